/**
 * The README's promise about O_DIRECT: on a filesystem that refuses it the store falls back to the page
 * cache by itself, and keeps, verifies and re-reads pages there as it would with O_DIRECT. ramfs
 * refuses O_DIRECT (EINVAL at open), so a store directory on a ramfs mount is such a filesystem.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { DIGEST_BYTES, digestOne } from '../src/digest';
import { PageStore } from '../src/store';
import { requireInCi } from './mounts';

const PAGE = 4096;
const PAGES = 64;

/** Whether a ramfs can be mounted here (root with CAP_SYS_ADMIN). */
function canMountRamfs(): boolean {
  if (process.getuid?.() !== 0) return requireInCi(false, 'a ramfs mount (root with CAP_SYS_ADMIN)');
  const probe = fs.mkdtempSync(path.join(os.tmpdir(), 'bfmig-ramfs-probe-'));
  try {
    execFileSync('mount', ['-t', 'ramfs', 'ramfs', probe], { stdio: 'ignore' });
    execFileSync('umount', [probe], { stdio: 'ignore' });
    return true;
  } catch {
    return requireInCi(false, 'a ramfs mount (root with CAP_SYS_ADMIN)');
  } finally {
    fs.rmSync(probe, { recursive: true, force: true });
  }
}

/** Page i's content: its index and a fill byte, so a page read back names itself. */
function pageOf(i: number): Buffer {
  const page = Buffer.alloc(PAGE, (i * 7 + 1) & 0xff);
  page.writeUInt32LE(i, 0);
  return page;
}

function writeSnapshot(store: PageStore): void {
  store.begin({ pageSize: PAGE, pageCount: PAGES, layoutId: 'L1', layout: { blocks: [{ name: 'pc.ram', length: PAGES * PAGE }] } });
  const digest = Buffer.alloc(DIGEST_BYTES);
  for (let i = 0; i < PAGES; i++) {
    const page = pageOf(i);
    digestOne(page, 0, PAGE, digest, 0);
    store.writePage(i, page, 0, digest, 0);
  }
  store.commit('s1');
}

(canMountRamfs() ? describe : describe.skip)('a store on a filesystem without O_DIRECT', () => {
  let dir = '';

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bfmig-ramfs-'));
    execFileSync('mount', ['-t', 'ramfs', 'ramfs', dir]);
  });

  afterEach(() => {
    execFileSync('umount', ['-l', dir]);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test('the filesystem does refuse O_DIRECT, so the check below means something', () => {
    // Node exposes no O_DIRECT open of its own; the constant is Linux's.
    const file = path.join(dir, 'probe');
    expect(() => fs.openSync(file, fs.constants.O_CREAT | fs.constants.O_RDWR | fs.constants.O_DIRECT)).toThrow(/EINVAL/);
  });

  test('falls back to the page cache by itself, and keeps, re-reads and verifies its pages', () => {
    const store = PageStore.open(dir, 'vm1');
    try {
      expect(store.directIo).toBe(false);
      writeSnapshot(store);
    } finally {
      store.close();
    }
    const again = PageStore.open(dir, 'vm1');
    try {
      expect(again.directIo).toBe(false);
      expect(again.snapshotId()).toBe('s1');
      const read = Buffer.alloc(PAGES * PAGE);
      again.readPages(0, PAGES, read, 0);
      for (let i = 0; i < PAGES; i++) expect({ page: i, intact: read.subarray(i * PAGE, (i + 1) * PAGE).equals(pageOf(i)) }).toEqual({ page: i, intact: true });
      expect(again.verify()).toEqual([]);
    } finally {
      again.close();
    }
  });
});
