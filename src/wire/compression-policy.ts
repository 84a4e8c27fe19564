/**
 * When the sending gateway compresses: only while it pays. Compression saves WAN bytes but costs the
 * gateway CPU; it must never make a migration slower or its bytes more. The policy decides from what it
 * is told, without clocks of its own:
 *
 * - The WAN is the bottleneck while it holds the session back: the peer socket still holds bytes when
 *   the source's next chunk arrives, or the source was paused for it (or for a WAN cap) since the last
 *   chunk. Then compressing costs nothing the migration waits for, and every byte saved is time saved.
 *   (A session paused for the socket resumes once it has drained: the socket alone would look idle.)
 * - Once the WAN has not held the session back across DRAINED_BYTES of input in a row, the link is
 *   faster than this gateway produces (its CPU, or the source, is the bottleneck): compression backs
 *   off, and comes back once the socket has queued before `rejoin` chunks in a row. The streak is
 *   counted in bytes, and as many as a socket's send buffer holds: while the kernel's buffers grow and
 *   fill, a WAN-bound session sees several chunks in a row leave at once, which is no fast link (a
 *   streak of 4 chunks backed compression off in the middle of a 40 Mbit/s leg). A back-off within
 *   SWING_BYTES of input since compression came back doubles `rejoin` (up to MAX_REJOIN): a gateway whose
 *   own CPU sets the pace fills the link as soon as it stops compressing and drains it as soon as it
 *   starts, and would otherwise swing between the two at every few chunks, paying for the compression
 *   each time. A back-off after a longer stretch is the source going quiet (zero or held pages) while
 *   compression kept up with the link: `rejoin` returns to 1.
 * - Except where Literal bytes are sparse: while they are at most 1/SPARSE_SHARE of what the gateway
 *   read lately (a back leg: headers and changed pages among Runs), compressing them costs a few percent
 *   of the gateway's work on that input, and they compress best (multifd packet headers, device state).
 * - A batch that did not shrink went raw; the next batches skip compression, twice as many after each
 *   further raw batch (up to MAX_SKIP), so incompressible memory costs a probe now and then, not a
 *   compression pass per batch.
 * - So does a batch that shrank by less than it cost: the WAN time its saved bytes would have taken at
 *   the rate the WAN was last measured to take them, against WORTH_FACTOR times the time compressing it
 *   took (the caller measures both: the policy keeps no clock). On a fast link a batch of mostly
 *   incompressible pages that shrank by a few percent costs the sending gateway, and the receiving one
 *   that decompresses it, more time than its bytes saved: a 1 Gbit/s first leg of a guest of
 *   pseudo-random pages took 20% longer with compression than without, 6% without it
 *   (docs/benchmarks.md, "Ninth session").
 */

/** Input read without the WAN holding the session back after which compression backs off (Linux's largest default TCP send buffer). */
export const DRAINED_BYTES = 4 * 1024 * 1024;
/** Most batches skipped after incompressible ones before compression is tried again. */
export const MAX_SKIP = 64;
/** Most queued observations in a row compression waits for after backing off (64 chunks: 16 MiB of source reads). */
export const MAX_REJOIN = 64;
/** A back-off after this much input or less since compression came back is a swing: compressing drained the link. */
export const SWING_BYTES = 4 * DRAINED_BYTES;
/** Literal bytes at most 1/SPARSE_SHARE of the input read lately are compressed whatever the WAN does. */
export const SPARSE_SHARE = 32;
/**
 * A compressed batch pays when the WAN time its saved bytes would have taken is at least this many times
 * the time compressing it took: the receiver decompresses it (zstd decompresses at about twice the rate
 * it compresses here) and both sides copy it once more than a raw batch.
 */
export const WORTH_FACTOR = 2;
/** Input after which both counts of "lately" halve, so the share follows the stream's recent mix. */
const SHARE_WINDOW_BYTES = 64 * 1024 * 1024;

export class CompressionPolicy {
  /** Compressing while the WAN is the bottleneck (starts so: a first leg fills the link at once). */
  private wanBound = true;
  /** Input read since the WAN last held the session back. */
  private drainedBytes = 0;
  /** Queued observations in a row while backed off, and how many bring compression back. */
  private queued = 0;
  private rejoin = 1;
  /** Input read since compression came back; a back-off right after the start (the link not yet filled) is no swing. */
  private onForBytes = SWING_BYTES + 1;
  /** Batches still to go raw after incompressible ones, and how many the next raw batch skips. */
  private skipLeft = 0;
  private nextSkip = 1;
  /** Input read and Literal bytes batched lately (both halved every SHARE_WINDOW_BYTES of input). */
  private readBytes = 0;
  private literalBytes = 0;

  /** The session paused its source for the WAN (the peer socket's backpressure, or a WAN cap) since the last chunk. */
  private paused = false;

  /** The session paused its source for the WAN: the next observation counts as held back whatever the socket shows then. */
  pausedForWan(): void {
    this.paused = true;
  }

  /**
   * The source's next chunk, of `chunkBytes`, arrived; `socketQueued`: the peer socket still holds bytes.
   * The WAN held the session back since the last chunk if so, or if the source was paused for it.
   */
  observeWan(socketQueued: boolean, chunkBytes: number): void {
    const heldBack = socketQueued || this.paused;
    this.paused = false;
    this.readBytes += chunkBytes;
    if (this.readBytes > SHARE_WINDOW_BYTES) {
      this.readBytes /= 2;
      this.literalBytes /= 2;
    }
    this.onForBytes += chunkBytes;
    if (heldBack) {
      this.drainedBytes = 0;
      if (!this.wanBound && ++this.queued >= this.rejoin) {
        this.wanBound = true;
        this.onForBytes = 0;
      }
      return;
    }
    this.queued = 0;
    this.drainedBytes += chunkBytes;
    if (this.drainedBytes >= DRAINED_BYTES && this.wanBound) {
      this.wanBound = false;
      this.rejoin = this.onForBytes <= SWING_BYTES ? Math.min(this.rejoin * 2, MAX_REJOIN) : 1;
    }
  }

  /**
   * Whether the WAN is the bottleneck now: what the gateway spends on saving WAN bytes (compression,
   * a delta's store reads) costs the migration nothing the link would not have cost anyway.
   */
  get wanIsBottleneck(): boolean {
    return this.wanBound;
  }

  /**
   * Whether the gateway's work on saving WAN bytes pays now: the WAN is the bottleneck, or what must
   * cross whole is a small share of what is read lately (a back leg), so that saving on it costs little
   * of the gateway's time. Compression, and the Deltas that cost the receiver a store read, wait for it.
   */
  get savingPays(): boolean {
    return this.wanBound || this.literalBytes * SPARSE_SHARE <= this.readBytes;
  }

  /** Literal bytes that went raw without a compression decision (compression is off): they count towards the share. */
  noteLiteral(bytes: number): void {
    this.literalBytes += bytes;
  }

  /** Whether the next batch, of `batchBytes`, is to be compressed; a batch it says no to goes raw. */
  compressNext(batchBytes: number): boolean {
    this.noteLiteral(batchBytes);
    if (!this.savingPays) return false;
    if (this.skipLeft > 0) {
      this.skipLeft--;
      return false;
    }
    return true;
  }

  /** Bytes a second the WAN was last measured to take (-1: not measured yet, when every shrink pays). */
  private wanBytesPerSecond = -1;

  /** The WAN was measured to take `bytesPerSecond` lately (negative: not measured yet). */
  observeWanRate(bytesPerSecond: number): void {
    this.wanBytesPerSecond = bytesPerSecond;
  }

  /**
   * A batch of `rawBytes` went out compressed, `savedBytes` fewer, and compressing it took `seconds`:
   * compress on if the saving paid for that (or the WAN's rate is not known yet), else skip as after a
   * batch that did not shrink.
   */
  compressedBatch(savedBytes: number, seconds: number): void {
    const rate = this.wanBytesPerSecond;
    if (rate > 0 && savedBytes / rate < WORTH_FACTOR * seconds) this.didNotShrink();
    else this.shrank();
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
