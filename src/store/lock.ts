import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { readFileNoFollow } from './fsio';

export const LOCK_FILE = 'lock';

/** Another process (perhaps on another host sharing the store) holds this VM's store. */
export class StoreBusyError extends Error {
  override readonly name = 'StoreBusyError';
}

/** Who holds a store's lock, or null. A holder on this host whose process is gone does not count. */
export function lockHolder(dir: string): { host: string; pid: number } | null {
  let text: string;
  try {
    // A symbolic link planted as the lock counts as no lock: acquireLock removes it (rm does not follow).
    text = readFileNoFollow(path.join(dir, LOCK_FILE)).toString('utf8');
  } catch {
    return null;
  }
  const [host, pidText] = text.trim().split(' ');
  const pid = Number(pidText);
  if (host === os.hostname() && Number.isInteger(pid) && !alive(pid)) return null;
  return { host: host ?? '?', pid };
}

/**
 * Takes a VM store's lock: a file created exclusively (atomic on local filesystems and NFSv3+), holding
 * "host pid". A lock left by a dead process on this host is taken over; one held elsewhere is not.
 * Throws an error with code ENOENT when `dir` is gone, or was renamed away as the lock was made.
 * `afterCreate` runs once the file is made, before that is checked (tests: the eviction race).
 */
export function acquireLock(dir: string, afterCreate: () => void = () => undefined): void {
  const file = path.join(dir, LOCK_FILE);
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const fd = fs.openSync(file, 'wx', 0o600);
      let made: fs.Stats;
      try {
        fs.writeSync(fd, `${os.hostname()} ${process.pid}\n`);
        made = fs.fstatSync(fd);
      } finally {
        fs.closeSync(fd);
      }
      afterCreate();
      if (!lockIsAt(file, made)) {
        // The directory was renamed away (a store evicted under its lock: budget.ts) between the path's
        // lookup and the file's creation, and the lock just made is in it: not this store's. The evicting
        // process removes it with its directory; the caller starts again, as when the directory is gone.
        throw Object.assign(new Error(`the store directory ${dir} moved while its lock was taken`), { code: 'ENOENT' });
      }
      return;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    const holder = lockHolder(dir);
    if (holder) throw new StoreBusyError(`the store of ${path.basename(dir)} is in use by process ${holder.pid} on ${holder.host}`);
    fs.rmSync(file, { force: true }); // stale: its process is gone
  }
  throw new StoreBusyError(`the store of ${path.basename(dir)} is being taken by another process`);
}

/** Whether `file` is still the file `made` describes (the same inode on the same device). */
function lockIsAt(file: string, made: fs.Stats): boolean {
  try {
    const now = fs.lstatSync(file);
    return now.ino === made.ino && now.dev === made.dev;
  } catch {
    return false;
  }
}

export function releaseLock(dir: string): void {
  fs.rmSync(path.join(dir, LOCK_FILE), { force: true });
}

/** Whether a process with this pid exists on this host (one we may not signal counts). */
export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}
