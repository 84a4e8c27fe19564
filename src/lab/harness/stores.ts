/** What a gateway's data directory holds, read after the fact: the checks tests and benchmarks make of the stores. */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { PageStore } from '../../store';

/** Every file under `dir` with its size and content digest: equal listings mean nothing was written. */
export function treeListing(dir: string): string[] {
  if (!fs.existsSync(dir)) return [];
  const out: string[] = [];
  const walk = (d: string): void => {
    for (const entry of fs.readdirSync(d, { withFileTypes: true }).sort((x, y) => x.name.localeCompare(y.name))) {
      const p = path.join(d, entry.name);
      if (entry.isDirectory()) {
        out.push(`${path.relative(dir, p)}/`);
        walk(p);
      } else {
        out.push(`${path.relative(dir, p)} ${createHash('sha256').update(fs.readFileSync(p)).digest('hex').slice(0, 16)}`);
      }
    }
  };
  walk(dir);
  return out;
}

/** What a VM's store at one site says about itself. */
export interface StoreCheck {
  vm: string;
  /** Page indexes whose digest disagrees (verify()); empty when the store is sound. */
  badPages: number[];
  snapshotId: string | null;
  presentPages: number;
}

/** Opens each VM's store in `data` (the gateway must not be migrating it), verifies it and closes it. */
export function checkStores(data: string, vms: readonly string[]): StoreCheck[] {
  return vms.map((vm) => {
    const store = PageStore.open(data, vm);
    try {
      const badPages = store.verify();
      return { vm, badPages, snapshotId: store.snapshotId(), presentPages: store.meta()?.presentPages ?? 0 };
    } finally {
      store.close();
    }
  });
}

/** The snapshot VM `vm`'s store in `data` claims (null: none); the store must not be in use. */
export function claimedSnapshot(data: string, vm: string): string | null {
  const store = PageStore.open(data, vm);
  try {
    return store.snapshotId();
  } finally {
    store.close();
  }
}
