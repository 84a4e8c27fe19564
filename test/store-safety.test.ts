/**
 * The store's own safety: symbolic links planted in the data directory are never followed, stores that
 * claim nothing are removed only under their lock, and a store the disk budget has no room for degrades
 * instead of growing.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { listSnapshots } from '../src/cli/snapshots';
import { PageStore, removeStore, removeUnclaimedStores, StoreBusyError, UndoableStore } from '../src/store';
import { DirectPages } from '../src/store/direct-pages';
import { testTempDir } from './temp-dir';

const LAYOUT = { pageSize: 4096, pageCount: 8, layoutId: 'l', layout: {} };
const page = (v: number): Buffer => Buffer.alloc(4096, v);
const digest = (v: number): Buffer => Buffer.alloc(16, v);

let tmp = '';
let data = '';
let outside = '';
beforeEach(() => {
  tmp = testTempDir('bfmig-safety-');
  data = path.join(tmp, 'data');
  outside = path.join(tmp, 'outside');
  fs.mkdirSync(data);
  fs.mkdirSync(outside);
});

function committed(vm: string, snapshot: string | null, pages = 1): void {
  const store = PageStore.open(data, vm);
  store.begin(LAYOUT);
  if (pages > 0) store.writePage(0, page(1), 0, digest(1), 0);
  if (snapshot !== null) store.commit(snapshot);
  else store.abort();
  store.close();
}

describe('symbolic links in the data directory are never followed', () => {
  test('a VM directory that is a symbolic link: open fails, nothing is created where it points', () => {
    fs.symlinkSync(outside, path.join(data, 'vm1'));
    expect(() => PageStore.open(data, 'vm1')).toThrow(/symbolic link/);
    expect(fs.readdirSync(outside)).toEqual([]);
  });

  test.each(['pages', 'digests', 'meta.json', 'meta.json.tmp'])('a store file planted as a symbolic link (%s): the store fails, the target is untouched', (name) => {
    committed('vm1', 's1');
    const target = path.join(outside, 'victim');
    fs.writeFileSync(target, 'precious');
    const file = path.join(data, 'vm1', name);
    fs.rmSync(file, { force: true });
    fs.symlinkSync(target, file);
    expect(() => {
      const store = PageStore.open(data, 'vm1');
      try {
        store.begin({ ...LAYOUT, layoutId: 'other' }); // rewrites meta.json (through meta.json.tmp)
      } finally {
        store.close();
      }
    }).toThrow(/symbolic link/);
    expect(fs.readFileSync(target, 'utf8')).toBe('precious');
  });

  test('an undo journal or a blob planted as a symbolic link is not written through', () => {
    committed('vm1', 's1');
    const target = path.join(outside, 'victim');
    fs.writeFileSync(target, 'precious');
    fs.symlinkSync(target, path.join(data, 'vm1', 'undo'));
    fs.symlinkSync(target, path.join(data, 'vm1', 'blob-stream-head.tmp'));
    const store = PageStore.open(data, 'vm1');
    try {
      expect(() => store.saveBlob('stream-head', Buffer.from('x'))).toThrow(/symbolic link/);
      const undoable = new UndoableStore(store);
      fs.rmSync(path.join(data, 'vm1', 'undo'));
      fs.symlinkSync(target, path.join(data, 'vm1', 'undo'));
      // begin() removes any earlier journal first: the link goes, the new journal is a real file.
      undoable.begin(LAYOUT);
      undoable.writePage(0, page(2), 0, digest(2), 0);
      undoable.rollback();
    } finally {
      store.close();
    }
    expect(fs.readFileSync(target, 'utf8')).toBe('precious');
  });

  test('the direct-I/O open of the pages file does not follow a symbolic link', () => {
    const real = path.join(data, 'real');
    fs.writeFileSync(real, Buffer.alloc(8192));
    const probe = DirectPages.open(real, 8192);
    if (probe === null) {
      console.warn('store-safety: no O_DIRECT on this filesystem; the native open is not exercised');
      return;
    }
    probe.close();
    const link = path.join(data, 'link');
    fs.symlinkSync(real, link);
    expect(DirectPages.open(link, 8192)).toBeNull();
  });

  test('bfmig snapshots list skips a VM directory that is a symbolic link, writing nothing where it points', () => {
    committed('vm1', 's1');
    fs.symlinkSync(outside, path.join(data, 'linked'));
    expect(listSnapshots(data).map((s) => s.vm)).toEqual(['vm1']);
    expect(fs.readdirSync(outside)).toEqual([]);
  });

  test('a lock file planted as a symbolic link is not read through: it is removed and the store opens', () => {
    fs.mkdirSync(path.join(data, 'vm1'));
    const target = path.join(outside, 'lock-target');
    fs.writeFileSync(target, `${os.hostname()} 1\n`); // pid 1 is alive: read through, it would hold the store
    fs.symlinkSync(target, path.join(data, 'vm1', 'lock'));
    PageStore.open(data, 'vm1').close();
    expect(fs.readFileSync(target, 'utf8')).toBe(`${os.hostname()} 1\n`);
  });
});

describe('stores that hold nothing are removed, under their lock', () => {
  test('empty stores and failed first migrations go; snapshots, held pages, interrupted migrations and stores in use stay', () => {
    fs.mkdirSync(path.join(data, 'empty')); // an accepted Hello that got no further
    committed('failed', null, 0); // a first migration that failed: its pages were put back to absent
    committed('lost', null); // lost its snapshot but holds pages: a digest-table exchange reuses them
    committed('kept', 's1');
    committed('inuse', null);
    // An interrupted migration: its recovery may claim the snapshot again.
    const dirty = PageStore.open(data, 'dirty');
    dirty.begin(LAYOUT);
    fs.cpSync(path.join(data, 'dirty'), path.join(data, 'dirty-copy'), { recursive: true });
    dirty.abort();
    dirty.close();
    fs.rmSync(path.join(data, 'dirty'), { recursive: true });
    fs.renameSync(path.join(data, 'dirty-copy'), path.join(data, 'dirty'));
    fs.rmSync(path.join(data, 'dirty', 'lock'));
    fs.symlinkSync(outside, path.join(data, 'linked'));
    const held = PageStore.open(data, 'inuse');
    try {
      const removed = removeUnclaimedStores(data).map((e) => e.vm).sort();
      expect(removed).toEqual(['empty', 'failed']);
      expect(fs.readdirSync(data).sort()).toEqual(['dirty', 'inuse', 'kept', 'linked', 'lost']);
      expect(removeStore(data, 'inuse')).toBeNull();
    } finally {
      held.close();
    }
    expect(fs.existsSync(outside)).toBe(true);
  });

  // What a process that looked the store's path up before the eviction's rename does to the directory
  // renamed away: it makes its lock file there, after the removal has emptied it (lock.ts).
  const fsModule = require('node:fs') as typeof fs;
  const realRm = fsModule.rmSync;

  test('a lock file made in a store renamed away for removal, after the removal emptied it, is removed too', () => {
    committed('vm1', null);
    let made = 0;
    const rm = jest.spyOn(fsModule, 'rmSync').mockImplementation((target, options) => {
      const away = String(target);
      if (made === 0 && path.basename(away).startsWith('.removing-vm1-')) {
        made++;
        for (const name of fs.readdirSync(away)) realRm(path.join(away, name), { recursive: true, force: true });
        fs.writeFileSync(path.join(away, 'lock'), `${os.hostname()} ${process.pid}\n`);
        fs.rmdirSync(away); // ENOTEMPTY, as rm's last step meets it
      }
      realRm(target, options);
    });
    try {
      expect(removeStore(data, 'vm1')).toMatchObject({ vm: 'vm1' });
    } finally {
      rm.mockRestore();
    }
    expect(made).toBe(1);
    expect(fs.readdirSync(data)).toEqual([]);
  });

  test('a removal that fails after the rename leaves the store opened meanwhile at that path alone', () => {
    committed('vm1', null);
    let opened: PageStore | null = null;
    const rm = jest.spyOn(fsModule, 'rmSync').mockImplementation((target, options) => {
      if (opened === null && path.basename(String(target)).startsWith('.removing-vm1-')) {
        opened = PageStore.open(data, 'vm1'); // a new, empty store, locked by its opener
        throw Object.assign(new Error('EIO: i/o error, rmdir'), { code: 'EIO' });
      }
      realRm(target, options);
    });
    try {
      expect(() => removeStore(data, 'vm1')).toThrow('EIO');
    } finally {
      rm.mockRestore();
    }
    expect(opened).not.toBeNull();
    expect(fs.existsSync(path.join(data, 'vm1', 'lock'))).toBe(true);
    expect(removeStore(data, 'vm1')).toBeNull(); // still in use
    (opened as PageStore | null)?.close();
  });

  test('a store taken by its lock before removal is left alone; once free it can be removed', () => {
    committed('vm1', null, 0);
    const store = PageStore.open(data, 'vm1');
    expect(removeStore(data, 'vm1')).toBeNull();
    store.close();
    expect(removeStore(data, 'vm1')).toMatchObject({ vm: 'vm1', snapshotId: null });
    expect(fs.existsSync(path.join(data, 'vm1'))).toBe(false);
    // And it can be created again at once.
    expect(() => PageStore.open(data, 'vm1').close()).not.toThrow(StoreBusyError);
  });
});

describe('a store the disk budget has no room for', () => {
  test('a new store keeps nothing: emptied, writes ignored, no snapshot claimed', () => {
    const store = PageStore.open(data, 'vm1');
    const undoable = new UndoableStore(store);
    try {
      undoable.begin(LAYOUT);
      expect(undoable.needBytes()).toBeGreaterThanOrEqual(8 * (4096 + 16));
      expect(undoable.overBudget()).toBe('withheld');
      undoable.writePage(0, page(1), 0, digest(1), 0);
      expect(undoable.digests.every((b) => b === 0)).toBe(true);
      undoable.commit('s1');
      expect(store.snapshotId()).toBeNull();
      expect(fs.statSync(path.join(data, 'vm1', 'pages')).size).toBe(0);
    } finally {
      store.close();
    }
    expect(removeUnclaimedStores(data).map((e) => e.vm)).toEqual(['vm1']);
  });

  test('a store that holds this layout goes on without its undo journal: a failure then claims nothing', () => {
    committed('vm1', 's1');
    const store = PageStore.open(data, 'vm1');
    const undoable = new UndoableStore(store);
    try {
      undoable.begin(LAYOUT);
      const withJournal = undoable.needBytes();
      expect(undoable.overBudget()).toBe('no-undo');
      expect(undoable.needBytes()).toBeLessThan(withJournal);
      expect(fs.existsSync(path.join(data, 'vm1', 'undo'))).toBe(false);
      undoable.writePage(0, page(2), 0, digest(2), 0);
      undoable.rollback();
      expect(store.snapshotId()).toBeNull();
      const got = Buffer.alloc(4096);
      store.readPages(0, 1, got, 0);
      expect(got[0]).toBe(2);
    } finally {
      store.close();
    }
  });
});
