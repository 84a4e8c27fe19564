import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { listSnapshots, runSnapshots } from '../src/cli/snapshots';
import { PageStore, StoreBusyError } from '../src/store';
import { acquireLock } from '../src/store/lock';
import { distModule, startNodeChild } from '../src/lab/harness/child';
import { testTempDir } from './temp-dir';

describe('a VM store shared by several gateway processes', () => {
  let data = '';
  beforeEach(() => {
    data = testTempDir('bfmig-lock-');
  });

  test('a second process cannot open a VM store another holds, and takes it over once that process is gone', async () => {
    const first = PageStore.open(data, 'vm1');
    first.begin({ pageSize: 4096, pageCount: 2, layoutId: 'l', layout: {} });
    first.commit('s1');
    first.close();
    // Another process opens vm1's store and keeps it open.
    const child = startNodeChild(`const { PageStore } = require(${distModule('src/store/index')});
      PageStore.open(${JSON.stringify(data)}, 'vm1'); console.log('held'); setInterval(() => {}, 1000);`);
    await child.said('held');
    try {
      expect(() => PageStore.open(data, 'vm1')).toThrow(StoreBusyError);
      expect(() => PageStore.open(data, 'vm1')).toThrow(new RegExp(`in use by process ${child.pid}`));
      expect(listSnapshots(data)).toMatchObject([{ vm: 'vm1', pages: 2, presentPages: 0, inUse: `${child.pid}@${os.hostname()}` }]);
      expect(() => runSnapshots('rm', data, 'vm1', false, () => undefined)).toThrow(StoreBusyError);
      // Other VMs are not affected.
      PageStore.open(data, 'vm2').close();
    } finally {
      await child.kill();
    }
    // Its process died without letting go: the lock is stale and is taken over.
    const store = PageStore.open(data, 'vm1');
    store.close();
    expect(fs.existsSync(path.join(data, 'vm1', 'lock'))).toBe(false);
  });

  test('a lock made in a directory renamed away meanwhile (an eviction) is not taken, and says so as a directory gone', () => {
    // The interleaving the eviction race can give: this process looked up vm1, the evicting process
    // renamed it away, and then this process's lock file was created in the directory renamed away.
    const dir = path.join(data, 'vm1');
    const away = path.join(data, '.removing-vm1-test');
    fs.mkdirSync(dir);
    let thrown: unknown = null;
    try {
      acquireLock(dir, () => fs.renameSync(dir, away));
    } catch (err) {
      thrown = err;
    }
    expect((thrown as NodeJS.ErrnoException | null)?.code).toBe('ENOENT');
    expect(fs.existsSync(path.join(away, 'lock'))).toBe(true);
    // PageStore.open starts again on ENOENT: a new store, its lock where it belongs.
    const store = PageStore.open(data, 'vm1');
    expect(fs.existsSync(path.join(dir, 'lock'))).toBe(true);
    store.close();
    // Not renamed: taken.
    acquireLock(path.join(data, 'vm1'));
    expect(fs.readFileSync(path.join(dir, 'lock'), 'utf8')).toBe(`${os.hostname()} ${process.pid}\n`);
  });
});
