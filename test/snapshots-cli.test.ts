import * as fs from 'node:fs';
import * as path from 'node:path';
import { listSnapshots, runSnapshots } from '../src/cli/snapshots';
import { digestOne } from '../src/digest';
import { keepStreamParts } from '../src/gateway/session';
import { describeOrigin, streamOrigin } from '../src/qemu';
import { PageStore } from '../src/store';
import { saveStreamParts } from '../src/store/snapshot-parts';
import { testTempDir } from './temp-dir';

describe('bfmig snapshots', () => {
  let data = '';
  const page = (seed: number): Buffer => Buffer.alloc(4096, seed);
  /** Writes pages [from, to), page i filled with i + 1, with their digests. */
  const writePages = (store: PageStore, from: number, to: number): void => {
    const digest = Buffer.alloc(16);
    for (let i = from; i < to; i++) {
      digestOne(page(i + 1), 0, 4096, digest, 0);
      store.writePage(i, page(i + 1), 0, digest, 0);
    }
  };
  beforeEach(() => {
    data = testTempDir('bfmig-snaps-');
    const store = PageStore.open(data, 'vm1');
    store.begin({ pageSize: 4096, pageCount: 8, layoutId: 'l1', layout: {} });
    writePages(store, 0, 6);
    store.commit('snap-1');
    store.close();
  });

  const run = (action: string, vm?: string, json = false): { code: number; out: string } => {
    let out = '';
    const code = runSnapshots(action, data, vm, json, (s) => (out += s));
    return { code, out };
  };

  test('list shows each VM with its snapshot and held pages', () => {
    // Two pages are not held and no device state was kept: not restorable.
    expect(listSnapshots(data)).toMatchObject([{ vm: 'vm1', snapshotId: 'snap-1', pages: 8, presentPages: 6, restorable: false, inUse: null }]);
    const { code, out } = run('list');
    expect(code).toBe(0);
    expect(out).toMatch(/vm1\s+snap-1\s+6\/8/);
  });

  test('verify passes a clean store and catches a flipped byte, which then stops being held', () => {
    expect(run('verify', 'vm1').code).toBe(0);
    const fd = fs.openSync(path.join(data, 'vm1', 'pages'), 'r+');
    fs.writeSync(fd, Buffer.from([0x99]), 0, 1, 2 * 4096 + 17);
    fs.closeSync(fd);
    const bad = run('verify', 'vm1', true);
    expect(bad.code).toBe(1);
    expect(JSON.parse(bad.out)).toMatchObject({ vm: 'vm1', corrupted: [2] });
    expect(listSnapshots(data)[0]).toMatchObject({ presentPages: 5, snapshotId: null });
    expect(run('verify', 'vm1').code).toBe(0);
  });

  test('a complete snapshot with its device state is restorable and says which QEMU it came from', () => {
    const store = PageStore.open(data, 'vm1');
    store.begin({ pageSize: 4096, pageCount: 8, layoutId: 'l1', layout: {} });
    writePages(store, 6, 8);
    const parts = { result: () => ({ head: Buffer.from('head'), tail: Buffer.from('tail'), ramSectionId: 2, machineType: 'pc-q35-7.2' }) };
    keepStreamParts(store, parts, true, 'snap-2');
    store.commit('snap-2');
    store.close();
    expect(listSnapshots(data)).toMatchObject([{ vm: 'vm1', snapshotId: 'snap-2', restorable: true, machineType: 'pc-q35-7.2', minQemuRelease: '7.2' }]);
    expect(run('list').out).toMatch(/yes \(pc-q35-7\.2, QEMU ≥ 7\.2\)/);
    expect(JSON.parse(run('show', 'vm1').out)).toMatchObject({ stream: { machineType: 'pc-q35-7.2', minQemuRelease: '7.2', framing: 'current' } });
    // The legacy framing names no machine type, so no version can be told.
    expect(streamOrigin(null, false)).toEqual({ machineType: null, minQemuRelease: null, framing: 'legacy' });
    expect(describeOrigin(streamOrigin('pc-i440fx-2.0', true))).toBe('pc-i440fx-2.0, QEMU ≥ 2.0');
  });

  test('show prints the metadata; rm removes the VM; unknown and unsafe names are refused', () => {
    expect(JSON.parse(run('show', 'vm1').out)).toMatchObject({ vm: 'vm1', snapshotId: 'snap-1', pageCount: 8 });
    expect(run('show', 'nope').code).toBe(1);
    expect(() => run('rm', '../etc')).toThrow(/name/);
    expect(run('rm', 'vm1').code).toBe(0);
    expect(listSnapshots(data)).toEqual([]);
  });
});

describe('bfmig restore refuses what it cannot rebuild', () => {
  let data = '';
  beforeEach(() => {
    data = testTempDir('bfmig-restore-');
  });
  const to = { host: '127.0.0.1', port: 9 };

  test('an unknown VM, a snapshot without device state, an incomplete snapshot', async () => {
    const { restoreSnapshot } = await import('../src/cli/restore');
    await expect(restoreSnapshot(data, 'ghost', to)).rejects.toThrow(/no retained snapshot/);

    const store = PageStore.open(data, 'vm1');
    store.begin({ pageSize: 4096, pageCount: 4, layoutId: 'l', layout: { blocks: [{ name: 'pc.ram', length: 4 * 4096 }] } });
    const digest = Buffer.alloc(16);
    digestOne(Buffer.alloc(4096, 1), 0, 4096, digest, 0);
    for (let i = 0; i < 3; i++) store.writePage(i, Buffer.alloc(4096, 1), 0, digest, 0);
    store.commit('s1');
    store.close();
    await expect(restoreSnapshot(data, 'vm1', to)).rejects.toThrow(/device state of snapshot s1 was not retained/);

    const again = PageStore.open(data, 'vm1');
    saveStreamParts(again, { head: Buffer.from('QEVM'), tail: Buffer.from([0]), info: { snapshotId: 's1', ramSectionId: 2, footers: true } });
    again.close();
    await expect(restoreSnapshot(data, 'vm1', to)).rejects.toThrow(/incomplete: 1 of 4 pages are not held/);
  });
});
