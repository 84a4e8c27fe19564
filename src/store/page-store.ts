/**
 * PageStore: the retained snapshot of one VM's RAM, as pageCount fixed-size
 * pages with one 16-byte XXH3-128 digest per page. It owns the store's
 * lifecycle (open, lock, begin, commit, abort, recovery) and composes the
 * digest table (digest-table.ts) and the pages file's write path
 * (pages-file.ts).
 *
 * Directory root/<vm>/, every file written and read only by this layer:
 *   pages      pageCount*pageSize bytes, sparse; page i at byte i*pageSize
 *   digests    pageCount*16 bytes; digest i at byte 16*i; all-zero = page absent
 *   meta.json  StoreMeta + {"format": "bfmig-store/1"}, replaced atomically (meta.ts)
 *   undo       the running migration's undo journal (undo-journal.ts)
 *   blob-NAME  opaque blobs kept beside the pages (saveBlob; snapshot-parts.ts)
 *   lock       the process using the store (lock.ts)
 *
 * Invariant (whenever meta.json says state "clean"): every page whose digest
 * in `digests` is non-zero holds, in `pages`, content with exactly that digest.
 * Pages and digests are only modified while meta.json says "dirty". A process
 * that dies mid-migration leaves "dirty" behind; the next open() re-hashes
 * every present page and so restores the invariant (pages written by the dead
 * migration that were absent before it stay absent: their digests never
 * reached the disk), and claims the last snapshot again when the dead
 * migration's undo journal (see undo.ts) puts every page of it back. The digest table goes to disk only at commit()/abort()
 * (and verify()/recovery), never during a migration.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { DIGEST_BYTES, digestContiguous } from '../digest';
import { DigestTable, DIGESTS_FILE } from './digest-table';
import { fsyncDir, openRW, readFileNoFollow, requireRealDir, writeFileAtomic } from './fsio';
import { acquireLock, releaseLock, StoreBusyError } from './lock';
import { type StoreLayout, type StoreMeta, META_FILE, parseMeta, serializeMeta, validateLayout, validateVmName, MAX_PAGE_COUNT } from './meta';
import { PAGES_FILE, PagesFile } from './pages-file';
import { isZero, UndoJournal } from './undo-journal';

export interface PageStoreOptions {
  /** Size of the write-coalescing buffer (rounded down to whole pages, at least one). Default 1 MiB. Direct I/O uses its queue's buffers instead. */
  writeBufferBytes?: number;
  /** Bytes read per batch by verify() and crash recovery. Default 8 MiB. */
  hashBatchBytes?: number;
  /** Largest layout begin() accepts, in pages: its digest table is held in memory (16 B a page). */
  maxPages?: number;
  /** Move pages with O_DIRECT where the filesystem allows (default true; BFMIG_STORE_DIRECT_IO=0 turns it off). */
  directIo?: boolean;
}

const DEFAULT_WRITE_BUFFER_BYTES = 1024 * 1024;
const DEFAULT_HASH_BATCH_BYTES = 8 * 1024 * 1024;
const MAX_BUFFER_OPTION = 256 * 1024 * 1024;

/** Bytes of pages a store read from and wrote to its pages file (PageStore.pageIo). */
export interface PageIo {
  readBytes: number;
  writtenBytes: number;
}

/** Store directories open in this process (realpath): two instances on one directory would corrupt it. */
const openDirs = new Set<string>();

function bufferOption(name: string, v: number | undefined, dflt: number): number {
  if (v === undefined) return dflt;
  if (!Number.isInteger(v) || v < 1 || v > MAX_BUFFER_OPTION) {
    throw new RangeError(`PageStore option ${name} must be an integer in [1, ${MAX_BUFFER_OPTION}], got ${v}`);
  }
  return v;
}

export class PageStore {
  /** The VM name (validated; the directory name under root). */
  readonly vm: string;
  /** root/<vm>, absolute. */
  readonly dir: string;
  /**
   * What open() found and repaired (crash recovery, unreadable meta.json,
   * files of the wrong size); for the caller to log. Empty on a normal open.
   */
  readonly warnings: string[] = [];

  private readonly lockKey: string;
  private readonly hashBatchBytes: number;
  private readonly maxPages: number;
  /** The pages file and the write path into it; it also holds the page geometry of the current meta (0 when none). */
  private readonly pages: PagesFile;
  private readonly digestsFd: number;
  private closed = false;

  /** meta.json as last written or read, or null when nothing was ever stored. */
  private storedMeta: StoreMeta | null = null;
  /** The digest table, loaded on first use; null until then and after a reset empties the files. */
  private table: DigestTable | null = null;

  /** Between begin() and a successful commit()/abort(). */
  private active = false;

  private constructor(vm: string, dir: string, lockKey: string, digestsFd: number, options: PageStoreOptions) {
    this.vm = vm;
    this.dir = dir;
    this.lockKey = lockKey;
    this.digestsFd = digestsFd;
    const writeBufferBytes = bufferOption('writeBufferBytes', options.writeBufferBytes, DEFAULT_WRITE_BUFFER_BYTES);
    this.hashBatchBytes = bufferOption('hashBatchBytes', options.hashBatchBytes, DEFAULT_HASH_BATCH_BYTES);
    this.maxPages = options.maxPages ?? MAX_PAGE_COUNT;
    this.pages = PagesFile.open(path.join(dir, PAGES_FILE), options.directIo !== false, writeBufferBytes, `store ${vm}`, (first, last) =>
      this.table?.clearRange(first, last),
    );
  }

  /**
   * Opens (creating root/<vm> if needed) the store of one VM. If the last
   * migration died without commit()/abort() (meta state "dirty"), recovers
   * first: fsyncs the pages file, re-hashes every present page, rewrites the
   * digests file, and persists {state: clean, snapshotId: null}. That costs
   * one read of every present page. See `warnings` for what was repaired.
   * At most one PageStore per directory may be open in a process.
   */
  static open(root: string, vm: string, options: PageStoreOptions = {}): PageStore {
    validateVmName(vm);
    const absRoot = path.resolve(root);
    fs.mkdirSync(absRoot, { recursive: true });
    const dir = path.join(absRoot, vm);
    // A store being evicted is renamed away under its lock (budget.ts): if that happens between our
    // mkdir and our lock, the lock's directory is gone (ENOENT) and we start again with a new one.
    for (let attempt = 0; ; attempt++) {
      let created = false;
      try {
        fs.mkdirSync(dir, { mode: 0o700 });
        created = true;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      }
      try {
        if (created) fsyncDir(absRoot);
        requireRealDir(dir);
        if (openDirs.has(fs.realpathSync(dir))) throw new StoreBusyError(`store ${dir} is already open in this process`);
        acquireLock(dir);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT' && attempt < 5) continue;
        throw err;
      }
      break;
    }
    const lockKey = fs.realpathSync(dir);

    let digestsFd = -1;
    let store: PageStore | null = null;
    try {
      digestsFd = openRW(path.join(dir, DIGESTS_FILE));
      store = new PageStore(vm, dir, lockKey, digestsFd, options);
      store.init();
      openDirs.add(lockKey);
      return store;
    } catch (err) {
      if (store !== null) store.pages.close();
      if (digestsFd >= 0) fs.closeSync(digestsFd);
      releaseLock(dir);
      throw err;
    }
  }

  // ---------------------------------------------------------------- queries

  /**
   * The store's metadata, or null when nothing was ever stored. During a
   * migration state is "dirty" and snapshotId null; presentPages is the live
   * count whenever the digest table is loaded.
   */
  meta(): StoreMeta | null {
    if (this.storedMeta === null) return null;
    return { ...this.storedMeta, presentPages: this.table !== null ? this.table.presentPages : this.storedMeta.presentPages };
  }

  /** The complete snapshot this store claims (meta.snapshotId when clean), else null. */
  snapshotId(): string | null {
    const stored = this.storedMeta;
    return stored !== null && stored.state === 'clean' ? stored.snapshotId : null;
  }

  /** True between begin() and a successful commit()/abort(). */
  get migrating(): boolean {
    return this.active;
  }

  /** Whether pages move with O_DIRECT (else through the page cache). */
  get directIo(): boolean {
    return this.pages.directIo;
  }

  /**
   * Bytes of pages this store has read from its pages file (reads ahead included: with direct I/O what its
   * device read, but for never-written pages, holes of the file) and written to it since it was opened. Not after close().
   */
  get pageIo(): PageIo {
    return { readBytes: this.pages.readBytes, writtenBytes: this.pages.writtenBytes };
  }

  /** The store reads ahead with threads: the kernel refused it an AIO context (DirectPages.kernelReadsRefused). */
  get kernelReadsRefused(): boolean {
    return this.pages.kernelReadsRefused;
  }

  /**
   * The in-memory digest table: 16 bytes per page, page i at [16*i, 16*i+16);
   * all zero = absent. Read-only for the caller. The same array stays valid
   * until the next begin() that resets the store, or close(); writePage() and
   * markAbsent() update it in place. Loaded on first use (also outside a
   * migration); throws when nothing was ever stored.
   */
  get digests(): Uint8Array {
    this.checkOpen();
    return this.loadTable().bytes;
  }

  /** Whether page index is held (its digest is non-zero). */
  isPresent(index: number): boolean {
    this.checkOpen();
    const table = this.loadTable();
    this.checkIndex(index, 'isPresent');
    return table.isPresent(index);
  }

  // ------------------------------------------------------------- migration

  /**
   * Starts a migration (a new snapshot). If the layout (layoutId, pageSize or
   * pageCount) differs from the stored one, or nothing is stored, the store is
   * reset: every page absent, files truncated. Persists {state: dirty,
   * snapshotId: null} durably before returning; loads the digest table.
   */
  begin(layout: StoreLayout): void {
    this.checkOpen();
    if (this.active) throw new Error(`store ${this.vm}: begin(): a migration is already in progress (commit or abort it)`);
    const layoutJson = validateLayout(layout);
    if (layout.pageCount > this.maxPages) {
      throw new RangeError(`store ${this.vm}: the stream declares ${layout.pageCount} pages of ${layout.pageSize} bytes, more than the ${this.maxPages} allowed (limits.maxGuestRam)`);
    }
    const layoutValue: unknown = JSON.parse(layoutJson);
    const stored = this.storedMeta;
    const same =
      stored !== null &&
      stored.layoutId === layout.layoutId &&
      stored.pageSize === layout.pageSize &&
      stored.pageCount === layout.pageCount;
    if (same) {
      const table = this.loadTable();
      this.persistMeta({ ...stored, state: 'dirty', snapshotId: null, layout: layoutValue, presentPages: table.presentPages });
    } else {
      this.resetFiles(layout.layoutId, layoutValue, layout.pageSize, layout.pageCount);
    }
    this.pages.prepareWrites();
    this.active = true;
  }

  /**
   * Stores page `index` = src[srcStart .. srcStart+pageSize) with digest
   * digest[digestStart .. +16) (computed by the caller; an all-zero digest
   * makes the page absent). Only during a migration. The bytes are copied:
   * src may be reused as soon as this returns. Consecutive indexes (and
   * rewrites of a page still in the buffer) are coalesced into one write.
   */
  writePage(index: number, src: Uint8Array, srcStart: number, digest: Uint8Array, digestStart: number): void {
    if (!this.active) throw new Error(`store ${this.vm}: writePage() outside a migration (call begin() first)`);
    const pageSize = this.pages.pageSize;
    const pageCount = this.pages.pageCount;
    if (!Number.isInteger(index) || index < 0 || index >= pageCount) {
      throw new RangeError(`store ${this.vm}: writePage(): page ${index} out of range [0, ${pageCount})`);
    }
    if (!Number.isInteger(digestStart) || digestStart < 0 || digestStart + DIGEST_BYTES > digest.length) {
      throw new RangeError(`store ${this.vm}: writePage(): digest offset ${digestStart} out of range for length ${digest.length}`);
    }
    if (!Number.isInteger(srcStart) || srcStart < 0 || srcStart + pageSize > src.length) {
      throw new RangeError(`store ${this.vm}: writePage(): ${pageSize} bytes at offset ${srcStart} exceed the source (${src.length} bytes)`);
    }
    this.pages.write(index, src, srcStart, digest, digestStart);
    (this.table as DigestTable).set(index, digest, digestStart);
  }

  /** Page `index` is no longer held (its digest becomes zero). Only during a migration. */
  markAbsent(index: number): void {
    if (!this.active) throw new Error(`store ${this.vm}: markAbsent() outside a migration (call begin() first)`);
    this.checkIndex(index, 'markAbsent');
    (this.table as DigestTable).clear(index);
  }

  /**
   * Reads pages index .. index+count-1 into dest[destStart ..]. Throws if any
   * of them is absent (before reading anything). Pending writes overlapping
   * the range are flushed first. Works during and outside a migration.
   * inStream: the read is one of a series in ascending page order (a
   * rebuild), so the pages after it are worth reading ahead; false for a
   * lone page.
   */
  readPages(index: number, count: number, dest: Uint8Array, destStart: number, inStream = true): void {
    this.checkOpen();
    const table = this.loadTable();
    const pageSize = this.pages.pageSize;
    const pageCount = this.pages.pageCount;
    if (!Number.isInteger(count) || count < 0 || !Number.isInteger(index) || index < 0 || index + count > pageCount) {
      throw new RangeError(`store ${this.vm}: readPages(): pages [${index}, +${count}) out of range [0, ${pageCount})`);
    }
    if (!Number.isInteger(destStart) || destStart < 0 || destStart + count * pageSize > dest.length) {
      throw new RangeError(
        `store ${this.vm}: readPages(): ${count} pages at offset ${destStart} do not fit in ${dest.length} bytes`,
      );
    }
    const absent = table.firstAbsent(index, index + count);
    if (absent >= 0) throw new Error(`store ${this.vm}: readPages(): page ${absent} is absent`);
    if (count === 0) return;
    this.pages.read(index, count, dest, destStart, inStream);
  }

  /**
   * Has the held pages among indices[0 .. count-1] read ahead, for lone readPages() of them to come soon
   * (a receiver's Delta bases). Only a hint: nothing is read where the store moves pages through the page
   * cache, and a page written meanwhile is read again. `indices` is compacted in place.
   */
  prefetchPages(indices: Uint32Array, count: number): void {
    this.checkOpen();
    const table = this.loadTable();
    const pageCount = this.pages.pageCount;
    let n = 0;
    for (let i = 0; i < count; i++) {
      const index = indices[i];
      if (index < pageCount && table.isPresent(index)) indices[n++] = index;
    }
    this.pages.prefetch(indices, n);
  }

  /**
   * A hint: ranges of pages [starts[i], starts[i] + counts[i]) will be read soon, each in one readPages()
   * (a back leg's multifd Runs). Nothing is read where the store moves pages through the page cache, and
   * a range written meanwhile is read again. Ranges past the store's pages are cut or passed over.
   */
  /** Ranges prefetchRanges() reads ahead at once (the channels of a migration share them); 0: it reads none. */
  get rangeSlots(): number {
    return this.pages.rangeSlots;
  }

  prefetchRanges(starts: Uint32Array, counts: Uint32Array, count: number): void {
    this.checkOpen();
    const pageCount = this.pages.pageCount;
    let n = 0;
    for (let i = 0; i < count; i++) {
      if (starts[i] >= pageCount || counts[i] === 0) continue;
      starts[n] = starts[i];
      counts[n++] = Math.min(counts[i], pageCount - starts[i]);
    }
    this.pages.prefetchRanges(starts, counts, n);
  }

  /**
   * Ends the migration successfully: flushes, fsyncs the pages, writes and
   * fsyncs the digest table, then persists {snapshotId, state: clean}. If it
   * throws, the migration stays in progress (meta on disk still "dirty"):
   * call abort() or close(); a later open() recovers.
   */
  commit(snapshotId: string): void {
    if (typeof snapshotId !== 'string' || snapshotId.length === 0) {
      throw new TypeError(`store ${this.vm}: commit(): snapshotId must be a non-empty string`);
    }
    if (!this.active) throw new Error(`store ${this.vm}: commit() outside a migration`);
    this.finish(snapshotId);
  }

  /**
   * Makes the pages written so far durable without holding up the caller's thread: commit() then finds
   * little left to wait for. After a large write phase the file system's first commit can take seconds
   * (2.7 s after a 1 GiB first leg here, docs/benchmarks.md "Eighth session"), and whichever file
   * operation comes first waits for it: a gateway's main thread would stand still meanwhile, every other
   * migration through it with it. Only speeds commit() up: commit() still makes everything durable.
   */
  async syncInBackground(): Promise<void> {
    this.checkOpen();
    if (!this.active) return;
    this.pages.flush();
    this.pages.settle();
    await this.pages.syncInBackground();
  }

  /**
   * Ends a failed migration: flushes and persists pages and digests (each
   * present page's digest matches its content) but claims no snapshot
   * (snapshotId null, state clean). A no-op when no migration is in progress.
   */
  abort(): void {
    this.checkOpen();
    if (!this.active) return;
    this.finish(null);
  }

  /**
   * Empties the store for good, outside a migration: no pages, no digests, no meta.json (it is then a
   * store that never held anything). For a caller that may not keep what it began to store, e.g. when
   * the disk budget has no room for it: the files stop taking their full size at once.
   */
  discardAll(): void {
    this.checkOpen();
    if (this.active) throw new Error(`store ${this.vm}: discardAll() during a migration (abort it first)`);
    try {
      this.pages.settle();
    } catch {
      // failed writes of pages thrown away anyway
    }
    fs.rmSync(path.join(this.dir, META_FILE), { force: true });
    fsyncDir(this.dir);
    fs.ftruncateSync(this.digestsFd, 0);
    this.pages.truncateAll();
    this.storedMeta = null;
    this.table = null;
  }

  /**
   * Keeps an opaque named blob beside the pages (written atomically), e.g. what a caller needs besides
   * the pages to rebuild what it stored. Names are simple words.
   */
  saveBlob(name: string, data: Buffer): void {
    this.checkOpen();
    writeFileAtomic(this.dir, blobFile(name), data);
  }

  /** A blob saved by saveBlob(), or null. */
  loadBlob(name: string): Buffer | null {
    this.checkOpen();
    try {
      return readFileNoFollow(path.join(this.dir, blobFile(name)));
    } catch {
      return null;
    }
  }

  /**
   * Re-hashes every present page and compares with its digest; corrupted
   * pages are marked absent and their indexes returned (ascending). Outside a
   * migration, finding any also drops the snapshot claim (snapshotId null)
   * and persists the digests; during one, the table is persisted by
   * commit()/abort(). Reads every present page: slow on big stores.
   */
  verify(): number[] {
    this.checkOpen();
    if (this.storedMeta === null) return [];
    const table = this.loadTable();
    if (this.active) this.pages.flush();
    this.pages.settle();
    const bad: number[] = [];
    this.rehash(table, (i) => {
      bad.push(i);
      table.clear(i);
    });
    if (bad.length > 0 && !this.active) {
      // Drop the claim and go "dirty" first: a crash while the digests are
      // rewritten then ends in recovery, never in a clean store whose digests
      // disagree with its pages, nor in a snapshot claimed with pages missing.
      this.persistMeta({ ...this.storedMeta, state: 'dirty', snapshotId: null, presentPages: table.presentPages });
      table.writeDirty(this.digestsFd);
      fs.fsyncSync(this.digestsFd);
      this.persistMeta({ ...this.storedMeta, state: 'clean', snapshotId: null, presentPages: table.presentPages });
    }
    return bad;
  }

  /**
   * Closes the files. A migration still in progress is aborted first (pages
   * and digests persisted, no snapshot claimed); if that fails the files are
   * closed anyway, the error is rethrown and the next open() recovers.
   */
  close(): void {
    if (this.closed) return;
    try {
      if (this.active) this.finish(null);
    } finally {
      this.closed = true;
      this.active = false;
      this.table = null;
      this.pages.dropWrites();
      openDirs.delete(this.lockKey);
      try {
        this.pages.close();
      } finally {
        fs.closeSync(this.digestsFd);
        releaseLock(this.dir);
      }
    }
  }

  // -------------------------------------------------------------- internals

  private init(): void {
    const metaPath = path.join(this.dir, META_FILE);
    let text: string;
    try {
      text = readFileNoFollow(metaPath).toString('utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw err;
    }
    const parsed = parseMeta(text, this.vm);
    if ('error' in parsed) {
      this.warnings.push(`ignored ${metaPath}: ${parsed.error}; the store is treated as empty`);
      return;
    }
    const meta = parsed.meta;
    this.storedMeta = meta;
    this.pages.setGeometry(meta.pageSize, meta.pageCount);
    const pagesSize = this.pages.size();
    const digestsSize = fs.fstatSync(this.digestsFd).size;
    if (pagesSize !== meta.pageCount * meta.pageSize || digestsSize !== meta.pageCount * DIGEST_BYTES) {
      // Also the trace of a crash in the middle of a reset (see resetFiles).
      this.warnings.push(
        `${this.dir}: pages file is ${pagesSize} bytes and digests file ${digestsSize} bytes, ` +
          `want ${meta.pageCount * meta.pageSize} and ${meta.pageCount * DIGEST_BYTES}; reset to empty`,
      );
      this.resetFiles(meta.layoutId, meta.layout, meta.pageSize, meta.pageCount);
      this.persistMeta({ ...(this.storedMeta as StoreMeta), state: 'clean' });
      return;
    }
    if (meta.state === 'dirty') this.recover();
  }

  /**
   * Crash recovery. The digests file still holds the last committed table (it is only rewritten at the
   * end of a migration); the pages file holds whatever the dead migration wrote. First the undo journal,
   * if the dead migration kept one, puts back the pages and digests of the snapshot it protected; then
   * every present page is re-hashed and any digest that disagrees with its page is corrected. The
   * protected snapshot is claimed again only if the journal replayed whole and no digest needed
   * correcting; otherwise the store is consistent and claims nothing.
   */
  private recover(): void {
    const meta = this.storedMeta as StoreMeta;
    const table = this.loadTable();
    const journal = UndoJournal.open(this.dir, meta);
    let restored = 0;
    let replayed = false;
    if (journal !== null) {
      try {
        replayed = journal.replay((index, digest, page, pageStart) => {
          if (isZero(digest, 0, DIGEST_BYTES)) {
            table.clear(index);
          } else {
            this.pages.writeThrough(index, page, pageStart);
            table.set(index, digest, 0);
          }
          restored++;
        });
      } finally {
        journal.close();
      }
    }
    this.pages.sync(); // hash what is durable, not just what is in the page cache
    let corrected = 0;
    const hashed = this.rehash(table, (i, hashes, at) => {
      table.set(i, hashes, at);
      corrected++;
    });
    const claim = journal !== null && replayed && corrected === 0 ? journal.header.snapshotId : null;
    table.markAllDirty();
    table.writeDirty(this.digestsFd);
    fs.fsyncSync(this.digestsFd);
    this.persistMeta({ ...meta, state: 'clean', snapshotId: claim, presentPages: table.presentPages });
    UndoJournal.remove(this.dir);
    const undo =
      journal === null
        ? 'no undo journal'
        : `put back ${restored} pages from the undo journal${replayed ? '' : ' (journal cut short)'}`;
    this.warnings.push(
      `${this.dir}: recovered from an interrupted migration: ${undo}, re-hashed ${hashed} present pages, ` +
        `corrected ${corrected} digests; ` +
        (claim !== null ? `snapshot ${claim} is claimed again` : 'no snapshot claimed'),
    );
  }

  /**
   * Empties the store for a (new) layout; leaves meta state "dirty".
   * Order matters for crash safety: the old digests go first (so no old page
   * can ever be taken as present under the new layout), then meta.json, then
   * the pages; a crash in between leaves files of the wrong size, which
   * open() treats as "reset again".
   */
  private resetFiles(layoutId: string, layout: unknown, pageSize: number, pageCount: number): void {
    try {
      this.pages.settle();
    } catch {
      // a failed write of pages the reset throws away
    }
    this.pages.forgetHoles();
    this.table = null;
    fs.ftruncateSync(this.digestsFd, 0);
    fs.fsyncSync(this.digestsFd);
    this.persistMeta({
      vm: this.vm,
      snapshotId: null,
      state: 'dirty',
      layoutId,
      layout,
      pageSize,
      pageCount,
      presentPages: 0,
    });
    this.pages.recreate(pageSize, pageCount);
    fs.ftruncateSync(this.digestsFd, pageCount * DIGEST_BYTES);
    this.pages.sync();
    fs.fsyncSync(this.digestsFd);
    this.table = DigestTable.empty(pageCount);
  }

  private finish(snapshotId: string | null): void {
    const table = this.table as DigestTable;
    this.pages.flush();
    this.pages.settle();
    this.pages.sync();
    table.writeDirty(this.digestsFd);
    fs.fsyncSync(this.digestsFd);
    this.persistMeta({ ...(this.storedMeta as StoreMeta), state: 'clean', snapshotId, presentPages: table.presentPages });
    this.active = false;
  }

  /**
   * Hashes every present page from the pages file, in batches of
   * hashBatchBytes (one read per batch, from its first to its last present
   * page), and calls onMismatch(index, hashes, offset) for each page whose
   * digest differs from the table. Returns the number of pages hashed.
   */
  private rehash(table: DigestTable, onMismatch: (index: number, hashes: Uint8Array, offset: number) => void): number {
    const pageSize = this.pages.pageSize;
    const pageCount = this.pages.pageCount;
    const batch = Math.max(1, Math.floor(this.hashBatchBytes / pageSize));
    const buf = Buffer.allocUnsafeSlow(batch * pageSize);
    const hashes = new Uint8Array(batch * DIGEST_BYTES);
    const hashWords = new Uint32Array(hashes.buffer, hashes.byteOffset, batch * 4);
    let hashed = 0;
    for (let b = 0; b < pageCount; b += batch) {
      const end = Math.min(pageCount, b + batch);
      const first = table.firstPresent(b, end);
      if (first < 0) continue;
      const last = table.lastPresent(first, end);
      const n = last - first + 1;
      this.pages.readRaw(buf, 0, n * pageSize, first * pageSize);
      digestContiguous(buf, 0, n, pageSize, hashes, 0);
      for (let i = first, k = 0; i <= last; i++, k += 4) {
        if (!table.isPresent(i)) continue;
        hashed++;
        if (!table.matches(i, hashWords, k)) onMismatch(i, hashes, k * 4);
      }
    }
    return hashed;
  }

  /** The digest table, read from the digests file on first use; throws when nothing was ever stored. */
  private loadTable(): DigestTable {
    if (this.table !== null) return this.table;
    if (this.storedMeta === null) throw new Error(`store ${this.vm}: nothing stored yet (call begin() first)`);
    this.table = DigestTable.load(this.digestsFd, this.pages.pageCount);
    return this.table;
  }

  private persistMeta(fields: Omit<StoreMeta, 'updatedAt'>): void {
    const meta: StoreMeta = { ...fields, vm: this.vm, updatedAt: new Date().toISOString() };
    writeFileAtomic(this.dir, META_FILE, serializeMeta(meta));
    this.storedMeta = meta;
  }

  private checkIndex(index: number, op: string): void {
    const pageCount = this.pages.pageCount;
    if (!Number.isInteger(index) || index < 0 || index >= pageCount) {
      throw new RangeError(`store ${this.vm}: ${op}(): page ${index} out of range [0, ${pageCount})`);
    }
  }

  private checkOpen(): void {
    if (this.closed) throw new Error(`store ${this.vm}: closed`);
  }
}

function blobFile(name: string): string {
  if (!/^[a-z][a-z0-9-]{0,31}$/.test(name)) throw new Error(`blob name ${JSON.stringify(name)} is not a simple word`);
  return `blob-${name}`;
}
