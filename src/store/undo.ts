import * as fs from 'node:fs';
import * as path from 'node:path';
import type { PageStore, StoreLayout } from './index';

const DIGEST_BYTES = 16;
const UNDO_FILE = 'undo';

/**
 * A store whose committed snapshot survives a failed migration: before a migration first overwrites
 * (or drops) a page of that snapshot, the old page and digest are appended to an undo file; rollback()
 * puts them back and the store claims the old snapshot again — unless a page was found corrupted, in
 * which case the store stays consistent but claims nothing. Data-path calls pass straight through
 * for pages already saved or not part of the snapshot. (After a crash the store still recovers to a
 * consistent state, but without its snapshot claim: the undo file is only used by rollback().)
 */
export class UndoableStore {
  private snapshot: string | null = null;
  private saved: Uint8Array | null = null;
  private fd = -1;
  private entries = 0;
  private corrupted = false;
  private readonly entry: Buffer;

  constructor(
    readonly store: PageStore,
    pageSize = 4096,
  ) {
    this.entry = Buffer.alloc(8 + DIGEST_BYTES + pageSize);
  }

  get digests(): Uint8Array {
    return this.store.digests;
  }

  begin(layout: StoreLayout): void {
    const before = this.store.meta();
    const snapshot = this.store.snapshotId();
    this.store.begin(layout);
    // Pages of another layout are discarded by begin(): nothing left to protect.
    this.snapshot = snapshot !== null && before?.layoutId === layout.layoutId ? snapshot : null;
    if (this.snapshot !== null) {
      this.saved = new Uint8Array(Math.ceil(layout.pageCount / 8));
      this.fd = fs.openSync(path.join(this.store.dir, UNDO_FILE), 'w+', 0o600);
    }
  }

  writePage(index: number, src: Uint8Array, srcStart: number, digest: Uint8Array, digestStart: number): void {
    this.save(index);
    this.store.writePage(index, src, srcStart, digest, digestStart);
  }

  markAbsent(index: number): void {
    this.save(index);
    this.store.markAbsent(index);
  }

  /** A corrupted page: dropped for good, and the old snapshot cannot be claimed again. */
  dropCorrupt(index: number): void {
    this.corrupted = true;
    this.store.markAbsent(index);
  }

  readPages(index: number, count: number, dest: Uint8Array, destStart: number): void {
    this.store.readPages(index, count, dest, destStart);
  }

  /** The migration completed: the new snapshot replaces the old one. */
  commit(snapshotId: string): void {
    this.store.commit(snapshotId);
    this.discard();
  }

  /**
   * The migration failed: puts back every page it changed and claims the old snapshot again; without
   * an old snapshot, leaves a consistent store that claims none.
   */
  rollback(): void {
    if (this.snapshot === null || this.fd < 0 || this.corrupted) {
      this.store.abort();
      this.discard();
      return;
    }
    for (let e = 0; e < this.entries; e++) {
      fs.readSync(this.fd, this.entry, 0, this.entry.length, e * this.entry.length);
      const index = this.entry.readUInt32BE(0) * 0x1_0000_0000 + this.entry.readUInt32BE(4);
      const digest = this.entry.subarray(8, 8 + DIGEST_BYTES);
      if (digest.every((b) => b === 0)) this.store.markAbsent(index);
      else this.store.writePage(index, this.entry, 8 + DIGEST_BYTES, digest, 0);
    }
    this.store.commit(this.snapshot);
    this.discard();
  }

  private save(index: number): void {
    const saved = this.saved;
    if (saved === null || (saved[index >>> 3] & (1 << (index & 7))) !== 0) return;
    saved[index >>> 3] |= 1 << (index & 7);
    const table = this.store.digests;
    const at = index * DIGEST_BYTES;
    const entry = this.entry;
    entry.writeUInt32BE(Math.floor(index / 0x1_0000_0000), 0);
    entry.writeUInt32BE(index % 0x1_0000_0000, 4);
    entry.set(table.subarray(at, at + DIGEST_BYTES), 8);
    let held = false;
    for (let i = 0; i < DIGEST_BYTES; i++) held ||= table[at + i] !== 0;
    if (held) this.store.readPages(index, 1, entry, 8 + DIGEST_BYTES);
    else entry.fill(0, 8 + DIGEST_BYTES);
    fs.writeSync(this.fd, entry, 0, entry.length, this.entries * entry.length);
    this.entries++;
  }

  private discard(): void {
    if (this.fd >= 0) {
      fs.closeSync(this.fd);
      fs.rmSync(path.join(this.store.dir, UNDO_FILE), { force: true });
    }
    this.fd = -1;
    this.saved = null;
    this.snapshot = null;
    this.entries = 0;
    this.corrupted = false;
  }
}
