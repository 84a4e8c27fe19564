/**
 * The WAN protocol between two bfmig gateways: length-prefixed frames over one TCP (or TLS)
 * connection per migration. It knows nothing of QEMU: Literal and Run payloads are defined by the
 * proxy layer; this module only moves and bounds them.
 *
 *   frame = u8 type | u32 payload length | payload
 */
import { Fifo } from '../common/fifo';

/**
 * 2: End carries a check of the whole stream; 3: that check is XXH3-64 (was CRC-32); 4: Seal checks
 * the stream as soon as the sender has parsed its end, before the receiver lets the destination finish;
 * 5: a migration has extra channels (multifd, postcopy-preempt), one connection each, whose Hello names
 * the migration and the channel (HelloMessage.channel).
 * Compression, deltas, siblings and batches of whole frames are not versions: they are negotiated within
 * 4 (Hello.compression, Offer.compression, Offer.features, Hello.siblings and Offer.siblings), so a
 * gateway from before them still migrates with one after them, without them.
 */
export const PROTOCOL_VERSION = 5;
/**
 * What a main channel's Hello says: a version-4 peer accepts it (and ignores its `migration`), so a
 * single-channel migration still goes to a peer that knows no extra channels. Receivers take both.
 */
export const SINGLE_CHANNEL_PROTOCOL = 4;
export const FRAME_HEADER_BYTES = 5;
const NO_BYTES = Buffer.alloc(0);
/** Larger frames are refused: a peer cannot make us buffer more than this per frame. */
export const MAX_FRAME_PAYLOAD = 4 * 1024 * 1024;
/** Control frames exchanged before a migration is accepted (Hello, Offer) are small: a peer that has
 * not yet said who it is cannot make us buffer more than this. */
export const MAX_HANDSHAKE_PAYLOAD = 4 * 1024;

export const enum FrameType {
  /** Sender → receiver, first frame: JSON HelloMessage. */
  Hello = 1,
  /** Receiver → sender, answer to Hello: JSON OfferMessage (what it holds for the VM). */
  Offer = 2,
  /** Sender → receiver: send your digest table (empty payload). */
  TableRequest = 3,
  /** Receiver → sender: the next piece of the digest table. */
  TableData = 4,
  /** Receiver → sender: the digest table is complete (empty payload). */
  TableEnd = 5,
  /** Sender → receiver: bytes of the stream, to be passed on as they are. */
  Literal = 6,
  /** Sender → receiver: a run of records the receiver rebuilds itself. */
  Run = 7,
  /** Receiver → sender: bytes the destination sent back (QEMU's return path). */
  Return = 8,
  /**
   * Sender → receiver: the source's stream ended: JSON EndMessage. On an extra channel it carries only
   * the SealMessage fields (the channel's length and check), and the connection closes after it.
   */
  End = 9,
  /** Receiver → sender: the destination has every byte and the store committed: JSON DoneMessage. */
  Done = 10,
  /** Either way: the migration is over, with JSON AbortMessage saying why. */
  Abort = 11,
  /**
   * Sender → receiver: the sender has parsed the whole stream (nothing can follow it) although the
   * source has not closed: JSON SealMessage. Until a Seal or End check passes, the receiver holds the
   * stream's device-state tail back, so the destination cannot finish loading a damaged stream.
   */
  Seal = 12,
  /**
   * Sender → receiver, only when the Offer chose compression: Literal bytes, zstd-compressed
   * (wire/compression.ts). A peer that was not offered compression never receives one.
   */
  Compressed = 13,
  /**
   * Sender → receiver: a page that changed since the version both sides hold, as a delta against it
   * (payload defined by the proxy layer). Sent only to a receiver whose Offer lists `delta`.
   */
  Delta = 14,
  /**
   * Sender → receiver: a page whose content a sibling's retained snapshot holds, as a Delta from that
   * sibling's page (payload defined by the proxy layer: the sibling's place in the Offer's `siblings`,
   * then a Delta payload). Sent only for siblings the receiver's Offer confirmed.
   */
  SiblingDelta = 15,
  /**
   * Sender → receiver, only when the Offer chose compression and lists `compressed-frames`: whole
   * frames (Literal, Run, Delta, SiblingDelta, KeepVersion, PacketHeader, in stream order) compressed as one batch, so that the
   * Runs and Deltas between Literal bytes do not cut the batches short (wire/compression.ts).
   */
  CompressedFrames = 16,
  /**
   * Sender → receiver, only to a receiver whose Offer lists `channel-earlier-bases`: the page the payload
   * names (defined by the proxy layer) is about to be written; keep the version held now until the
   * epoch is over, for Deltas that go against it.
   */
  KeepVersion = 17,
  /**
   * Sender → receiver, on a multifd channel, only to a receiver whose Offer lists
   * `channel-packet-headers`: stream bytes coded against those the channel's previous such frame stood
   * for (payload defined by the proxy layer: a packet's header and offsets).
   */
  PacketHeader = 18,
}

/** What a CompressedFrames batch may carry: stream data, never control frames or another batch. */
export function carriedInBatches(type: FrameType): boolean {
  return (
    type === FrameType.Literal ||
    type === FrameType.Run ||
    type === FrameType.Delta ||
    type === FrameType.SiblingDelta ||
    type === FrameType.KeepVersion ||
    type === FrameType.PacketHeader
  );
}

/**
 * Checks that `batch` (a CompressedFrames payload, inflated) is whole frames of the types a batch may
 * carry, end to end, and shows each to `look` (its payload is batch[at, at + length)): a bad batch
 * throws a WireError before any of its frames is delivered.
 */
export function checkCarriedFrames(batch: Buffer, look: (type: FrameType, batch: Buffer, at: number, length: number) => void): void {
  let at = 0;
  while (at < batch.length) {
    if (at + FRAME_HEADER_BYTES > batch.length) throw new WireError(`CompressedFrames: a frame header cut off at byte ${at} of ${batch.length}`);
    const type = batch[at] as FrameType;
    const length = batch.readUInt32BE(at + 1);
    if (!carriedInBatches(type)) throw new WireError(`CompressedFrames: frame type ${type} cannot be carried in a batch`);
    const end = at + FRAME_HEADER_BYTES + length;
    if (end > batch.length) throw new WireError(`CompressedFrames: a frame of ${length} bytes at byte ${at} runs past the batch's ${batch.length}`);
    look(type, batch, at + FRAME_HEADER_BYTES, length);
    at = end;
  }
}

/** Most siblings a Hello may name (and a route list): each costs the sender its digest table and an index. */
export const MAX_SIBLINGS = 4;

/** A sibling's retained snapshot, as a Hello names it. */
export interface SiblingSnapshot {
  vm: string;
  snapshotId: string;
}

/**
 * What a receiver takes beyond its protocol version, listed in its Offer; a sender uses only what is
 * listed, so gateways of one protocol version but different releases still work together.
 */
export const enum Feature {
  Delta = 'delta',
  /**
   * The receiver reads the base pages of the Deltas in each chunk it receives together, before it
   * rebuilds them (its device serves them in parallel): a Delta against another page costs it little.
   */
  BasesAhead = 'bases-ahead',
  /** The receiver takes CompressedFrames: Runs and Deltas travel inside the compressed batches. */
  CompressedFrames = 'compressed-frames',
  /**
   * The receiver takes Delta frames on multifd channels too: a page of a packet as the ranges that changed
   * from the version of that page both sides hold (proxy/multifd-encoder.ts).
   */
  ChannelDeltas = 'channel-deltas',
  /**
   * The receiver takes SiblingDelta frames on multifd channels too, and reads their pages ahead: a page
   * of a packet as a reference to a page of a sibling's snapshot it confirmed (proxy/multifd-encoder.ts).
   */
  ChannelSiblings = 'channel-siblings',
  /**
   * The receiver takes Delta frames on multifd channels against other pages too (a content match, or a
   * page like it), written in the same epoch already: it holds such a Delta back until that page's write
   * has been rebuilt, on whatever channel (proxy/multifd-decoder.ts).
   */
  ChannelMatches = 'channel-matches',
  /**
   * The receiver takes CompressedFrames on multifd channels too: a channel's Runs and Deltas travel inside
   * its compressed batches, which then no longer end at each of them.
   */
  ChannelCompressedFrames = 'channel-compressed-frames',
  /**
   * The receiver takes Deltas on multifd channels against another page's version of an earlier epoch
   * too, and KeepVersion frames, on the channels and the main connection, before a write of such a base
   * in the epoch (proxy/multifd-migration.ts): where QEMU syncs the channels after every RAM section
   * (7.2; later versions on machine types of 8.0 and before) an epoch is a few megabytes.
   */
  ChannelEarlierBases = 'channel-earlier-bases',
  /**
   * The receiver takes Seal frames on multifd channels: the sender checks each channel (its length and
   * XXH3-64 so far) right after every SYNC packet, and says so in the channel's Hello; the receiver holds
   * each SYNC packet back from its destination until that check has passed (proxy/multifd-decoder.ts).
   */
  ChannelChecks = 'channel-checks',
  /**
   * The receiver takes PacketHeader frames on multifd channels: a packet's header and offsets, coded
   * against the channel's previous header (proxy/packet-header.ts), in place of their Literal bytes.
   */
  ChannelPacketHeaders = 'channel-packet-headers',
}

export interface HelloMessage {
  protocol: number;
  /** The sending site's name, for logs. */
  site: string;
  vm: string;
  /** HOST:PORT of the destination QEMU, as the receiving gateway reaches it. */
  target: string;
  /** What the sender can compress Literal bytes with (wire/compression.ts); absent before compression. */
  compression?: string[];
  /** Protocol 5: the migration's id (a random UUID), which its extra channels name. */
  migration?: string;
  /** Protocol 5: this connection carries an extra channel of migration `migration`, not its stream. */
  channel?: ChannelName;
  /** A multifd channel's Hello: how many multifd channels the sender had when it opened this one. */
  channels?: number;
  /** A multifd channel's Hello: a Seal frame follows every SYNC packet on it (Feature.ChannelChecks). */
  channelChecks?: boolean;
  /** The siblings whose snapshots the sender holds (route `siblings`); absent before siblings. */
  siblings?: SiblingSnapshot[];
}

/** An extra channel of a migration: a multifd channel by its index, or the postcopy-preempt channel. */
export interface ChannelName {
  /** 'encrypted': one connection of a migration under QEMU's own TLS, carried as it is on its own. */
  kind: 'multifd' | 'preempt' | 'encrypted';
  /** The multifd channel's id (0 for the preempt channel). */
  index: number;
}

export interface OfferMessage {
  site: string;
  /** The complete snapshot the receiver holds for the VM, if any. */
  snapshotId: string | null;
  /** Layout of what it holds (pages may be held even without a complete snapshot). */
  layoutId: string | null;
  pageCount: number;
  presentPages: number;
  /** The compression the receiver chose from the Hello's list; absent or null: none. */
  compression?: string | null;
  /** Feature names the receiver takes (absent from older receivers: none). */
  features?: string[];
  /**
   * The Hello's siblings the receiver holds at the same snapshot and has pinned for this migration, by
   * name; a SiblingDelta names one by its place in this list. Absent from older receivers: none.
   */
  siblings?: string[];
}

/** The length and XXH3-64 of the whole QEMU stream, as the sender read it. */
export interface SealMessage {
  /** Bytes of the QEMU stream the sender read from the source. */
  streamBytes: number;
  /**
   * XXH3-64 of those bytes, 16 hex digits: the receiver checks the stream it rebuilt against it, so
   * bytes damaged between the gateways fail the migration instead of reaching the destination unnoticed.
   */
  streamCheck: string;
}

/** The source closed its stream: the check once more, and the snapshot id both stores will commit. */
export interface EndMessage extends SealMessage {
  /** The id both stores will give the snapshot this migration leaves. */
  snapshotId: string;
  /**
   * Protocol 5: the extra channels the migration had at the sender. The receiver completes it only once
   * as many have joined: a source QEMU may have sent everything before its last channel crossed the WAN.
   */
  channels?: number;
}

export interface DoneMessage {
  snapshotId: string;
  streamBytes: number;
}

export interface AbortMessage {
  error: string;
}

export class WireError extends Error {
  override readonly name: string = 'WireError';
}

/** A frame header announced more payload than the parser accepts (refused before any of it is buffered). */
export class FrameTooLargeError extends WireError {
  override readonly name = 'FrameTooLargeError';
}

/** The 5-byte header of a frame, to be written before (or corked with) its payload. */
export function frameHeader(type: FrameType, length: number): Buffer {
  if (length > MAX_FRAME_PAYLOAD) throw new WireError(`frame of ${length} bytes exceeds ${MAX_FRAME_PAYLOAD}`);
  const header = Buffer.allocUnsafe(FRAME_HEADER_BYTES);
  header[0] = type;
  header.writeUInt32BE(length, 1);
  return header;
}

/** A whole frame in one buffer: for control messages, not for bulk data. */
export function encodeFrame(type: FrameType, payload: Buffer = Buffer.alloc(0)): Buffer {
  return Buffer.concat([frameHeader(type, payload.length), payload]);
}

export function encodeJson(type: FrameType, message: object): Buffer {
  return encodeFrame(type, Buffer.from(JSON.stringify(message), 'utf8'));
}

type FieldType = 'string' | 'number' | 'nullableString';

function decodeJson<T>(payload: Buffer, what: string, fields: Record<string, FieldType>): T {
  let value: unknown;
  try {
    value = JSON.parse(payload.toString('utf8'));
  } catch {
    throw new WireError(`${what}: not JSON`);
  }
  if (typeof value !== 'object' || value === null) throw new WireError(`${what}: not an object`);
  const record = value as Record<string, unknown>;
  for (const [key, type] of Object.entries(fields)) {
    const v = record[key];
    const ok =
      type === 'string' ? typeof v === 'string' : type === 'number' ? typeof v === 'number' && Number.isFinite(v) && v >= 0 : v === null || typeof v === 'string';
    if (!ok) throw new WireError(`${what}: field ${key} is not a ${type}`);
  }
  return value as T;
}

export function decodeHello(p: Buffer): HelloMessage {
  const hello = decodeJson<HelloMessage>(p, 'Hello', { protocol: 'number', site: 'string', vm: 'string', target: 'string' });
  if (hello.migration !== undefined && typeof hello.migration !== 'string') throw new WireError('Hello: field migration is not a string');
  const siblings: unknown = hello.siblings;
  if (siblings !== undefined && !(Array.isArray(siblings) && siblings.length <= MAX_SIBLINGS && siblings.every(isSiblingSnapshot))) {
    throw new WireError(`Hello: field siblings is not a list of at most ${MAX_SIBLINGS} {vm, snapshotId}`);
  }
  const channel: unknown = hello.channel;
  if (channel === undefined) return hello;
  if (hello.migration === undefined) throw new WireError('Hello: a channel without its migration');
  if (hello.channels !== undefined && !(Number.isInteger(hello.channels) && hello.channels >= 1 && hello.channels <= 256)) throw new WireError('Hello: field channels is not 1..256');
  if (hello.channelChecks !== undefined && typeof hello.channelChecks !== 'boolean') throw new WireError('Hello: field channelChecks is not a boolean');
  const c = channel as Partial<ChannelName> | null;
  if (typeof c !== 'object' || c === null || (c.kind !== 'multifd' && c.kind !== 'preempt' && c.kind !== 'encrypted') || !Number.isInteger(c.index) || (c.index as number) < 0 || (c.index as number) > 255) {
    throw new WireError('Hello: field channel is not {kind: "multifd" | "preempt" | "encrypted", index: 0..255}');
  }
  return { ...hello, channel: { kind: c.kind, index: c.index as number }, channels: hello.channels, channelChecks: hello.channelChecks };
}
function isSiblingSnapshot(v: unknown): v is SiblingSnapshot {
  if (typeof v !== 'object' || v === null) return false;
  const { vm, snapshotId } = v as Record<string, unknown>;
  return typeof vm === 'string' && typeof snapshotId === 'string';
}

export const decodeOffer = (p: Buffer): OfferMessage => {
  const offer = decodeJson<OfferMessage>(p, 'Offer', { site: 'string', snapshotId: 'nullableString', layoutId: 'nullableString', pageCount: 'number', presentPages: 'number' });
  const features: unknown = offer.features;
  if (features !== undefined && !(Array.isArray(features) && features.length <= 64 && features.every((f) => typeof f === 'string'))) {
    throw new WireError('Offer: field features is not a list of names');
  }
  const siblings: unknown = offer.siblings;
  if (siblings !== undefined && !(Array.isArray(siblings) && siblings.length <= MAX_SIBLINGS && siblings.every((s) => typeof s === 'string'))) {
    throw new WireError(`Offer: field siblings is not a list of at most ${MAX_SIBLINGS} names`);
  }
  return offer;
};

/** Whether an Offer lists a feature. */
export const offers = (offer: OfferMessage, feature: Feature): boolean => offer.features?.includes(feature) ?? false;
export function decodeEnd(p: Buffer): EndMessage {
  const end = decodeJson<EndMessage>(p, 'End', { streamBytes: 'number', streamCheck: 'string', snapshotId: 'string' });
  if (end.channels !== undefined && !(Number.isInteger(end.channels) && end.channels >= 0 && end.channels <= 256)) throw new WireError('End: field channels is not 0..256');
  return end;
}
export const decodeSeal = (p: Buffer): SealMessage => decodeJson(p, 'Seal', { streamBytes: 'number', streamCheck: 'string' });
export const decodeDone = (p: Buffer): DoneMessage => decodeJson(p, 'Done', { snapshotId: 'string', streamBytes: 'number' });
export const decodeAbort = (p: Buffer): AbortMessage => decodeJson(p, 'Abort', { error: 'string' });

/** `carried`: the frame came inside a CompressedFrames batch (FrameParser.nest), not on its own. */
export type FrameHandler = (type: FrameType, payload: Buffer, carried: boolean) => void;

/**
 * Shown the frames of each chunk pushed before any of them is delivered: for work that pays to start
 * early (a receiver's store reads for the Deltas in the chunk, which the device serves in parallel).
 */
export interface FrameLookahead {
  /** Payload bytes wanted of each frame of the types `wants` names. */
  readonly headBytes: number;
  wants(type: FrameType): boolean;
  /**
   * A whole frame has arrived: its first `length` = min(headBytes, payload length) payload bytes are
   * head[0 .. length) (a buffer reused from call to call: valid during the call only).
   */
  look(type: FrameType, head: Buffer, length: number): void;
  /** Every whole frame that arrived has been looked at; their delivery follows. */
  looked(): void;
  /** Frame types whose whole payload is wanted (a CompressedFrames batch, to inflate as it arrives). */
  wantsWhole?(type: FrameType): boolean;
  /**
   * A whole frame of a type wantsWhole names has arrived: its payload (a view of the input, or a copy
   * where it spans chunks: valid during the call only). Whether the frames it carries were looked at.
   */
  lookWhole?(type: FrameType, payload: Buffer): boolean;
}

/**
 * An incremental frame parser. Payloads that arrived within one chunk are views of it; others are
 * assembled in a buffer of their own — except for the frame types `streamed` names, whose payloads are
 * delivered piece by piece as they arrive (views, never copies), for bytes that need no assembling.
 * The handler may call pause() to stop delivery mid-chunk (the rest is kept) until resume(): that is
 * how a receiver whose destination is slow stops expanding frames into megabytes of output.
 */
export class FrameParser {
  private readonly chunks = new Fifo<Buffer>();
  private buffered = 0;
  private paused = false;
  private delivering = false;
  /** The streamed frame being delivered, and how many of its payload bytes are still to come. */
  private streamType: FrameType = FrameType.Literal;
  private streamRemaining = 0;
  /** Largest payload accepted, checked on the header before any payload is buffered; may change between frames. */
  maxPayload = MAX_FRAME_PAYLOAD;

  /** Frames a frame carried (nest()), delivered before any frame after it, and where the next one starts. */
  private nested: Buffer = NO_BYTES;
  private nestedAt = 0;

  /** Bytes taken from the front since the first push: where chunks[0] starts in the input. */
  private taken = 0;
  /** Where in the input the first frame not yet looked at starts (FrameLookahead). */
  private lookedTo = 0;
  private lookHead: Buffer | null = null;

  constructor(
    private readonly handler: FrameHandler,
    private readonly streamed: (type: FrameType) => boolean = () => false,
    private readonly lookahead: FrameLookahead | null = null,
  ) {}

  get isPaused(): boolean {
    return this.paused;
  }

  /** Bytes received but not yet delivered as frames. */
  get pending(): number {
    return this.buffered;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    if (this.lookahead !== null) this.lookAhead(this.lookahead);
    this.deliver();
  }

  /**
   * Shows the lookahead the whole frames that arrived since it last looked. A frame whose payload is
   * still arriving is looked at once it is whole; a streamed frame is stepped over from its header.
   */
  private lookAhead(lookahead: FrameLookahead): void {
    const end = this.taken + this.buffered;
    let at = this.lookedTo;
    if (at + FRAME_HEADER_BYTES > end) return;
    const head = (this.lookHead ??= Buffer.allocUnsafe(Math.max(FRAME_HEADER_BYTES, lookahead.headBytes)));
    // A cursor on the chunks: chunk ci, byte off of it is input byte `at`.
    let ci = 0;
    let off = at - this.taken;
    while (off >= this.chunks.at(ci).length) off -= this.chunks.at(ci++).length;
    const copy = (n: number): void => {
      for (let filled = 0; filled < n; ) {
        const c = this.chunks.at(ci);
        const take = Math.min(c.length - off, n - filled);
        c.copy(head, filled, off, off + take);
        filled += take;
        off += take;
        if (off === c.length && ci + 1 < this.chunks.length) {
          ci++;
          off = 0;
        }
      }
    };
    const skip = (n: number): void => {
      off += n;
      while (ci < this.chunks.length - 1 && off >= this.chunks.at(ci).length) off -= this.chunks.at(ci++).length;
    };
    /** The next n bytes: a view when they lie in one chunk, else a copy; the cursor steps past them. */
    const whole = (n: number): Buffer => {
      skip(0);
      const c = this.chunks.at(ci);
      if (c.length - off >= n) {
        const view = c.subarray(off, off + n);
        skip(n);
        return view;
      }
      const out = Buffer.allocUnsafe(n);
      for (let filled = 0; filled < n; ) {
        const from = this.chunks.at(ci);
        const take = Math.min(from.length - off, n - filled);
        from.copy(out, filled, off, off + take);
        filled += take;
        skip(take);
      }
      return out;
    };
    let seen = false;
    while (at + FRAME_HEADER_BYTES <= end) {
      copy(FRAME_HEADER_BYTES);
      const type = head[0] as FrameType;
      const length = head.readUInt32BE(1);
      if (length > 0 && this.streamed(type)) {
        at += FRAME_HEADER_BYTES + length;
        if (at >= end) break;
        skip(length);
        continue;
      }
      if (at + FRAME_HEADER_BYTES + length > end) break;
      if (lookahead.wantsWhole?.(type) === true) {
        // Its delivery would refuse it too; a payload is not copied past the limit.
        if (length > this.maxPayload) throw new FrameTooLargeError(`frame of ${length} bytes exceeds ${this.maxPayload}`);
        if (lookahead.lookWhole?.(type, whole(length)) === true) seen = true;
      } else if (lookahead.wants(type)) {
        const n = Math.min(lookahead.headBytes, length);
        copy(n);
        lookahead.look(type, head, n);
        seen = true;
        skip(length - n);
      } else {
        skip(length);
      }
      at += FRAME_HEADER_BYTES + length;
    }
    this.lookedTo = at;
    if (seen) lookahead.looked();
  }

  pause(): void {
    this.paused = true;
  }

  /**
   * From the handler, for a frame whose payload carries frames (an inflated CompressedFrames batch,
   * checked whole by checkCarriedFrames): they are delivered next, before any frame after it, pausing
   * between them as between any others, so a slow destination stops a batch's Runs midway too.
   */
  nest(batch: Buffer): void {
    if (!this.delivering || this.nestedAt < this.nested.length) throw new Error('FrameParser.nest: only from the handler, one batch at a time');
    this.nested = batch;
    this.nestedAt = 0;
  }

  /** Delivers the next carried frame; false when none is left. */
  private deliverNested(): boolean {
    const batch = this.nested;
    const at = this.nestedAt;
    if (at >= batch.length) return false;
    const end = at + FRAME_HEADER_BYTES + batch.readUInt32BE(at + 1);
    this.nestedAt = end;
    if (end >= batch.length) this.nested = NO_BYTES;
    this.handler(batch[at] as FrameType, batch.subarray(at + FRAME_HEADER_BYTES, end), true);
    return true;
  }

  resume(): void {
    this.paused = false;
    this.deliver();
  }

  /** True when the input ended between frames. */
  get atBoundary(): boolean {
    return this.buffered === 0 && this.streamRemaining === 0 && this.nestedAt >= this.nested.length;
  }

  /**
   * Makes the bytes still held of the last chunk pushed (a frame cut by its end, or its rest while
   * paused) a copy of their own: for a caller that reuses its chunk buffers once push() has returned.
   * Called after every push(), so what is held of earlier chunks is a copy already.
   */
  ownRetained(): void {
    const last = this.chunks.length - 1;
    if (last >= 0) this.chunks.set(last, Buffer.from(this.chunks.at(last)));
  }

  private deliver(): void {
    if (this.delivering) return;
    this.delivering = true;
    try {
      while (!this.paused) {
        if (this.nestedAt < this.nested.length && this.deliverNested()) continue;
        if (this.streamRemaining > 0) {
          if (this.buffered === 0) break;
          const piece = this.consume(Math.min(this.chunks.at(0).length, this.streamRemaining));
          this.streamRemaining -= piece.length;
          this.handler(this.streamType, piece, false);
          continue;
        }
        if (this.buffered < FRAME_HEADER_BYTES) break;
        const head = this.peekHeader();
        const type = head[0] as FrameType;
        const length = head.readUInt32BE(1);
        if (length > this.maxPayload) throw new FrameTooLargeError(`frame of ${length} bytes exceeds ${this.maxPayload}`);
        if (length > 0 && this.streamed(type)) {
          this.consume(FRAME_HEADER_BYTES);
          this.streamType = type;
          this.streamRemaining = length;
          continue;
        }
        if (this.buffered < FRAME_HEADER_BYTES + length) break;
        this.consume(FRAME_HEADER_BYTES);
        const payload = this.consume(length);
        this.handler(type, payload, false);
      }
    } finally {
      this.delivering = false;
    }
  }

  private peekHeader(): Buffer {
    const first = this.chunks.at(0);
    if (first.length >= FRAME_HEADER_BYTES) return first;
    return this.gather(FRAME_HEADER_BYTES, false);
  }

  /** Takes n bytes from the front: a view when they lie in one chunk, else a new buffer. */
  private consume(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    return this.gather(n, true);
  }

  private gather(n: number, remove: boolean): Buffer {
    const first = this.chunks.at(0);
    if (first.length >= n) {
      if (!remove) return first.subarray(0, n);
      const out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks.set(0, first.subarray(n));
      this.buffered -= n;
      this.taken += n;
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    // Chunks [0, whole) are taken whole; the last one taken from may keep a tail.
    let whole = 0;
    while (filled < n) {
      const c = this.chunks.at(whole);
      const take = Math.min(c.length, n - filled);
      c.copy(out, filled, 0, take);
      filled += take;
      if (take < c.length) {
        if (remove) this.chunks.set(whole, c.subarray(take));
        break;
      }
      whole++;
    }
    if (remove) {
      for (let i = 0; i < whole; i++) this.chunks.shift();
      this.buffered -= n;
      this.taken += n;
    }
    return out;
  }
}
