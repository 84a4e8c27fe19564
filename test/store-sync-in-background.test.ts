/**
 * PageStore.syncInBackground(): during a migration it writes out what the store's write queue holds and
 * fsyncs the pages in the thread pool, leaving the migration open (commit() still to come, and still the
 * one that makes the snapshot durable); outside one it does nothing; a closed store refuses it.
 */
import * as path from 'node:path';
import { PageStore } from '../src/store';
import { testTempDir } from './temp-dir';

const LAYOUT = { pageSize: 4096, pageCount: 64, layoutId: 'l', layout: {} };
const page = (v: number): Buffer => Buffer.alloc(4096, v);
const digest = (v: number): Buffer => Buffer.alloc(16, v);

describe('a store synced in the background', () => {
  test('during a migration: pages written, still in progress, then committed as usual', async () => {
    const data = path.join(testTempDir('bfmig-sync-bg-'), 'data');
    const store = PageStore.open(data, 'vm');
    try {
      await store.syncInBackground(); // nothing begun: nothing to do
      store.begin(LAYOUT);
      for (let i = 0; i < 40; i++) store.writePage(i, page(i + 1), 0, digest(i + 1), 0);
      await store.syncInBackground();
      // Still the migration's: the snapshot is claimed only by commit().
      expect(store.snapshotId()).toBeNull();
      const back = Buffer.alloc(4096);
      store.readPages(39, 1, back, 0);
      expect(back.equals(page(40))).toBe(true);
      store.commit('s1');
      expect(store.snapshotId()).toBe('s1');
    } finally {
      store.close();
    }
    const again = PageStore.open(data, 'vm');
    try {
      expect(again.snapshotId()).toBe('s1');
      const back = Buffer.alloc(4096);
      again.readPages(7, 1, back, 0);
      expect(back.equals(page(8))).toBe(true);
    } finally {
      again.close();
    }
  });

  test('a closed store refuses it', async () => {
    const store = PageStore.open(path.join(testTempDir('bfmig-sync-bg-'), 'data'), 'vm');
    store.close();
    await expect(store.syncInBackground()).rejects.toThrow(/closed/);
  });
});
