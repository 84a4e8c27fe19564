import * as fs from 'node:fs';
import * as path from 'node:path';
import { DIGEST_BYTES } from '../digest';
import { DIGESTS_FILE } from './digest-table';
import type { StoreLayout } from './meta';
import type { PageStore } from './page-store';
import { PAGES_FILE } from './pages-file';
import { INDEX_BYTES, isZero, UNDO_FILE, UNDO_HEADER_BYTES, UndoJournal } from './undo-journal';

/**
 * A store whose committed snapshot survives a failed migration: before a migration first overwrites
 * (or drops) a page of that snapshot, the old page and digest go to an undo journal; rollback() puts
 * them back and the store claims the old snapshot again — unless a page was found corrupted, in which
 * case the store stays consistent but claims nothing. After a crash, PageStore.open() replays the same
 * journal. Data-path calls pass straight through for pages already saved or not part of the snapshot.
 */
export class UndoableStore {
  private snapshot: string | null = null;
  private saved: Uint8Array | null = null;
  private journal: UndoJournal | null = null;
  private corrupted = false;
  private layout: StoreLayout | null = null;
  /** Set by overBudget() for a store that keeps nothing this migration: the digests it shows, all absent. */
  private withheld: Uint8Array | null = null;
  /**
   * The page last read alone through readPages() and its index (-1: none), as the store holds it until
   * this object writes or drops that page. A codec reads a page's held version (a delta's base) right
   * before it writes the page's new one: the journal takes the old version from here instead of a
   * second read of the disk.
   */
  private lastReadIndex = -1;
  private lastRead: Buffer | null = null;

  constructor(readonly store: PageStore) {}

  get digests(): Uint8Array {
    return this.withheld ?? this.store.digests;
  }

  /**
   * Everything the store may hold by the end of the migration begun: pages and digests at their full
   * size, the undo journal if it protects a snapshot (one entry per page at most), and the files it
   * holds besides (meta, blobs) as they are now. What the disk budget must make room for.
   */
  needBytes(): number {
    const l = this.layout;
    if (l === null) return 0;
    const pages = l.pageCount * (l.pageSize + DIGEST_BYTES);
    const undo = this.journal !== null ? UNDO_HEADER_BYTES + l.pageCount * (INDEX_BYTES + DIGEST_BYTES + l.pageSize) : 0;
    let besides = 0;
    for (const name of fs.readdirSync(this.store.dir)) {
      if (name === PAGES_FILE || name === DIGESTS_FILE || name === UNDO_FILE) continue;
      try {
        besides += fs.lstatSync(path.join(this.store.dir, name)).size;
      } catch {
        // removed meanwhile
      }
    }
    return pages + undo + besides;
  }

  /** Whether this migration keeps nothing (overBudget() withheld it). */
  get withholding(): boolean {
    return this.withheld !== null;
  }

  /**
   * The disk budget has no room for needBytes(), right after begin() (nothing written yet). A store that
   * already holds pages of this layout keeps them, and the migration may reuse them, but goes on without
   * an undo journal: a failed migration then leaves the store claiming no snapshot instead of the old
   * one. Any other store (new, or reset for a new layout: the peer can reuse none of its pages) keeps
   * nothing at all: it is emptied, writes are ignored and every page reads as absent. Returns which.
   */
  overBudget(): 'no-undo' | 'withheld' {
    const l = this.layout;
    if (l === null) throw new Error('overBudget() before begin()');
    if (this.journal !== null || (this.store.meta()?.presentPages ?? 0) > 0) {
      this.discard();
      return 'no-undo';
    }
    this.store.abort();
    this.store.discardAll();
    this.discard();
    this.withheld = new Uint8Array(l.pageCount * DIGEST_BYTES);
    return 'withheld';
  }

  begin(layout: StoreLayout): void {
    this.withheld = null;
    this.lastReadIndex = -1;
    this.layout = layout;
    const before = this.store.meta();
    const snapshot = this.store.snapshotId();
    // A journal left by an earlier migration must never be taken for this one's.
    UndoJournal.remove(this.store.dir);
    // Pages of another layout are discarded by begin(): nothing left to protect.
    this.snapshot = snapshot !== null && before?.layoutId === layout.layoutId ? snapshot : null;
    if (this.snapshot !== null) {
      this.journal = UndoJournal.create(this.store.dir, {
        snapshotId: this.snapshot,
        layoutId: layout.layoutId,
        pageSize: layout.pageSize,
        pageCount: layout.pageCount,
      });
      this.saved = new Uint8Array(Math.ceil(layout.pageCount / 8));
    }
    try {
      this.store.begin(layout);
    } catch (err) {
      this.discard();
      throw err;
    }
  }

  writePage(index: number, src: Uint8Array, srcStart: number, digest: Uint8Array, digestStart: number): void {
    if (this.withheld !== null) return;
    this.save(index);
    this.forget(index);
    this.store.writePage(index, src, srcStart, digest, digestStart);
  }

  markAbsent(index: number): void {
    if (this.withheld !== null) return;
    this.save(index);
    this.forget(index);
    this.store.markAbsent(index);
  }

  /** Whether this migration found a corrupted page (until commit or rollback). */
  get corruptionFound(): boolean {
    return this.corrupted;
  }

  /** A corrupted page: dropped for good, and the old snapshot cannot be claimed again. */
  dropCorrupt(index: number): void {
    if (this.withheld !== null) return;
    this.corrupted = true;
    this.forget(index);
    this.store.markAbsent(index);
  }

  readPages(index: number, count: number, dest: Uint8Array, destStart: number, inStream = true): void {
    this.store.readPages(index, count, dest, destStart, inStream);
    // Kept only where the journal may still want it: a page it has not saved yet.
    if (count !== 1 || !this.journalWants(index)) return;
    const pageSize = (this.layout as StoreLayout).pageSize;
    this.lastRead ??= Buffer.allocUnsafe(pageSize);
    this.lastRead.set(dest.subarray(destStart, destStart + pageSize));
    this.lastReadIndex = index;
  }

  /**
   * Whether writing page `index` now would first save its old version in the journal, reading it from
   * the disk unless a lone readPages() of it just before kept it: then such a read is one the write makes
   * anyway (a Delta's base at the sender, the page's held version).
   */
  readsBeforeWrite(index: number): boolean {
    return this.withheld === null && this.journal !== null && this.journalWants(index) && !isZero(this.store.digests, index * DIGEST_BYTES, DIGEST_BYTES);
  }

  /** Whether readsBeforeWrite() may say yes of any page: the journal protects a snapshot (a back leg). */
  get readsHeldVersions(): boolean {
    return this.withheld === null && this.journal !== null;
  }

  /** Whether the journal protects a snapshot and has not saved page `index` yet this migration. */
  private journalWants(index: number): boolean {
    const saved = this.saved;
    return saved !== null && (saved[index >>> 3] & (1 << (index & 7))) === 0;
  }

  prefetchPages(indices: Uint32Array, count: number): void {
    if (this.withheld === null) this.store.prefetchPages(indices, count);
  }

  get rangeSlots(): number {
    return this.store.rangeSlots;
  }

  prefetchRanges(starts: Uint32Array, counts: Uint32Array, count: number): void {
    if (this.withheld === null) this.store.prefetchRanges(starts, counts, count);
  }

  /** The page is about to change: what readPages() kept of it is no longer what the store holds. */
  private forget(index: number): void {
    if (index === this.lastReadIndex) this.lastReadIndex = -1;
  }

  /** The migration completed: the new snapshot replaces the old one. */
  commit(snapshotId: string): void {
    if (this.withheld !== null) return;
    // The digest table on disk is the old snapshot's until commit rewrites it; a crash part-way through
    // that must still find every changed page's entry, after a power loss too.
    this.journal?.sync();
    this.store.commit(snapshotId);
    this.discard();
  }

  /**
   * The migration failed: puts back every page it changed and claims the old snapshot again; without
   * an old snapshot, leaves a consistent store that claims none.
   */
  rollback(): void {
    if (this.withheld !== null) return;
    const journal = this.journal;
    if (this.snapshot === null || journal === null || this.corrupted) {
      this.store.abort();
      this.discard();
      return;
    }
    const complete = journal.replay((index, digest, page, pageStart) => {
      if (isZero(digest, 0, DIGEST_BYTES)) this.store.markAbsent(index);
      else this.store.writePage(index, page, pageStart, digest, 0);
    });
    if (complete) this.store.commit(this.snapshot);
    else this.store.abort();
    this.discard();
  }

  private save(index: number): void {
    if (!this.journalWants(index)) return;
    (this.saved as Uint8Array)[index >>> 3] |= 1 << (index & 7);
    const kept = index === this.lastReadIndex ? this.lastRead : null;
    (this.journal as UndoJournal).append(index, this.store.digests, (dest, at) => (kept !== null ? void dest.set(kept, at) : this.store.readPages(index, 1, dest, at, false)));
  }

  private discard(): void {
    if (this.journal !== null) {
      this.journal.close();
      UndoJournal.remove(this.store.dir);
    }
    this.journal = null;
    this.saved = null;
    this.snapshot = null;
    this.corrupted = false;
    this.lastReadIndex = -1;
  }
}
