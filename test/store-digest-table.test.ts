import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { DIGEST_BYTES } from '../src/digest';
import { isAbsentDigest } from '../src/digest';
import { DigestTable } from '../src/store/digest-table';

/** Pages per dirty chunk of the table (digest-table.ts): the tests span several chunks and a partial last one. */
const CHUNK_PAGES = 4096;
const PAGES = 3 * CHUNK_PAGES + 5;

/** A 16-byte digest whose bytes are all `fill`, after `before` leading zero bytes. */
function digestOf(fill: number, before = 0): Uint8Array {
  const b = new Uint8Array(before + DIGEST_BYTES);
  b.fill(fill, before);
  return b;
}

describe('isAbsentDigest', () => {
  test('is true only when all four words of the digest are zero, each word counting', () => {
    const words = new Uint32Array(8);
    expect(isAbsentDigest(words, 0)).toBe(true);
    expect(isAbsentDigest(words, 4)).toBe(true);
    for (let w = 0; w < 4; w++) {
      words.fill(0);
      words[4 + w] = 1 << 31;
      expect(isAbsentDigest(words, 4)).toBe(false);
      expect(isAbsentDigest(words, 0)).toBe(true);
    }
  });
});

describe('DigestTable', () => {
  let dir = '';
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bfmig-digest-table-'));
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  test('set and clear keep the present count; a zero digest makes a page absent', () => {
    const t = DigestTable.empty(PAGES);
    expect(t.presentPages).toBe(0);
    expect(t.bytes.length).toBe(PAGES * DIGEST_BYTES);
    t.set(7, digestOf(0xab, 3), 3);
    expect(t.isPresent(7)).toBe(true);
    expect(Buffer.from(t.bytes.subarray(7 * DIGEST_BYTES, 8 * DIGEST_BYTES)).equals(Buffer.alloc(DIGEST_BYTES, 0xab))).toBe(true);
    t.set(7, digestOf(0xcd), 0); // replacing a held page's digest: still one page
    expect(t.presentPages).toBe(1);
    t.set(PAGES - 1, digestOf(1), 0);
    expect(t.presentPages).toBe(2);
    t.set(7, digestOf(0), 0);
    expect(t.isPresent(7)).toBe(false);
    expect(t.presentPages).toBe(1);
    t.clear(7); // already absent: no change
    expect(t.presentPages).toBe(1);
    t.clear(PAGES - 1);
    expect(t.presentPages).toBe(0);
  });

  test('set copies the digest whatever its buffer: reused, unaligned, or at an unaligned offset of an aligned one', () => {
    const t = DigestTable.empty(8);
    const reused = digestOf(0x11);
    const expected = (page: number): Buffer => Buffer.from(t.bytes.subarray(page * DIGEST_BYTES, (page + 1) * DIGEST_BYTES));
    t.set(0, reused, 0);
    reused.fill(0x22); // the same buffer with new content: the table takes what it holds now
    t.set(1, reused, 0);
    const pool = new Uint8Array(new ArrayBuffer(64));
    const unaligned = pool.subarray(1, 1 + 2 * DIGEST_BYTES);
    for (let i = 0; i < unaligned.length; i++) unaligned[i] = 0x30 + i;
    t.set(2, unaligned, DIGEST_BYTES);
    const aligned = new Uint8Array(new ArrayBuffer(48));
    for (let i = 0; i < aligned.length; i++) aligned[i] = 0x80 + i;
    t.set(3, aligned, 5);
    t.set(4, aligned, 16);
    t.set(5, reused, 0); // back to the first buffer after others
    expect(expected(0).equals(Buffer.alloc(DIGEST_BYTES, 0x11))).toBe(true);
    expect(expected(1).equals(Buffer.alloc(DIGEST_BYTES, 0x22))).toBe(true);
    expect(expected(2).equals(Buffer.from(unaligned.subarray(DIGEST_BYTES)))).toBe(true);
    expect(expected(3).equals(Buffer.from(aligned.subarray(5, 5 + DIGEST_BYTES)))).toBe(true);
    expect(expected(4).equals(Buffer.from(aligned.subarray(16, 32)))).toBe(true);
    expect(expected(5).equals(Buffer.alloc(DIGEST_BYTES, 0x22))).toBe(true);
    expect(t.presentPages).toBe(6);
  });

  test('a digest with a single non-zero byte counts as present', () => {
    const t = DigestTable.empty(4);
    const d = new Uint8Array(DIGEST_BYTES);
    d[DIGEST_BYTES - 1] = 1;
    t.set(2, d, 0);
    expect(t.isPresent(2)).toBe(true);
    expect(t.presentPages).toBe(1);
  });

  test('finds the first absent, first present and last present page of a range', () => {
    const t = DigestTable.empty(PAGES);
    expect(t.firstPresent(0, PAGES)).toBe(-1);
    expect(t.lastPresent(0, PAGES)).toBe(-1);
    expect(t.firstAbsent(0, PAGES)).toBe(0);
    for (let i = 10; i < 20; i++) t.set(i, digestOf(i + 1), 0);
    t.set(30, digestOf(9), 0);
    expect(t.firstPresent(0, PAGES)).toBe(10);
    expect(t.firstPresent(11, PAGES)).toBe(11);
    expect(t.firstPresent(20, 30)).toBe(-1);
    expect(t.lastPresent(0, PAGES)).toBe(30);
    expect(t.lastPresent(0, 30)).toBe(19);
    expect(t.lastPresent(10, 11)).toBe(10);
    expect(t.firstAbsent(10, 20)).toBe(-1);
    expect(t.firstAbsent(10, 21)).toBe(20);
    expect(t.firstAbsent(10, 10)).toBe(-1);
    t.clearRange(12, 14);
    expect(t.firstAbsent(10, 20)).toBe(12);
    expect(t.presentPages).toBe(8);
  });

  test('matches compares the whole digest against one given as words', () => {
    const t = DigestTable.empty(4);
    const d = new Uint8Array(2 * DIGEST_BYTES);
    for (let k = 0; k < d.length; k++) d[k] = k + 1;
    t.set(1, d, DIGEST_BYTES);
    const words = new Uint32Array(d.buffer);
    expect(t.matches(1, words, 4)).toBe(true);
    expect(t.matches(1, words, 0)).toBe(false);
    for (let w = 0; w < 4; w++) {
      const other = words.slice();
      other[4 + w] ^= 1;
      expect(t.matches(1, other, 4)).toBe(false);
    }
  });

  test('load reads the digests file and counts the held pages', () => {
    const file = path.join(dir, 'digests');
    const bytes = Buffer.alloc(PAGES * DIGEST_BYTES);
    for (const i of [0, 5, CHUNK_PAGES, PAGES - 1]) bytes.fill(0x5a, i * DIGEST_BYTES, (i + 1) * DIGEST_BYTES);
    fs.writeFileSync(file, bytes);
    const fd = fs.openSync(file, 'r');
    try {
      const t = DigestTable.load(fd, PAGES);
      expect(t.presentPages).toBe(4);
      expect(Buffer.from(t.bytes).equals(bytes)).toBe(true);
      expect(t.isPresent(CHUNK_PAGES)).toBe(true);
      expect(t.isPresent(CHUNK_PAGES + 1)).toBe(false);
    } finally {
      fs.closeSync(fd);
    }
  });

  test('writeDirty writes the chunks that changed and only those; markAllDirty makes it write them all', () => {
    const file = path.join(dir, 'digests');
    fs.writeFileSync(file, Buffer.alloc(PAGES * DIGEST_BYTES));
    const fd = fs.openSync(file, 'r+');
    try {
      const t = DigestTable.load(fd, PAGES);
      // The file changes behind the table in chunk 0: a write of chunk 0 would undo that.
      fs.writeSync(fd, Buffer.alloc(DIGEST_BYTES, 0x77), 0, DIGEST_BYTES, 0);
      t.set(2 * CHUNK_PAGES + 1, digestOf(0x11), 0);
      t.set(PAGES - 1, digestOf(0x22), 0);
      t.writeDirty(fd);
      const after = fs.readFileSync(file);
      expect(after.subarray(0, DIGEST_BYTES).equals(Buffer.alloc(DIGEST_BYTES, 0x77))).toBe(true);
      expect(after.subarray(2 * CHUNK_PAGES * DIGEST_BYTES).equals(Buffer.from(t.bytes.subarray(2 * CHUNK_PAGES * DIGEST_BYTES)))).toBe(true);
      // Flags cleared: a second call writes nothing.
      fs.writeSync(fd, Buffer.alloc(DIGEST_BYTES, 0x33), 0, DIGEST_BYTES, (2 * CHUNK_PAGES + 1) * DIGEST_BYTES);
      t.writeDirty(fd);
      expect(fs.readFileSync(file).subarray((2 * CHUNK_PAGES + 1) * DIGEST_BYTES, (2 * CHUNK_PAGES + 2) * DIGEST_BYTES).equals(Buffer.alloc(DIGEST_BYTES, 0x33))).toBe(true);
      t.markAllDirty();
      t.writeDirty(fd);
      expect(fs.readFileSync(file).equals(Buffer.from(t.bytes))).toBe(true);
    } finally {
      fs.closeSync(fd);
    }
  });
});
