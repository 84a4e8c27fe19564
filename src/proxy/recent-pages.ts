/**
 * The pages a receiving gateway stored last, in memory: the bases most Deltas name. A sender gives a page
 * as a Delta against a page it sent lately (resemblance-cache.ts) or a copy of one (a content match);
 * the receiver stored that page moments ago, so reading it back from the store's device (a random read,
 * 100-250 us here) costs more than the page did to rebuild. Each page stored is copied here as well (one
 * 4 KiB copy, well under a microsecond) and stays until RECENT_PAGES later pages have pushed it out.
 *
 * Only a hint: a Delta's base is checked against its digest wherever it came from, and read from the
 * store when this copy does not match.
 *
 * Copying pauses once as many pages as are kept have been stored with no Delta naming another page
 * (used()): the sender has stopped sending them (its policy backed off, or nothing resembles), and a
 * copy of every page into memory touched for the first time cost a first leg 260 ms of the receiving
 * gateway's main thread at 1 Gbit/s (docs/benchmarks.md, "Sixth session"). The next such Delta reads
 * its base from the store and starts the copies again.
 */

import { pageBuffers, type ReusedBuffers } from './reused-buffers';
import { copyBytes } from '../common/copy';

/** Pages kept: 32 MiB, as many as the sender's resemblance cache holds. */
export const RECENT_PAGES = 8192;

export class RecentPages {
  /** Page content, a slot per page kept (from the pool of page buffers: empty once released). */
  content: Buffer;
  /** Slot of each page of the layout (-1: not kept). */
  private readonly slotOf: Int32Array;
  /** Page each slot holds (-1: none). */
  private readonly pageIn: Int32Array;
  /** The slot the next new page goes into: the oldest. */
  private next = 0;
  /** Pages stored since a Delta last named another page: copying pauses at as many as there are slots. */
  private storedSinceUse = 0;

  constructor(
    pageCount: number,
    private readonly pageSize: number,
    slots = RECENT_PAGES,
    /** Where the content comes from and goes back to. */
    private readonly buffers: ReusedBuffers = pageBuffers,
  ) {
    this.content = buffers.take(slots * pageSize);
    this.slotOf = new Int32Array(pageCount).fill(-1);
    this.pageIn = new Int32Array(slots).fill(-1);
  }

  /**
   * No longer used (the migration is over, or its block list starts another): the content goes back to
   * the pool, and every page is forgotten, so that nothing here names bytes it no longer has.
   */
  release(): void {
    this.slotOf.fill(-1);
    this.pageIn.fill(-1);
    this.buffers.give(this.content);
    this.content = Buffer.alloc(0);
  }

  /** A Delta named another page as its base: the pages stored from now on are kept again. */
  used(): void {
    this.storedSinceUse = 0;
  }

  /** Whether pages stored are copied: a Delta named another page within the last slots' worth of them. */
  get copying(): boolean {
    return this.storedSinceUse < this.pageIn.length;
  }

  /** Page `page` now holds src[srcStart .. +pageSize): kept, in its slot if it has one; forgotten while copying pauses and once released. */
  add(page: number, src: Buffer, srcStart: number): void {
    if (!this.copying || this.content.length === 0) return this.forget(page);
    this.storedSinceUse++;
    let slot = this.slotOf[page];
    if (slot < 0) {
      slot = this.next;
      this.next = slot + 1 === this.pageIn.length ? 0 : slot + 1;
      const old = this.pageIn[slot];
      if (old >= 0) this.slotOf[old] = -1;
      this.pageIn[slot] = page;
      this.slotOf[page] = slot;
    }
    copyBytes(src, srcStart, this.content, slot * this.pageSize, this.pageSize);
  }

  /** Page `page` changed to content not kept here (a zero page, an encoded one): its copy is stale. */
  forget(page: number): void {
    const slot = this.slotOf[page];
    if (slot < 0) return;
    this.slotOf[page] = -1;
    this.pageIn[slot] = -1;
  }

  /** The byte offset of page `page` in `content`, or -1 when it is not kept. */
  find(page: number): number {
    const slot = page < this.slotOf.length ? this.slotOf[page] : -1;
    return slot < 0 ? -1 : slot * this.pageSize;
  }
}
