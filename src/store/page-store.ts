/**
 * PageStore: the retained snapshot of one VM's RAM, as pageCount fixed-size
 * pages with one 16-byte XXH3-128 digest per page.
 *
 * Directory root/<vm>/:
 *   pages      pageCount*pageSize bytes, sparse; page i at byte i*pageSize
 *   digests    pageCount*16 bytes; digest i at byte 16*i; all-zero = page absent
 *   meta.json  StoreMeta + {"format": "bfmig-store/1"}, replaced atomically
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
 *
 * Data path: writePage() copies into one preallocated coalescing buffer and
 * the buffer goes to disk in one positioned write per run of consecutive
 * pages; no allocation, promise or syscall per page. Where the filesystem
 * allows, page reads and writes bypass the page cache (direct-pages.ts):
 * writes are queued to a thread and settled before anything relies on them
 * being on disk (commit, abort, verify, reset). After a reset, all-zero
 * pages (recognised by their digest) are not written at all while their
 * region of the sparse file is known to be a hole.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { DIGEST_BYTES, digestContiguous, digestOne } from '../digest';
import { copyBytes } from './copy';
import { DIRECT_IO_ALIGN, DirectPages, DirectWriteError } from './direct-pages';
import { fsyncDir, openRW, preadFully, pwriteFully, readFileNoFollow, requireRealDir, writeFileAtomic } from './fsio';
import { acquireLock, releaseLock, StoreBusyError } from './lock';
import { errorMessage } from '../common/errors';
import { type StoreLayout, type StoreMeta, parseMeta, serializeMeta, validateLayout, validateVmName, MAX_PAGE_COUNT } from './meta';
import { UndoJournal } from './undo-journal';

export const PAGES_FILE = 'pages';
export const DIGESTS_FILE = 'digests';
export const META_FILE = 'meta.json';

/** Pages per dirty-tracking chunk of the digest table (64 KiB of digests). */
const DIRTY_CHUNK_SHIFT = 12;
const DIRTY_CHUNK_PAGES = 1 << DIRTY_CHUNK_SHIFT;
/** Most digest-table bytes written by one write call. */
const DIGEST_WRITE_MAX_BYTES = 16 * 1024 * 1024;

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
  private readonly writeBufferBytes: number;
  private readonly hashBatchBytes: number;
  private readonly maxPages: number;
  private pagesFd: number;
  private digestsFd: number;
  /** The pages file opened for direct I/O, or null (page cache only). */
  private readonly direct: DirectPages | null;
  private closed = false;

  private m: StoreMeta | null = null;
  /** Page geometry of the current meta (0 when there is none). */
  private ps = 0;
  private pc = 0;

  /** Digest table (pageCount*16), its 32-bit view, per-chunk dirty flags, present count. */
  private table: Uint8Array | null = null;
  private t32: Uint32Array | null = null;
  private dirty: Uint8Array | null = null;
  private present = 0;

  /**
   * After a reset by this instance: bit i set = page i's region of the pages
   * file is still a hole (reads as zeros), so writing an all-zero page there
   * is skipped. pageCount/8 bytes; null when unknown (e.g. after reopen).
   */
  private zeroKnown: Uint8Array | null = null;
  /** Digest of an all-zero page of the current page size. */
  private zeroDigest: Uint8Array | null = null;
  private zeroDigestSize = 0;

  /** Between begin() and a successful commit()/abort(). */
  private active = false;

  /** Write-coalescing buffer: pages wStart .. wStart+wCount-1 pending at slots 0..wCount-1. */
  private wbuf: Buffer | null = null;
  private wcap = 0;
  /** With direct I/O, wbuf is the write queue's buffer of this index, lent until flush() submits it. */
  private lent = -1;
  private wStart = 0;
  private wCount = 0;

  private constructor(
    vm: string,
    dir: string,
    lockKey: string,
    pagesFd: number,
    digestsFd: number,
    direct: DirectPages | null,
    options: PageStoreOptions,
  ) {
    this.vm = vm;
    this.dir = dir;
    this.lockKey = lockKey;
    this.pagesFd = pagesFd;
    this.digestsFd = digestsFd;
    this.direct = direct;
    this.writeBufferBytes = bufferOption('writeBufferBytes', options.writeBufferBytes, DEFAULT_WRITE_BUFFER_BYTES);
    this.hashBatchBytes = bufferOption('hashBatchBytes', options.hashBatchBytes, DEFAULT_HASH_BATCH_BYTES);
    this.maxPages = options.maxPages ?? MAX_PAGE_COUNT;
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

    let pagesFd = -1;
    let digestsFd = -1;
    let direct: DirectPages | null = null;
    try {
      const pagesFile = path.join(dir, PAGES_FILE);
      pagesFd = openRW(pagesFile);
      digestsFd = openRW(path.join(dir, DIGESTS_FILE));
      if (options.directIo !== false) direct = DirectPages.open(pagesFile, fs.fstatSync(pagesFd).size);
      const store = new PageStore(vm, dir, lockKey, pagesFd, digestsFd, direct, options);
      store.init();
      openDirs.add(lockKey);
      return store;
    } catch (err) {
      if (direct !== null) direct.close();
      if (pagesFd >= 0) fs.closeSync(pagesFd);
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
    if (this.m === null) return null;
    return { ...this.m, presentPages: this.table !== null ? this.present : this.m.presentPages };
  }

  /** The complete snapshot this store claims (meta.snapshotId when clean), else null. */
  snapshotId(): string | null {
    const m = this.m;
    return m !== null && m.state === 'clean' ? m.snapshotId : null;
  }

  /** True between begin() and a successful commit()/abort(). */
  get migrating(): boolean {
    return this.active;
  }

  /** Whether pages move with O_DIRECT (else through the page cache). */
  get directIo(): boolean {
    return this.directPages() !== null;
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
    return this.ensureTable();
  }

  /** Whether page index is held (its digest is non-zero). */
  isPresent(index: number): boolean {
    this.checkOpen();
    this.ensureTable();
    this.checkIndex(index, 'isPresent');
    const t32 = this.t32 as Uint32Array;
    const j = index * 4;
    return (t32[j] | t32[j + 1] | t32[j + 2] | t32[j + 3]) !== 0;
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
    const m = this.m;
    const same =
      m !== null &&
      m.layoutId === layout.layoutId &&
      m.pageSize === layout.pageSize &&
      m.pageCount === layout.pageCount;
    this.wCount = 0;
    if (same) {
      this.ensureTable();
      this.persistMeta({ ...m, state: 'dirty', snapshotId: null, layout: layoutValue, presentPages: this.present });
    } else {
      this.resetFiles(layout.layoutId, layoutValue, layout.pageSize, layout.pageCount);
    }
    this.ensureWriteBuffer();
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
    const ps = this.ps;
    if (!Number.isInteger(index) || index < 0 || index >= this.pc) {
      throw new RangeError(`store ${this.vm}: writePage(): page ${index} out of range [0, ${this.pc})`);
    }
    if (!Number.isInteger(digestStart) || digestStart < 0 || digestStart + DIGEST_BYTES > digest.length) {
      throw new RangeError(`store ${this.vm}: writePage(): digest offset ${digestStart} out of range for length ${digest.length}`);
    }
    if (!Number.isInteger(srcStart) || srcStart < 0 || srcStart + ps > src.length) {
      throw new RangeError(`store ${this.vm}: writePage(): ${ps} bytes at offset ${srcStart} exceed the source (${src.length} bytes)`);
    }
    const zk = this.zeroKnown;
    if (zk !== null && (zk[index >>> 3] & (1 << (index & 7))) !== 0) {
      // The page's region of the file is still a hole. A zero page needs no write.
      if (this.isZeroPageDigest(digest, digestStart)) {
        this.setDigest(index, digest, digestStart);
        return;
      }
      zk[index >>> 3] &= ~(1 << (index & 7));
    }
    const n = this.wCount;
    const rel = index - this.wStart;
    let slot: number;
    if (n > 0 && rel >= 0 && rel < n) {
      slot = rel; // rewrite of a pending page
    } else if (n > 0 && rel === n && n < this.wcap) {
      slot = n; // extends the run
    } else {
      if (n > 0) this.flush();
      this.wStart = index;
      slot = 0;
    }
    copyBytes(src, srcStart, this.wbuf ?? this.lendBuffer(), slot * ps, ps);
    if (slot === this.wCount) this.wCount = slot + 1;
    this.setDigest(index, digest, digestStart);
  }

  /** Page `index` is no longer held (its digest becomes zero). Only during a migration. */
  markAbsent(index: number): void {
    if (!this.active) throw new Error(`store ${this.vm}: markAbsent() outside a migration (call begin() first)`);
    this.checkIndex(index, 'markAbsent');
    this.clearDigest(index);
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
    const t32 = (this.ensureTable(), this.t32 as Uint32Array);
    const ps = this.ps;
    if (!Number.isInteger(count) || count < 0 || !Number.isInteger(index) || index < 0 || index + count > this.pc) {
      throw new RangeError(`store ${this.vm}: readPages(): pages [${index}, +${count}) out of range [0, ${this.pc})`);
    }
    if (!Number.isInteger(destStart) || destStart < 0 || destStart + count * ps > dest.length) {
      throw new RangeError(
        `store ${this.vm}: readPages(): ${count} pages at offset ${destStart} do not fit in ${dest.length} bytes`,
      );
    }
    const end = index + count;
    for (let i = index, j = index * 4; i < end; i++, j += 4) {
      if ((t32[j] | t32[j + 1] | t32[j + 2] | t32[j + 3]) === 0) {
        throw new Error(`store ${this.vm}: readPages(): page ${i} is absent`);
      }
    }
    if (count === 0) return;
    if (this.wCount > 0 && index < this.wStart + this.wCount && this.wStart < end) this.flush();
    const direct = this.directPages();
    if (direct !== null) direct.read(dest, destStart, count * ps, index * ps, inStream);
    else preadFully(this.pagesFd, dest, destStart, count * ps, index * ps);
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
      this.settleWrites();
    } catch {
      // failed writes of pages thrown away anyway
    }
    fs.rmSync(path.join(this.dir, META_FILE), { force: true });
    fsyncDir(this.dir);
    fs.ftruncateSync(this.digestsFd, 0);
    fs.ftruncateSync(this.pagesFd, 0);
    this.direct?.setSize(0);
    this.m = null;
    this.ps = 0;
    this.pc = 0;
    this.table = null;
    this.t32 = null;
    this.dirty = null;
    this.zeroKnown = null;
    this.present = 0;
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
    if (this.m === null) return [];
    this.ensureTable();
    if (this.active) this.flush();
    this.settleWrites();
    const bad: number[] = [];
    this.rehash((i) => {
      bad.push(i);
      this.clearDigest(i);
    });
    if (bad.length > 0 && !this.active) {
      // Drop the claim and go "dirty" first: a crash while the digests are
      // rewritten then ends in recovery, never in a clean store whose digests
      // disagree with its pages, nor in a snapshot claimed with pages missing.
      this.persistMeta({ ...this.m, state: 'dirty', snapshotId: null, presentPages: this.present });
      this.writeDirtyDigests();
      fs.fsyncSync(this.digestsFd);
      this.persistMeta({ ...this.m, state: 'clean', snapshotId: null, presentPages: this.present });
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
      this.t32 = null;
      this.dirty = null;
      this.zeroKnown = null;
      this.wbuf = null;
      this.wCount = 0;
      openDirs.delete(this.lockKey);
      try {
        if (this.direct !== null) this.direct.close();
      } catch {
        // Writes still queued here are those of a finish() that failed: the store on disk is still
        // "dirty", and the next open() re-hashes every page.
      }
      try {
        fs.closeSync(this.pagesFd);
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
    const m = parsed.meta;
    this.m = m;
    this.ps = m.pageSize;
    this.pc = m.pageCount;
    const pagesSize = fs.fstatSync(this.pagesFd).size;
    const digestsSize = fs.fstatSync(this.digestsFd).size;
    if (pagesSize !== m.pageCount * m.pageSize || digestsSize !== m.pageCount * DIGEST_BYTES) {
      // Also the trace of a crash in the middle of a reset (see resetFiles).
      this.warnings.push(
        `${this.dir}: pages file is ${pagesSize} bytes and digests file ${digestsSize} bytes, ` +
          `want ${m.pageCount * m.pageSize} and ${m.pageCount * DIGEST_BYTES}; reset to empty`,
      );
      this.resetFiles(m.layoutId, m.layout, m.pageSize, m.pageCount);
      this.persistMeta({ ...(this.m as StoreMeta), state: 'clean' });
      return;
    }
    if (m.state === 'dirty') this.recover();
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
    const m = this.m as StoreMeta;
    const t = this.ensureTable();
    const journal = UndoJournal.open(this.dir, m);
    let restored = 0;
    let replayed = false;
    if (journal !== null) {
      try {
        replayed = journal.replay((index, digest, page, pageStart) => {
          if (digest.every((b) => b === 0)) {
            this.clearDigest(index);
          } else {
            pwriteFully(this.pagesFd, page, pageStart, this.ps, index * this.ps);
            this.setDigest(index, digest, 0);
          }
          restored++;
        });
      } finally {
        journal.close();
      }
    }
    fs.fsyncSync(this.pagesFd); // hash what is durable, not just what is in the page cache
    let corrected = 0;
    const hashed = this.rehash((i, out, outOff) => {
      copyBytes(out, outOff, t, i * DIGEST_BYTES, DIGEST_BYTES);
      corrected++;
    });
    const claim = journal !== null && replayed && corrected === 0 ? journal.header.snapshotId : null;
    this.present = this.countPresent();
    (this.dirty as Uint8Array).fill(1);
    this.writeDirtyDigests();
    fs.fsyncSync(this.digestsFd);
    this.persistMeta({ ...m, state: 'clean', snapshotId: claim, presentPages: this.present });
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
      this.settleWrites();
    } catch {
      // a failed write of pages the reset throws away
    }
    this.zeroKnown = null;
    this.table = null;
    this.t32 = null;
    this.dirty = null;
    this.present = 0;
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
    this.ps = pageSize;
    this.pc = pageCount;
    fs.ftruncateSync(this.pagesFd, 0); // drop the old blocks
    fs.ftruncateSync(this.pagesFd, pageCount * pageSize);
    fs.ftruncateSync(this.digestsFd, pageCount * DIGEST_BYTES);
    this.direct?.setSize(pageCount * pageSize);
    fs.fsyncSync(this.pagesFd);
    fs.fsyncSync(this.digestsFd);
    this.setTable(new Uint8Array(pageCount * DIGEST_BYTES));
    this.zeroKnown = new Uint8Array(Math.ceil(pageCount / 8)).fill(0xff);
  }

  private finish(snapshotId: string | null): void {
    this.flush();
    this.settleWrites();
    fs.fsyncSync(this.pagesFd);
    this.writeDirtyDigests();
    fs.fsyncSync(this.digestsFd);
    this.persistMeta({ ...(this.m as StoreMeta), state: 'clean', snapshotId, presentPages: this.present });
    this.active = false;
  }

  /** Writes the pending run. On failure its pages become absent (their content on disk is unknown). */
  private flush(): void {
    const n = this.wCount;
    if (n === 0) return;
    const start = this.wStart;
    this.wCount = 0;
    const direct = this.directPages();
    try {
      if (direct !== null) {
        const lent = this.lent;
        this.lent = -1;
        this.wbuf = null;
        direct.submit(lent, n * this.ps, start * this.ps);
      } else {
        pwriteFully(this.pagesFd, this.wbuf as Buffer, 0, n * this.ps, start * this.ps);
      }
    } catch (err) {
      if (err instanceof DirectWriteError) throw this.directWriteFailed(err);
      for (let i = start; i < start + n; i++) this.clearDigest(i);
      throw new Error(
        `store ${this.vm}: writing pages ${start}..${start + n - 1} failed: ${errorMessage(err)}; they are now absent`,
        { cause: err },
      );
    }
  }

  /** Direct I/O for the current page size (O_DIRECT needs whole 4 KiB blocks), else null. */
  private directPages(): DirectPages | null {
    return this.direct !== null && this.ps > 0 && this.ps % DIRECT_IO_ALIGN === 0 ? this.direct : null;
  }

  /**
   * Waits for the queued page writes: before the pages are fsynced, read another way, or thrown away.
   * A write that failed makes its pages absent and throws.
   */
  private settleWrites(): void {
    if (this.direct === null) return;
    try {
      this.direct.drain();
    } catch (err) {
      if (err instanceof DirectWriteError) throw this.directWriteFailed(err);
      throw err;
    }
  }

  /** The pages a failed queued write covered become absent (their content on disk is unknown). */
  private directWriteFailed(err: DirectWriteError): Error {
    const ps = this.ps;
    const first = Math.floor(err.start / ps);
    const last = Math.min(this.pc, Math.ceil(err.end / ps)) - 1;
    if (this.t32 !== null) for (let i = first; i <= last; i++) this.clearDigest(i);
    return new Error(`store ${this.vm}: writing pages ${first}..${last} failed: ${err.message}; they are now absent`, { cause: err });
  }

  private setDigest(index: number, digest: Uint8Array, digestStart: number): void {
    const t = this.table as Uint8Array;
    const t32 = this.t32 as Uint32Array;
    const j = index * 4;
    const was = (t32[j] | t32[j + 1] | t32[j + 2] | t32[j + 3]) !== 0;
    const o = index * DIGEST_BYTES;
    for (let k = 0; k < DIGEST_BYTES; k++) t[o + k] = digest[digestStart + k];
    const now = (t32[j] | t32[j + 1] | t32[j + 2] | t32[j + 3]) !== 0;
    if (was !== now) this.present += now ? 1 : -1;
    (this.dirty as Uint8Array)[index >>> DIRTY_CHUNK_SHIFT] = 1;
  }

  private isZeroPageDigest(digest: Uint8Array, at: number): boolean {
    const z = this.zeroDigest as Uint8Array;
    for (let k = 0; k < DIGEST_BYTES; k++) if (digest[at + k] !== z[k]) return false;
    return true;
  }

  private clearDigest(index: number): void {
    const t32 = this.t32 as Uint32Array;
    const j = index * 4;
    if ((t32[j] | t32[j + 1] | t32[j + 2] | t32[j + 3]) === 0) return;
    t32[j] = 0;
    t32[j + 1] = 0;
    t32[j + 2] = 0;
    t32[j + 3] = 0;
    this.present--;
    (this.dirty as Uint8Array)[index >>> DIRTY_CHUNK_SHIFT] = 1;
  }

  /**
   * Hashes every present page from the pages file, in batches of
   * hashBatchBytes (one read per batch, from its first to its last present
   * page), and calls onMismatch(index, hashes, offset) for each page whose
   * digest differs from the table. Returns the number of pages hashed.
   */
  private rehash(onMismatch: (index: number, hashes: Uint8Array, offset: number) => void): number {
    const ps = this.ps;
    const pc = this.pc;
    const t32 = this.t32 as Uint32Array;
    const batch = Math.max(1, Math.floor(this.hashBatchBytes / ps));
    const buf = Buffer.allocUnsafeSlow(batch * ps);
    const hashes = new Uint8Array(batch * DIGEST_BYTES);
    const h32 = new Uint32Array(hashes.buffer, hashes.byteOffset, batch * 4);
    let hashed = 0;
    for (let b = 0; b < pc; b += batch) {
      const end = Math.min(pc, b + batch);
      let first = -1;
      let last = -1;
      for (let i = b, j = b * 4; i < end; i++, j += 4) {
        if ((t32[j] | t32[j + 1] | t32[j + 2] | t32[j + 3]) !== 0) {
          if (first < 0) first = i;
          last = i;
        }
      }
      if (first < 0) continue;
      const n = last - first + 1;
      preadFully(this.pagesFd, buf, 0, n * ps, first * ps);
      digestContiguous(buf, 0, n, ps, hashes, 0);
      for (let i = first, j = first * 4, k = 0; i <= last; i++, j += 4, k += 4) {
        if ((t32[j] | t32[j + 1] | t32[j + 2] | t32[j + 3]) === 0) continue;
        hashed++;
        if (t32[j] !== h32[k] || t32[j + 1] !== h32[k + 1] || t32[j + 2] !== h32[k + 2] || t32[j + 3] !== h32[k + 3]) {
          onMismatch(i, hashes, k * 4);
        }
      }
    }
    return hashed;
  }

  /** Writes the dirty chunks of the digest table (coalesced), then clears their flags. No fsync. */
  private writeDirtyDigests(): void {
    const d = this.dirty;
    const t = this.table;
    if (d === null || t === null) return;
    const chunkBytes = DIRTY_CHUNK_PAGES * DIGEST_BYTES;
    const maxChunks = DIGEST_WRITE_MAX_BYTES / chunkBytes;
    let c = d.indexOf(1);
    while (c >= 0) {
      let e = c + 1;
      while (e < d.length && d[e] !== 0 && e - c < maxChunks) e++;
      const from = c * chunkBytes;
      const to = Math.min(t.length, e * chunkBytes);
      pwriteFully(this.digestsFd, t, from, to - from, from);
      d.fill(0, c, e);
      c = d.indexOf(1, e);
    }
  }

  private ensureTable(): Uint8Array {
    if (this.table !== null) return this.table;
    if (this.m === null) throw new Error(`store ${this.vm}: nothing stored yet (call begin() first)`);
    const bytes = this.pc * DIGEST_BYTES;
    const t = new Uint8Array(bytes);
    preadFully(this.digestsFd, t, 0, bytes, 0);
    this.setTable(t);
    this.present = this.countPresent();
    return t;
  }

  private setTable(t: Uint8Array): void {
    this.table = t;
    this.t32 = new Uint32Array(t.buffer, t.byteOffset, t.length >>> 2);
    this.dirty = new Uint8Array(Math.ceil(this.pc / DIRTY_CHUNK_PAGES));
  }

  private countPresent(): number {
    const t32 = this.t32 as Uint32Array;
    let n = 0;
    for (let j = 0; j < t32.length; j += 4) {
      if ((t32[j] | t32[j + 1] | t32[j + 2] | t32[j + 3]) !== 0) n++;
    }
    return n;
  }

  private ensureWriteBuffer(): void {
    if (this.zeroDigest === null || this.zeroDigestSize !== this.ps) {
      const zd = new Uint8Array(DIGEST_BYTES);
      digestOne(new Uint8Array(this.ps), 0, this.ps, zd, 0);
      this.zeroDigest = zd;
      this.zeroDigestSize = this.ps;
    }
    const direct = this.directPages();
    if (direct !== null) {
      // Pages are laid out in the write queue's own buffers (lent one at a time), not in one of ours.
      if (this.lent >= 0) direct.submit(this.lent, 0, 0);
      this.lent = -1;
      this.wbuf = null;
      this.wcap = Math.max(1, Math.floor(Math.min(direct.writeBuffers[0].length, this.writeBufferBytes) / this.ps));
      return;
    }
    const cap = Math.max(1, Math.floor(this.writeBufferBytes / this.ps));
    if (this.wbuf === null || this.wcap !== cap || this.wbuf.length !== cap * this.ps) {
      this.wbuf = Buffer.allocUnsafeSlow(cap * this.ps);
      this.wcap = cap;
    }
  }

  /** Borrows a buffer of the direct write queue for the next run of pages (waits while all are queued). */
  private lendBuffer(): Buffer {
    const direct = this.direct as DirectPages;
    this.lent = direct.acquire();
    this.wbuf = direct.writeBuffers[this.lent];
    return this.wbuf;
  }

  private persistMeta(fields: Omit<StoreMeta, 'updatedAt'>): void {
    const m: StoreMeta = { ...fields, vm: this.vm, updatedAt: new Date().toISOString() };
    writeFileAtomic(this.dir, META_FILE, serializeMeta(m));
    this.m = m;
  }

  private checkIndex(index: number, op: string): void {
    if (!Number.isInteger(index) || index < 0 || index >= this.pc) {
      throw new RangeError(`store ${this.vm}: ${op}(): page ${index} out of range [0, ${this.pc})`);
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
