/**
 * Synchronous positioned I/O helpers for the store: every call moves a large
 * range (looping over short transfers and splitting at IO_MAX_BYTES), and
 * small-file atomic replacement (temp file, fsync, rename, fsync directory).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

/** Largest single read/write issued (Node rejects lengths above 2 GiB - 1). */
export const IO_MAX_BYTES = 64 * 1024 * 1024;

/** Reads exactly len bytes at file position pos into buf[off..]; throws on EOF. */
export function preadFully(fd: number, buf: Uint8Array, off: number, len: number, pos: number): void {
  while (len > 0) {
    const n = fs.readSync(fd, buf, off, Math.min(len, IO_MAX_BYTES), pos);
    if (n <= 0) throw new Error(`short read: end of file at byte ${pos} with ${len} bytes still wanted`);
    off += n;
    len -= n;
    pos += n;
  }
}

/** Writes exactly len bytes of buf[off..] at file position pos. */
export function pwriteFully(fd: number, buf: Uint8Array, off: number, len: number, pos: number): void {
  while (len > 0) {
    const n = fs.writeSync(fd, buf, off, Math.min(len, IO_MAX_BYTES), pos);
    if (n <= 0) throw new Error(`write made no progress at byte ${pos}`);
    off += n;
    len -= n;
    pos += n;
  }
}

/** fsync a directory so that entries created/renamed in it are durable. */
export function fsyncDir(dir: string): void {
  const fd = fs.openSync(dir, 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Store files are never opened through a symbolic link: one planted in the data directory would
 * otherwise make the gateway create or overwrite a file anywhere it may write. The open fails (ELOOP).
 */
const NOFOLLOW = fs.constants.O_NOFOLLOW;

/** Replaces dir/name with data atomically and durably: temp file, fsync, rename, fsync dir. */
export function writeFileAtomic(dir: string, name: string, data: string | Buffer): void {
  const tmp = path.join(dir, `${name}.tmp`);
  const fd = openNoFollow(tmp, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_TRUNC);
  try {
    const buf = typeof data === 'string' ? Buffer.from(data, 'utf8') : data;
    pwriteFully(fd, buf, 0, buf.length, 0);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, path.join(dir, name));
  fsyncDir(dir);
}

/** Opens (creating if missing, mode 0600) a file for positioned read/write. Never O_APPEND. */
export function openRW(file: string): number {
  return openNoFollow(file, fs.constants.O_RDWR | fs.constants.O_CREAT);
}

/** fs.openSync with O_NOFOLLOW (mode 0600 when created); a symbolic link fails with a clear message. */
export function openNoFollow(file: string, flags: number): number {
  try {
    return fs.openSync(file, flags | NOFOLLOW, 0o600);
  } catch (err) {
    throw symlinkError(file, err);
  }
}

/** A whole small file, read without following a symbolic link. */
export function readFileNoFollow(file: string): Buffer {
  const fd = openNoFollow(file, fs.constants.O_RDONLY);
  try {
    return fs.readFileSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Throws unless dir is a real directory (lstat: a symbolic link to one is refused), so that nothing a
 * store creates lands outside the data directory.
 */
export function requireRealDir(dir: string): void {
  const st = fs.lstatSync(dir);
  if (st.isSymbolicLink()) throw new Error(`${dir} is a symbolic link, not a store directory: refusing to follow it`);
  if (!st.isDirectory()) throw new Error(`${dir} is not a directory`);
}

/** ELOOP from O_NOFOLLOW (on Linux) means the last component is a symbolic link: say so. */
function symlinkError(file: string, err: unknown): unknown {
  if ((err as NodeJS.ErrnoException).code !== 'ELOOP') return err;
  return Object.assign(new Error(`${file} is a symbolic link: store files are never opened through one`, { cause: err }), { code: 'ELOOP' });
}
