import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { PageStore, parseSize, StoreBudget } from '../src/store';

describe('store budget', () => {
  let data = '';
  beforeEach(() => {
    data = fs.mkdtempSync(path.join(os.tmpdir(), 'bfmig-budget-'));
    // Three VMs of 8 pages (32 KiB each), used in the order vm1, vm2, vm3.
    for (const vm of ['vm1', 'vm2', 'vm3']) {
      const store = PageStore.open(data, vm);
      store.begin({ pageSize: 4096, pageCount: 8, layoutId: 'l', layout: {} });
      store.commit(`snap-${vm}`);
      store.close();
    }
  });
  afterEach(() => fs.rmSync(data, { recursive: true, force: true }));

  test('sizes parse in the units users write', () => {
    expect(parseSize('200GiB')).toBe(200 * 2 ** 30);
    expect(parseSize('1.5 MiB')).toBe(1.5 * 2 ** 20);
    expect(parseSize('2TB')).toBe(2e12);
    expect(parseSize('4096')).toBe(4096);
    expect(() => parseSize('lots')).toThrow(/not a size/);
  });

  test('the least recently used idle stores go first, until the new one fits', () => {
    const budget = new StoreBudget(data, 80 * 1024);
    expect(budget.totalBytes).toBe(96 * 1024);
    const evicted = budget.makeRoom('vm4', 32 * 1024);
    expect(evicted.map((e) => e.vm)).toEqual(['vm1', 'vm2']);
    expect(fs.existsSync(path.join(data, 'vm1'))).toBe(false);
    expect(fs.existsSync(path.join(data, 'vm3'))).toBe(true);
    expect(budget.totalBytes).toBeLessThanOrEqual(80 * 1024);
  });

  test('a store in use is never evicted, and a recently used one outlives older ones', () => {
    const budget = new StoreBudget(data, 64 * 1024);
    budget.makeRoom('vm1', 32 * 1024); // vm1 used again: now the most recent; total 96 KiB > 64 → vm2 goes
    expect(fs.existsSync(path.join(data, 'vm2'))).toBe(false);
    const inUse = PageStore.open(data, 'vm3'); // a migration of vm3 is running
    try {
      const evicted = budget.makeRoom('vm5', 64 * 1024);
      expect(evicted.map((e) => e.vm)).toEqual(['vm1']);
      expect(fs.existsSync(path.join(data, 'vm3'))).toBe(true);
    } finally {
      inUse.close();
    }
  });
});
