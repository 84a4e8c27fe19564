import type { CompressionPolicy } from '../wire/compression-policy';
import { LoopLoad } from './loop-load';
import { WanRate } from './wan-rate';

/** Whatever tells a policy the event loop's load (LoopLoad; a test's stand-in). */
export interface LoopLoadSource {
  tell(policy: CompressionPolicy): void;
}

/**
 * What a sending connection learns of its pace with each source chunk, and tells its compression
 * policy: whether the WAN held it back since the last chunk, how busy the event loop was meanwhile, and
 * the rate its connection takes while held back. The main channel's session and each multifd channel
 * observe alike. For a channel both the loop and the link are shared with the other channels: its
 * bytes over the loop's time and its connection's rate are both about 1/N of the whole, so the policy's
 * "kept up with the link" compares like with like.
 */
export class WanPace {
  /** The connection's rate, and the link's while the WAN holds the connection back. */
  readonly rate = new WanRate();

  constructor(private readonly loop: LoopLoadSource = new LoopLoad()) {}

  /**
   * The source's next chunk, of `chunkBytes`, arrived at `nowMs`: `queuedBytes` is what the peer socket
   * still holds, `writtenBytes` all that was written to it; `statedLinkBytesPerSecond`: the connection's
   * share of a link whose rate the operator stated (WanShare.linkBytesPerSecond; -1: none), which stands
   * for the measured one. Tells `policy` (null: compression is off, the rate is measured all the same)
   * and returns whether the WAN held the connection back.
   */
  observe(policy: CompressionPolicy | null, queuedBytes: number, writtenBytes: number, chunkBytes: number, nowMs: number, statedLinkBytesPerSecond = -1): boolean {
    this.rate.knownLinkBytesPerSecond = statedLinkBytesPerSecond;
    let heldBack = false;
    if (policy !== null) {
      this.loop.tell(policy);
      heldBack = policy.observeWan(queuedBytes > 0, chunkBytes);
    }
    this.rate.observe(writtenBytes - queuedBytes, nowMs, heldBack);
    policy?.observeLinkRate(this.rate.linkBytesPerSecond);
    return heldBack;
  }
}
