/**
 * The codecs of a migration's extra channels (multifd, postcopy-preempt): the seam where a codec that
 * reuses pages on those channels plugs in. Today every extra channel is relayed verbatim; the main
 * channel keeps StreamEncoder / StreamDecoder.
 *
 * Both ends count and check what they carried, as the main channel does: the sender's channel End
 * names the bytes it read and their XXH3-64, and the receiver compares them with what it passed on.
 */
import { StreamHash } from '../digest';

/** Where a channel encoder's output goes: Literal frames (a codec that reuses pages adds its own). */
export interface ChannelFrames {
  literal(bytes: Buffer): void;
}

/** The sending side of one extra channel: the source's bytes in, frames out. */
export interface ChannelEncoder {
  push(chunk: Buffer): void;
  /** Bytes read from the source. */
  readonly streamBytes: number;
  /** XXH3-64 of them, 16 hex digits. */
  readonly streamCheck: string;
}

/** The receiving side: frames in, the channel's bytes out to the destination. */
export interface ChannelDecoder {
  literal(payload: Buffer): void;
  /** Bytes handed to the destination. */
  readonly streamBytes: number;
  readonly streamCheck: string;
}

/** Counts and hashes a channel's bytes (both verbatim codecs). */
class ChannelTally {
  private readonly hash = new StreamHash();
  streamBytes = 0;

  add(bytes: Buffer): void {
    this.hash.update(bytes);
    this.streamBytes += bytes.length;
  }

  get streamCheck(): string {
    return this.hash.digest();
  }
}

/** Sends the channel as it is: one Literal frame per chunk read. */
export class VerbatimChannelEncoder implements ChannelEncoder {
  private readonly tally = new ChannelTally();

  constructor(private readonly frames: ChannelFrames) {}

  push(chunk: Buffer): void {
    this.tally.add(chunk);
    this.frames.literal(chunk);
  }

  get streamBytes(): number {
    return this.tally.streamBytes;
  }

  get streamCheck(): string {
    return this.tally.streamCheck;
  }
}

/** Passes Literal bytes on as they are. */
export class VerbatimChannelDecoder implements ChannelDecoder {
  private readonly tally = new ChannelTally();

  constructor(private readonly output: (bytes: Buffer) => void) {}

  literal(payload: Buffer): void {
    this.tally.add(payload);
    this.output(payload);
  }

  get streamBytes(): number {
    return this.tally.streamBytes;
  }

  get streamCheck(): string {
    return this.tally.streamCheck;
  }
}
