import { DIGEST_WORDS, isAbsentDigest, sameDigestWords } from '../digest';

const EMPTY = 0xffffffff;
/** Slots per bucket: a page's content is looked for in one bucket of four. */
const WAYS = 4;

/**
 * Where the receiver holds a page of given content: digest → page index, for pages the receiver holds
 * at another place than the one a record names (page cache that moved, identical pages of one VM).
 *
 * A hint table, not a map: u32 page indices in buckets of four slots, the bucket chosen by the
 * digest's first 32 bits (XXH3-128 output is uniform). A hit is believed only when the digest table
 * (`reference`: what the receiver holds now) still says that page holds that digest, so a stale or
 * colliding slot costs a miss, never a wrong page; a full bucket gives up a stale slot first. Two slots
 * per page rounded up to a power of two: 8 to 16 bytes per guest page (at most 32 MiB for an 8 GiB VM),
 * beside the digest table's 16, and only on the sending gateway.
 */
export class ContentIndex {
  private readonly slots: Uint32Array;
  private readonly bucketMask: number;
  private victim = 0;
  constructor(
    pageCount: number,
    /** What the receiver holds now, as words (digestWords: 4 per page, all zero = not held). Updated by its owner. */
    private readonly reference: Uint32Array,
  ) {
    const size = ContentIndex.slotsFor(pageCount);
    this.slots = new Uint32Array(size).fill(EMPTY);
    this.bucketMask = size / WAYS - 1;
  }

  /** Slots of the index of a guest of pageCount pages: two a page, rounded up to a power of two (4 B a slot). */
  static slotsFor(pageCount: number): number {
    let size = 1024;
    while (size < 2 * pageCount) size *= 2;
    return size;
  }

  /** The bucket of the digest at words[at…]: its first four bytes, big-endian, pick it. */
  private bucket(words: Uint32Array, at: number): number {
    const w = words[at];
    return ((((w & 0xff) << 24) | ((w & 0xff00) << 8) | ((w >>> 8) & 0xff00) | (w >>> 24)) & this.bucketMask) * WAYS;
  }

  /** Pages of the reference fill() has looked at: [0, filledTo). */
  private filledTo = 0;

  /** Whether fill() has looked at every page of the reference. */
  get filled(): boolean {
    return this.filledTo * DIGEST_WORDS >= this.reference.length;
  }

  /** Indexes every page the reference holds at once (fill() without a limit). */
  addAll(): void {
    this.fill(Infinity);
  }

  /**
   * Indexes the next `limit` pages of the reference that fill() has not looked at yet, of those the
   * reference holds: an index that must not stop its caller for long (2 M pages of an 8 GiB guest take
   * a good part of a second) is filled a slice at a time, and until it is whole a find() may miss a
   * page it would have found, never name a wrong one. A page add() put there already may be indexed
   * again beside itself, which costs a slot of its bucket, nothing more.
   */
  fill(limit: number): void {
    const table = this.reference;
    const slots = this.slots;
    const pages = table.length / DIGEST_WORDS;
    const end = Math.min(pages, this.filledTo + limit);
    for (let page = this.filledTo; page < end; page++) {
      const at = page * DIGEST_WORDS;
      if (isAbsentDigest(table, at)) continue;
      const first = this.bucket(table, at);
      let s = first;
      while (s < first + WAYS && slots[s] !== EMPTY) s++;
      slots[s < first + WAYS ? s : first + (this.victim++ & (WAYS - 1))] = page;
    }
    this.filledTo = end;
  }

  /** The receiver now holds the content of the digest at `digest[at…]` (words) at `page`. */
  add(page: number, digest: Uint32Array, at: number): void {
    const first = this.bucket(digest, at);
    const slots = this.slots;
    // The bucket's own slots first (one cache line): the page there already, or an empty slot. Only a
    // full bucket looks up its pages in the reference, a cache miss each, for one gone stale.
    let free = -1;
    for (let s = first; s < first + WAYS; s++) {
      const held = slots[s];
      if (held === page) return;
      if (free < 0 && held === EMPTY) free = s;
    }
    if (free < 0) free = this.staleSlot(first);
    if (free < 0) free = first + (this.victim++ & (WAYS - 1));
    slots[free] = page;
  }

  /** A slot of the full bucket at `first` whose page no longer holds content of this bucket, or -1. */
  private staleSlot(first: number): number {
    for (let s = first; s < first + WAYS; s++) {
      if (this.bucket(this.reference, this.slots[s] * DIGEST_WORDS) !== first) return s;
    }
    return -1;
  }

  /** A page the receiver holds with the content of the digest at `digest[at…]` (words), or -1. */
  find(digest: Uint32Array, at: number): number {
    const first = this.bucket(digest, at);
    for (let s = first; s < first + WAYS; s++) {
      const page = this.slots[s];
      if (page !== EMPTY && sameDigestWords(this.reference, page * DIGEST_WORDS, digest, at)) return page;
    }
    return -1;
  }
}
