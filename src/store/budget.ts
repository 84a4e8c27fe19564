import * as fs from 'node:fs';
import * as path from 'node:path';
import { acquireLock, alive, lockHolder, releaseLock, StoreBusyError } from './lock';
import { META_FILE, readMetaFile, validateVmName } from './meta';
import { readMigrationRecord } from './migration-record';

export interface Eviction {
  vm: string;
  bytes: number;
}

/** What makeRoom() decided. */
export interface Room {
  /** Whether the store may grow to the bytes asked for: everything then fits the budget. */
  fits: boolean;
  /** The stores removed to make it fit (none when it does not fit). */
  evicted: Eviction[];
}

/** One store directory as a scan of the data directory found it (stat sizes and meta.json only). */
export interface StoreEntry {
  vm: string;
  /** Sum of the sizes (st_size) of every file in it: pages, digests, undo journal, blobs, meta, lock. */
  bytes: number;
  /** The complete snapshot it claims, or null (none, never, or its meta.json is missing/unreadable). */
  snapshotId: string | null;
  /** meta.json says a migration was writing (it may claim its snapshot again on recovery). */
  dirty: boolean;
  /** Pages it holds (each matching its digest), whether or not it claims a snapshot. */
  presentPages: number;
  /** When it was last used: meta.json's modification time (ms), 0 without one. */
  usedAt: number;
  /** Its VM's last migration was relayed verbatim from some point on (see migration-record.ts). */
  lastRelayedVerbatim: boolean;
}

/** Bytes every store under root holds now (what storeBudget bounds). */
export function storeBytes(root: string): number {
  return scanStores(root).reduce((sum, e) => sum + e.bytes, 0);
}

/** Prefix of a store directory being removed; never a VM name (those start with a letter or digit). */
const REMOVING_PREFIX = '.removing-';

/**
 * The store directories under root, found by stat alone (no page is read): every VM-named entry that is
 * a real directory (a symbolic link is not a store, and is not followed). A store created by another
 * process sharing the directory counts as soon as its directory exists.
 */
export function scanStores(root: string): StoreEntry[] {
  let names: string[];
  try {
    names = fs.readdirSync(root);
  } catch {
    return [];
  }
  const found: StoreEntry[] = [];
  for (const vm of names) {
    try {
      validateVmName(vm);
    } catch {
      continue;
    }
    const entry = statStore(path.join(root, vm), vm);
    if (entry !== null) found.push(entry);
  }
  return found;
}

/** One store's sizes and claim, or null when dir is not a real directory (or vanished meanwhile). */
export function statStore(dir: string, vm: string): StoreEntry | null {
  let files: string[];
  try {
    if (!fs.lstatSync(dir).isDirectory()) return null;
    files = fs.readdirSync(dir);
  } catch {
    return null;
  }
  let bytes = 0;
  let usedAt = 0;
  for (const f of files) {
    try {
      // lstat: a symbolic link counts as what it is here, never as what it points to.
      const st = fs.lstatSync(path.join(dir, f));
      bytes += st.size;
      if (f === META_FILE) usedAt = st.mtimeMs;
    } catch {
      // removed meanwhile
    }
  }
  // No valid meta: a store that never held anything.
  const meta = readMetaFile(dir, vm);
  const dirty = meta?.state === 'dirty';
  const snapshotId = meta?.state === 'clean' ? meta.snapshotId : null;
  const lastRelayedVerbatim = (readMigrationRecord(dir)?.verbatim ?? null) !== null;
  return { vm, bytes, snapshotId, dirty, presentPages: meta?.presentPages ?? 0, usedAt, lastRelayedVerbatim };
}

/**
 * A store that holds nothing worth keeping: no valid meta.json, or a clean one that claims no snapshot
 * and holds no page (a first migration that failed leaves one: its pages were put back to absent). A
 * "dirty" store is kept: its recovery may claim its snapshot again from the undo journal. So is one that
 * lost its snapshot but holds pages (to a corrupted page, say): a digest-table exchange reuses them.
 * And so is one whose last migration was relayed verbatim: it is how `bfmig snapshots` tells the
 * operator why that VM reuses nothing (the store budget still evicts it like any other).
 */
export function holdsNothing(entry: StoreEntry): boolean {
  return entry.snapshotId === null && !entry.dirty && entry.presentPages === 0 && !entry.lastRelayedVerbatim;
}

/**
 * Removes root/<vm> if `still(entry)` holds once its lock is ours. Taking the lock first is what makes
 * this safe against a process opening the store meanwhile: either that process holds the lock (we skip
 * the store) or it finds the directory gone and creates a new, empty one (PageStore.open retries when
 * its directory vanishes under it). The directory is renamed away under the lock, then deleted.
 * Returns the removed store's entry, or null when it was in use, gone, or no longer matched.
 */
export function removeStore(root: string, vm: string, still: (entry: StoreEntry) => boolean = () => true): StoreEntry | null {
  try {
    validateVmName(vm);
  } catch {
    return null; // not a VM name: no store has it
  }
  const dir = path.join(root, vm);
  // Checked once without the lock so that a store that stays (the usual case) is never locked, not even
  // for a moment another process could find it busy in; checked again under the lock before removal.
  const before = statStore(dir, vm);
  if (before === null || !still(before)) return null;
  try {
    acquireLock(dir);
  } catch (err) {
    if (err instanceof StoreBusyError || (err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
  let away: string;
  let entry: StoreEntry | null;
  try {
    entry = statStore(dir, vm);
    if (entry === null || !still(entry)) {
      releaseLock(dir);
      return null;
    }
    away = path.join(root, `${REMOVING_PREFIX}${vm}-${process.pid}-${Date.now()}`);
    fs.renameSync(dir, away);
  } catch (err) {
    // Only before the rename: once it has happened, `dir` may be a new store another process has locked.
    if (fs.existsSync(dir)) releaseLock(dir);
    throw err;
  }
  deleteRenamedAway(away);
  return entry;
}

/**
 * Deletes a store directory renamed away for removal. A process whose lookup of the store's path came
 * before the rename may still create its lock file in it (it finds out and starts again: lock.ts),
 * even after the removal has emptied it: the removal fails with ENOTEMPTY and is made again. rm's own
 * retries would not do: they retry only the last rmdir, not what came into the directory meanwhile.
 * Each such process makes at most one file there, so a few passes are enough.
 */
function deleteRenamedAway(away: string): void {
  for (let pass = 1; ; pass++) {
    try {
      fs.rmSync(away, { recursive: true, force: true });
      return;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOTEMPTY' || pass === 5) throw err;
    }
  }
}

/**
 * Removes every store that claims nothing (see holdsNothing) and is not in use, and what a removal
 * interrupted by a crash left behind. Returns the stores removed.
 */
export function removeUnclaimedStores(root: string): StoreEntry[] {
  removeLeftovers(root);
  const removed: StoreEntry[] = [];
  for (const entry of scanStores(root)) {
    if (!holdsNothing(entry)) continue;
    const gone = removeStore(root, entry.vm, holdsNothing);
    if (gone !== null) removed.push(gone);
  }
  return removed;
}

/** Directories renamed away for removal by a process that died before deleting them. */
function removeLeftovers(root: string): void {
  let names: string[];
  try {
    names = fs.readdirSync(root);
  } catch {
    return;
  }
  for (const name of names) {
    if (!name.startsWith(REMOVING_PREFIX)) continue;
    const pid = Number(/-(\d+)-\d+$/.exec(name)?.[1]);
    // Another live process on this host may be deleting it right now: leave it to that process.
    if (Number.isInteger(pid) && pid !== process.pid && alive(pid)) continue;
    try {
      fs.rmSync(path.join(root, name), { recursive: true, force: true });
    } catch {
      // another process removed it first
    }
  }
}

/**
 * A disk budget over one store directory. Before a VM's store grows to `bytes` (everything it will
 * hold: pages, digests, undo journal, blobs), the directory is scanned again (stat sizes only, so
 * stores written by other processes sharing it count) and whole idle stores of other VMs are removed —
 * those claiming no snapshot first, then the least recently used — until everything fits. A store in
 * use by any process is never removed (see removeStore). When the store could not fit even with every
 * removable store gone, nothing is removed: a VM declaring a guest larger than the room the budget can
 * make never costs another VM its snapshot (the caller goes on without retention instead).
 */
export class StoreBudget {
  /** Uses seen by this process (ms), newer than a store's meta.json may yet say. */
  private readonly touched = new Map<string, number>();
  /**
   * What makeRoom() let each store grow to, while the store stays locked (its migration running): its
   * files are still growing toward it (the undo journal fills as pages change), so it counts at least
   * that much. Dropped once the store is found unlocked.
   */
  private readonly reserved = new Map<string, number>();

  constructor(
    private readonly root: string,
    readonly budgetBytes: number,
  ) {}

  /** Bytes every store in the directory holds now. */
  get totalBytes(): number {
    return storeBytes(this.root);
  }

  /**
   * `vm`'s store is about to hold `bytes` in all: marks it most recently used and, if it then fits,
   * removes idle stores of other VMs until the total fits the budget.
   */
  makeRoom(vm: string, bytes: number): Room {
    this.touched.set(vm, Date.now());
    removeLeftovers(this.root); // what a remover that died left behind takes space no scan counts
    const others = scanStores(this.root).filter((e) => e.vm !== vm);
    // Which stores a removal could take: a store whose lock is held now is not one of them.
    const removable: StoreEntry[] = [];
    for (const e of others) {
      if (lockHolder(path.join(this.root, e.vm)) === null) {
        this.reserved.delete(e.vm);
        removable.push(e);
      } else {
        e.bytes = Math.max(e.bytes, this.reserved.get(e.vm) ?? 0);
      }
    }
    let total = bytes + others.reduce((sum, e) => sum + e.bytes, 0);
    if (total <= this.budgetBytes) return this.granted(vm, bytes, []);
    const floor = total - removable.reduce((sum, e) => sum + e.bytes, 0);
    if (floor > this.budgetBytes) return { fits: false, evicted: [] };
    const usedAt = (e: StoreEntry): number => Math.max(e.usedAt, this.touched.get(e.vm) ?? 0);
    removable.sort((a, b) => Number(a.snapshotId !== null) - Number(b.snapshotId !== null) || usedAt(a) - usedAt(b));
    const evicted: Eviction[] = [];
    for (const e of removable) {
      if (total <= this.budgetBytes) break;
      const gone = removeStore(this.root, e.vm);
      if (gone === null) continue; // taken meanwhile by another process
      this.touched.delete(e.vm);
      total -= gone.bytes;
      evicted.push({ vm: e.vm, bytes: gone.bytes });
    }
    if (total > this.budgetBytes) return { fits: false, evicted };
    return this.granted(vm, bytes, evicted);
  }

  private granted(vm: string, bytes: number, evicted: Eviction[]): Room {
    this.reserved.set(vm, bytes);
    return { fits: true, evicted };
  }

  forget(vm: string): void {
    this.touched.delete(vm);
    this.reserved.delete(vm);
  }
}
