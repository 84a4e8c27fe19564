import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { digestOne } from '../src/digest';
import { PageStore, UndoableStore } from '../src/store';

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
    data = fs.mkdtempSync(path.join(os.tmpdir(), 'bfmig-undo-'));
    original = Array.from({ length: 16 }, (_, i) => Buffer.alloc(4096, i + 1));
    const store = PageStore.open(data, 'vm1');
    store.begin(layout);
    original.forEach((p, i) => store.writePage(i, p, 0, digestOf(p), 0));
    store.commit('snap-1');
    store.close();
  });
  afterEach(() => fs.rmSync(data, { recursive: true, force: true }));

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
