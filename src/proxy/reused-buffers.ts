/**
 * Large buffers a migration's codec holds pages in (the sender's resemblance cache, the receiver's recent
 * pages: 32 MiB each), given back when the migration ends and lent to the next one instead of allocated
 * again. Memory a process has just been given costs a page fault and a zeroed page on the first touch of
 * each 4 KiB: copying 8,192 pages into a fresh 32 MiB buffer took 25-36 ms on this project's machines,
 * into one already touched 5-7 ms, per migration and side (docs/benchmarks.md, "Seventh session"). A
 * buffer kept here stays touched: the process holds on to it, so the kernel never takes it back.
 *
 * A gateway with deltas on fills the pool when it starts (prefill), so that not even its first migration
 * pays for the first touches.
 *
 * Only the content is reused, never what it meant: a cache that takes a buffer starts with no entries,
 * so bytes a former migration left in it are never read as pages.
 */

/** Most bytes kept idle: a sending and a receiving session's worth (two 32 MiB buffers). */
export const MAX_IDLE_BYTES = 64 * 1024 * 1024;

export class ReusedBuffers {
  /** Idle buffers by length. */
  private readonly idle = new Map<number, Buffer[]>();
  private idleBytes = 0;

  constructor(private readonly maxIdleBytes: number) {}

  /** A buffer of `bytes` (its content undefined): an idle one of that length, or a new one. */
  take(bytes: number): Buffer {
    const kept = this.idle.get(bytes)?.pop();
    if (kept === undefined) return Buffer.allocUnsafeSlow(bytes);
    this.idleBytes -= bytes;
    return kept;
  }

  /** `buffer` (from take()) is no longer used by whoever took it: kept for the next take() while there is room. */
  give(buffer: Buffer): void {
    if (buffer.length === 0 || this.idleBytes + buffer.length > this.maxIdleBytes) return;
    const list = this.idle.get(buffer.length);
    if (list === undefined) this.idle.set(buffer.length, [buffer]);
    else if (list.includes(buffer)) return;
    else list.push(buffer);
    this.idleBytes += buffer.length;
  }

  /**
   * Makes a buffer of each of `lengths` idle here, touched once (as far as the bound allows, counting
   * those idle already): called before any migration, so that not even a process's first migration pays
   * for the first touch of its buffers while its stream waits.
   */
  prefill(lengths: readonly number[]): void {
    const wanted = new Map<number, number>();
    for (const bytes of lengths) wanted.set(bytes, (wanted.get(bytes) ?? 0) + 1);
    for (const [bytes, count] of wanted) {
      for (let i = this.idle.get(bytes)?.length ?? 0; i < count && this.idleBytes + bytes <= this.maxIdleBytes; i++) this.give(Buffer.allocUnsafeSlow(bytes).fill(0));
    }
  }

  /** Lets go of every idle buffer (the next take()s allocate anew). */
  clear(): void {
    this.idle.clear();
    this.idleBytes = 0;
  }

  /** Bytes kept idle now. */
  get idleByteCount(): number {
    return this.idleBytes;
  }
}

/** The process's pool of page buffers, shared by every migration's codecs. */
export const pageBuffers = new ReusedBuffers(MAX_IDLE_BYTES);
