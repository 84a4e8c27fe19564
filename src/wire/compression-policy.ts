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
 *   faster than this gateway produces: something else set that stretch's pace. The stretch is judged:
 *   - the gateway's event loop waited for the source for more than 1 − BUSY_LOOP_SHARE of it: the source
 *     sets the pace (QEMU sends no faster, compressed or not), and compression costs the migration
 *     nothing it waits for: it stays on;
 *   - the loop was busy throughout, yet took in the source at least as fast as the link takes it raw
 *     (the session measures the link while it holds the session back): sent raw, the stream would wait
 *     for the link instead. Compression stays on;
 *   - else the gateway's CPU sets the pace, and raw would go faster: compression backs off, and comes
 *     back once the socket has queued before `rejoin` chunks in a row and the link has been measured
 *     (observeLinkRate: every sending connection measures it), so that the next such stretch can be weighed.
 *   A connection that starts at full rate (startsAtFullRate: a multifd channel, RAM from its first byte)
 *   does not judge a stretch in its first SWING_BYTES while the link is not measured: the kernel's
 *   buffers and the WAN's queue take its first megabytes whatever the link. Each channel of a 4-channel
 *   first leg at 1 Gbit/s had backed off at its first stretch, before it had ever been held back. The
 *   main channel starts with QEMU's setup and measures the link on the way: given the same grace, its
 *   first legs at 1 Gbit/s compressed their first megabytes at the gateway's pace and took longer.
 *   Backing off whenever the link drained put back, on a 1 Gbit/s first leg of a guest of real files,
 *   the bytes compression had saved: the link filled again, compression came back and the policy swung,
 *   161 MiB over the WAN instead of 53 and 1.50 s instead of 1.16 (docs/benchmarks.md, "Sixteenth
 *   session"). The streak is counted in bytes, and as many as a socket's send buffer holds: while the
 *   kernel's buffers grow and fill, a WAN-bound session sees several chunks in a row leave at once,
 *   which is no fast link (a streak of 4 chunks backed compression off in the middle of a 40 Mbit/s
 *   leg). A back-off within SWING_BYTES of input since compression came back doubles `rejoin` (up to
 *   MAX_REJOIN): a gateway whose own CPU sets the pace fills the link as soon as it stops compressing
 *   and drains it as soon as it starts, and would otherwise swing between the two at every few chunks,
 *   paying for the compression each time. A back-off after a longer stretch is the source going quiet
 *   (zero or held pages) while compression kept up with the link: `rejoin` returns to 1.
 * - Except where Literal bytes are sparse: while they are at most 1/SPARSE_SHARE of what the gateway
 *   read lately (a back leg: headers and changed pages among Runs), compressing them costs a few percent
 *   of the gateway's work on that input, and they compress best (multifd packet headers, device state).
 * - A batch that did not shrink went raw; the next batches skip compression, twice as many after each
 *   further raw batch (up to MAX_SKIP), so incompressible memory costs a probe now and then, not a
 *   compression pass per batch.
 * - So do batches that shrank by less than they cost: the WAN time a batch's saved bytes would have
 *   taken (priced at the link's rate where the session measured it), against WORTH_FACTOR times the CPU
 *   time compressing it took (the caller measures both: the policy keeps no clock), averaged over the
 *   batches lately. On a fast link a batch of mostly incompressible pages that shrank by a few percent
 *   costs the sending gateway, and the receiving one that decompresses it, more time than its bytes
 *   saved: a 1 Gbit/s first leg of a guest of pseudo-random pages took 20% longer with compression than
 *   without, 6% without it (docs/benchmarks.md, "Ninth session").
 */

/** Input read without the WAN holding the session back after which compression backs off (Linux's largest default TCP send buffer). */
export const DRAINED_BYTES = 4 * 1024 * 1024;
/** Most batches skipped after incompressible ones before compression is tried again. */
export const MAX_SKIP = 64;
/** Most queued observations in a row compression waits for after backing off (64 chunks: 16 MiB of source reads). */
export const MAX_REJOIN = 64;
/** A back-off after this much input or less since compression came back is a swing: compressing drained the link. */
export const SWING_BYTES = 4 * DRAINED_BYTES;
/**
 * Share of a drained stretch the gateway's event loop must have been busy for its CPU to be what sets
 * the pace: all but saturated. On a 1 Gbit/s first leg the loop was busy for 64–72% of the stretches the
 * source set the pace of (its first: QEMU's setup, zero pages) and for 98–100% of those the sending
 * gateway did (docs/benchmarks.md, "Sixteenth session").
 */
export const BUSY_LOOP_SHARE = 0.9;
/** Literal bytes at most 1/SPARSE_SHARE of the input read lately are compressed whatever the WAN does. */
export const SPARSE_SHARE = 32;
/**
 * Compressed batches pay while the WAN time their saved bytes would have taken is at least this many
 * times the CPU time compressing them took. 2 (for the receiver's decompression and a copy more on both
 * sides) was chosen while batches were timed by the wall clock, on a host where that clock also counted
 * waits for a core; timed in CPU seconds, 1 sent a 1 Gbit/s first leg of a guest of real files in 59 MiB
 * instead of 77 (medians of four runs) and one of pseudo-random pages in 160 instead of 167, neither
 * slower (docs/benchmarks.md, "Sixteenth session").
 */
export const WORTH_FACTOR = 1;
/** Weight of the latest compressed batch in the running worth. */
export const WORTH_WEIGHT = 0.25;
/** Input after which both counts of "lately" halve, so the share follows the stream's recent mix. */
const SHARE_WINDOW_BYTES = 64 * 1024 * 1024;

export class CompressionPolicy {
  /**
   * Compressing: the WAN or the source, not this gateway's CPU, sets the pace (starts so: a first leg
   * fills the link at once).
   */
  private savingOn = true;
  /** Input read since the WAN last held the session back. */
  private drainedBytes = 0;
  /** Of that, input since the loop's load was last judged, and the loop's busy and idle ms over it. */
  private stretchBytes = 0;
  private loopBusyMs = 0;
  private loopIdleMs = 0;
  /** Queued observations in a row while backed off, and how many bring compression back. */
  private queued = 0;
  private rejoin = 1;
  /** Input read since compression came back; a back-off right after the start (the link not yet filled) is no swing. */
  private onForBytes = SWING_BYTES + 1;
  /** Input read since the start, up to graceBytes: the kernel's buffers may still be filling. */
  private startBytes = 0;
  /** Input at the start in which a stretch is not weighed until the link is measured (startsAtFullRate). */
  private graceBytes = 0;
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
   * The WAN held the session back since the last chunk if so, or if the source was paused for it: returns
   * whether it did.
   */
  observeWan(socketQueued: boolean, chunkBytes: number): boolean {
    const heldBack = socketQueued || this.paused;
    this.paused = false;
    this.readBytes += chunkBytes;
    if (this.readBytes > SHARE_WINDOW_BYTES) {
      this.readBytes /= 2;
      this.literalBytes /= 2;
    }
    this.onForBytes += chunkBytes;
    if (this.startBytes <= this.graceBytes) this.startBytes += chunkBytes;
    if (heldBack) {
      this.drainedBytes = 0;
      this.newStretch();
      // It comes back once the link is measured: until then a stretch the gateway set the pace of cannot be
      // weighed against it, and would back off again.
      if (!this.savingOn && ++this.queued >= this.rejoin && this.linkBytesPerSecond > 0) {
        this.savingOn = true;
        this.onForBytes = 0;
      }
      return true;
    }
    this.queued = 0;
    this.drainedBytes += chunkBytes;
    this.stretchBytes += chunkBytes;
    if (this.stretchBytes < DRAINED_BYTES || !this.savingOn) return false;
    // A stretch of DRAINED_BYTES without the WAN holding the session back: who set its pace?
    const loopMs = this.loopBusyMs + this.loopIdleMs;
    const gatewayBound = loopMs === 0 || this.loopBusyMs >= BUSY_LOOP_SHARE * loopMs;
    // Compressing at its own pace, the gateway still took in the source as fast as the link takes it raw.
    const keptUp = loopMs > 0 && this.linkBytesPerSecond > 0 && this.stretchBytes * 1000 >= this.linkBytesPerSecond * loopMs;
    // A connection that starts at full rate, in its first SWING_BYTES, the link not measured yet: the
    // kernel's buffers are still taking the first megabytes whatever the link, and the stretch cannot be weighed.
    const unweighed = this.linkBytesPerSecond <= 0 && this.startBytes <= this.graceBytes;
    this.newStretch();
    if (!gatewayBound || keptUp || unweighed) return false;
    this.savingOn = false;
    this.rejoin = this.onForBytes <= SWING_BYTES ? Math.min(this.rejoin * 2, MAX_REJOIN) : 1;
    return false;
  }

  /** Bytes a second the link takes when the WAN holds the session back (-1: not measured). */
  private linkBytesPerSecond = -1;

  /**
   * The connection carries the stream at full rate from its first byte (a multifd channel: RAM packets
   * at once, where the main channel starts with QEMU's setup): a stretch in its first SWING_BYTES is not
   * weighed until the link is measured.
   */
  startsAtFullRate(): void {
    this.graceBytes = SWING_BYTES;
  }

  /** The link was measured to take `bytesPerSecond` while the WAN held the session back (negative: not yet). */
  observeLinkRate(bytesPerSecond: number): void {
    this.linkBytesPerSecond = bytesPerSecond;
  }

  /**
   * The gateway's event loop was busy for `busyMs` and idle (waiting for any socket or timer) for
   * `idleMs` since the last call; told before each observeWan(). Told nothing, the policy takes the
   * gateway for what sets the pace whenever the WAN does not.
   */
  observeLoop(busyMs: number, idleMs: number): void {
    // The thread pool's zstd is the gateway's work as much as the loop's own: counted as busy time.
    const offLoop = Math.min(this.offLoopMs, idleMs);
    this.offLoopMs = 0;
    this.loopBusyMs += busyMs + offLoop;
    this.loopIdleMs += idleMs - offLoop;
  }

  /** CPU time compression took on the thread pool since the last observeLoop. */
  private offLoopMs = 0;

  /**
   * A batch took `ms` of CPU on the thread pool: counted as the event loop busy (out of its idle time) at
   * the next observeLoop(), so that the policy weighs it as if it had run on the loop. Where the pool's
   * threads have cores of their own the loop's time is shorter for it, and a stretch compressed still
   * keeps up with the link sooner; where they take cores the QEMUs need (the two-core test host), the
   * loop, idle while they compressed, would otherwise have read as the source setting the pace, and
   * compression stayed on throughout: a 4-channel first leg at 1 Gbit/s took 1.33 s instead of 1.24
   * (docs/benchmarks.md, "Twenty-first session").
   */
  observeOffLoopWork(ms: number): void {
    this.offLoopMs += ms;
  }

  private newStretch(): void {
    this.stretchBytes = 0;
    this.loopBusyMs = 0;
    this.loopIdleMs = 0;
  }

  /**
   * Whether the WAN is the bottleneck now: what the gateway spends on saving WAN bytes (compression,
   * a delta's store reads) costs the migration nothing the link would not have cost anyway.
   */
  get wanIsBottleneck(): boolean {
    return this.savingOn && this.drainedBytes < DRAINED_BYTES;
  }

  /**
   * Whether the gateway's work on saving WAN bytes pays now: the WAN is the bottleneck, or what must
   * cross whole is a small share of what is read lately (a back leg), so that saving on it costs little
   * of the gateway's time. Compression waits for it, and so do a multifd channel's Deltas against other
   * pages (the main channel's pay on a slow enough link whatever the pace: gateway/send.ts).
   */
  get savingPays(): boolean {
    return this.savingOn || this.literalBytes * SPARSE_SHARE <= this.readBytes;
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

  /**
   * What compressed batches lately saved beyond their cost, in seconds: each one's saved bytes' WAN time
   * less WORTH_FACTOR times its compression time, a running average (null before the first). A batch is
   * judged with the ones before it: one that shrank less among batches that shrank well does not stop
   * compression (the skipping doubles with each in a row), a run of them does.
   */
  private worthSeconds: number | null = null;

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
    if (rate <= 0) return this.shrank();
    const margin = savedBytes / rate - WORTH_FACTOR * seconds;
    this.worthSeconds = this.worthSeconds === null ? margin : this.worthSeconds + WORTH_WEIGHT * (margin - this.worthSeconds);
    if (this.worthSeconds < 0) this.didNotShrink();
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
