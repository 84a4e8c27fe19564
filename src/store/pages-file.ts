/**
 * The pages file (page i at byte i*pageSize, sparse) and the write path into it.
 *
 * write() copies a page into a run buffer; a run goes to disk in one positioned write per run of
 * consecutive pages: no allocation, promise or syscall per page. Where the filesystem allows, pages
 * move with O_DIRECT (direct-pages.ts): run buffers are then ones the direct write queue lends, runs are
 * written by its thread, and settle() waits for them before anything relies on their being on disk.
 * With O_DIRECT several runs stay open at once (OPEN_RUNS): a migration's multifd channels each write
 * their own stretch of pages, interleaved chunk by chunk, and one open run would cut them into writes of
 * a chunk's few pages, which the device takes at a third of the rate of whole runs (measured:
 * docs/design.md, multifd channels and cores).
 * After the file was recreated empty, all-zero pages are not written at all while their region of the
 * file is known to be a hole.
 *
 * A write that fails leaves its pages' content unknown: the pages it covered are handed to `lose`, for
 * the store to mark absent, and the error is thrown.
 */
import * as fs from 'node:fs';
import { DIGEST_BYTES, zeroPageDigest } from '../digest';
import { errorMessage } from '../common/errors';
import { copyBytes } from '../common/copy';
import { DIRECT_IO_ALIGN, DirectPages, DirectWriteError } from './direct-pages';
import { openRW, preadFully, pwriteFully } from './fsio';

export const PAGES_FILE = 'pages';

/**
 * Runs open at once with O_DIRECT: a main channel and up to 7 multifd channels each keep theirs. 8 of
 * the direct write queue's 12 buffers (native/pageio.c), which keeps 4 for writes in flight.
 */
const OPEN_RUNS = 8;

/** Most pages one prefetch() hands the direct queue (it holds 128: native/pageio.c). */
const PREFETCH_BATCH = 128;
/** Most ranges handed to the reader pool at once (it holds 64 parts of 512 KiB: native/pageio.c). */
const PREFETCH_RANGES = 16;

/** Pages start .. start+length-1, waiting in buffer at slots 0 .. length-1 (length 0: the run is not open). */
interface PendingRun {
  start: number;
  length: number;
  /** Null until the run first opens (with direct I/O: after each flush, until the queue lends another). */
  buffer: Buffer | null;
  /** With direct I/O, the write queue's buffer of this index, lent until the run is flushed. */
  lent: number;
  /** When the run was last written to (a count of writes): the least recent one is flushed for a new one. */
  touched: number;
}

/** Whether the open run holds any of pages [index, index + count). */
function runHoldsAny(run: PendingRun, index: number, count: number): boolean {
  return run.length > 0 && index < run.start + run.length && run.start < index + count;
}

export class PagesFile {
  private bytesPerPage = 0;
  private pagesInFile = 0;

  /** The runs waiting to be written; disjoint. One through the page cache, OPEN_RUNS with direct I/O. */
  private runs: PendingRun[] = [];
  /** Pages a run buffer holds. */
  private runCapacity = 0;
  private writes = 0;
  /** Bytes of pages written to the file, and read from it through the page cache, since it was opened. */
  private bytesWritten = 0;
  private bytesReadPaged = 0;

  /**
   * After recreate(): bit i set = page i's region of the file is still a hole (reads as zeros), so an
   * all-zero page there needs no write. pageCount/8 bytes; null when unknown (e.g. after reopen).
   */
  private holes: Uint8Array | null = null;
  /** Digest of an all-zero page of the current page size (prepareWrites). */
  private zeroDigest: Uint8Array | null = null;
  /** File positions handed to prefetch(), reused. */
  private prefetchAt: Float64Array | null = null;
  /** File positions and lengths handed to prefetchRanges(), reused. */
  private rangeAt: Float64Array | null = null;
  private rangeLengths: Float64Array | null = null;

  private constructor(
    private readonly fd: number,
    /** The file opened for direct I/O, or null (page cache only). */
    private readonly direct: DirectPages | null,
    /** Size of the run buffer (rounded down to whole pages, at least one). */
    private readonly runBufferBytes: number,
    /** Who the file belongs to, to begin error messages ("store vm1"). */
    private readonly owner: string,
    /** Called with the first and last page of a failed write: their content on disk is unknown. */
    private readonly lose: (first: number, last: number) => void,
  ) {}

  /** Opens (creating if missing) file; with directIo, for O_DIRECT too where the filesystem allows. */
  static open(file: string, directIo: boolean, runBufferBytes: number, owner: string, lose: (first: number, last: number) => void): PagesFile {
    const fd = openRW(file);
    try {
      const direct = directIo ? DirectPages.open(file, fs.fstatSync(fd).size) : null;
      return new PagesFile(fd, direct, runBufferBytes, owner, lose);
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
  }

  /** Bytes per page (0 when the store holds no layout). */
  get pageSize(): number {
    return this.bytesPerPage;
  }

  /** Pages the file holds room for. */
  get pageCount(): number {
    return this.pagesInFile;
  }

  /** Whether pages move with O_DIRECT (else through the page cache). */
  get directIo(): boolean {
    return this.directForPageSize() !== null;
  }

  /**
   * Bytes read from the file since it was opened, by every path: with direct I/O what was read from it,
   * reads ahead that went unused included (DirectPages.deviceReadBytes; the device reads all of it but the
   * file's holes, pages never written); through the page cache what was asked of it.
   */
  get readBytes(): number {
    return (this.direct?.deviceReadBytes ?? 0) + this.bytesReadPaged;
  }

  /** Bytes of pages written to the file since it was opened (handed to the direct queue, or written through the page cache). */
  get writtenBytes(): number {
    return this.bytesWritten;
  }

  /** Direct I/O reads ahead with the reader pool because the kernel refused its AIO (DirectPages.kernelReadsRefused). */
  get kernelReadsRefused(): boolean {
    return this.direct?.kernelReadsRefused ?? false;
  }

  /** The file's current size in bytes. */
  size(): number {
    return fs.fstatSync(this.fd).size;
  }

  /** Takes the geometry of a file already of that size (as a store's meta says). */
  setGeometry(pageSize: number, pageCount: number): void {
    this.bytesPerPage = pageSize;
    this.pagesInFile = pageCount;
  }

  /**
   * Empties the file and sizes it for pageCount pages of pageSize (all of it a hole, which the write path
   * then knows). No fsync. Pending writes must be settled first.
   */
  recreate(pageSize: number, pageCount: number): void {
    this.setGeometry(pageSize, pageCount);
    fs.ftruncateSync(this.fd, 0); // drop the old blocks
    fs.ftruncateSync(this.fd, pageCount * pageSize);
    this.direct?.setSize(pageCount * pageSize);
    this.holes = new Uint8Array(Math.ceil(pageCount / 8)).fill(0xff);
  }

  /** Truncates the file to nothing and forgets the geometry. Pending writes must be settled first. */
  truncateAll(): void {
    this.setGeometry(0, 0);
    fs.ftruncateSync(this.fd, 0);
    this.direct?.setSize(0);
    this.holes = null;
  }

  /** Forgets where the holes are (the file is about to be emptied another way). */
  forgetHoles(): void {
    this.holes = null;
  }

  /** Readies the write path for the current page size; any run not flushed is dropped. */
  prepareWrites(): void {
    const pageSize = this.bytesPerPage;
    for (const run of this.runs) run.length = 0;
    this.zeroDigest = zeroPageDigest(pageSize);
    const direct = this.directForPageSize();
    if (direct !== null) {
      // Pages are laid out in the write queue's own buffers (lent one per open run), not in ones of ours.
      for (const run of this.runs) if (run.lent >= 0) direct.submit(run.lent, 0, 0);
      this.runs = Array.from({ length: OPEN_RUNS }, () => ({ start: 0, length: 0, buffer: null, lent: -1, touched: 0 }));
      this.runCapacity = Math.max(1, Math.floor(Math.min(direct.writeBuffers[0].length, this.runBufferBytes) / pageSize));
      return;
    }
    const capacity = Math.max(1, Math.floor(this.runBufferBytes / pageSize));
    const buffer = this.runs[0]?.buffer;
    if (buffer == null || this.runCapacity !== capacity || buffer.length !== capacity * pageSize) {
      this.runs = [{ start: 0, length: 0, buffer: Buffer.allocUnsafeSlow(capacity * pageSize), lent: -1, touched: 0 }];
      this.runCapacity = capacity;
    }
  }

  /**
   * Queues page index = src[srcStart .. srcStart+pageSize), whose digest is digest[digestStart .. +16)
   * (the caller has checked every bound). The bytes are copied: src may be reused at once. Consecutive
   * indexes, and rewrites of a page still in an open run, are coalesced into one write.
   */
  write(index: number, src: Uint8Array, srcStart: number, digest: Uint8Array, digestStart: number): void {
    const pageSize = this.bytesPerPage;
    const holes = this.holes;
    if (holes !== null && (holes[index >>> 3] & (1 << (index & 7))) !== 0) {
      // The page's region of the file is still a hole. A zero page needs no write.
      if (this.isZeroPage(digest, digestStart)) return;
      holes[index >>> 3] &= ~(1 << (index & 7));
    }
    const run = this.runFor(index);
    const slot = index - run.start;
    copyBytes(src, srcStart, run.buffer ?? this.lendBuffer(run), slot * pageSize, pageSize);
    if (slot === run.length) run.length = slot + 1;
    run.touched = ++this.writes;
  }

  /**
   * The open run page `index` goes into: the one that holds it already (a rewrite), else the one it
   * extends, else a new one, in a free place or in that of the run least recently written (flushed).
   */
  private runFor(index: number): PendingRun {
    const runs = this.runs;
    let next: PendingRun | null = null;
    // Index loops on the per-page paths: a for-of's iterator is an allocation wherever it is not optimized away.
    for (let r = 0; r < runs.length; r++) {
      const run = runs[r];
      if (run.length === 0) continue;
      const rel = index - run.start;
      if (rel >= 0 && rel < run.length) return run;
      if (rel === run.length) next = run;
    }
    if (next !== null) {
      if (next.length < this.runCapacity) return next;
      // Full: it can only be written, and the page starts a run in its place.
      this.flushRun(next);
      next.start = index;
      return next;
    }
    let place = runs[0];
    for (let r = 0; r < runs.length; r++) {
      const run = runs[r];
      if (run.length === 0) {
        place = run;
        break;
      }
      if (run.touched < place.touched) place = run;
    }
    this.flushRun(place);
    place.start = index;
    return place;
  }

  /**
   * Writes page index = src[srcStart .. +pageSize) now, around the run buffer (recovery: before any
   * page is queued).
   */
  writeThrough(index: number, src: Uint8Array, srcStart: number): void {
    pwriteFully(this.fd, src, srcStart, this.bytesPerPage, index * this.bytesPerPage);
    this.bytesWritten += this.bytesPerPage;
  }

  /** Writes the pending runs. On failure a run's pages are lost (their content on disk is unknown) and it throws. */
  flush(): void {
    for (const run of this.runs) this.flushRun(run);
  }

  private flushRun(run: PendingRun): void {
    const n = run.length;
    if (n === 0) return;
    const start = run.start;
    const pageSize = this.bytesPerPage;
    run.length = 0;
    const direct = this.directForPageSize();
    try {
      if (direct !== null) {
        const lent = run.lent;
        run.lent = -1;
        run.buffer = null;
        direct.submit(lent, n * pageSize, start * pageSize);
      } else {
        pwriteFully(this.fd, run.buffer as Buffer, 0, n * pageSize, start * pageSize);
      }
      this.bytesWritten += n * pageSize;
    } catch (err) {
      if (err instanceof DirectWriteError) throw this.directWriteFailed(err);
      this.lose(start, start + n - 1);
      throw new Error(`${this.owner}: writing pages ${start}..${start + n - 1} failed: ${errorMessage(err)}; they are now absent`, { cause: err });
    }
  }

  /**
   * Waits for the queued page writes: before the pages are fsynced, read another way, or thrown away.
   * A write that failed loses its pages and throws.
   */
  settle(): void {
    if (this.direct === null) return;
    try {
      this.direct.drain();
    } catch (err) {
      if (err instanceof DirectWriteError) throw this.directWriteFailed(err);
      throw err;
    }
  }

  /** fsync (settle() first: queued writes are not in it). */
  sync(): void {
    fs.fsyncSync(this.fd);
  }

  /** sync() in libuv's thread pool: the caller's thread goes on while the file system commits. */
  syncInBackground(): Promise<void> {
    return new Promise((resolve, reject) => fs.fsync(this.fd, (err) => (err ? reject(err) : resolve())));
  }

  /**
   * Reads pages index .. index+count-1 into dest[destStart ..] (bounds checked by the caller): a lone
   * page an open run holds from its buffer, others after writing the pending runs that overlap them.
   * inStream: one of a series in ascending page order, so the pages after it are worth reading ahead.
   */
  read(index: number, count: number, dest: Uint8Array, destStart: number, inStream: boolean): void {
    const pageSize = this.bytesPerPage;
    if (count === 1) {
      // A lone page still in an open run: its buffer holds it, and writing the run early would only wait.
      const run = this.runHolding(index);
      if (run !== null) {
        copyBytes(run.buffer as Buffer, (index - run.start) * pageSize, dest, destStart, pageSize);
        return;
      }
    }
    const runs = this.runs;
    for (let r = 0; r < runs.length; r++) if (runHoldsAny(runs[r], index, count)) this.flushRun(runs[r]);
    const direct = this.directForPageSize();
    if (direct !== null) {
      direct.read(dest, destStart, count * pageSize, index * pageSize, inStream);
    } else {
      preadFully(this.fd, dest, destStart, count * pageSize, index * pageSize);
      this.bytesReadPaged += count * pageSize;
    }
  }

  /**
   * Has lone pages indices[0 .. count-1] (in range, checked by the caller) read ahead for read()s to come,
   * when the pages move with direct I/O: a receiver's Delta bases, scattered over the file. Not those an
   * open run holds; at most PREFETCH_BATCH.
   */
  prefetch(indices: Uint32Array, count: number): void {
    const direct = this.directForPageSize();
    if (direct === null) return;
    const at = (this.prefetchAt ??= new Float64Array(PREFETCH_BATCH));
    let n = 0;
    for (let i = 0; i < count && n < PREFETCH_BATCH; i++) {
      if (this.runHolding(indices[i]) === null) at[n++] = indices[i] * this.bytesPerPage;
    }
    if (n > 0) direct.prefetch(at, n);
  }

  /**
   * Has ranges of pages [starts[i], starts[i] + counts[i]) (in range, checked by the caller) read ahead for
   * read()s to come, when the pages move with direct I/O: a back leg's multifd Runs. Not a range an open
   * run overlaps (read() writes that run first); at most PREFETCH_RANGES.
   */
  /** Ranges prefetchRanges() holds read ahead at once: none where the pages move through the page cache. */
  get rangeSlots(): number {
    return this.directForPageSize() === null ? 0 : DirectPages.rangeSlots;
  }

  prefetchRanges(starts: Uint32Array, counts: Uint32Array, count: number): void {
    const direct = this.directForPageSize();
    if (direct === null) return;
    const at = (this.rangeAt ??= new Float64Array(PREFETCH_RANGES));
    const lengths = (this.rangeLengths ??= new Float64Array(PREFETCH_RANGES));
    let n = 0;
    for (let i = 0; i < count && n < PREFETCH_RANGES; i++) {
      if (this.runOverlapping(starts[i], counts[i]) !== null) continue;
      at[n] = starts[i] * this.bytesPerPage;
      lengths[n++] = counts[i] * this.bytesPerPage;
    }
    if (n > 0) direct.prefetchRanges(at, lengths, n);
  }

  /** The first open run holding any of pages [index, index + count), or null. */
  private runOverlapping(index: number, count: number): PendingRun | null {
    const runs = this.runs;
    for (let r = 0; r < runs.length; r++) if (runHoldsAny(runs[r], index, count)) return runs[r];
    return null;
  }

  /** The open run holding page index, or null. */
  private runHolding(index: number): PendingRun | null {
    return this.runOverlapping(index, 1);
  }

  /**
   * Reads len bytes at pos through the page cache, for a pass over the whole file (verify, recovery)
   * after settle(); the pending run is not looked at.
   */
  readRaw(dest: Uint8Array, destStart: number, len: number, pos: number): void {
    preadFully(this.fd, dest, destStart, len, pos);
    this.bytesReadPaged += len;
  }

  /** Drops the write path's state (the store is closing; a failed finish left a run unwritten). */
  dropWrites(): void {
    this.holes = null;
    for (const run of this.runs) {
      if (run.lent >= 0) run.buffer = null;
      run.length = 0;
    }
  }

  /**
   * Closes the file, waiting for queued writes. Writes still queued here are those of a store's finish
   * that failed: the store on disk is still "dirty" and its next open re-hashes every page, so their
   * failure is not reported.
   */
  close(): void {
    try {
      if (this.direct !== null) this.direct.close();
    } catch {
      // see above
    }
    fs.closeSync(this.fd);
  }

  /** Direct I/O for the current page size (O_DIRECT needs whole 4 KiB blocks), else null. */
  private directForPageSize(): DirectPages | null {
    return this.direct !== null && this.bytesPerPage > 0 && this.bytesPerPage % DIRECT_IO_ALIGN === 0 ? this.direct : null;
  }

  private isZeroPage(digest: Uint8Array, at: number): boolean {
    const zero = this.zeroDigest as Uint8Array;
    for (let k = 0; k < DIGEST_BYTES; k++) if (digest[at + k] !== zero[k]) return false;
    return true;
  }

  /** The pages a failed queued write covered are lost (their content on disk is unknown). */
  private directWriteFailed(err: DirectWriteError): Error {
    const pageSize = this.bytesPerPage;
    const first = Math.floor(err.start / pageSize);
    const last = Math.min(this.pagesInFile, Math.ceil(err.end / pageSize)) - 1;
    this.lose(first, last);
    return new Error(`${this.owner}: writing pages ${first}..${last} failed: ${err.message}; they are now absent`, { cause: err });
  }

  /** Borrows a buffer of the direct write queue for the run (waits while all are queued). */
  private lendBuffer(run: PendingRun): Buffer {
    const direct = this.direct as DirectPages;
    run.lent = direct.acquire();
    run.buffer = direct.writeBuffers[run.lent];
    return run.buffer;
  }
}
