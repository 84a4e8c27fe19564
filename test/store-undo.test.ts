import * as fs from 'node:fs';
import * as path from 'node:path';
import { digestOne } from '../src/digest';
import { PageStore, UndoableStore } from '../src/store';
import { distModule, startNodeChild } from '../src/lab/harness/child';
import { testTempDir } from './temp-dir';

const layout = { pageSize: 4096, pageCount: 16, layoutId: 'l1', layout: {} };
const digestOf = (page: Buffer): Buffer => {
  const d = Buffer.alloc(16);
  digestOne(page, 0, 4096, d, 0);
  return d;
};

describe('a failed migration keeps the last complete snapshot', () => {
  let data = '';
  let original: Buffer[];
  beforeEach(() => {
    data = testTempDir('bfmig-undo-');
    original = Array.from({ length: 16 }, (_, i) => Buffer.alloc(4096, i + 1));
    const store = PageStore.open(data, 'vm1');
    store.begin(layout);
    original.forEach((p, i) => store.writePage(i, p, 0, digestOf(p), 0));
    store.commit('snap-1');
    store.close();
  });

  const contents = (store: PageStore): Buffer[] =>
    original.map((_, i) => {
      const b = Buffer.alloc(4096);
      store.readPages(i, 1, b, 0);
      return b;
    });

  test('rollback puts back every page the migration changed or dropped, and claims the snapshot again', () => {
    const store = PageStore.open(data, 'vm1');
    const undo = new UndoableStore(store);
    undo.begin(layout);
    const changed = Buffer.alloc(4096, 0xaa);
    undo.writePage(3, changed, 0, digestOf(changed), 0);
    undo.writePage(3, Buffer.alloc(4096, 0xbb), 0, digestOf(Buffer.alloc(4096, 0xbb)), 0); // twice
    undo.writePage(9, changed, 0, digestOf(changed), 0);
    undo.markAbsent(12);
    expect(store.snapshotId()).toBeNull();
    undo.rollback();
    expect(store.snapshotId()).toBe('snap-1');
    expect(contents(store).every((b, i) => b.equals(original[i]))).toBe(true);
    expect(fs.existsSync(path.join(data, 'vm1', 'undo'))).toBe(false);
    store.close();
    // And it says so after a reopen.
    const reopened = PageStore.open(data, 'vm1');
    expect(reopened.snapshotId()).toBe('snap-1');
    expect(reopened.verify()).toEqual([]);
    reopened.close();
  });

  test('a page read alone right before it is overwritten is journalled from that read, not read again; rollback puts back the very page', () => {
    const store = PageStore.open(data, 'vm1');
    const undo = new UndoableStore(store);
    undo.begin(layout);
    const read = store.readPages.bind(store);
    let diskReads = 0;
    store.readPages = (index, count, dest, destStart, inStream) => {
      diskReads++;
      read(index, count, dest, destStart, inStream);
    };
    const base = Buffer.alloc(4096);
    const next = (v: number): Buffer => Buffer.alloc(4096, v);
    // As a codec does for a delta: the held version, then the new one.
    undo.readPages(4, 1, base, 0);
    expect(base.equals(original[4])).toBe(true);
    undo.writePage(4, next(0xa4), 0, digestOf(next(0xa4)), 0);
    expect(diskReads).toBe(1);
    // A page read, then another page read, then the first overwritten: that one is read again.
    undo.readPages(6, 1, base, 0);
    undo.readPages(7, 1, base, 0);
    undo.writePage(6, next(0xa6), 0, digestOf(next(0xa6)), 0);
    expect(diskReads).toBe(4);
    // Dropping the page last read journals it from that read too; the next page read and overwritten
    // likewise. Rollback puts every one back as the snapshot held it.
    undo.markAbsent(7);
    undo.readPages(8, 1, base, 0);
    undo.writePage(8, next(0xa8), 0, digestOf(next(0xa8)), 0);
    expect(diskReads).toBe(5);
    undo.rollback();
    expect(store.snapshotId()).toBe('snap-1');
    expect(contents(store).every((b, i) => b.equals(original[i]))).toBe(true);
    expect(store.verify()).toEqual([]);
    store.close();
  });

  test('a completed migration replaces the snapshot; a corrupted page means no snapshot is claimed after a failure', () => {
    const store = PageStore.open(data, 'vm1');
    const undo = new UndoableStore(store);
    undo.begin(layout);
    const changed = Buffer.alloc(4096, 0xcc);
    undo.writePage(1, changed, 0, digestOf(changed), 0);
    undo.commit('snap-2');
    expect(store.snapshotId()).toBe('snap-2');
    expect(contents(store)[1].equals(changed)).toBe(true);

    undo.begin(layout);
    undo.writePage(2, changed, 0, digestOf(changed), 0);
    undo.dropCorrupt(5);
    undo.rollback();
    expect(store.snapshotId()).toBeNull();
    expect(store.isPresent(5)).toBe(false);
    expect(store.verify()).toEqual([]);
    store.close();
  });
});

describe('a gateway killed mid-migration', () => {
  const pageCount = 600;
  const big = { pageSize: 4096, pageCount, layoutId: 'l2', layout: {} };
  const oldPage = (i: number): Buffer => Buffer.alloc(4096, (i % 250) + 1);
  let data = '';
  beforeEach(() => {
    data = testTempDir('bfmig-crash-');
  });

  const commitOld = (snapshot: string | null): void => {
    const store = PageStore.open(data, 'vm1');
    store.begin(big);
    for (let i = 0; i < pageCount; i++) store.writePage(i, oldPage(i), 0, digestOf(oldPage(i)), 0);
    if (snapshot === null) store.abort();
    else store.commit(snapshot);
    store.close();
  };

  /** Another process rewrites every page (and drops some) through an UndoableStore, then is killed with SIGKILL. */
  const crashMidMigration = async (): Promise<void> => {
    const child = startNodeChild(`const { PageStore, UndoableStore } = require(${distModule('src/store/index')}); const { digestOne } = require(${distModule('src/digest/index')});
      const s = new UndoableStore(PageStore.open(${JSON.stringify(data)}, 'vm1'));
      s.begin(${JSON.stringify(big)});
      const d = Buffer.alloc(16);
      for (let i = 0; i < ${pageCount}; i++) {
        if (i % 7 === 0) { s.markAbsent(i); continue; }
        const p = Buffer.alloc(4096, 0xf0 ^ (i & 0xff)); digestOne(p, 0, 4096, d, 0); s.writePage(i, p, 0, d, 0);
      }
      if (s.store.verify().length !== 0) throw new Error('damaged'); // writes the open runs to the pages file and waits for them
      console.log('written'); setInterval(() => {}, 1000);`);
    try {
      expect(await child.said('written')).toContain('written');
    } finally {
      await child.kill();
    }
  };

  const pagesFileHoldsNew = (): boolean => {
    const pages = fs.readFileSync(path.join(data, 'vm1', 'pages'));
    return pages[1 * 4096] === (0xf0 ^ 1);
  };

  test('the restarted store puts the old snapshot back from the undo journal and claims it again', async () => {
    commitOld('snap-old');
    await crashMidMigration();
    expect(pagesFileHoldsNew()).toBe(true); // the dead migration did overwrite the snapshot on disk
    const store = PageStore.open(data, 'vm1');
    try {
      expect(store.warnings.join('\n')).toMatch(/put back \d+ pages from the undo journal.*snapshot snap-old is claimed again/);
      expect(store.snapshotId()).toBe('snap-old');
      expect(store.meta()?.presentPages).toBe(pageCount);
      const b = Buffer.alloc(4096);
      for (let i = 0; i < pageCount; i++) {
        store.readPages(i, 1, b, 0);
        expect(b.equals(oldPage(i))).toBe(true);
      }
      expect(store.verify()).toEqual([]);
      expect(fs.existsSync(path.join(data, 'vm1', 'undo'))).toBe(false);
    } finally {
      store.close();
    }
  });

  test('a journal missing its last entry (as after a power loss) leaves a consistent store that claims nothing', async () => {
    commitOld('snap-old');
    await crashMidMigration();
    const journal = path.join(data, 'vm1', 'undo');
    const entry = 8 + 16 + 4096;
    fs.truncateSync(journal, fs.statSync(journal).size - entry);
    const store = PageStore.open(data, 'vm1');
    try {
      expect(store.snapshotId()).toBeNull();
      expect(store.warnings.join('\n')).toMatch(/corrected 1 digests; no snapshot claimed/);
      expect(store.verify()).toEqual([]);
    } finally {
      store.close();
    }
  });

  test('without a snapshot to protect there is no journal, and recovery claims nothing', async () => {
    commitOld(null);
    await crashMidMigration();
    expect(fs.existsSync(path.join(data, 'vm1', 'undo'))).toBe(false);
    const store = PageStore.open(data, 'vm1');
    try {
      expect(store.snapshotId()).toBeNull();
      expect(store.warnings.join('\n')).toMatch(/no undo journal/);
      expect(store.verify()).toEqual([]);
    } finally {
      store.close();
    }
  });

  test('a journal left by an earlier migration is never replayed into a later one', () => {
    commitOld('snap-old');
    const store = PageStore.open(data, 'vm1');
    const undo = new UndoableStore(store);
    undo.begin(big);
    undo.writePage(5, Buffer.alloc(4096, 0xee), 0, digestOf(Buffer.alloc(4096, 0xee)), 0);
    undo.commit('snap-new');
    // As if the process died right after committing, before removing the journal: a stale one.
    fs.writeFileSync(path.join(data, 'vm1', 'undo'), 'bfmig-undo/1\n{"snapshotId":"snap-old"}');
    undo.begin(big);
    undo.writePage(6, Buffer.alloc(4096, 0xdd), 0, digestOf(Buffer.alloc(4096, 0xdd)), 0);
    undo.rollback();
    expect(store.snapshotId()).toBe('snap-new');
    const b = Buffer.alloc(4096);
    store.readPages(5, 1, b, 0);
    expect(b[0]).toBe(0xee);
    store.readPages(6, 1, b, 0);
    expect(b.equals(oldPage(6))).toBe(true);
    store.close();
  });
});
