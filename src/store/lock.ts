import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { readFileNoFollow } from './fsio';

export const LOCK_FILE = 'lock';

/** Another process (perhaps on another host sharing the store) holds this VM's store. */
export class StoreBusyError extends Error {
  override readonly name = 'StoreBusyError';
}

/**
 * Held only while a stale lock is taken over (see takeOver): created exclusively, holding what the lock
 * does, removed before acquireLock returns.
 */
export const TAKEOVER_FILE = 'lock.takeover';

/** Who holds a store's lock, or null. A holder on this host whose process is gone does not count. */
export function lockHolder(dir: string): { host: string; pid: number } | null {
  return holderOf(path.join(dir, LOCK_FILE));
}

/** Who a lock file (the lock, or the takeover file) names, or null: none, or a process of this host that is gone. */
function holderOf(file: string): { host: string; pid: number } | null {
  let text: string;
  try {
    // A symbolic link planted as the lock counts as no lock: acquireLock removes it (rm does not follow).
    text = readFileNoFollow(file).toString('utf8');
  } catch {
    return null;
  }
  const [host, pidText, started] = text.trim().split(' ');
  const pid = Number(pidText);
  if (host === os.hostname() && Number.isInteger(pid)) {
    if (!alive(pid)) return null;
    // The pid given again to a process started since (pids wrap, at 32,768 on some hosts): gone too. A
    // lock without the start time (an earlier version's, or '-' from a writer that could not read it),
    // or a holder whose start this process cannot read, counts as held.
    const now = started === undefined || !/^\d+$/.test(started) ? null : processStart(pid);
    if (now !== null && now !== started) return null;
  }
  return { host: host ?? '?', pid };
}

/** What a lock file holds: this host, this process, and when it started. */
function lockText(): string {
  return `${os.hostname()} ${process.pid} ${processStart(process.pid) ?? '-'}\n`;
}

/**
 * When this host's process `pid` started, in clock ticks since boot (/proc/PID/stat, field 22), or null
 * where that cannot be read. Together with the pid it names one process for as long as the host runs.
 */
export function processStart(pid: number): string | null {
  let stat: string;
  try {
    stat = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
  } catch {
    return null;
  }
  // Field 2, the command, is in parentheses and may hold spaces: the fields after it start with field 3.
  const field22 = stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
  return field22 !== undefined && /^\d+$/.test(field22) ? field22 : null;
}

/** Hooks for tests: what runs at the points where another process may interleave (the eviction race, the takeover race). */
export interface LockRaces {
  /** Runs once the lock file is made, before it is checked to be where it was made. */
  afterCreate?: () => void;
  /** Runs once the lock was found stale, before it is taken over. */
  beforeTakeover?: () => void;
}

/**
 * Takes a VM store's lock: a file created exclusively (atomic on local filesystems and NFSv3+), holding
 * "host pid start" (start: see processStart). A lock left by a process on this host that is gone is taken
 * over; one held elsewhere is not.
 * Throws an error with code ENOENT when `dir` is gone, or was renamed away as the lock was made.
 */
export function acquireLock(dir: string, races: LockRaces = {}): void {
  const file = path.join(dir, LOCK_FILE);
  if (createLockFile(file, races.afterCreate) !== null) return;
  const holder = lockHolder(dir);
  if (holder) throw new StoreBusyError(`the store of ${path.basename(dir)} is in use by process ${holder.pid} on ${holder.host}`);
  races.beforeTakeover?.();
  // A takeover file left by a process that died taking the lock over is removed, and the takeover tried again once.
  if (!takeOver(dir, races.afterCreate) && !takeOver(dir, races.afterCreate)) {
    throw new StoreBusyError(`the store of ${path.basename(dir)} is being taken over by another process`);
  }
}

/**
 * Replaces a stale lock with this process's. Judging a lock stale and removing it are two steps: two
 * processes that both judged it stale would each remove it, the later one removing the lock the earlier
 * had just made in its place, and both would go on holding the store. So a stale lock is judged again,
 * removed and replaced only by the holder of the takeover file: the second process then finds the
 * first's lock, alive, and is told the store is busy. Anyone may still make the lock while none exists
 * (exclusively): only one of them and the takeover succeeds. False when another process's takeover
 * file was found and it had died (the file is removed): the caller may try again.
 */
function takeOver(dir: string, afterCreate?: () => void): boolean {
  const vm = path.basename(dir);
  const guardFile = path.join(dir, TAKEOVER_FILE);
  const guard = createLockFile(guardFile);
  if (guard === null) {
    // Which file was judged is taken first: a file another process makes there after this one is gone
    // must not be the one removed.
    const seen = statNoFollow(guardFile);
    const taker = holderOf(guardFile);
    if (taker) throw new StoreBusyError(`the store of ${vm} is being taken over by process ${taker.pid} on ${taker.host}`);
    removeIfSame(guardFile, seen);
    return false;
  }
  try {
    const holder = lockHolder(dir);
    if (holder) throw new StoreBusyError(`the store of ${vm} is in use by process ${holder.pid} on ${holder.host}`);
    fs.rmSync(path.join(dir, LOCK_FILE), { force: true }); // stale (or gone): only a takeover removes it
    if (createLockFile(path.join(dir, LOCK_FILE), afterCreate) === null) throw new StoreBusyError(`the store of ${vm} is being taken by another process`);
  } finally {
    removeIfSame(guardFile, guard);
  }
  return true;
}

/**
 * Creates `file` exclusively, holding lockText(): its stat, or null when it exists already. Throws an
 * error with code ENOENT when its directory is gone, or was renamed away as the file was made.
 */
function createLockFile(file: string, afterCreate: () => void = () => undefined): fs.Stats | null {
  let fd: number;
  try {
    fd = fs.openSync(file, 'wx', 0o600);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return null;
    throw err;
  }
  let made: fs.Stats;
  try {
    fs.writeSync(fd, lockText());
    made = fs.fstatSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  afterCreate();
  if (!sameFile(statNoFollow(file), made)) {
    // The directory was renamed away (a store evicted under its lock: budget.ts) between the path's
    // lookup and the file's creation, and the file just made is in it: not this store's. The evicting
    // process removes it with its directory; the caller starts again, as when the directory is gone.
    throw Object.assign(new Error(`the store directory ${path.dirname(file)} moved while its lock was taken`), { code: 'ENOENT' });
  }
  return made;
}

function statNoFollow(file: string): fs.Stats | null {
  try {
    return fs.lstatSync(file);
  } catch {
    return null;
  }
}

/** Whether `now` is the file `made` describes (the same inode on the same device). */
function sameFile(now: fs.Stats | null, made: fs.Stats | null): boolean {
  return now !== null && made !== null && now.ino === made.ino && now.dev === made.dev;
}

/** Removes `file` if it is still the file `made` describes: not one another process made there since. */
function removeIfSame(file: string, made: fs.Stats | null): void {
  if (sameFile(statNoFollow(file), made)) fs.rmSync(file, { force: true });
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
