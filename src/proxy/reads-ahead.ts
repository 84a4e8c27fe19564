/**
 * The base pages of Delta frames that have arrived and are not rebuilt yet, for one store (a receiver's
 * own, or a sibling's): read ahead a window at a time, as the frames are rebuilt. A device serves many
 * random reads at once far faster than one after another (`native/pageio.c`), and a chunk of frames can
 * hold thousands of Deltas in a row (a sibling's kernel and libraries, page after page): the window keeps
 * WINDOW reads in flight ahead of the decoder, never more than the store's reader pool holds.
 *
 * Frames are numbered as they are seen (note) and as they are rebuilt (advance): a base is dropped from
 * the queue once its frame is rebuilt, whether or not its read was used, so a Delta whose base did not
 * need the store (a page kept in memory) leaves nothing behind.
 */

/** What a store offers for reading ahead (RetainedPages.prefetchPages). */
export interface Prefetching {
  prefetchPages?(indices: Uint32Array, count: number): void;
}

/** Bases noted ahead at most: a 256 KiB chunk of the smallest Delta frames (46 bytes) holds fewer. */
const QUEUED = 8192;
/** Reads in flight at most; the native pool holds 128 pages a store. */
export const BASES_WINDOW = 96;

export class BasesAhead {
  private readonly frames = new Float64Array(QUEUED);
  private readonly pages = new Uint32Array(QUEUED);
  private readonly batch = new Uint32Array(BASES_WINDOW);
  /** Counters, not indexes (index = counter % QUEUED): the oldest base not rebuilt, the next to read, the next free. */
  private head = 0;
  private issued = 0;
  private tail = 0;

  constructor(private readonly store: Prefetching) {}

  /** Frame `frame`'s base is page `page` of this store. */
  note(frame: number, page: number): void {
    if (this.tail - this.head === QUEUED) return; // read when it comes, like any other
    const at = this.tail % QUEUED;
    this.frames[at] = frame;
    this.pages[at] = page;
    this.tail++;
  }

  /** Frames up to `rebuilt` are being or have been rebuilt; tops the reads in flight up to the window. */
  advance(rebuilt: number): void {
    while (this.head < this.tail && this.frames[this.head % QUEUED] <= rebuilt) this.head++;
    if (this.issued < this.head) this.issued = this.head;
    // In batches: a call to the store for every Delta would cost more than the reads save.
    if (this.issued === this.tail || this.issued - this.head > BASES_WINDOW / 2) return;
    let n = 0;
    while (this.issued < this.tail && this.issued - this.head < BASES_WINDOW) this.batch[n++] = this.pages[this.issued++ % QUEUED];
    this.store.prefetchPages?.(this.batch, n);
  }
}
