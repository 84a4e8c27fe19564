import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { listSnapshots, runSnapshots } from '../src/cli/snapshots';
import { PACKAGE_ROOT } from '../src/digest/package-root';
import { PageStore, StoreBusyError } from '../src/store';
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
    const script = `const { PageStore } = require(${JSON.stringify(path.join(PACKAGE_ROOT, 'dist', 'src', 'store', 'index.js'))});
      PageStore.open(${JSON.stringify(data)}, 'vm1'); console.log('held'); setInterval(() => {}, 1000);`;
    const child = spawn(process.execPath, ['-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
    await new Promise<void>((resolve) => child.stdout.on('data', () => resolve()));
    try {
      expect(() => PageStore.open(data, 'vm1')).toThrow(StoreBusyError);
      expect(() => PageStore.open(data, 'vm1')).toThrow(new RegExp(`in use by process ${child.pid}`));
      expect(listSnapshots(data)).toMatchObject([{ vm: 'vm1', inUse: `${child.pid}@${os.hostname()}` }]);
      expect(() => runSnapshots('rm', data, 'vm1', false, () => undefined)).toThrow(StoreBusyError);
      // Other VMs are not affected.
      PageStore.open(data, 'vm2').close();
    } finally {
      child.kill('SIGKILL');
      await new Promise((resolve) => child.on('exit', resolve));
    }
    // Its process died without letting go: the lock is stale and is taken over.
    const store = PageStore.open(data, 'vm1');
    store.close();
    expect(fs.existsSync(path.join(data, 'vm1', 'lock'))).toBe(false);
  });
});
