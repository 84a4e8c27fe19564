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
import { nativeExport } from '../digest';
import { CompressionPolicy } from './compression-policy';
import { FRAME_HEADER_BYTES, frameHeader, FrameType, WireError } from './frames';

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

interface ZstdAddon {
  zstdCompressorNew(level: number, windowLog: number): Handle;
  zstdCompress(h: Handle, inputs: Uint8Array[], out: Uint8Array, outOffset: number): number;
  zstdCompressorReset(h: Handle): void;
  zstdDecompressorNew(windowLogMax: number): Handle;
  zstdDecompress(h: Handle, input: Uint8Array, out: Uint8Array): void;
  zstdDecompressorReset(h: Handle): void;
}

function zstdAddon(): ZstdAddon {
  const names: (keyof ZstdAddon)[] = ['zstdCompressorNew', 'zstdCompress', 'zstdCompressorReset', 'zstdDecompressorNew', 'zstdDecompress', 'zstdDecompressorReset'];
  const fns = names.map((n) => nativeExport(n));
  if (!fns.every((f) => typeof f === 'function')) throw new Error('bfmig: the native addon was built without zstd; run `npm run build:native` (needs libzstd-dev)');
  return Object.fromEntries(names.map((n, i) => [n, fns[i]])) as unknown as ZstdAddon;
}

let addon: ZstdAddon | null = null;
const zstd = (): ZstdAddon => (addon ??= zstdAddon());

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

/**
 * The sending side: Literal bytes in, Literal or Compressed frames out. Without compression each
 * Literal goes at once as it always has; with it, they are gathered (views, not copies) into batches of
 * up to MAX_BATCH_BYTES that leave at flush(), which the session calls before any other frame and
 * before the chunk the views point into may be reused.
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

  constructor(
    private readonly write: (bytes: Buffer) => void,
    compression: typeof ZSTD | null,
  ) {
    this.compressor = compression === ZSTD ? zstd().zstdCompressorNew(ZSTD_LEVEL, ZSTD_WINDOW_LOG) : null;
  }

  get compressing(): boolean {
    return this.compressor !== null;
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
      this.write(header);
      this.write(payload);
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
      // Timed as a whole (the frame's buffer, zstd, the header), in this thread's CPU time: what the policy
      // weighs the saving against. A wall clock, on a host whose cores are shared, put 0.3–6 ms on batches
      // alike, and the policy skipped compressible batches after the slow ones.
      const started = threadCpuSeconds();
      const saved = this.compressed(batch, total);
      if (saved >= 0) {
        this.policy.compressedBatch(saved, threadCpuSeconds() - started);
        return;
      }
    } else if (this.framed && !worthTrying) {
      this.policy.noteLiteral(literalBytes);
    }
    if (this.framed) {
      for (const piece of batch) this.write(piece);
      return;
    }
    // A Literal frame restarts the receiver's stream: the sender's restarts with it.
    if (this.streamOpen) {
      zstd().zstdCompressorReset(this.compressor as Handle);
      this.streamOpen = false;
    }
    for (const bytes of batch) this.writeRaw(bytes);
  }

  /**
   * Writes the batch as one Compressed (or CompressedFrames) frame, if that is smaller than the frames
   * it stands for: the bytes saved, or -1.
   */
  private compressed(batch: Buffer[], total: number): number {
    const start = FRAME_HEADER_BYTES + COMPRESSED_HEADER_BYTES;
    // Room for fewer zstd bytes than the batch's frames would take: a Compressed frame must be smaller
    // than its Literal frames (the batch and one header at least), a CompressedFrames frame than the
    // frames it carries (the batch, headers included). Never more on the WAN.
    const frame = Buffer.allocUnsafe(this.framed ? total : start + total - FRAME_HEADER_BYTES);
    const n = zstd().zstdCompress(this.compressor as Handle, batch, frame, start);
    if (n < 0) {
      // The native side restarted its stream already; a receiver of whole frames is told so.
      if (this.framed && this.streamOpen) this.write(RESTART_FRAME);
      this.streamOpen = false;
      this.policy.didNotShrink();
      return -1;
    }
    this.streamOpen = true;
    const payload = COMPRESSED_HEADER_BYTES + n;
    frame[0] = this.framed ? FrameType.CompressedFrames : FrameType.Compressed;
    frame.writeUInt32BE(payload, 1);
    frame.writeUInt32BE(total, FRAME_HEADER_BYTES);
    this.savedBytes += total - payload;
    this.write(frame.subarray(0, start + n));
    return total - payload;
  }

  private writeRaw(bytes: Buffer): void {
    this.write(frameHeader(FrameType.Literal, bytes.length));
    this.write(bytes);
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

  /** The sender restarted its stream: a Literal frame came (Compressed frames), or a restart (CompressedFrames). */
  raw(): void {
    if (!this.streamOpen) return;
    zstd().zstdDecompressorReset(this.decompressor);
    this.streamOpen = false;
  }

  /** The frames a CompressedFrames payload carries (a buffer of their own), or null for a restart of the stream. */
  inflateBatch(payload: Buffer): Buffer | null {
    if (payload.length === COMPRESSED_HEADER_BYTES && payload.readUInt32BE(0) === 0) {
      this.raw();
      return null;
    }
    return this.inflate(payload);
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
