/**
 * Store pages that frames already arrived will need and that are not rebuilt yet, for one store (a
 * receiver's own, or a sibling's): read ahead a window at a time, as the frames are rebuilt. A device
 * serves many reads at once far faster than one after another (`native/pageio.c`), and a chunk of frames
 * can name thousands of them: Delta bases (a sibling's kernel and libraries, page after page, each a lone
 * page somewhere), or a back leg's multifd Runs (each a packet's pages, the channels' packets in turn from
 * all over the store). The window keeps that many reads in flight ahead of the decoder, never more than
 * the store's reader pool holds.
 *
 * Frames are numbered as they are seen (note) and as they are rebuilt (advance): a read is dropped from
 * the queue once its frame is rebuilt, whether or not it was used, so a frame that did not need the store
 * (a base kept in memory) leaves nothing behind.
 */

/** Issues reads of pages [starts[i], starts[i] + counts[i]), i < count, to a store (which may compact the arrays). */
export type IssueReads = (starts: Uint32Array, counts: Uint32Array, count: number) => void;

/** Reads noted ahead at most: a 256 KiB chunk of the smallest Delta frames (46 bytes) holds fewer. */
const QUEUED = 8192;
/** Delta bases in flight at most; the native pool holds 128 lone pages a store. */
export const BASES_WINDOW = 96;
/**
 * Multifd Runs in flight at most, per channel, with `channels` channels reading ahead from one store
 * that holds `slots` ranges read ahead (RetainedPages.rangeSlots): they take turns a few Runs at a time
 * (as their destination sockets drain), and each holds besides its window the range it is reading and
 * one it read part of (a Run ending in zero pages). More would evict other channels' Runs before they
 * are read: with 64 ranges (the native store's today), 12 Runs each up to 4 channels, fewer beyond (8
 * for 6, 4 for 10), 2 for 13 to 16, 1 from 17 on. With 4 Runs (2 MiB) a channel, a few milliseconds
 * ahead, a 4-channel back leg's receiver found 119–198 of its about 2,400 range reads still under way
 * when it came to them, about 50 with 12 (docs/benchmarks.md, "Twenty-eighth session").
 */
export const MAX_RUNS_WINDOW = 12;

export function runsWindow(channels: number, slots: number): number {
  return Math.max(1, Math.min(MAX_RUNS_WINDOW, Math.floor(slots / Math.max(1, channels)) - 2));
}

export class ReadsAhead {
  private readonly frames = new Float64Array(QUEUED);
  private readonly starts = new Uint32Array(QUEUED);
  private readonly counts = new Uint32Array(QUEUED);
  private readonly batchStarts: Uint32Array;
  private readonly batchCounts: Uint32Array;
  /** Counters, not indexes (index = counter % QUEUED): the oldest read not rebuilt, the next to issue, the next free. */
  private head = 0;
  private issued = 0;
  private tail = 0;

  constructor(
    /** Reads in flight at most. */
    private readonly window: number,
    private readonly issue: IssueReads,
  ) {
    this.batchStarts = new Uint32Array(window);
    this.batchCounts = new Uint32Array(window);
  }

  /** Frame `frame` will read pages [start, start + count) of this store. */
  note(frame: number, start: number, count = 1): void {
    if (this.tail - this.head === QUEUED) return; // read when it comes, like any other
    const at = this.tail % QUEUED;
    this.frames[at] = frame;
    this.starts[at] = start;
    this.counts[at] = count;
    this.tail++;
  }

  /** Frames up to `rebuilt` are being or have been rebuilt; tops the reads in flight up to the window. */
  advance(rebuilt: number): void {
    while (this.head < this.tail && this.frames[this.head % QUEUED] <= rebuilt) this.head++;
    if (this.issued < this.head) this.issued = this.head;
    // In batches: a call to the store for every frame would cost more than the reads save.
    if (this.issued === this.tail || this.issued - this.head > this.window / 2) return;
    let n = 0;
    while (this.issued < this.tail && this.issued - this.head < this.window) {
      const at = this.issued++ % QUEUED;
      this.batchStarts[n] = this.starts[at];
      this.batchCounts[n++] = this.counts[at];
    }
    this.issue(this.batchStarts, this.batchCounts, n);
  }
}
