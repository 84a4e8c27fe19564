import { type EventLoopUtilization, performance } from 'node:perf_hooks';
import type { CompressionPolicy } from '../wire/compression-policy';

/**
 * How busy the gateway's event loop has been, told to a session's CompressionPolicy with each source
 * chunk: a loop that waited between chunks was paced by its source, one that never waited by its own
 * CPU. The loop is the process's, shared by every session: one that keeps it busy slows the others too.
 */
export class LoopLoad {
  private last: EventLoopUtilization = performance.eventLoopUtilization();

  /** Tells `policy` the loop's busy and idle milliseconds since the last call. */
  tell(policy: CompressionPolicy): void {
    const now = performance.eventLoopUtilization();
    policy.observeLoop(now.active - this.last.active, now.idle - this.last.idle);
    this.last = now;
  }
}
