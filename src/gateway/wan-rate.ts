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

/** Held-back time over which the link's own rate is measured: a few dozen source chunks at 1 Gbit/s. */
export const LINK_WINDOW_MS = 50;

/** A fast link's rate (1 Gbit/s): what a session prices its own work against where it knows no better. */
export const ASSUMED_BYTES_PER_SECOND = 125e6;

export class WanRate {
  /** Bytes a second over the last whole window; -1 until one has passed. */
  bytesPerSecond = -1;
  /**
   * Bytes a second the link itself takes, as measured: what the socket handed on across LINK_WINDOW_MS
   * of intervals in which the WAN held the session back, the kernel's send buffer full throughout, added
   * up however far apart they came. bytesPerSecond is what the session gave the link; this is what it
   * would take. -1 until measured.
   */
  private measuredLinkBytesPerSecond = -1;
  /** How many times the link was measured (the session's end logs it beside the rate). */
  linkMeasurements = 0;
  /**
   * The connection's share of the link where the operator stated the link's rate (`wan.linkMbit` under
   * the peer; WanShare.linkBytesPerSecond, set per chunk): it stands for the measured rate, which a busy
   * host measures low (docs/benchmarks.md, "Fortieth session"). -1: not stated.
   */
  knownLinkBytesPerSecond = -1;
  private windowAt = -1;
  private windowBytes = 0;
  /** The last observation, and the held-back intervals added up since the link was last measured. */
  private lastAt = -1;
  private lastSent = 0;
  private heldMs = 0;
  private heldBytes = 0;

  /**
   * `sentBytes`: bytes the socket has handed on so far (written less still queued), at `nowMs`;
   * `heldBack`: the WAN held the session back since the last observation (CompressionPolicy.observeWan).
   */
  observe(sentBytes: number, nowMs: number, heldBack = false): void {
    if (heldBack && this.lastAt >= 0) {
      this.heldMs += nowMs - this.lastAt;
      this.heldBytes += sentBytes - this.lastSent;
      if (this.heldMs >= LINK_WINDOW_MS) {
        this.measuredLinkBytesPerSecond = (this.heldBytes * 1000) / this.heldMs;
        this.linkMeasurements++;
        this.heldMs = 0;
        this.heldBytes = 0;
      }
    }
    this.lastAt = nowMs;
    this.lastSent = sentBytes;
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

  /**
   * The link's rate: the connection's share of it where the operator stated it, else as last measured
   * (-1 until then).
   */
  get linkBytesPerSecond(): number {
    return this.knownLinkBytesPerSecond > 0 ? this.knownLinkBytesPerSecond : this.measuredLinkBytesPerSecond;
  }

  /**
   * The link's rate as the session's end logs it: as stated or last measured (what the compression
   * policy weighs a drained stretch against, and the main channel's prices a saved byte at), how often
   * it was measured, and whether it was stated. A leg that compressed throughout on a rate measured once
   * or twice, early and low, is the case of docs/benchmarks.md, "Fortieth session".
   */
  get linkReport(): { linkBytesPerSecond: number; linkMeasurements: number; linkStated: boolean } {
    return { linkBytesPerSecond: Math.round(this.linkBytesPerSecond), linkMeasurements: this.linkMeasurements, linkStated: this.knownLinkBytesPerSecond > 0 };
  }

  /**
   * What a byte saved is worth, in bytes a second: the link's own rate where measured, else the rate the
   * session used. The session's own rate falls while it compresses and rises while it does not, and a
   * saving priced at it swung with it: a batch priced at a raw stretch's rate did not pay, was sent raw,
   * and kept the rate up.
   */
  get savedByteRate(): number {
    return this.linkBytesPerSecond > 0 ? this.linkBytesPerSecond : this.bytesPerSecond;
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
