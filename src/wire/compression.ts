/**
 * zstd compression of the Literal bytes that cross the WAN (changed pages, page headers, device state):
 * one streaming context per migration on each side (native/zstd.c, libzstd), so each batch is
 * compressed against the stream before it.
 *
 * Negotiated in the handshake, within protocol 4: the sender's Hello lists what it can decompress for
 * (`compression: ["zstd"]`), the receiver's Offer names what it chose (`compression: "zstd"`). A
 * gateway that predates compression ignores the Hello's field and offers none, and one that is not
 * offered compression never sends a Compressed frame: both then carry Literal frames as before.
 *
 *   Compressed payload = u32 raw length | zstd bytes (a flushed part of the migration's zstd stream)
 *
 * A Literal frame (sent raw: incompressible, or the policy backed off) restarts the stream on both
 * sides: the sender's context has seen bytes the receiver's never will. Frames never grow: a batch whose
 * Compressed frame would not be smaller than its Literal frames goes as those.
 *
 * With a receiver whose Offer lists `compressed-frames`, a batch is whole frames instead: the Literal
 * bytes with their frame headers, and the Runs and Deltas between them, in stream order, as one
 * CompressedFrames frame. A Compressed batch must end at every Run or Delta (the receiver rebuilds them
 * in order), and where a guest's pages alternate between ones that cross and ones that do not (a
 * kernel's, a page cache's) that made batches of a page or two: a zstd call, a frame buffer and a
 * frame each (a first leg of a guest of real files made 12,690 batches under 32 KiB, 25 MB of its 179).
 * A batch that goes raw is its frames as they are, and the stream goes on across it (both sides' zstd
 * contexts saw neither), so device state after a stretch of raw batches still compresses against what
 * came before; only a compression attempt that failed restarts it, which the sender says with a
 * CompressedFrames frame declaring 0 bytes. A batch mostly of Runs and Deltas (held pages' digests,
 * changed bytes) is not worth a zstd call and goes raw without the policy weighing it: such batches, on
 * a back leg, failed to shrink enough and made the policy skip the compressible ones after them.
 *
 *   CompressedFrames payload = u32 raw length | zstd bytes of whole frames (FrameType.CompressedFrames)
 *                            | u32 0 (the stream restarts)
 */
import { errorMessage } from '../common/errors';
import { Fifo } from '../common/fifo';
import { nativeExport } from '../digest';
import { CompressionPolicy } from './compression-policy';
import { checkCarriedFrames, FRAME_HEADER_BYTES, type FrameParser, frameHeader, FrameType, WireError } from './frames';

export const ZSTD = 'zstd';
/** zstd's fastest regular level: at 1 it keeps up with a 1 Gbit/s link on one core. */
const ZSTD_LEVEL = 1;
/** 1 MiB of history on both sides; a decompressor refuses streams that need more. */
const ZSTD_WINDOW_LOG = 20;
/** Literal bytes compressed as one batch at most, and the most a Compressed frame may declare. */
export const MAX_BATCH_BYTES = 256 * 1024;
/** The raw length before a Compressed frame's zstd bytes. */
export const COMPRESSED_HEADER_BYTES = 4;
/** Smaller batches are not worth a zstd call. */
const MIN_BATCH_BYTES = 64;
/** A CompressedFrames frame declaring 0 bytes: the sender's zstd stream restarted (a failed attempt). */
const RESTART_FRAME = Buffer.from([FrameType.CompressedFrames, 0, 0, 0, COMPRESSED_HEADER_BYTES, 0, 0, 0, 0]);

type Handle = object;
/** What zstdCompressAsync reports: bytes written (-1: did not fit, -2: failed), the pool thread's CPU seconds, an error message. */
type CompressDone = (written: number, cpuSeconds: number, error?: string) => void;

interface ZstdAddon {
  zstdCompressorNew(level: number, windowLog: number): Handle;
  zstdCompress(h: Handle, inputs: Uint8Array[], out: Uint8Array, outOffset: number): number;
  zstdCompressorReset(h: Handle): void;
  /** As zstdCompress of [input], on libuv's thread pool; `done` on this thread (an addon built before it: absent). */
  zstdCompressAsync?: (h: Handle, input: Uint8Array, out: Uint8Array, outOffset: number, done: CompressDone) => void;
  zstdDecompressorNew(windowLogMax: number): Handle;
  zstdDecompress(h: Handle, input: Uint8Array, out: Uint8Array): void;
  zstdDecompressorReset(h: Handle): void;
}

function zstdAddon(): ZstdAddon {
  const names: (keyof ZstdAddon)[] = ['zstdCompressorNew', 'zstdCompress', 'zstdCompressorReset', 'zstdDecompressorNew', 'zstdDecompress', 'zstdDecompressorReset'];
  const fns = names.map((n) => nativeExport(n));
  if (!fns.every((f) => typeof f === 'function')) throw new Error('bfmig: the native addon was built without zstd; run `npm run build:native` (needs libzstd-dev)');
  const found = Object.fromEntries(names.map((n, i) => [n, fns[i]])) as unknown as ZstdAddon;
  const async = nativeExport('zstdCompressAsync');
  if (typeof async === 'function') found.zstdCompressAsync = async as ZstdAddon['zstdCompressAsync'];
  return found;
}

let addon: ZstdAddon | null = null;
const zstd = (): ZstdAddon => (addon ??= zstdAddon());

/**
 * Smaller batches are compressed on the event loop even with `offThread`, unless one is on the pool
 * already (they then queue behind it: one zstd stream). A trip to the pool cost 30–45 µs of CPU more
 * than the call itself, both threads counted (a 4 KiB batch 42 µs against 12, 64 KiB 153 against 111,
 * 256 KiB 455 against 413, one at a time on a quiet host), and a multifd channel, whose batches end at
 * every Run and Delta, made mostly small ones.
 */
const POOL_MIN_BATCH_BYTES = 64 * 1024;
/** Bytes of batches and frames held back behind a batch on the thread pool beyond which the session stops reading. */
const MAX_HELD_BYTES = 4 * MAX_BATCH_BYTES;

/**
 * CPU seconds the calling thread has used: what a batch's compression cost, where the wall clock also
 * counts time spent waiting for a core (an older addon without it: the wall clock).
 */
const threadCpuSeconds = ((): (() => number) => {
  const native = nativeExport('threadCpuSeconds');
  return typeof native === 'function' ? (native as () => number) : () => Number(process.hrtime.bigint()) / 1e9;
})();

/** The Hello's offer: what this sender can compress with (nothing when compression is off here). */
export function helloCompression(enabled: boolean): string[] {
  return enabled ? [ZSTD] : [];
}

/** The receiver's choice from a Hello (any JSON a peer sent): zstd when both sides have it, else null. */
export function chooseCompression(hello: { compression?: unknown }, enabled: boolean): typeof ZSTD | null {
  const offered = hello.compression;
  return enabled && Array.isArray(offered) && offered.includes(ZSTD) ? ZSTD : null;
}

/** The sender's reading of the Offer: what the receiver chose, which must be what the Hello offered. */
export function offeredCompression(offer: { compression?: unknown }, helloOffered: readonly string[]): typeof ZSTD | null {
  const chosen = offer.compression;
  if (chosen === undefined || chosen === null) return null;
  if (chosen !== ZSTD || !helloOffered.includes(ZSTD)) throw new WireError(`Offer: compression ${JSON.stringify(chosen)} was not offered`);
  return ZSTD;
}

/** Told once bytes handed to a writer have left (or failed to): a socket write's callback. */
export type WriteDone = (err?: Error | null) => void;

/** A compressed batch waiting for, or on, the thread pool (LiteralFrames with `offThread`). */
interface PoolBatch {
  /** The batch's bytes, copied: the views it was gathered from may be read into again meanwhile. */
  readonly input: Buffer;
  readonly total: number;
  /** The lengths of the pieces it was gathered from: a batch that did not shrink goes raw as they were. */
  readonly pieces: number[];
}

/** What waits behind a batch on the thread pool, in stream order. */
type Held = { bytes: Buffer; done: WriteDone | undefined } | { batch: PoolBatch } | { task: () => void };

/**
 * The sending side: Literal bytes in, Literal or Compressed frames out. Without compression each
 * Literal goes at once as it always has; with it, they are gathered (views, not copies) into batches of
 * up to MAX_BATCH_BYTES that leave at flush(), which the session calls before any other frame and
 * before the chunk the views point into may be reused.
 *
 * With `offThread`, a batch to be compressed is copied and compressed on libuv's thread pool, so that
 * the event loop parses, digests and relays the next source bytes meanwhile (a gateway with cores to
 * spare is then not held to one core's zstd rate, nor its multifd channels to one core between them).
 * Batches of a connection are compressed one after another (one zstd stream), and everything written
 * after a batch, through this object or inOrder(), is held back until the batch's frame has gone:
 * the WAN stream is the same, byte for byte, as compressing on the event loop would make it. The
 * session stops reading its source while `backlogged`, and weighs its backpressure again at onWritten.
 */
export class LiteralFrames {
  /** Bytes compression kept off the WAN (raw bytes less Compressed and CompressedFrames frames' payloads). */
  savedBytes = 0;
  private readonly compressor: Handle | null;
  readonly policy = new CompressionPolicy();
  /** Literal bytes (views); once carryFrames() was called, whole frames: headers, payloads. */
  private batch: Buffer[] = [];
  private batchBytes = 0;
  /** Of batchBytes, Literal bytes (what the policy weighs). */
  private batchLiteralBytes = 0;
  /** Batches carry whole frames (CompressedFrames): the receiver's Offer listed `compressed-frames`. */
  private framed = false;
  /** The zstd stream has data the receiver decompressed since the last restart. */
  private streamOpen = false;
  /** Batches are compressed on the thread pool (offThread and an addon that can). */
  private readonly pooled: boolean;
  /** A batch is on the thread pool. */
  private onPool = false;
  /** What waits behind it, in order. */
  private readonly held = new Fifo<Held>();
  /** Bytes of `held` and of the batch on the pool. */
  private heldByteCount = 0;
  /** Input buffers of batches done with, for the next ones. */
  private readonly spareInputs: Buffer[] = [];
  /** Closed: what the pool still returns is dropped. */
  private closed = false;
  /** The batch back from the pool is being written: it goes before everything held, so straight to the writer. */
  private atHead = false;
  /**
   * Called once a batch back from the pool, and what waited behind it, went to the writer: the session
   * weighs its backpressure again (a WAN cap charged for them, the socket, `backlogged`).
   */
  onWritten: (() => void) | null = null;
  /**
   * Told of a batch's raw size when it goes to the pool, and of the same size negated once it is back
   * (before its frame is written): a WAN cap charges what is on its way as if it had been written, so
   * that the session stops reading as soon as it would have compressing on the event loop, not a backlog
   * later.
   */
  onReserve: ((bytes: number) => void) | null = null;
  /** Called when a batch on the pool failed (a zstd error): the migration ends. */
  onError: ((err: Error) => void) | null = null;

  constructor(
    private readonly write: (bytes: Buffer, done?: WriteDone) => void,
    compression: typeof ZSTD | null,
    offThread = false,
    /**
     * Runs its argument with the writer's socket corked (what it writes then leaves in one writev): for
     * what a batch back from the pool writes, outside the session's own corking of a source chunk.
     * Without it, each held Run or Delta was a write call of its own.
     */
    private readonly corked: (writes: () => void) => void = (writes) => writes(),
  ) {
    this.compressor = compression === ZSTD ? zstd().zstdCompressorNew(ZSTD_LEVEL, ZSTD_WINDOW_LOG) : null;
    this.pooled = this.compressor !== null && offThread && zstd().zstdCompressAsync !== undefined;
  }

  get compressing(): boolean {
    return this.compressor !== null;
  }

  /** Whether batches are compressed on the thread pool. */
  get offThread(): boolean {
    return this.pooled;
  }

  /** Bytes written to this object that have not reached the writer yet: held behind a batch on the pool. */
  get heldBytes(): number {
    return this.heldByteCount;
  }

  /** A batch is on the thread pool (until it is back, also after close()). */
  get poolBusy(): boolean {
    return this.onPool;
  }

  /** What is written now waits: a batch is on the pool, or things wait behind one. */
  private get behindPool(): boolean {
    return this.onPool || this.held.length > 0;
  }

  /** The session stops reading its source: held bytes passed MAX_HELD_BYTES. */
  get backlogged(): boolean {
    return this.heldByteCount >= MAX_HELD_BYTES;
  }

  /** Bytes of a frame other than Literal bytes, written after everything before them (the batch gathering is not flushed). */
  inOrder(bytes: Buffer, done?: WriteDone): void {
    if (this.closed) return;
    if (!this.atHead && this.behindPool) {
      this.held.push({ bytes, done });
      this.heldByteCount += bytes.length;
      return;
    }
    this.write(bytes, done);
  }

  /** `task` runs after everything written before it has reached the writer (at once, unless a batch is on the pool). */
  afterHeld(task: () => void): void {
    if (!this.atHead && this.behindPool) this.held.push({ task });
    else task();
  }

  /** Nothing more is written: what the pool still returns is dropped (the session failed or ended). */
  close(): void {
    this.closed = true;
    this.held.clear();
    this.heldByteCount = 0;
  }

  /** The receiver takes CompressedFrames: from here on Runs and Deltas go through frame() (compressing only). */
  carryFrames(): void {
    if (this.compressor !== null) this.framed = true;
  }

  /** Whether frame() takes Runs and Deltas into the batches; if not, the caller flushes and sends them itself. */
  get carriesFrames(): boolean {
    return this.framed;
  }

  literal(bytes: Buffer): void {
    if (this.compressor === null) {
      // No compression, but the policy still judges for the Deltas whether saving pays.
      this.policy.noteLiteral(bytes.length);
      this.writeRaw(bytes);
      return;
    }
    // A framed batch holds each piece's Literal header beside it.
    const header = this.framed ? FRAME_HEADER_BYTES : 0;
    let rest = bytes;
    while (rest.length > 0) {
      const room = MAX_BATCH_BYTES - this.batchBytes - header;
      if (room <= 0) {
        this.flush();
        continue;
      }
      const take = Math.min(rest.length, room);
      if (header > 0) this.batch.push(frameHeader(FrameType.Literal, take));
      this.batch.push(take === rest.length ? rest : rest.subarray(0, take));
      this.batchBytes += header + take;
      this.batchLiteralBytes += take;
      rest = rest.subarray(take);
      if (this.batchBytes + header >= MAX_BATCH_BYTES) this.flush();
    }
  }

  /**
   * A whole frame other than Literal bytes (a Run, a Delta: `header` and its `payload`, kept as views
   * until the batch leaves), after the bytes before it; only once carryFrames() was called.
   */
  frame(header: Buffer, payload: Buffer): void {
    if (!this.framed) throw new Error('LiteralFrames.frame: the receiver takes no CompressedFrames');
    const size = header.length + payload.length;
    if (this.batchBytes + size > MAX_BATCH_BYTES) this.flush();
    if (size > MAX_BATCH_BYTES) {
      // Larger than a batch may declare: it leaves raw, after the batch (no Run or Delta is this large:
      // MAX_RUN_RECORDS bits and a digest, a page's ranges).
      this.inOrder(header);
      this.inOrder(payload);
      return;
    }
    this.batch.push(header);
    if (payload.length > 0) this.batch.push(payload);
    this.batchBytes += size;
    if (this.batchBytes === MAX_BATCH_BYTES) this.flush();
  }

  /** Sends the batch gathered so far. */
  flush(): void {
    if (this.batchBytes === 0) return;
    const batch = this.batch;
    const total = this.batchBytes;
    const literalBytes = this.batchLiteralBytes;
    this.batch = [];
    this.batchBytes = 0;
    this.batchLiteralBytes = 0;
    // A framed batch mostly of Runs and Deltas goes raw, unweighed (see above).
    const worthTrying = this.framed ? literalBytes >= MIN_BATCH_BYTES && literalBytes * 2 >= total : total >= MIN_BATCH_BYTES;
    if (worthTrying && this.policy.compressNext(literalBytes)) {
      if (this.pooled && (total >= POOL_MIN_BATCH_BYTES || this.behindPool)) return this.toPool(batch, total);
      // Timed as a whole (the frame's buffer, zstd, the header), in this thread's CPU time: what the policy
      // weighs the saving against. A wall clock, on a host whose cores are shared, put 0.3–6 ms on batches
      // alike, and the policy skipped compressible batches after the slow ones.
      const started = threadCpuSeconds();
      const frame = this.frameBuffer(total);
      const written = zstd().zstdCompress(this.compressor as Handle, batch, frame, FRAME_HEADER_BYTES + COMPRESSED_HEADER_BYTES);
      if (this.compressed(frame, written, total, threadCpuSeconds() - started)) return;
    } else if (this.framed && !worthTrying) {
      this.policy.noteLiteral(literalBytes);
    }
    this.sendRaw(batch);
  }

  /**
   * A batch that goes raw. Framed, its frames as they are (the zstd streams go on across it); else each
   * piece a Literal frame, which restarts the receiver's stream: the sender's restarts with it (in turn
   * when batches before it are still on the pool).
   */
  private sendRaw(batch: Buffer[]): void {
    if (!this.framed) {
      this.afterHeld(() => {
        if (!this.streamOpen) return;
        zstd().zstdCompressorReset(this.compressor as Handle);
        this.streamOpen = false;
      });
    }
    for (const piece of batch) {
      if (this.framed) this.inOrder(piece);
      else this.writeRaw(piece);
    }
  }

  /** A Compressed (or CompressedFrames) frame's buffer: room for fewer zstd bytes than the frames it stands for. */
  private frameBuffer(total: number): Buffer {
    // A Compressed frame must be smaller than its Literal frames (the batch and one header at least), a
    // CompressedFrames frame than the frames it carries (the batch, headers included). Never more on the WAN.
    return Buffer.allocUnsafe(this.framed ? total : FRAME_HEADER_BYTES + COMPRESSED_HEADER_BYTES + total - FRAME_HEADER_BYTES);
  }

  /**
   * What zstd made of a batch of `total` bytes (`written` bytes into `frame` after its headers, or -1:
   * it did not fit, the stream restarted) in `seconds` of CPU: sends the frame if it shrank, and tells
   * the policy. Whether it went (else the caller sends the batch raw).
   */
  private compressed(frame: Buffer, written: number, total: number, seconds: number): boolean {
    if (written < 0) {
      // The native side restarted its stream already; a receiver of whole frames is told so.
      if (this.framed && this.streamOpen) this.inOrder(RESTART_FRAME);
      this.streamOpen = false;
      this.policy.didNotShrink();
      return false;
    }
    this.streamOpen = true;
    const start = FRAME_HEADER_BYTES + COMPRESSED_HEADER_BYTES;
    const payload = COMPRESSED_HEADER_BYTES + written;
    frame[0] = this.framed ? FrameType.CompressedFrames : FrameType.Compressed;
    frame.writeUInt32BE(payload, 1);
    frame.writeUInt32BE(total, FRAME_HEADER_BYTES);
    this.savedBytes += total - payload;
    this.inOrder(frame.subarray(0, start + written));
    this.policy.compressedBatch(total - payload, seconds);
    return true;
  }

  /** A batch to compress on the thread pool: copied, then sent there in turn. */
  private toPool(batch: Buffer[], total: number): void {
    // Every input is MAX_BATCH_BYTES long: a batch never is longer.
    const input = this.spareInputs.pop() ?? Buffer.allocUnsafe(MAX_BATCH_BYTES);
    const pieces: number[] = [];
    let at = 0;
    for (const piece of batch) {
      at += piece.copy(input, at);
      pieces.push(piece.length);
    }
    const pending: PoolBatch = { input, total, pieces };
    this.heldByteCount += total;
    this.onReserve?.(total);
    if (this.behindPool) this.held.push({ batch: pending });
    else this.startOnPool(pending);
  }

  private startOnPool(batch: PoolBatch): void {
    this.onPool = true;
    const frame = this.frameBuffer(batch.total);
    const input = batch.input.subarray(0, batch.total);
    (zstd().zstdCompressAsync as NonNullable<ZstdAddon['zstdCompressAsync']>)(this.compressor as Handle, input, frame, FRAME_HEADER_BYTES + COMPRESSED_HEADER_BYTES, (written, seconds, error) =>
      this.pooledDone(batch, frame, written, seconds, error),
    );
  }

  /** A batch is back from the pool: its frame (or its pieces raw) goes, then what waited behind it. */
  private pooledDone(batch: PoolBatch, frame: Buffer, written: number, seconds: number, error: string | undefined): void {
    this.onPool = false;
    this.heldByteCount -= batch.total;
    if (this.closed) return;
    this.onReserve?.(-batch.total);
    if (error !== undefined) {
      this.close();
      this.onError?.(new Error(`zstd compression failed: ${error}`));
      return;
    }
    this.policy.observeOffLoopWork(seconds * 1000);
    // Its frame and everything that waited behind it leave in one writev, as a source chunk's frames do.
    this.corked(() => {
      this.atHead = true;
      try {
        if (this.compressed(frame, written, batch.total, seconds)) {
          this.spareInputs.push(batch.input);
        } else {
          // Back as it was gathered: the same frames raw as on the event loop (views of the input, which
          // is not reused: the writer may hold them).
          const pieces: Buffer[] = [];
          let at = 0;
          for (const length of batch.pieces) {
            pieces.push(batch.input.subarray(at, at + length));
            at += length;
          }
          this.sendRaw(pieces);
        }
      } finally {
        this.atHead = false;
      }
      this.releaseHeld();
    });
    if (this.closed) return;
    this.onWritten?.();
  }

  /** Writes what waited, in order, up to the next batch for the pool (which then goes there). */
  private releaseHeld(): void {
    while (!this.onPool && this.held.length > 0 && !this.closed) {
      const next = this.held.shift() as Held;
      if ('bytes' in next) {
        this.heldByteCount -= next.bytes.length;
        this.write(next.bytes, next.done);
      } else if ('batch' in next) {
        this.startOnPool(next.batch);
      } else {
        next.task();
      }
    }
  }

  private writeRaw(bytes: Buffer): void {
    this.inOrder(frameHeader(FrameType.Literal, bytes.length));
    this.inOrder(bytes);
  }
}

/**
 * What compression makes of a stream's Literal bytes: the batches, zstd stream and policy of a sending
 * gateway's LiteralFrames while the WAN is the bottleneck throughout (a first leg), its frames counted
 * instead of sent. `bfmig inspect` measures a capture's compression ratio with it.
 */
export class CompressionMeter {
  literalBytes = 0;
  /** Bytes of the frames the Literal bytes became (Compressed frames, and Literal frames for what went raw). */
  frameBytes = 0;
  private readonly frames = new LiteralFrames((bytes) => {
    this.frameBytes += bytes.length;
  }, ZSTD);

  /** Literal bytes, in stream order; kept (not copied) until their batch is full. */
  literal(bytes: Buffer): void {
    this.literalBytes += bytes.length;
    this.frames.literal(bytes);
  }

  /** Compresses what is gathered; frameBytes / literalBytes is then the ratio. */
  end(): void {
    this.frames.flush();
  }
}

/** Shown a carried frame (its type, and its payload's place in the batch): whether its pages will be read ahead. */
export type CarriedLook = (type: FrameType, batch: Buffer, at: number, length: number) => boolean;

/** Checks a batch whole (checkCarriedFrames), showing `look` each frame; whether it said yes to any. */
function lookInto(batch: Buffer, look: CarriedLook): boolean {
  let looked = false;
  checkCarriedFrames(batch, (type, bytes, at, length) => {
    if (look(type, bytes, at, length)) looked = true;
  });
  return looked;
}

/**
 * The receiving side: Compressed frames back into the Literal bytes they were, each checked to decode
 * to exactly the length it declares (at most MAX_BATCH_BYTES). Anything else a peer sends is a
 * WireError that ends the migration.
 */
export class LiteralInflater {
  /** Literal bytes that crossed compressed: decompressed bytes less Compressed frames' payloads. */
  savedBytes = 0;
  private readonly decompressor: Handle = zstd().zstdDecompressorNew(ZSTD_WINDOW_LOG);
  private streamOpen = false;
  private batchesCame = false;

  /**
   * A CompressedFrames payload has been taken (inflated, here or ahead): the sender batches whole frames,
   * and its stream goes on across the frames it sends raw until it says so. A Compressed frame is then
   * out of place.
   */
  get framed(): boolean {
    return this.batchesCame;
  }

  /** A Literal frame sent raw, outside a batch: it restarts a stream of Compressed frames, not of CompressedFrames. */
  rawLiteral(): void {
    if (!this.batchesCame) this.raw();
  }

  /** The sender restarted its stream: a Literal frame came (Compressed frames), or a restart (CompressedFrames). */
  raw(): void {
    if (!this.streamOpen) return;
    zstd().zstdDecompressorReset(this.decompressor);
    this.streamOpen = false;
  }

  /** The frames a CompressedFrames payload carries (a buffer of their own), or null for a restart of the stream. */
  inflateBatch(payload: Buffer): Buffer | null {
    this.batchesCame = true;
    if (payload.length === COMPRESSED_HEADER_BYTES && payload.readUInt32BE(0) === 0) {
      this.raw();
      return null;
    }
    return this.inflate(payload);
  }

  /**
   * A CompressedFrames payload: inflated, checked whole (checkCarriedFrames), each frame shown to `look`
   * (its type, and its payload's place in the batch) so that its pages can be read ahead, then nested in
   * `parser`, which delivers its frames before the frames after it. Returns whether `look` said yes to
   * any (false for a restart of the stream).
   */
  nestBatch(payload: Buffer, parser: FrameParser, look: CarriedLook): boolean {
    const batch = this.inflateBatch(payload);
    if (batch === null) return false;
    const looked = lookInto(batch, look);
    parser.nest(batch);
    return looked;
  }

  /** The Literal bytes of a Compressed frame's payload: a buffer of their own. */
  inflate(payload: Buffer): Buffer {
    if (payload.length <= COMPRESSED_HEADER_BYTES) throw new WireError(`Compressed frame of ${payload.length} bytes`);
    const rawBytes = payload.readUInt32BE(0);
    if (rawBytes === 0 || rawBytes > MAX_BATCH_BYTES) throw new WireError(`Compressed frame declares ${rawBytes} bytes (1..${MAX_BATCH_BYTES})`);
    const out = Buffer.allocUnsafe(rawBytes);
    try {
      zstd().zstdDecompress(this.decompressor, payload.subarray(COMPRESSED_HEADER_BYTES), out);
    } catch (err) {
      throw new WireError(`Compressed frame: ${errorMessage(err)}`);
    }
    this.streamOpen = true;
    this.savedBytes += rawBytes - payload.length;
    return out;
  }
}

/** A batch looked at on arrival but left for its delivery to inflate (see BatchesAhead). */
const NOT_INFLATED = 'not-inflated';
/** Batches inflated ahead of their delivery and not yet delivered, at most (4 of the largest). */
const MAX_BYTES_AHEAD = 4 * MAX_BATCH_BYTES;

/**
 * CompressedFrames batches inflated as they arrive whole, ahead of their delivery: a FrameParser's
 * lookahead hands each one to arrived() (FrameLookahead.lookWhole), and the receiver's handler to
 * nest() when its turn comes. Inflated only at delivery, a batch's Runs and Deltas were shown to the
 * codec just before they were rebuilt, so the first of them waited for the device's whole latency: on
 * a compressed 4-channel back leg, whose batches are a packet header and its Run, none of the Runs'
 * pages were read ahead (docs/design.md, "What remains").
 *
 * One entry per batch that arrived, in the order both calls see them (the parser looks at every frame
 * before it delivers it), so the zstd stream is inflated in order. A batch is left to its delivery when
 * no inflater was chosen yet, past MAX_BYTES_AHEAD held, and after any batch so left (the stream is
 * one): memory stays bounded whatever a peer sends.
 */
export class BatchesAhead {
  private readonly entries = new Fifo<Buffer | null | typeof NOT_INFLATED>();
  private notInflated = 0;
  private bytesAhead = 0;

  constructor(private readonly inflater: () => LiteralInflater | null) {}

  /**
   * A CompressedFrames payload has arrived whole (valid during the call only): inflated and checked
   * now, its frames shown to `look`, unless left to its delivery. Whether `look` said yes to any.
   */
  arrived(payload: Buffer, look: CarriedLook): boolean {
    const inflater = this.inflater();
    const declared = payload.length >= COMPRESSED_HEADER_BYTES ? payload.readUInt32BE(0) : 0;
    if (inflater === null || this.notInflated > 0 || this.bytesAhead + declared > MAX_BYTES_AHEAD) {
      this.entries.push(NOT_INFLATED);
      this.notInflated++;
      return false;
    }
    const batch = inflater.inflateBatch(payload);
    this.entries.push(batch);
    if (batch === null) return false;
    this.bytesAhead += batch.length;
    return lookInto(batch, look);
  }

  /**
   * A CompressedFrames payload is delivered: its batch nested in `parser`, inflated ahead or now (its
   * frames then shown to `look`). Whether `look` said yes to any now (false for a batch looked at ahead).
   */
  nest(inflater: LiteralInflater, payload: Buffer, parser: FrameParser, look: CarriedLook): boolean {
    const entry = this.entries.length > 0 ? this.entries.shift() : NOT_INFLATED;
    if (entry === NOT_INFLATED) {
      if (this.notInflated > 0) this.notInflated--;
      return inflater.nestBatch(payload, parser, look);
    }
    if (entry !== null && entry !== undefined) {
      this.bytesAhead -= entry.length;
      parser.nest(entry);
    }
    return false;
  }
}
