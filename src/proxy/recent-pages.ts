/**
 * The pages a receiving gateway stored last, in memory: the bases most Deltas name. A sender gives a page
 * as a Delta against a page it sent lately (resemblance-cache.ts) or a copy of one (a content match);
 * the receiver stored that page moments ago, so reading it back from the store's device (a random read,
 * 100-250 us here) costs more than the page did to rebuild. Each page stored is copied here as well (one
 * 4 KiB copy, well under a microsecond) and stays until RECENT_PAGES later pages have pushed it out.
 *
 * Only a hint: a Delta's base is checked against its digest wherever it came from, and read from the
 * store when this copy does not match.
 */

/** Pages kept: 32 MiB, as many as the sender's resemblance cache holds. */
export const RECENT_PAGES = 8192;

export class RecentPages {
  /** Page content, a slot per page kept. */
  readonly content: Buffer;
  /** Slot of each page of the layout (-1: not kept). */
  private readonly slotOf: Int32Array;
  /** Page each slot holds (-1: none). */
  private readonly pageIn: Int32Array;
  /** The slot the next new page goes into: the oldest. */
  private next = 0;

  constructor(
    pageCount: number,
    private readonly pageSize: number,
    slots = RECENT_PAGES,
  ) {
    this.content = Buffer.allocUnsafe(slots * pageSize);
    this.slotOf = new Int32Array(pageCount).fill(-1);
    this.pageIn = new Int32Array(slots).fill(-1);
  }

  /** Page `page` now holds src[srcStart .. +pageSize): kept, in its slot if it has one. */
  add(page: number, src: Buffer, srcStart: number): void {
    let slot = this.slotOf[page];
    if (slot < 0) {
      slot = this.next;
      this.next = slot + 1 === this.pageIn.length ? 0 : slot + 1;
      const old = this.pageIn[slot];
      if (old >= 0) this.slotOf[old] = -1;
      this.pageIn[slot] = page;
      this.slotOf[page] = slot;
    }
    src.copy(this.content, slot * this.pageSize, srcStart, srcStart + this.pageSize);
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
