import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseSize } from '../src/common/units';
import { PageStore, statStore, StoreBudget, UndoableStore } from '../src/store';
import { distModule, type NodeChild, startNodeChild } from '../src/lab/harness/child';
import { testTempDir } from './temp-dir';

describe('store budget', () => {
  let data = '';
  beforeEach(() => {
    data = testTempDir('bfmig-budget-');
    // Three VMs of 8 pages (32 KiB each), used in the order vm1, vm2, vm3.
    for (const vm of ['vm1', 'vm2', 'vm3']) {
      const store = PageStore.open(data, vm);
      store.begin({ pageSize: 4096, pageCount: 8, layoutId: 'l', layout: {} });
      store.commit(`snap-${vm}`);
      store.close();
    }
    // Last used in that order, a second apart (the budget orders stores by their meta.json's time).
    const t0 = Date.now() / 1000 - 100;
    ['vm1', 'vm2', 'vm3'].forEach((vm, i) => fs.utimesSync(path.join(data, vm, 'meta.json'), t0 + i, t0 + i));
  });
  /** What a store holds on disk: every file in its directory. */
  const size = (vm: string): number => statStore(path.join(data, vm), vm)?.bytes ?? 0;

  test('sizes parse in the units users write', () => {
    expect(parseSize('200GiB')).toBe(200 * 2 ** 30);
    expect(parseSize('1.5 MiB')).toBe(1.5 * 2 ** 20);
    expect(parseSize('2TB')).toBe(2e12);
    expect(parseSize('4096')).toBe(4096);
    expect(() => parseSize('lots')).toThrow(/not a size/);
  });

  test('the least recently used idle stores go first, until the new one fits', () => {
    const budget = new StoreBudget(data, 80 * 1024);
    expect(budget.totalBytes).toBe(size('vm1') + size('vm2') + size('vm3'));
    const room = budget.makeRoom('vm4', 32 * 1024);
    expect(room).toMatchObject({ fits: true });
    expect(room.evicted.map((e) => e.vm)).toEqual(['vm1', 'vm2']);
    expect(fs.existsSync(path.join(data, 'vm1'))).toBe(false);
    expect(fs.existsSync(path.join(data, 'vm3'))).toBe(true);
    expect(budget.totalBytes).toBeLessThanOrEqual(80 * 1024);
  });

  test('a store in use is never evicted, and a recently used one outlives older ones', () => {
    const budget = new StoreBudget(data, 72 * 1024);
    budget.makeRoom('vm1', 32 * 1024); // vm1 used again: now the most recent; total ~97 KiB > 72 → vm2 goes
    expect(fs.existsSync(path.join(data, 'vm2'))).toBe(false);
    const inUse = PageStore.open(data, 'vm3'); // a migration of vm3 is running
    try {
      const room = budget.makeRoom('vm5', 32 * 1024);
      expect(room.evicted.map((e) => e.vm)).toEqual(['vm1']);
      expect(room.fits).toBe(true);
      expect(fs.existsSync(path.join(data, 'vm3'))).toBe(true);
    } finally {
      inUse.close();
    }
  });
});

/** Bytes of every file under dir, by lstat: what the disk holds, counted independently of the budget. */
function du(dir: string): number {
  let total = 0;
  for (const name of fs.readdirSync(dir)) {
    const st = fs.lstatSync(path.join(dir, name));
    total += st.isDirectory() ? du(path.join(dir, name)) : st.size;
  }
  return total;
}

/** Runs `script` in another Node process, the compiled store as `store`. */
const child = (script: string): NodeChild => startNodeChild(`const store = require(${distModule('src/store/index')});\n${script}`);

describe('storeBudget bounds the disk', () => {
  let data = '';
  const commitStore = (vm: string, pageCount: number, at: number): void => {
    const store = PageStore.open(data, vm);
    store.begin({ pageSize: 4096, pageCount, layoutId: 'l', layout: {} });
    const page = Buffer.alloc(4096, vm.length);
    const digest = Buffer.alloc(16, 7);
    for (let i = 0; i < pageCount; i++) store.writePage(i, page, 0, digest, 0);
    store.commit(`snap-${vm}`);
    store.close();
    fs.utimesSync(path.join(data, vm, 'meta.json'), at, at);
  };
  beforeEach(() => {
    data = testTempDir('bfmig-bound-');
    const t0 = Date.now() / 1000 - 100;
    ['vm1', 'vm2', 'vm3'].forEach((vm, i) => commitStore(vm, 8, t0 + i));
  });

  test('everything a store holds counts: pages, digests, meta, blobs and the undo journal', () => {
    const budget = new StoreBudget(data, 1 << 30);
    const blobs = PageStore.open(data, 'vm1');
    blobs.saveBlob('stream-tail', Buffer.alloc(64 * 1024, 1));
    blobs.close();
    // vm2 is migrating with an undo journal that protects its snapshot: 4 pages changed so far.
    const store = PageStore.open(data, 'vm2');
    const undoable = new UndoableStore(store);
    try {
      undoable.begin({ pageSize: 4096, pageCount: 8, layoutId: 'l', layout: {} });
      for (let i = 0; i < 4; i++) undoable.writePage(i, Buffer.alloc(4096, 9), 0, Buffer.alloc(16, 9), 0);
      expect(fs.statSync(path.join(data, 'vm2', 'undo')).size).toBeGreaterThan(4 * 4096);
      expect(budget.totalBytes).toBe(du(data));
      expect(budget.totalBytes).toBeGreaterThan(3 * 8 * 4096 + 64 * 1024 + 4 * 4096);
    } finally {
      undoable.rollback();
      store.close();
    }
  });

  test('a running migration counts at what it was let grow to, not at what its files hold yet', () => {
    const budget = new StoreBudget(data, 200 * 1024);
    const store = PageStore.open(data, 'vm1');
    const undoable = new UndoableStore(store);
    try {
      undoable.begin({ pageSize: 4096, pageCount: 8, layoutId: 'l', layout: {} }); // its undo journal may reach 8 pages
      const need = undoable.needBytes();
      expect(need).toBeGreaterThan(2 * 8 * 4096);
      expect(budget.makeRoom('vm1', need)).toEqual({ fits: true, evicted: [] });
      // vm2 and vm3 are idle and may go; vm1's journal is still empty on disk but must stay counted.
      expect(budget.makeRoom('vm4', 200 * 1024 - need + 1)).toEqual({ fits: false, evicted: [] });
    } finally {
      undoable.rollback();
      store.close();
    }
    // Once vm1's migration is over (its store unlocked), only its files count.
    const room = budget.makeRoom('vm4', 200 * 1024 - du(path.join(data, 'vm1')));
    expect(room.fits).toBe(true);
    expect(room.evicted.map((e) => e.vm)).toEqual(['vm2', 'vm3']);
  });

  test('a store created after the budget was made counts and can be evicted', () => {
    const budget = new StoreBudget(data, 100 * 1024);
    commitStore('vm0', 8, Date.now() / 1000 - 200); // written later, but used longest ago
    const room = budget.makeRoom('vm5', 32 * 1024);
    expect(room.fits).toBe(true);
    expect(room.evicted.map((e) => e.vm)).toEqual(['vm0', 'vm1']);
    expect(du(data) + 32 * 1024).toBeLessThanOrEqual(100 * 1024);
  });

  test('a store that could not fit even with every idle store gone evicts nothing', () => {
    const budget = new StoreBudget(data, 100 * 1024);
    const room = budget.makeRoom('huge', 1 << 30);
    expect(room).toEqual({ fits: false, evicted: [] });
    for (const vm of ['vm1', 'vm2', 'vm3']) expect(fs.existsSync(path.join(data, vm, 'meta.json'))).toBe(true);
  });

  test('stores without a snapshot go before snapshots, however recently used', () => {
    const budget = new StoreBudget(data, 80 * 1024);
    const store = PageStore.open(data, 'vm4');
    store.begin({ pageSize: 4096, pageCount: 8, layoutId: 'l', layout: {} });
    store.abort(); // a migration that never completed: no snapshot
    store.close();
    const room = budget.makeRoom('vm5', 8 * 1024);
    expect(room.evicted.map((e) => e.vm)).toEqual(['vm4', 'vm1']);
  });

  test('two processes: stores another process writes, and holds, count; the one it holds is never evicted', async () => {
    const budget = new StoreBudget(data, 120 * 1024);
    const other = child(`
      const s = store.PageStore.open(${JSON.stringify(data)}, 'far');
      s.begin({ pageSize: 4096, pageCount: 16, layoutId: 'l', layout: {} });
      for (let i = 0; i < 16; i++) s.writePage(i, Buffer.alloc(4096, 3), 0, Buffer.alloc(16, 3), 0);
      s.commit('snap-far');
      console.log('ready');
      setInterval(() => {}, 1000);`);
    await other.said('ready');
    try {
      const room = budget.makeRoom('vm5', 32 * 1024);
      expect(room.fits).toBe(true);
      expect(room.evicted.map((e) => e.vm)).toEqual(['vm1', 'vm2', 'vm3']);
      expect(fs.existsSync(path.join(data, 'far', 'meta.json'))).toBe(true);
      expect(du(data) + 32 * 1024).toBeLessThanOrEqual(120 * 1024);
      // With the held store alone over the budget, a new store evicts nothing and does not fit.
      expect(new StoreBudget(data, 64 * 1024).makeRoom('vm6', 32 * 1024)).toEqual({ fits: false, evicted: [] });
    } finally {
      await other.kill();
    }
  });

  test('two processes: eviction never deletes a store another process has just opened', async () => {
    // The other process opens vm1's store over and over, writes a page that names the round and
    // commits; every time it finds a snapshot, its page must be that snapshot's. Meanwhile this
    // process keeps making room for a store that leaves no room for vm1. Every eighth round the other
    // process leaves vm1 closed for a millisecond, so that evictions happen however the two
    // processes' speeds compare (back to back, the window between close and open can be too short
    // to hit on some machines); the other rounds race open against eviction. It runs until told to stop.
    const stop = path.join(data, 'stop');
    const other = child(`
      const fs = require('node:fs');
      const errors = [];
      let errorCount = 0;
      const noteError = (message) => { errorCount++; if (errors.length < 5) errors.push(message); };
      let rounds = 0;
      let busy = 0;
      let found = 0;
      const pause = new Int32Array(new SharedArrayBuffer(4));
      console.log('ready');
      while (!fs.existsSync(${JSON.stringify(stop)})) {
        if (rounds % 8 === 7) Atomics.wait(pause, 0, 0, 1);
        let s;
        try {
          s = store.PageStore.open(${JSON.stringify(data)}, 'vm1');
        } catch (err) {
          if (err instanceof store.StoreBusyError) { busy++; continue; }
          noteError('open: ' + err.message);
          continue;
        }
        try {
          const snap = s.snapshotId();
          if (snap !== null && snap.startsWith('round-')) {
            found++;
            const page = Buffer.alloc(4096);
            s.readPages(0, 1, page, 0);
            if (page[0] !== Number(snap.slice(6)) % 256) noteError('round ' + snap + ' holds page ' + page[0]);
          }
          rounds++;
          s.begin({ pageSize: 4096, pageCount: 4, layoutId: 'l', layout: {} });
          s.writePage(0, Buffer.alloc(4096, rounds % 256), 0, Buffer.alloc(16, (rounds % 255) + 1), 0);
          s.commit('round-' + rounds);
        } catch (err) {
          noteError(err.message);
        } finally {
          try { s.close(); } catch (err) { noteError('close: ' + err.message); }
        }
      }
      console.log(JSON.stringify({ rounds, busy, found, errors, errorCount }));`);
    await other.said('ready');
    const budget = new StoreBudget(data, 32 * 1024);
    let evictions = 0;
    // At least 2 s of racing and 5 evictions of vm1; 20 s at most.
    const start = Date.now();
    try {
      while ((Date.now() - start < 2000 || evictions < 5) && Date.now() - start < 20_000) {
        for (const e of budget.makeRoom('hog', 30 * 1024).evicted) if (e.vm === 'vm1') evictions++;
        await new Promise((resolve) => setImmediate(resolve));
      }
    } finally {
      // The other process stops whatever happened here (it would loop on for good, its errors growing).
      fs.writeFileSync(stop, '');
    }
    const exit = await other.exited;
    expect(exit).toMatchObject({ code: 0, stderr: '' });
    const report = JSON.parse(exit.stdout.trim().split('\n').pop() ?? '{}') as { rounds: number; errorCount: number; errors: string[] };
    expect(report.errors).toEqual([]);
    expect(report.errorCount).toBe(0);
    expect(report.rounds).toBeGreaterThan(10);
    expect(evictions).toBeGreaterThanOrEqual(5);
  });
});
