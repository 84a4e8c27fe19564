/** What a migration's codecs count, each side and each channel for itself; a report adds them up. */
export interface TransferCounts {
  /** QEMU stream bytes. */
  streamBytes: number;
  /** Normal pages sent in full. */
  pagesSent: number;
  /** Normal pages the receiver rebuilt from its store. */
  pagesReused: number;
  /**
   * Normal pages the receiver held that went in full all the same (counted in pagesSent too): in a
   * multifd migration, pages whose order against another channel's write of them was not yet known (the
   * main channel behind their epoch, the second copy of a page QEMU < 9.0 sent twice in one) or was older.
   */
  pagesUnordered: number;
  /** QEMU zero (fill) pages. */
  pagesZero: number;
  /** XBZRLE and compressed pages, passed on as they are. */
  pagesOther: number;
  /** Normal pages sent as a delta against the version the receiver held (not counted in pagesSent). */
  pagesDelta: number;
  /** Normal pages sent as a reference to another page the receiver held with the same content. */
  pagesMatched: number;
  /** Normal pages sent as a reference to a page with the same content in a sibling's retained snapshot. */
  pagesSibling: number;
  /** What deltas and content matches took (Delta and SiblingDelta payloads), against (pagesDelta + pagesMatched + pagesSibling) × 4 KiB sent whole. */
  deltaBytes: number;
}

export const newCounts = (): TransferCounts => ({ streamBytes: 0, pagesSent: 0, pagesReused: 0, pagesUnordered: 0, pagesZero: 0, pagesOther: 0, pagesDelta: 0, pagesMatched: 0, pagesSibling: 0, deltaBytes: 0 });

/** `into` plus `more`, field by field. */
export function addCounts(into: TransferCounts, more: Readonly<TransferCounts>): TransferCounts {
  for (const key of Object.keys(into) as (keyof TransferCounts)[]) into[key] += more[key];
  return into;
}
