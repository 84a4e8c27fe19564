/**
 * The codecs of a migration's extra channels (multifd, postcopy-preempt): a multifd channel goes
 * through MultifdEncoder / MultifdDecoder (pages the far site holds as Runs, in the migration's
 * MultifdMigration beside the main channel's StreamEncoder / StreamDecoder); a preempt channel, or one
 * whose migration has no block list, is relayed verbatim.
 *
 * Both ends count and check what they carried, as the main channel does: the sender's channel End
 * names the bytes it read and their XXH3-64, and the receiver compares them with what it passed on.
 */
import { StreamHash } from '../digest';
import { DELTA_AHEAD_BYTES, SIBLING_DELTA_LEAD_BYTES } from './page-delta';
import { RUN_LEAD_BYTES } from './run';
import type { EncoderSink } from './encoder';
import { MultifdDecoder } from './multifd-decoder';
import { MultifdEncoder } from './multifd-encoder';
import type { MultifdMigration } from './multifd-migration';

/** What both sides' codecs share: the barrier may park them (see MultifdMigration). */
interface ParkingCodec {
  /** Waiting for the migration's other channels: stop reading this channel's input until onReadOn. */
  readonly parked: boolean;
  /** Called when a parked codec may read on again. */
  onReadOn: (() => void) | null;
}

/**
 * A channel frame's first bytes its codec is shown ahead of it (aheadOfRun() and the others): where a
 * Run's pages are, and a Delta's or SiblingDelta's base with the digest it names.
 */
export const CHANNEL_AHEAD_BYTES = Math.max(RUN_LEAD_BYTES, SIBLING_DELTA_LEAD_BYTES + DELTA_AHEAD_BYTES);

/** The sending side of one extra channel: the source's bytes in, frames out. */
export interface ChannelEncoder extends ParkingCodec {
  /** Throws on malformed input. */
  push(chunk: Buffer): void;
  /** The chunk last pushed is about to be read into again: whatever the codec keeps of it, it copies. */
  releaseInput(): void;
  /**
   * Whether saving WAN bytes pays on this channel now (its compression policy's savingPays, which the
   * relay sets per chunk): a multifd channel looks for pages elsewhere in the VM only then.
   */
  savingPays?: boolean;
  /** The source closed the channel: `ended` once every byte pushed has gone out (the End may go). */
  end(ended: () => void): void;
  /** Bytes read from the source. */
  readonly streamBytes: number;
  /** XXH3-64 of them, 16 hex digits. */
  readonly streamCheck: string;
  /** A multifd channel's Deltas against another page's version of an earlier epoch, and its KeepVersion frames. */
  readonly earlierBaseDeltas?: number;
  readonly versionsKept?: number;
  /** Header bytes a multifd channel's PacketHeader frames kept off the WAN. */
  readonly headerSavedBytes?: number;
}

/** The receiving side: frames in, the channel's bytes out to the destination. */
export interface ChannelDecoder extends ParkingCodec {
  literal(payload: Buffer): void;
  /** The Literal bytes last given are about to be read into again: whatever the codec keeps of them, it copies. */
  releaseInput(): void;
  run(payload: Buffer): void;
  /** A Delta frame: a multifd channel's only (Feature.ChannelDeltas). */
  delta?(payload: Buffer): void;
  /** A SiblingDelta frame: a multifd channel's only (Feature.ChannelSiblings). */
  siblingDelta?(payload: Buffer): void;
  /** A KeepVersion frame: a multifd channel's only (Feature.ChannelEarlierBases). */
  keepVersion?(payload: Buffer): void;
  /** A PacketHeader frame: a multifd channel's only (Feature.ChannelPacketHeaders). */
  packetHeader?(payload: Buffer): void;
  /** Header bytes a multifd channel's PacketHeader frames kept off the WAN. */
  readonly headerSavedBytes?: number;
  /**
   * A Run frame has arrived, to be given to run() after the frames before it: head[0 .. length) are its
   * payload's first bytes (CHANNEL_AHEAD_BYTES at most; valid during the call only). Every Run frame, in order.
   */
  aheadOfRun?(head: Buffer, length: number): void;
  /** As aheadOfRun(), for each Delta frame. */
  aheadOfDelta?(head: Buffer, length: number): void;
  /** As aheadOfRun(), for each SiblingDelta frame. */
  aheadOfSibling?(head: Buffer, length: number): void;
  /** The frames that arrived have all been shown to aheadOf…(): reads ahead may start. */
  prefetchAhead?(): void;
  /**
   * A Seal frame (Feature.ChannelChecks): the sender's length and XXH3-64 of the channel so far; throws
   * unless the channel rebuilt to there matches (taken in order with the frames around it).
   */
  check(streamBytes: number, streamCheck: string): void;
  /**
   * A SYNC packet is held back for a check that has not come, and no frame waits before it: the next
   * frame, that check, is taken even while the codec is parked (which it may well be, right after a SYNC).
   */
  readonly checkDue?: boolean;
  /** The sender's End: throws unless the channel was rebuilt whole; `ended` once that has been checked. */
  end(streamBytes: number, streamCheck: string, ended: () => void): void;
  /** Bytes handed to the destination. */
  readonly streamBytes: number;
  readonly streamCheck: string;
}

/** A multifd channel's encoder when its migration has a MultifdMigration, else a verbatim one. */
export function channelEncoder(frames: EncoderSink, multifd: MultifdMigration | null): ChannelEncoder {
  return multifd ? new MultifdEncoder(frames, multifd) : new VerbatimChannelEncoder(frames);
}

/**
 * The receiving side's counterpart of channelEncoder. `allocate`: where a multifd Run's pages are laid
 * out (output then owns the buffer); `holdsSyncs`: the sender checks the channel after every SYNC
 * packet, which waits for its check (MultifdDecoder.holdsSyncs).
 */
export function channelDecoder(output: (bytes: Buffer) => void, multifd: MultifdMigration | null, allocate?: (size: number) => Buffer, holdsSyncs = false): ChannelDecoder {
  if (!multifd) return new VerbatimChannelDecoder(output);
  const decoder = new MultifdDecoder(output, multifd, allocate);
  decoder.holdsSyncs = holdsSyncs;
  return decoder;
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
  readonly parked = false;
  onReadOn: (() => void) | null = null;

  constructor(private readonly frames: EncoderSink) {}

  push(chunk: Buffer): void {
    this.tally.add(chunk);
    this.frames.literal(chunk);
  }

  /** Nothing is kept past a push. */
  releaseInput(): void {}

  end(ended: () => void): void {
    ended();
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
  readonly parked = false;
  onReadOn: (() => void) | null = null;

  constructor(private readonly output: (bytes: Buffer) => void) {}

  literal(payload: Buffer): void {
    this.tally.add(payload);
    this.output(payload);
  }

  /** Nothing is kept past a frame. */
  releaseInput(): void {}

  run(): void {
    throw new Error('a Run on a channel relayed verbatim');
  }

  /** Checked, but nothing was held back for it: a channel not parsed has no SYNC packets to hold. */
  check(streamBytes: number, streamCheck: string): void {
    const passed = this.tally;
    if (streamBytes !== passed.streamBytes || streamCheck !== passed.streamCheck) {
      throw new Error(`${passed.streamBytes} bytes (XXH3-64 ${passed.streamCheck}) passed on, the sender read ${streamBytes} (${streamCheck})`);
    }
  }

  end(streamBytes: number, streamCheck: string, ended: () => void): void {
    this.check(streamBytes, streamCheck);
    ended();
  }

  get streamBytes(): number {
    return this.tally.streamBytes;
  }

  get streamCheck(): string {
    return this.tally.streamCheck;
  }
}
