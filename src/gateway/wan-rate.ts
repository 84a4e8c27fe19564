/**
 * How fast the WAN takes a sending session's bytes: the bytes its peer socket has handed to the kernel,
 * per second, over windows of at least WINDOW_MS. The compression policy says whether the WAN holds the
 * session back; this says what a page costs to cross, which decides whether a store read at the
 * receiver (a content match, a delta against another page or the page's own old version) is worth it:
 * at 1 Gbit/s a page crosses in 33 µs, less than such a read takes, and the receiver, reading once a
 * page, becomes the bottleneck even while the link looks busy.
 */

/** Shortest window: a socket's first bursts (filling the kernel's send buffer) average out over it. */
export const WINDOW_MS = 100;

/** A fast link's rate (1 Gbit/s): what a session prices its own work against where it knows no better. */
export const ASSUMED_BYTES_PER_SECOND = 125e6;

export class WanRate {
  /** Bytes a second over the last whole window; -1 until one has passed. */
  bytesPerSecond = -1;
  private windowAt = -1;
  private windowBytes = 0;

  /** `sentBytes`: bytes the socket has handed on so far (written less still queued), at `nowMs`. */
  observe(sentBytes: number, nowMs: number): void {
    if (this.windowAt < 0) {
      this.windowAt = nowMs;
      this.windowBytes = sentBytes;
      return;
    }
    const elapsed = nowMs - this.windowAt;
    if (elapsed < WINDOW_MS) return;
    this.bytesPerSecond = ((sentBytes - this.windowBytes) * 1000) / elapsed;
    this.windowAt = nowMs;
    this.windowBytes = sentBytes;
  }

  /** Whether the WAN was measured to take `bytesPerSecond` or more; false until measured. */
  fasterThan(bytesPerSecond: number): boolean {
    return this.bytesPerSecond >= bytesPerSecond;
  }

  /**
   * What `pageBytes` cost to cross, in µs, as far as the session can tell: at the measured rate while the
   * WAN holds the session back (`wanHeldBack`: the rate the session used is then the link's). Otherwise
   * the link takes at least what was measured, and a fast link's rate is assumed: a back leg that sends
   * little measures next to nothing.
   */
  pageMicros(pageBytes: number, wanHeldBack: boolean): number {
    const measured = this.bytesPerSecond;
    const rate = wanHeldBack && measured > 0 ? measured : Math.max(measured, ASSUMED_BYTES_PER_SECOND);
    return (pageBytes * 1e6) / rate;
  }

  /** Whether the WAN was measured to take fewer than `bytesPerSecond`; false until measured. */
  slowerThan(bytesPerSecond: number): boolean {
    return this.bytesPerSecond >= 0 && this.bytesPerSecond < bytesPerSecond;
  }
}
