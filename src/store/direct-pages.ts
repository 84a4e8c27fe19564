/**
 * The pages file moved with O_DIRECT by the native addon (native/pageio.c): writes queued to a thread
 * of the store's own, reads of a stream read ahead by it, nothing through the page cache. A store
 * writes each page once per migration and reads it once in the next, in stream order: the page cache
 * gains nothing from holding them, and filling it costs a fresh page of kernel memory per page (on a
 * virtual machine with free page reporting, more CPU than the rest of the gateway's work on it).
 *
 * The calls are synchronous (prefetch() only queues); ordering is the native side's: a read sees every
 * write before it.
 */
import { getSystemErrorMap } from 'node:util';
import { nativeExport } from '../digest';

/** Alignment O_DIRECT asks of file offsets and lengths here. */
export const DIRECT_IO_ALIGN = 4096;

/** A range of the file a queued write failed to fill: it holds unknown bytes. */
interface NativeWriteFailure {
  errno: number;
  start: number;
  end: number;
}

type Handle = object;

interface PageioAddon {
  /** Ranges the store holds read ahead at once (pageioPrefetchRanges). */
  pageioRangeSlots: number;
  pageioOpen(file: string, fileSize: number, kernelReads: boolean): Handle;
  pageioWriteBuffers(h: Handle): ArrayBuffer[];
  pageioAcquire(h: Handle): number;
  pageioSubmit(h: Handle, index: number, len: number, pos: number): NativeWriteFailure | null;
  pageioRead(h: Handle, dest: Uint8Array, destOff: number, len: number, pos: number, inStream: boolean): void;
  pageioPrefetch(h: Handle, positions: Float64Array, count: number): number;
  pageioPrefetchRanges(h: Handle, positions: Float64Array, lengths: Float64Array, count: number): number;
  pageioKernelReads(h: Handle): boolean;
  pageioDeviceReadBytes(h: Handle): number;
  pageioCallerReadBytes(h: Handle): number;
  pageioDrain(h: Handle): NativeWriteFailure | null;
  pageioSetSize(h: Handle, fileSize: number): void;
  pageioClose(h: Handle): NativeWriteFailure | null;
}

function pageioAddon(): PageioAddon | null {
  const names: (keyof PageioAddon)[] = ['pageioOpen', 'pageioWriteBuffers', 'pageioAcquire', 'pageioSubmit', 'pageioRead', 'pageioPrefetch', 'pageioPrefetchRanges', 'pageioKernelReads', 'pageioDeviceReadBytes', 'pageioCallerReadBytes', 'pageioDrain', 'pageioSetSize', 'pageioClose'];
  const fns = names.map((n) => nativeExport(n));
  const rangeSlots = nativeExport('pageioRangeSlots');
  if (!fns.every((f) => typeof f === 'function') || typeof rangeSlots !== 'number') return null;
  return { ...Object.fromEntries(names.map((n, i) => [n, fns[i]])), pageioRangeSlots: rangeSlots } as unknown as PageioAddon;
}

const addon = pageioAddon();

/** The errno's name and text as Node's own fs errors give them (libuv numbers errors negative). */
function describeErrno(errno: number): [string, string] {
  return getSystemErrorMap().get(-errno) ?? [`errno ${errno}`, 'unknown error'];
}

/** An earlier queued write failed: bytes [start, end) of the file are not what was written. */
export class DirectWriteError extends Error {
  override readonly name = 'DirectWriteError';
  /** The errno name (ENOSPC, EIO, ...), as on Node's own fs errors. */
  readonly code: string;
  readonly start: number;
  readonly end: number;
  constructor(failure: NativeWriteFailure) {
    const [code, text] = describeErrno(failure.errno);
    super(`${code}: ${text}, a queued write of bytes ${failure.start}..${failure.end - 1}`);
    this.code = code;
    this.start = failure.start;
    this.end = failure.end;
  }
}

function check(failure: NativeWriteFailure | null): void {
  if (failure !== null) throw new DirectWriteError(failure);
}

export class DirectPages {
  /** Ranges prefetchRanges() holds read ahead at once, a store (native/pageio.c PIO_RANGE_SLOTS). */
  static readonly rangeSlots: number = addon?.pageioRangeSlots ?? 0;

  /**
   * The write queue's buffers (4 KiB aligned, all of one size): the store lays pages out in the one
   * acquire() lends it, then submit()s it, so that each page is copied once on its way to the device.
   */
  readonly writeBuffers: Buffer[];

  private constructor(
    private readonly handle: Handle,
    /** The kernel's AIO was asked for (BFMIG_STORE_AIO is not 0). */
    private readonly kernelReadsAsked: boolean,
  ) {
    this.writeBuffers = (addon as PageioAddon).pageioWriteBuffers(handle).map((ab) => Buffer.from(ab));
  }

  /**
   * Opens file for direct I/O, or null where that is not to be had (no addon function, a filesystem
   * without O_DIRECT, BFMIG_STORE_DIRECT_IO=0): the store then uses the page cache.
   * BFMIG_STORE_AIO=0: lone pages and ranges are read ahead by the reader pool, not the kernel's AIO
   * (kernelReads).
   */
  static open(file: string, fileSize: number): DirectPages | null {
    if (addon === null || process.env.BFMIG_STORE_DIRECT_IO === '0') return null;
    const kernelReads = process.env.BFMIG_STORE_AIO !== '0';
    try {
      return new DirectPages(addon.pageioOpen(file, fileSize, kernelReads), kernelReads);
    } catch {
      return null;
    }
  }

  /** Lends a free write buffer (its index in writeBuffers); waits while every one is queued. */
  acquire(): number {
    return (addon as PageioAddon).pageioAcquire(this.handle);
  }

  /**
   * Queues the lent buffer's first len bytes for writing at pos (len and pos multiples of
   * DIRECT_IO_ALIGN; len 0 gives the buffer back unwritten). Throws DirectWriteError for an earlier
   * write that failed (this one is queued all the same).
   */
  submit(index: number, len: number, pos: number): void {
    check((addon as PageioAddon).pageioSubmit(this.handle, index, len, pos));
  }

  /** Reads exactly len bytes at pos into dest[destOff..]; inStream: one of an ascending series (read ahead). */
  read(dest: Uint8Array, destOff: number, len: number, pos: number, inStream: boolean): void {
    (addon as PageioAddon).pageioRead(this.handle, dest, destOff, len, pos, inStream);
  }

  /**
   * Has the lone pages at positions[0 .. count-1] read ahead (by the kernel's AIO, or by a pool of reader
   * threads where it has none or BFMIG_STORE_AIO=0: kernelReads), in that order, for read()s of them to
   * come: a device serves many reads at once far faster than one after another.
   * Returns how many were queued (pages prefetched already, or that a queued write holds, are not).
   */
  prefetch(positions: Float64Array, count: number): number {
    return (addon as PageioAddon).pageioPrefetch(this.handle, positions, count);
  }

  /**
   * Has the ranges [positions[i], positions[i] + lengths[i]) read ahead (as prefetch() has its pages), in
   * that order and at most 512 KiB a part, for read()s of them to come: a back leg's multifd Runs, read in
   * turn from as many places of the file. Returns how many parts were queued (rangeSlots at a time).
   */
  prefetchRanges(positions: Float64Array, lengths: Float64Array, count: number): number {
    return (addon as PageioAddon).pageioPrefetchRanges(this.handle, positions, lengths, count);
  }

  /**
   * Whether the kernel's asynchronous I/O reads what prefetch() and prefetchRanges() queue (one system
   * call a batch, no thread woken a read); else the reader pool does.
   */
  get kernelReads(): boolean {
    return (addon as PageioAddon).pageioKernelReads(this.handle);
  }

  /**
   * The kernel's AIO was asked for and refused (io_setup failed: most often every context of
   * `fs.aio-max-nr` is taken, 192 events a store): the reader pool reads ahead instead, slower on a busy host.
   */
  get kernelReadsRefused(): boolean {
    return this.kernelReadsAsked && !this.kernelReads;
  }

  /**
   * Bytes read from the file so far by every path: reads made when asked, and every read ahead (used or
   * not). Beside what the callers read, what the store's reading cost its device.
   */
  get deviceReadBytes(): number {
    return (addon as PageioAddon).pageioDeviceReadBytes(this.handle);
  }

  /**
   * Of deviceReadBytes, the bytes read() read itself while its caller waited: those no read-ahead,
   * prefetch or queued write held for it.
   */
  get callerReadBytes(): number {
    return (addon as PageioAddon).pageioCallerReadBytes(this.handle);
  }

  /** Waits for every queued write and forgets what was read ahead. Throws DirectWriteError. */
  drain(): void {
    check((addon as PageioAddon).pageioDrain(this.handle));
  }

  /** The file's length after it was truncated or extended (read-ahead stops there). */
  setSize(fileSize: number): void {
    (addon as PageioAddon).pageioSetSize(this.handle, fileSize);
  }

  /** Waits for the queued writes and closes. Throws DirectWriteError (closed all the same). */
  close(): void {
    check((addon as PageioAddon).pageioClose(this.handle));
  }
}
