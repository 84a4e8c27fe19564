/**
 * When the sending gateway compresses: only while it pays. Compression saves WAN bytes but costs the
 * gateway CPU; it must never make a migration slower or its bytes more. The policy decides from what it
 * is told, without clocks of its own:
 *
 * - The WAN is the bottleneck while the peer socket still holds bytes when the source's next chunk
 *   arrives: then compressing costs nothing the migration waits for, and every byte saved is time saved.
 * - Once the socket has drained completely before each of DRAINED_CHUNKS chunks in a row, the link is
 *   faster than this gateway produces (its CPU, or the source, is the bottleneck): compression backs
 *   off, and comes back when the socket queues again.
 * - Except where Literal bytes are sparse: while they are at most 1/SPARSE_SHARE of what the gateway
 *   read lately (a back leg: headers and changed pages among Runs), compressing them costs a few percent
 *   of the gateway's work on that input, and they compress best (multifd packet headers, device state).
 * - A batch that did not shrink went raw; the next batches skip compression, twice as many after each
 *   further raw batch (up to MAX_SKIP), so incompressible memory costs a probe now and then, not a
 *   compression pass per batch.
 */

/** Drained observations in a row after which compression backs off. */
export const DRAINED_CHUNKS = 4;
/** Most batches skipped after incompressible ones before compression is tried again. */
export const MAX_SKIP = 64;
/** Literal bytes at most 1/SPARSE_SHARE of the input read lately are compressed whatever the WAN does. */
export const SPARSE_SHARE = 32;
/** Input after which both counts of "lately" halve, so the share follows the stream's recent mix. */
const SHARE_WINDOW_BYTES = 64 * 1024 * 1024;

export class CompressionPolicy {
  /** Compressing while the WAN is the bottleneck (starts so: a first leg fills the link at once). */
  private wanBound = true;
  private drained = 0;
  /** Batches still to go raw after incompressible ones, and how many the next raw batch skips. */
  private skipLeft = 0;
  private nextSkip = 1;
  /** Input read and Literal bytes batched lately (both halved every SHARE_WINDOW_BYTES of input). */
  private readBytes = 0;
  private literalBytes = 0;

  /**
   * The source's next chunk of `chunkBytes` arrived; `queuedBytes` the peer socket had not yet handed
   * to the kernel.
   */
  observeWan(queuedBytes: number, chunkBytes: number): void {
    this.readBytes += chunkBytes;
    if (this.readBytes > SHARE_WINDOW_BYTES) {
      this.readBytes /= 2;
      this.literalBytes /= 2;
    }
    if (queuedBytes > 0) {
      this.wanBound = true;
      this.drained = 0;
    } else if (++this.drained >= DRAINED_CHUNKS) {
      this.wanBound = false;
    }
  }

  /**
   * Whether the WAN is the bottleneck now: what the gateway spends on saving WAN bytes (compression,
   * a delta's store reads) costs the migration nothing the link would not have cost anyway.
   */
  get wanIsBottleneck(): boolean {
    return this.wanBound;
  }

  /** Whether the next batch, of `batchBytes`, is to be compressed; a batch it says no to goes raw. */
  compressNext(batchBytes: number): boolean {
    this.literalBytes += batchBytes;
    if (!this.wanBound && this.literalBytes * SPARSE_SHARE > this.readBytes) return false;
    if (this.skipLeft > 0) {
      this.skipLeft--;
      return false;
    }
    return true;
  }

  /** The batch compressed smaller: compress on. */
  shrank(): void {
    this.nextSkip = 1;
  }

  /** The batch did not shrink and went raw: skip the next ones. */
  didNotShrink(): void {
    this.skipLeft = this.nextSkip;
    this.nextSkip = Math.min(this.nextSkip * 2, MAX_SKIP);
  }
}
