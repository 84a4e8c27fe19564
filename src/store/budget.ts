import * as fs from 'node:fs';
import * as path from 'node:path';
import { LRUCache } from 'lru-cache';
import { lockHolder } from './lock';
import { validateVmName } from './meta';

export interface Eviction {
  vm: string;
  bytes: number;
}

/**
 * A disk budget over one store directory: before a VM's store grows to `bytes`, whole stores of the
 * least recently used other VMs are removed until everything fits. A store in use by any process (its
 * lock is held) is never removed. Sizes are the stores' full size (pages × page size), not what the
 * sparse files happen to take, so the budget holds however full they become.
 */
export class StoreBudget {
  /** Store sizes by VM, least recently used first when iterated with rkeys(). */
  private readonly used = new LRUCache<string, number>({ max: 1_000_000 });

  constructor(
    private readonly root: string,
    readonly budgetBytes: number,
  ) {
    // Existing stores, oldest use first.
    const found: { vm: string; bytes: number; at: string }[] = [];
    if (fs.existsSync(root)) {
      for (const vm of fs.readdirSync(root)) {
        try {
          validateVmName(vm);
          const meta = JSON.parse(fs.readFileSync(path.join(root, vm, 'meta.json'), 'utf8')) as { pageCount: number; pageSize: number; updatedAt: string };
          found.push({ vm, bytes: meta.pageCount * meta.pageSize, at: meta.updatedAt });
        } catch {
          // not a store, or one never written: nothing to account for
        }
      }
    }
    found.sort((a, b) => a.at.localeCompare(b.at));
    for (const f of found) this.used.set(f.vm, f.bytes);
  }

  get totalBytes(): number {
    let total = 0;
    for (const bytes of this.used.values()) total += bytes;
    return total;
  }

  /**
   * `vm`'s store is about to hold `bytes`: marks it most recently used and removes the least recently
   * used idle stores of other VMs until the total fits. Returns what it removed.
   */
  makeRoom(vm: string, bytes: number): Eviction[] {
    this.used.set(vm, bytes);
    const evicted: Eviction[] = [];
    let total = this.totalBytes;
    for (const other of [...this.used.rkeys()]) {
      if (total <= this.budgetBytes) break;
      if (other === vm) continue;
      const dir = path.join(this.root, other);
      if (lockHolder(dir)) continue;
      const size = this.used.get(other) ?? 0;
      fs.rmSync(dir, { recursive: true, force: true });
      this.used.delete(other);
      total -= size;
      evicted.push({ vm: other, bytes: size });
    }
    return evicted;
  }

  forget(vm: string): void {
    this.used.delete(vm);
  }
}

/** "200GiB", "512 MiB", "1TB", "4096": bytes. */
export function parseSize(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$/i.exec(text);
  if (!m) throw new Error(`"${text}" is not a size like 200GiB`);
  const unit = (m[2] ?? '').toUpperCase().replace(/B$/, '');
  const powers: Record<string, number> = { '': 0, K: 1, KI: 1, M: 2, MI: 2, G: 3, GI: 3, T: 4, TI: 4 };
  if (!(unit in powers)) throw new Error(`"${text}" has an unknown unit`);
  const base = unit.endsWith('I') || unit === '' ? 1024 : 1000;
  return Math.round(Number(m[1]) * base ** powers[unit]);
}
