import * as fs from 'node:fs';
import * as path from 'node:path';
import { DIGEST_BYTES, digestHex, digestOne } from '../src/digest';
import { PageStore, type StoreLayout, storeCopyMode, validateVmName } from '../src/store';
import * as copyModule from '../src/common/copy';
import { distModule, startNodeChild } from '../src/lab/harness/child';
import { TestStores } from './test-stores';

const PAGE = 4096;
const ZERO_DIGEST = Buffer.alloc(DIGEST_BYTES);

let tmp: string;
const stores = new TestStores();

beforeEach(() => {
  tmp = stores.dir('bfmig-store-');
});

function open(vm = 'vm1', options?: Parameters<typeof PageStore.open>[2]): PageStore {
  return stores.open(tmp, vm, options);
}

function layout(pageCount: number, layoutId = 'L1', pageSize = PAGE): StoreLayout {
  return { pageSize, pageCount, layoutId, layout: { blocks: [{ id: 'pc.ram', pages: pageCount }], layoutId } };
}

/** Deterministic page content for (page index, generation); distinct for every pair. */
function pageContent(index: number, gen: number, size = PAGE): Buffer {
  const b = Buffer.alloc(size);
  let s = (index * 2654435761 + gen * 40503 + 1) >>> 0 || 1;
  for (let o = 0; o + 4 <= size; o += 4) {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    b.writeUInt32LE(s, o);
  }
  return b;
}

function digestOf(data: Uint8Array, start = 0, len = data.length - start): Buffer {
  const out = Buffer.alloc(DIGEST_BYTES);
  digestOne(data, start, len, out, 0);
  return out;
}

/** Writes page `index` = pageContent(index, gen), from a misaligned offset inside a larger buffer. */
function put(s: PageStore, index: number, gen: number): Buffer {
  const content = pageContent(index, gen);
  const src = Buffer.concat([Buffer.from([1, 2, 3, 4, 5, 6, 7]), content, Buffer.from([9, 9])]);
  const dg = Buffer.concat([Buffer.from([0xee, 0xee, 0xee]), digestOf(content), Buffer.from([0xee])]);
  s.writePage(index, src, 7, dg, 3);
  return content;
}

function readOne(s: PageStore, index: number): Buffer {
  const b = Buffer.alloc(PAGE);
  s.readPages(index, 1, b, 0);
  return b;
}

function tableDigest(s: PageStore, index: number): Buffer {
  return Buffer.from(s.digests.subarray(index * DIGEST_BYTES, (index + 1) * DIGEST_BYTES));
}

function vmDir(vm = 'vm1'): string {
  return path.join(tmp, vm);
}

function filePage(index: number, vm = 'vm1'): Buffer {
  const fd = fs.openSync(path.join(vmDir(vm), 'pages'), 'r');
  try {
    const b = Buffer.alloc(PAGE);
    expect(fs.readSync(fd, b, 0, PAGE, index * PAGE)).toBe(PAGE);
    return b;
  } finally {
    fs.closeSync(fd);
  }
}

function fileDigest(index: number, vm = 'vm1'): Buffer {
  const all = fs.readFileSync(path.join(vmDir(vm), 'digests'));
  return all.subarray(index * DIGEST_BYTES, (index + 1) * DIGEST_BYTES);
}

function readMetaJson(vm = 'vm1'): Record<string, unknown> {
  return JSON.parse(fs.readFileSync(path.join(vmDir(vm), 'meta.json'), 'utf8')) as Record<string, unknown>;
}

/** Every page with a non-zero digest (per the digests FILE) holds content with that digest (per the pages FILE). */
function expectFilesConsistent(pageCount: number, vm = 'vm1'): number {
  const digests = fs.readFileSync(path.join(vmDir(vm), 'digests'));
  const pages = fs.readFileSync(path.join(vmDir(vm), 'pages'));
  expect(digests.length).toBe(pageCount * DIGEST_BYTES);
  expect(pages.length).toBe(pageCount * PAGE);
  let present = 0;
  for (let i = 0; i < pageCount; i++) {
    const d = digests.subarray(i * DIGEST_BYTES, (i + 1) * DIGEST_BYTES);
    if (d.equals(ZERO_DIGEST)) continue;
    present++;
    expect(`${i}:${digestHex(d)}`).toBe(`${i}:${digestHex(digestOf(pages, i * PAGE, PAGE))}`);
  }
  return present;
}

describe('validateVmName', () => {
  test.each(['vm1', 'web-01.prod', 'A', 'a_b', 'x'.repeat(64), '0.1'])('accepts %j', (name) => {
    expect(validateVmName(name)).toBe(name);
  });

  test.each([
    ['../x', /contains "\/"/],
    ['', /empty/],
    ['a/b', /contains "\/"/],
    ['x'.repeat(65), /65 characters/],
    ['.', /relative path component/],
    ['..', /relative path component/],
    ['.hidden', /start with a letter or digit/],
    ['-rf', /start with a letter or digit/],
    ['a b', /contains " "/],
    ['a\\b', /contains "\\\\"/],
    ['vm\u0000', /contains/],
  ])('rejects %j', (name, why) => {
    expect(() => validateVmName(name)).toThrow(why);
  });

  test('PageStore.open rejects a bad name and creates nothing', () => {
    expect(() => PageStore.open(tmp, '../escape')).toThrow(/VM name/);
    expect(fs.existsSync(path.join(tmp, '..', 'escape'))).toBe(false);
    expect(fs.readdirSync(tmp)).toEqual([]);
  });
});

describe('copyBytes (the write path copy)', () => {
  function loadPortable(): typeof copyModule {
    const saved = process.env.BFMIG_STORE_COPY;
    process.env.BFMIG_STORE_COPY = 'portable';
    try {
      let mod: typeof copyModule | undefined;
      jest.isolateModules(() => {
        // eslint-disable-next-line @typescript-eslint/no-require-imports
        mod = require('../src/common/copy') as typeof copyModule;
      });
      return mod!;
    } finally {
      if (saved === undefined) delete process.env.BFMIG_STORE_COPY;
      else process.env.BFMIG_STORE_COPY = saved;
    }
  }

  test('mode is reported', () => {
    expect(['native', 'portable']).toContain(storeCopyMode());
    expect(loadPortable().copyMode()).toBe('portable');
  });

  test.each([
    ['default', copyModule],
    ['portable', null],
  ])('%s: exact copy between views at offsets; bad bounds throw and write nothing', (_name, given) => {
    const m = given ?? loadPortable();
    const backing = new Uint8Array(300).map((_, i) => (i * 31 + 7) & 0xff);
    const src = backing.subarray(5, 205);
    const dstBacking = Buffer.alloc(300);
    const dst = dstBacking.subarray(11, 211);
    m.copyBytes(src, 17, dst, 23, 100);
    const want = Buffer.alloc(300);
    want.set(backing.subarray(5 + 17, 5 + 17 + 100), 11 + 23);
    expect(dstBacking.equals(want)).toBe(true);
    m.copyBytes(src, 0, dst, 0, 0);
    for (const [ss, ds, len] of [
      [101, 0, 100],
      [0, 101, 100],
      [-1, 0, 1],
      [0, -1, 1],
      [0, 0, -1],
      [0.5, 0, 1],
    ]) {
      expect(() => m.copyBytes(src, ss, dst, ds, len)).toThrow(RangeError);
    }
    expect(() => m.copyBytes([1, 2, 3] as unknown as Uint8Array, 0, dst, 0, 1)).toThrow(TypeError);
    expect(() => m.copyBytes(new Uint16Array(4) as unknown as Uint8Array, 0, dst, 0, 1)).toThrow(TypeError);
    expect(dstBacking.equals(want)).toBe(true);
  });
});

describe('PageStore', () => {
  test('fresh store: nothing stored, files created in root/<vm>', () => {
    const s = open();
    expect(s.vm).toBe('vm1');
    expect(s.meta()).toBeNull();
    expect(s.snapshotId()).toBeNull();
    expect(s.migrating).toBe(false);
    expect(() => s.digests).toThrow(/nothing stored/);
    expect(() => s.readPages(0, 1, Buffer.alloc(PAGE), 0)).toThrow(/nothing stored/);
    expect(s.verify()).toEqual([]);
    expect(fs.statSync(vmDir()).isDirectory()).toBe(true);
    expect(fs.existsSync(path.join(vmDir(), 'meta.json'))).toBe(false);
    expect(s.warnings).toEqual([]);
  });

  test('write/read round-trip across coalescing boundaries and non-consecutive indexes', () => {
    // 4-page write buffer: runs of 10 consecutive pages cross two boundaries.
    const s = open('vm1', { writeBufferBytes: 4 * PAGE });
    s.begin(layout(64));
    expect(s.migrating).toBe(true);
    const want = new Map<number, Buffer>();
    for (let i = 0; i < 10; i++) want.set(i, put(s, i, 1));
    // non-consecutive, backwards, and a gap
    for (const i of [40, 42, 41, 30, 63, 20, 21, 22]) want.set(i, put(s, i, 1));
    // rewrite a page already flushed (3) and one still pending (22, last written)
    want.set(3, put(s, 3, 2));
    want.set(22, put(s, 22, 2));
    // rewrite of a pending page in the middle of a run, then extend the run
    want.set(23, put(s, 23, 1));
    want.set(22, put(s, 22, 3));
    want.set(24, put(s, 24, 1));

    // Reads flush overlapping pending writes: pages 20..24 (22..24 still buffered).
    const run = Buffer.alloc(5 * PAGE + 3);
    s.readPages(20, 5, run, 3);
    for (let k = 0; k < 5; k++) {
      expect(run.subarray(3 + k * PAGE, 3 + (k + 1) * PAGE).equals(want.get(20 + k)!)).toBe(true);
    }
    const first10 = Buffer.alloc(10 * PAGE);
    s.readPages(0, 10, first10, 0);
    for (let i = 0; i < 10; i++) expect(first10.subarray(i * PAGE, (i + 1) * PAGE).equals(want.get(i)!)).toBe(true);

    // in-memory table: exactly the written pages, each with its content's digest
    expect(s.meta()!.presentPages).toBe(want.size);
    for (let i = 0; i < 64; i++) {
      expect(s.isPresent(i)).toBe(want.has(i));
      expect(tableDigest(s, i).equals(want.has(i) ? digestOf(want.get(i)!) : ZERO_DIGEST)).toBe(true);
    }
    s.commit('snap-1');

    // file format: page i at i*pageSize of `pages`, digest i at 16*i of `digests`
    for (const [i, content] of want) {
      expect(filePage(i).equals(content)).toBe(true);
      expect(fileDigest(i).equals(digestOf(content))).toBe(true);
    }
    expect(fileDigest(10).equals(ZERO_DIGEST)).toBe(true);
    expect(expectFilesConsistent(64)).toBe(want.size);

    // and the same through a fresh instance with the default (1 MiB) buffer
    s.close();
    const r = open();
    for (const [i, content] of want) expect(readOne(r, i).equals(content)).toBe(true);
  });

  test('a long sequential run with the default buffer lands intact', () => {
    const s = open();
    const n = 700; // > 2 full 256-page buffers
    s.begin(layout(n));
    for (let i = 0; i < n; i++) put(s, i, 7);
    const all = Buffer.alloc(n * PAGE);
    s.readPages(0, n, all, 0);
    for (let i = 0; i < n; i++) expect(all.subarray(i * PAGE, (i + 1) * PAGE).equals(pageContent(i, 7))).toBe(true);
    s.commit('seq');
    expect(expectFilesConsistent(n)).toBe(n);
  });

  test('zero pages into a freshly reset store are not written (the file stays sparse) yet read back as zeros', () => {
    const zero = Buffer.alloc(PAGE);
    const zd = digestOf(zero);
    const s = open();
    s.begin(layout(300));
    for (let i = 0; i < 300; i++) if (i !== 150) s.writePage(i, zero, 0, zd, 0);
    const p150 = put(s, 150, 1);
    s.commit('z');
    expect(s.meta()!.presentPages).toBe(300);
    // 300 pages, one of them written: at most a few blocks allocated (st_blocks counts 512 B units)
    expect(fs.statSync(path.join(vmDir(), 'pages')).blocks).toBeLessThanOrEqual(64);
    const all = Buffer.alloc(300 * PAGE, 0xcc);
    s.readPages(0, 300, all, 0);
    expect(all.subarray(0, 150 * PAGE).equals(Buffer.alloc(150 * PAGE))).toBe(true);
    expect(all.subarray(150 * PAGE, 151 * PAGE).equals(p150)).toBe(true);
    expect(all.subarray(151 * PAGE).equals(Buffer.alloc(149 * PAGE))).toBe(true);
    expect(expectFilesConsistent(300)).toBe(300);

    // a zero page over a page that was written (same instance) is really written
    s.begin(layout(300));
    s.writePage(150, zero, 0, zd, 0);
    expect(readOne(s, 150).equals(zero)).toBe(true);
    put(s, 10, 2);
    s.commit('z2');
    s.close();

    // after a reopen the store no longer knows what is a hole: zero pages are written
    const r = open();
    r.begin(layout(300));
    r.writePage(10, zero, 0, zd, 0);
    r.commit('z3');
    expect(readOne(r, 10).equals(zero)).toBe(true);
    expect(expectFilesConsistent(300)).toBe(300);
    expect(r.verify()).toEqual([]);
  });

  test('an empty layout (pageCount 0) is accepted', () => {
    const s = open();
    s.begin(layout(0));
    expect(s.digests.length).toBe(0);
    s.readPages(0, 0, Buffer.alloc(0), 0);
    expect(() => s.isPresent(0)).toThrow(RangeError);
    s.commit('empty');
    s.close();
    const r = open();
    expect(r.snapshotId()).toBe('empty');
    expect(r.verify()).toEqual([]);
    expect(() => r.begin(layout(-1))).toThrow(RangeError);
    expect(() => r.begin({ ...layout(1), layoutId: '' })).toThrow(/layoutId/);
    expect(() => r.begin({ ...layout(1), pageSize: 0 })).toThrow(/pageSize/);
  });

  test('readPages of an absent page throws and reads nothing; bad ranges throw RangeError', () => {
    const s = open();
    s.begin(layout(8));
    const p1 = put(s, 1, 1);
    put(s, 2, 1);
    const dest = Buffer.alloc(3 * PAGE, 0xab);
    expect(() => s.readPages(0, 1, dest, 0)).toThrow(/page 0 is absent/);
    expect(() => s.readPages(1, 3, dest, 0)).toThrow(/page 3 is absent/);
    expect(dest.every((b) => b === 0xab)).toBe(true);
    expect(readOne(s, 1).equals(p1)).toBe(true);

    s.markAbsent(1);
    expect(s.isPresent(1)).toBe(false);
    expect(tableDigest(s, 1).equals(ZERO_DIGEST)).toBe(true);
    expect(() => s.readPages(1, 1, dest, 0)).toThrow(/page 1 is absent/);

    expect(() => s.readPages(7, 2, dest, 0)).toThrow(RangeError);
    expect(() => s.readPages(-1, 1, dest, 0)).toThrow(RangeError);
    expect(() => s.readPages(2, 1, dest, 2 * PAGE + 1)).toThrow(RangeError);
    expect(() => s.writePage(8, p1, 0, digestOf(p1), 0)).toThrow(RangeError);
    expect(() => s.writePage(0, p1, 1, digestOf(p1), 0)).toThrow(RangeError); // src too short
    expect(() => s.writePage(0, p1, 0, digestOf(p1), 1)).toThrow(RangeError); // digest too short
    expect(s.isPresent(0)).toBe(false); // failed writes changed nothing
    s.readPages(2, 0, dest, 0); // an empty read is fine
    s.commit('s');
    expect(() => s.writePage(0, p1, 0, digestOf(p1), 0)).toThrow(/outside a migration/);
    expect(() => s.markAbsent(2)).toThrow(/outside a migration/);
  });

  test('begin with a new layoutId (or a new geometry) resets the store', () => {
    const s = open();
    s.begin(layout(16, 'L1'));
    for (let i = 0; i < 16; i++) put(s, i, 1);
    s.commit('snap-L1');

    // same layout: pages kept
    s.begin(layout(16, 'L1'));
    expect(s.meta()!.presentPages).toBe(16);
    expect(readOne(s, 5).equals(pageContent(5, 1))).toBe(true);
    s.abort();

    // new layoutId, same geometry: every page absent, on disk too
    s.begin(layout(16, 'L2'));
    const m = s.meta()!;
    expect(m).toMatchObject({ layoutId: 'L2', state: 'dirty', snapshotId: null, presentPages: 0, pageCount: 16 });
    expect((m.layout as { layoutId: string }).layoutId).toBe('L2');
    expect(Buffer.from(s.digests).equals(Buffer.alloc(16 * DIGEST_BYTES))).toBe(true);
    expect(() => readOne(s, 5)).toThrow(/absent/);
    expect(fs.readFileSync(path.join(vmDir(), 'digests')).equals(Buffer.alloc(16 * DIGEST_BYTES))).toBe(true);
    expect(filePage(5).equals(Buffer.alloc(PAGE))).toBe(true); // old data truncated away
    put(s, 2, 9);
    s.commit('snap-L2');

    // same layoutId but a different pageCount: also a reset, files resized
    s.begin(layout(40, 'L2'));
    expect(s.meta()!.presentPages).toBe(0);
    expect(s.isPresent(2)).toBe(false);
    expect(fs.statSync(path.join(vmDir(), 'pages')).size).toBe(40 * PAGE);
    expect(fs.statSync(path.join(vmDir(), 'digests')).size).toBe(40 * DIGEST_BYTES);
    s.commit('snap-L2b');
    expect(s.snapshotId()).toBe('snap-L2b');
  });

  test('commit, then reopen: snapshotId, meta and digests persist', () => {
    const s = open();
    s.begin(layout(32));
    expect(s.snapshotId()).toBeNull();
    expect(readMetaJson().state).toBe('dirty'); // persisted before the first page write
    for (let i = 0; i < 32; i += 3) put(s, i, 4);
    expect(s.snapshotId()).toBeNull();
    s.commit('snap-A');
    expect(s.snapshotId()).toBe('snap-A');
    expect(s.migrating).toBe(false);
    const table = Buffer.from(s.digests);
    s.close();
    expect(() => s.snapshotId()).not.toThrow();
    expect(() => s.digests).toThrow(/closed/);

    const r = open();
    expect(r.warnings).toEqual([]);
    expect(r.snapshotId()).toBe('snap-A');
    const m = r.meta()!;
    expect(m).toMatchObject({
      vm: 'vm1',
      snapshotId: 'snap-A',
      state: 'clean',
      layoutId: 'L1',
      pageSize: PAGE,
      pageCount: 32,
      presentPages: 11,
    });
    expect(m.layout).toEqual(layout(32).layout);
    expect(Number.isNaN(Date.parse(m.updatedAt))).toBe(false);
    expect(Buffer.from(r.digests).equals(table)).toBe(true);
    expect(readMetaJson()).toMatchObject({ format: 'bfmig-store/1', snapshotId: 'snap-A', state: 'clean' });
    for (let i = 0; i < 32; i++) {
      expect(r.isPresent(i)).toBe(i % 3 === 0);
      if (i % 3 === 0) expect(readOne(r, i).equals(pageContent(i, 4))).toBe(true);
    }
    // a new migration withdraws the claim until it commits
    r.begin(layout(32));
    expect(r.snapshotId()).toBeNull();
    expect(readMetaJson()).toMatchObject({ snapshotId: null, state: 'dirty' });
  });

  test('one instance per directory per process; reopen after close', () => {
    const s = open();
    expect(() => PageStore.open(tmp, 'vm1')).toThrow(/already open/);
    const other = open('vm2'); // another VM is fine
    expect(other.vm).toBe('vm2');
    s.close();
    s.close(); // idempotent
    const again = open();
    expect(again.meta()).toBeNull();
  });

  test('abort keeps digests consistent with content and claims no snapshot', () => {
    const s = open('vm1', { writeBufferBytes: 8 * PAGE });
    s.begin(layout(50));
    for (let i = 0; i < 50; i++) put(s, i, 1);
    s.commit('snap-1');

    s.begin(layout(50));
    for (let i = 10; i < 30; i++) put(s, i, 2); // some flushed, some pending at abort
    s.markAbsent(40);
    s.markAbsent(12); // written in this migration, then dropped
    s.abort();
    expect(s.migrating).toBe(false);
    expect(s.snapshotId()).toBeNull();
    expect(s.meta()).toMatchObject({ state: 'clean', snapshotId: null, presentPages: 48 });
    expect(readMetaJson()).toMatchObject({ state: 'clean', snapshotId: null, presentPages: 48 });
    s.abort(); // no migration: no-op
    expect(expectFilesConsistent(50)).toBe(48);
    s.close();

    const r = open();
    expect(r.warnings).toEqual([]); // clean: no recovery needed
    expect(r.snapshotId()).toBeNull();
    expect(r.isPresent(40)).toBe(false);
    expect(r.isPresent(12)).toBe(false);
    expect(readOne(r, 11).equals(pageContent(11, 2))).toBe(true);
    expect(readOne(r, 29).equals(pageContent(29, 2))).toBe(true);
    expect(readOne(r, 30).equals(pageContent(30, 1))).toBe(true);
    expect(r.verify()).toEqual([]);
  });

  test('close() during a migration aborts it', () => {
    const s = open();
    s.begin(layout(10));
    put(s, 3, 1);
    s.close();
    expect(readMetaJson()).toMatchObject({ state: 'clean', snapshotId: null, presentPages: 1 });
    const r = open();
    expect(r.warnings).toEqual([]);
    expect(readOne(r, 3).equals(pageContent(3, 1))).toBe(true);
  });

  test('verify detects a byte flipped in the pages file and marks the page absent', () => {
    const s = open();
    s.begin(layout(20));
    for (let i = 0; i < 20; i++) if (i !== 7) put(s, i, 1);
    s.commit('snap-v');
    expect(s.verify()).toEqual([]);
    expect(s.snapshotId()).toBe('snap-v');
    s.close();

    for (const [page, at] of [
      [5, 1234],
      [19, PAGE - 1],
    ]) {
      const fd = fs.openSync(path.join(vmDir(), 'pages'), 'r+');
      const b = Buffer.alloc(1);
      fs.readSync(fd, b, 0, 1, page * PAGE + at);
      b[0] ^= 0x01;
      fs.writeSync(fd, b, 0, 1, page * PAGE + at);
      fs.closeSync(fd);
    }

    const r = open();
    expect(r.snapshotId()).toBe('snap-v'); // nothing noticed until verify
    expect(r.verify()).toEqual([5, 19]);
    expect(r.isPresent(5)).toBe(false);
    expect(r.isPresent(19)).toBe(false);
    expect(r.isPresent(6)).toBe(true);
    expect(() => readOne(r, 5)).toThrow(/absent/);
    expect(r.snapshotId()).toBeNull(); // the snapshot is no longer complete
    expect(r.meta()!.presentPages).toBe(17);
    expect(readMetaJson()).toMatchObject({ snapshotId: null, state: 'clean', presentPages: 17 });
    expect(fileDigest(5).equals(ZERO_DIGEST)).toBe(true);
    expect(expectFilesConsistent(20)).toBe(17);
    expect(r.verify()).toEqual([]);
    r.close();

    const again = open();
    expect(again.isPresent(5)).toBe(false);
    expect(again.isPresent(19)).toBe(false);
  });

  test('verify during a migration covers pending writes and pages on disk', () => {
    const s = open();
    s.begin(layout(8));
    put(s, 0, 1);
    put(s, 1, 1);
    s.commit('x');
    s.begin(layout(8));
    put(s, 2, 1); // pending
    const fd = fs.openSync(path.join(vmDir(), 'pages'), 'r+');
    fs.writeSync(fd, Buffer.from([0xff, 0xfe]), 0, 2, PAGE + 100);
    fs.closeSync(fd);
    expect(s.verify()).toEqual([1]);
    expect(s.isPresent(1)).toBe(false);
    expect(s.isPresent(2)).toBe(true);
    expect(readMetaJson().state).toBe('dirty');
    s.commit('y');
    expect(expectFilesConsistent(8)).toBe(2);
  });

  test('unreadable meta.json: treated as empty (with a warning), next begin resets', () => {
    const s = open();
    s.begin(layout(4));
    put(s, 0, 1);
    s.commit('snap');
    s.close();
    fs.writeFileSync(path.join(vmDir(), 'meta.json'), '{"format": "bfmig-store/1", trunc');
    const r = open();
    expect(r.meta()).toBeNull();
    expect(r.warnings.join('\n')).toMatch(/meta\.json: not JSON/);
    r.begin(layout(4));
    expect(r.isPresent(0)).toBe(false);
  });

  test('files of the wrong size (e.g. a crash in the middle of a reset): reset to empty', () => {
    const s = open();
    s.begin(layout(4));
    put(s, 0, 1);
    s.commit('snap');
    s.close();
    fs.truncateSync(path.join(vmDir(), 'digests'), 0);
    const r = open();
    expect(r.warnings.join('\n')).toMatch(/reset to empty/);
    expect(r.meta()).toMatchObject({ state: 'clean', snapshotId: null, presentPages: 0, layoutId: 'L1' });
    expect(r.isPresent(0)).toBe(false);
    expect(expectFilesConsistent(4)).toBe(0);
  });
});

describe('crash recovery', () => {
  /**
   * The child: opens the store, begins a migration, writes/marks pages as
   * told, then SIGKILLs itself (no flush, no commit/abort, no close). It runs the compiled dist/, as
   * every crash test does.
   */
  const CHILD_SCRIPT = `
    const { PageStore } = require(${distModule('src/store/index')});
    const { digestOne } = require(${distModule('src/digest/index')});
    const PAGE = ${PAGE};
    const pageContent = ${pageContent.toString()};
    const cfg = JSON.parse(process.argv[1]);
    const s = PageStore.open(cfg.root, cfg.vm, { writeBufferBytes: cfg.writeBufferBytes });
    s.begin(cfg.layout);
    const dg = Buffer.alloc(16);
    for (const w of cfg.writes) {
      for (let i = w.from; i < w.to; i++) {
        const p = pageContent(i, w.gen);
        digestOne(p, 0, p.length, dg, 0);
        s.writePage(i, p, 0, dg, 0);
      }
    }
    for (const i of cfg.absent) s.markAbsent(i);
    process.stdout.write('ready to die\\n', () => process.kill(process.pid, 'SIGKILL'));
  `;

  /** Runs the child process that drives the store and SIGKILLs itself mid-migration. */
  async function crashChild(script: object): Promise<void> {
    // Through the page cache a flushed run is in the file when the process dies, which the exact counts
    // below rely on; queued direct writes may or may not have landed (recovery re-hashes either way).
    const end = await startNodeChild(CHILD_SCRIPT, { args: [JSON.stringify(script)], env: { BFMIG_STORE_DIRECT_IO: '0' } }).exited;
    expect(end).toEqual({ code: null, signal: 'SIGKILL', stdout: 'ready to die\n', stderr: '' });
  }

  test('begin + writes without commit/abort, then reopen: recovered, clean, no snapshot, digests match content', async () => {
    const N = 200;
    const s = open('vm1', { writeBufferBytes: 8 * PAGE });
    s.begin(layout(N));
    for (let i = 0; i < 100; i++) put(s, i, 1);
    s.commit('snap-1');
    s.close();

    await crashChild({
      root: tmp,
      vm: 'vm1',
      layout: layout(N),
      writeBufferBytes: 8 * PAGE,
      writes: [
        // previously absent pages; all reach the file (each new run flushes the previous one)
        { from: 150, to: 160, gen: 2 },
        { from: 170, to: 171, gen: 2 },
        // previously present: 0..47 reach the file (6 full buffers), 48..49 are still buffered at the crash
        { from: 0, to: 50, gen: 2 },
      ],
      absent: [60],
    });
    expect(readMetaJson()).toMatchObject({ state: 'dirty', snapshotId: null });

    // change a page behind the digest's back while nothing runs
    const behind = pageContent(80, 99);
    const fd = fs.openSync(path.join(vmDir(), 'pages'), 'r+');
    fs.writeSync(fd, behind, 0, PAGE, 80 * PAGE);
    fs.closeSync(fd);

    const r = open();
    expect(r.warnings.join('\n')).toMatch(/recovered from an interrupted migration: no undo journal, re-hashed 100 present pages, corrected 49 digests/);
    expect(r.meta()).toMatchObject({ state: 'clean', snapshotId: null, presentPages: 100 });
    expect(r.snapshotId()).toBeNull();
    expect(readMetaJson()).toMatchObject({ state: 'clean', snapshotId: null, presentPages: 100 });

    // The invariant, checked from the files alone: every present page's digest matches its content.
    expect(expectFilesConsistent(N)).toBe(100);
    expect(Buffer.from(r.digests).equals(fs.readFileSync(path.join(vmDir(), 'digests')))).toBe(true);

    for (let i = 0; i < 48; i++) expect(readOne(r, i).equals(pageContent(i, 2))).toBe(true); // new content landed
    for (const i of [48, 49]) expect(readOne(r, i).equals(pageContent(i, 1))).toBe(true); // lost in the buffer
    expect(readOne(r, 60).equals(pageContent(60, 1))).toBe(true); // its old content is still intact and hashed
    expect(readOne(r, 80).equals(behind)).toBe(true);
    expect(tableDigest(r, 80).equals(digestOf(behind))).toBe(true);
    for (const i of [150, 159, 170]) {
      expect(r.isPresent(i)).toBe(false); // their digests never reached the disk...
      expect(filePage(i).equals(pageContent(i, 2))).toBe(true); // ...though their content did
    }
    expect(r.verify()).toEqual([]);

    // a reopen after recovery is clean and quiet
    r.close();
    const again = open();
    expect(again.warnings).toEqual([]);
    expect(again.meta()!.state).toBe('clean');
  });

  test('a crash right after begin (nothing written) recovers to the old pages, minus the snapshot claim', async () => {
    const s = open();
    s.begin(layout(10));
    for (let i = 0; i < 10; i++) put(s, i, 1);
    s.commit('snap-1');
    s.close();
    await crashChild({ root: tmp, vm: 'vm1', layout: layout(10), writes: [], absent: [] });
    const r = open();
    expect(r.warnings.join('\n')).toMatch(/re-hashed 10 present pages, corrected 0 digests/);
    expect(r.snapshotId()).toBeNull();
    expect(r.meta()!.presentPages).toBe(10);
    expect(expectFilesConsistent(10)).toBe(10);
  });
});
