import { DIGEST_WORDS } from '../src/digest';
import { ContentIndex } from '../src/proxy/content-index';

/**
 * The content index is a hint table over the receiver's digest table: these tests build digests by hand
 * so that pages land in chosen buckets (the bucket is the digest's first four bytes, big-endian, masked).
 */
const PAGES = 512; // 1,024 slots, 256 buckets of four

/** A digest whose bucket is `bucket` and whose other words are `tag`. */
function digestIn(bucket: number, tag: number): Uint32Array {
  // The first word's bytes big-endian pick the bucket: store the bucket number byte-swapped.
  const swapped = (((bucket & 0xff) << 24) | ((bucket & 0xff00) << 8) | ((bucket >>> 8) & 0xff00) | (bucket >>> 24)) >>> 0;
  return Uint32Array.of(swapped, tag, tag ^ 0x5a5a5a5a, tag + 1);
}

function holding(reference: Uint32Array, page: number, digest: Uint32Array): void {
  reference.set(digest, page * DIGEST_WORDS);
}

/** An empty digest table (nothing held) and an index over it. */
function emptyIndex(): { reference: Uint32Array; index: ContentIndex } {
  const reference = new Uint32Array(PAGES * DIGEST_WORDS);
  return { reference, index: new ContentIndex(PAGES, reference) };
}

/** The receiver now holds `digest` at `page`, and the index is told so. */
function store(reference: Uint32Array, index: ContentIndex, page: number, digest: Uint32Array): void {
  holding(reference, page, digest);
  index.add(page, digest, 0);
}

describe('ContentIndex', () => {
  test('finds the page holding a content, and nothing for a content no page holds', () => {
    const { reference, index } = emptyIndex();
    const d = digestIn(7, 1);
    store(reference, index, 40, d);
    expect(index.find(d, 0)).toBe(40);
    expect(index.find(digestIn(7, 2), 0)).toBe(-1);
    expect(index.find(digestIn(8, 1), 0)).toBe(-1);
  });

  test('a hit is believed only while the reference still says the page holds that content', () => {
    const { reference, index } = emptyIndex();
    const d = digestIn(3, 9);
    store(reference, index, 11, d);
    holding(reference, 11, digestIn(3, 10));
    expect(index.find(d, 0)).toBe(-1);
  });

  test('a full bucket gives up a slot whose page moved to another bucket before a current one', () => {
    const { reference, index } = emptyIndex();
    // Four pages fill bucket 5; page 2's content then changes to one of bucket 6 (its slot is stale).
    for (let page = 0; page < 4; page++) store(reference, index, page, digestIn(5, page + 100));
    holding(reference, 2, digestIn(6, 1));
    // A fifth page of bucket 5 takes page 2's slot: the other three stay findable.
    store(reference, index, 4, digestIn(5, 104));
    for (const page of [0, 1, 3, 4]) expect(index.find(digestIn(5, page + 100), 0)).toBe(page);
  });

  test('adding a page already in its bucket takes no second slot', () => {
    const { reference, index } = emptyIndex();
    const d = digestIn(9, 1);
    for (let i = 0; i < 5; i++) store(reference, index, 20, d);
    // Three more pages of that bucket all fit beside it: a duplicate would have pushed one out.
    for (let page = 21; page < 24; page++) store(reference, index, page, digestIn(9, page));
    expect(index.find(d, 0)).toBe(20);
    for (let page = 21; page < 24; page++) expect(index.find(digestIn(9, page), 0)).toBe(page);
  });

  test('addAll indexes every page the reference holds, and no page it does not', () => {
    const reference = new Uint32Array(PAGES * DIGEST_WORDS);
    // An absent page's digest is all zero, which would land in bucket 0: four held pages fill that bucket,
    // and indexing any of the hundreds of absent pages would push one of them out.
    for (let page = 0; page < 4; page++) holding(reference, page * 100, digestIn(0, page + 1));
    for (let page = 1; page < PAGES; page += 3) if (page % 100 !== 0) holding(reference, page, digestIn(1 + (page % 200), page + 1));
    const index = new ContentIndex(PAGES, reference);
    index.addAll();
    for (let page = 0; page < 4; page++) expect(index.find(digestIn(0, page + 1), 0)).toBe(page * 100);
    for (let page = 1; page < PAGES; page += 3) if (page % 100 !== 0) expect(index.find(digestIn(1 + (page % 200), page + 1), 0)).toBe(page);
  });

  test('fill indexes the reference a slice at a time: until whole, a page not reached yet is missed, never named wrong', () => {
    const reference = new Uint32Array(PAGES * DIGEST_WORDS);
    for (let page = 0; page < PAGES; page += 2) holding(reference, page, digestIn(page % 97, page + 1));
    const index = new ContentIndex(PAGES, reference);
    const slice = Math.floor(PAGES / 3);
    index.fill(slice);
    expect(index.filled).toBe(false);
    for (let page = 0; page < PAGES; page += 2) expect(index.find(digestIn(page % 97, page + 1), 0)).toBe(page < slice ? page : -1);
    // A page added meanwhile beyond the slice is found, and found once more after fill() reaches it.
    const late = PAGES - 2;
    index.add(late, reference, late * DIGEST_WORDS);
    expect(index.find(digestIn(late % 97, late + 1), 0)).toBe(late);
    index.fill(slice);
    index.fill(slice);
    index.fill(slice);
    expect(index.filled).toBe(true);
    for (let page = 0; page < PAGES; page += 2) expect(index.find(digestIn(page % 97, page + 1), 0)).toBe(page);
    for (let page = 1; page < PAGES; page += 2) expect(index.find(digestIn(page % 97, page + 1), 0)).toBe(-1);
  });
});
