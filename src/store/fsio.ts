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

/** Replaces dir/name with data atomically and durably: temp file, fsync, rename, fsync dir. */
export function writeFileAtomic(dir: string, name: string, data: string | Buffer): void {
  const tmp = path.join(dir, `${name}.tmp`);
  const fd = fs.openSync(tmp, 'w', 0o600);
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
  return fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
}
