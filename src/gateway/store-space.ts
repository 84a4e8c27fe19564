import * as fs from 'node:fs';
import { errorMessage } from '../common/errors';
import type { Direction } from './session';

/** The filesystem has no room (or the quota is used up): what a store write fails with on a full disk. */
export function isNoSpace(err: unknown): boolean {
  // The store wraps the fs error in one that names the pages; the code is on its cause. Duck-typed:
  // errors from another realm (a vm context, a worker) are not instances of this one's Error.
  let e: unknown = err;
  for (let depth = 0; typeof e === 'object' && e !== null && depth < 4; depth++) {
    const { code, cause } = e as { code?: unknown; cause?: unknown };
    if (code === 'ENOSPC' || code === 'EDQUOT') return true;
    e = cause;
  }
  return false;
}

/**
 * Tells `observer` of a store write that failed for lack of space (other errors are not its business):
 * retention then stays off for the VM until its filesystem has the room its store needs.
 */
export function noteStoreError(
  observer: { storeFull(vm: string, direction: Direction, needBytes: number, error: string): void },
  vm: string,
  direction: Direction,
  layout: { pageCount: number; pageSize: number } | null | undefined,
  err: unknown,
): void {
  if (!isNoSpace(err)) return;
  observer.storeFull(vm, direction, storeNeedBytes(layout?.pageCount ?? 0, layout?.pageSize ?? 0), errorMessage(err));
}

/** Room a VM's store may need for one migration: its pages and digests, and as much again for the undo journal. */
export function storeNeedBytes(pageCount: number, pageSize: number): number {
  return Math.max(MIN_FREE_BYTES, 2 * pageCount * (pageSize + 16));
}

/** Below this much free space no store is worth retrying, whatever its size. */
const MIN_FREE_BYTES = 64 * 1024 * 1024;

function statfsFreeBytes(dir: string): number {
  const s = fs.statfsSync(dir);
  return s.bavail * s.bsize;
}

/**
 * Which VMs' stores ran out of space. Retention is what makes the next migration cheap, never a
 * condition of this one: a VM whose store write failed for lack of room migrates without retaining
 * anything until the filesystem has the room its store needs again.
 */
export class StoreSpace {
  private readonly short = new Map<string, number>();

  constructor(
    private readonly root: string,
    private readonly freeBytes: (dir: string) => number = statfsFreeBytes,
  ) {}

  /** A write to `vm`'s store failed for lack of space; the store needs about `needBytes`. */
  exhausted(vm: string, needBytes: number): void {
    this.short.set(vm, Math.max(MIN_FREE_BYTES, needBytes));
  }

  /** Whether a migration of `vm` may write its store now. */
  retains(vm: string): boolean {
    const need = this.short.get(vm);
    if (need === undefined) return true;
    let free: number;
    try {
      free = this.freeBytes(this.root);
    } catch {
      return false;
    }
    if (free < need) return false;
    this.short.delete(vm);
    return true;
  }

  /** VMs that migrate without retention now, with the bytes each waits for. */
  get waiting(): ReadonlyMap<string, number> {
    return this.short;
  }
}
