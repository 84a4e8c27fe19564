/**
 * The digest table: one 16-byte XXH3-128 digest per page of a store, page i's at bytes
 * [16*i, 16*i+16), all zero for a page the store does not hold. The whole table is kept in memory (every
 * page passing through a migration is looked up or set), and goes back to the digests file only in the
 * chunks that changed since it was last written.
 */
import { DIGEST_BYTES, DIGEST_WORDS, isAbsentDigest } from '../digest';
import { preadFully, pwriteFully } from './fsio';

/** The digests file: the table as it was last written, byte for byte. */
export const DIGESTS_FILE = 'digests';

/** Pages per dirty-tracking chunk of the table (64 KiB of digests). */
const DIRTY_CHUNK_SHIFT = 12;
const DIRTY_CHUNK_PAGES = 1 << DIRTY_CHUNK_SHIFT;
/** Most table bytes written by one write call. */
const DIGEST_WRITE_MAX_BYTES = 16 * 1024 * 1024;

export class DigestTable {
  /** 16 bytes per page, page i at [16*i, 16*i+16); what the store's `digests` hands out. */
  readonly bytes: Uint8Array;
  /** The same memory as 32-bit words, for isAbsentDigest() and whole-digest comparison. */
  private readonly words: Uint32Array;
  /** One flag per DIRTY_CHUNK_PAGES pages: set when a digest in the chunk changed since writeDirty(). */
  private readonly dirtyChunks: Uint8Array;
  private presentCount: number;

  private constructor(readonly pageCount: number, bytes: Uint8Array, loaded: boolean) {
    this.bytes = bytes;
    this.words = new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.length >>> 2);
    this.dirtyChunks = new Uint8Array(Math.ceil(pageCount / DIRTY_CHUNK_PAGES));
    this.presentCount = loaded ? this.countPresent() : 0; // a new table holds nothing: no need to count
  }

  /** A table of pageCount absent pages. */
  static empty(pageCount: number): DigestTable {
    return new DigestTable(pageCount, new Uint8Array(pageCount * DIGEST_BYTES), false);
  }

  /** The table of pageCount pages as the digests file (fd) holds it. */
  static load(fd: number, pageCount: number): DigestTable {
    const bytes = new Uint8Array(pageCount * DIGEST_BYTES);
    preadFully(fd, bytes, 0, bytes.length, 0);
    return new DigestTable(pageCount, bytes, true);
  }

  /** How many pages are held (non-zero digest). */
  get presentPages(): number {
    return this.presentCount;
  }

  /** Whether page index is held. index must be in range. */
  isPresent(index: number): boolean {
    return !isAbsentDigest(this.words, index * DIGEST_WORDS);
  }

  /** The first page of [from, end) that is absent, or -1 when all are held. */
  firstAbsent(from: number, end: number): number {
    const words = this.words;
    for (let i = from, at = from * DIGEST_WORDS; i < end; i++, at += DIGEST_WORDS) {
      if (isAbsentDigest(words, at)) return i;
    }
    return -1;
  }

  /** The first page of [from, end) that is held, or -1 when none is. */
  firstPresent(from: number, end: number): number {
    const words = this.words;
    for (let i = from, at = from * DIGEST_WORDS; i < end; i++, at += DIGEST_WORDS) {
      if (!isAbsentDigest(words, at)) return i;
    }
    return -1;
  }

  /** The last page of [from, end) that is held, or -1 when none is. */
  lastPresent(from: number, end: number): number {
    const words = this.words;
    for (let i = end - 1, at = i * DIGEST_WORDS; i >= from; i--, at -= DIGEST_WORDS) {
      if (!isAbsentDigest(words, at)) return i;
    }
    return -1;
  }

  /** Whether page index's digest equals the one at digestWords[at .. at+4). */
  matches(index: number, digestWords: Uint32Array, at: number): boolean {
    const words = this.words;
    const j = index * DIGEST_WORDS;
    return words[j] === digestWords[at] && words[j + 1] === digestWords[at + 1] && words[j + 2] === digestWords[at + 2] && words[j + 3] === digestWords[at + 3];
  }

  /**
   * Page index's digest becomes digest[digestStart .. +16) (all zero: the page becomes absent). Called
   * for every page a migration stores, nearly always with one digest buffer (the retainer's): its words
   * are kept, and the digest goes over as four words, not sixteen byte loads and stores.
   */
  set(index: number, digest: Uint8Array, digestStart: number): void {
    const words = this.words;
    const at = index * DIGEST_WORDS;
    const was = !isAbsentDigest(words, at);
    if (digest !== this.sourceBytes) this.takeSource(digest);
    const source = this.sourceWords;
    if (source !== null && (digestStart & 3) === 0) {
      const from = digestStart >>> 2;
      words[at] = source[from];
      words[at + 1] = source[from + 1];
      words[at + 2] = source[from + 2];
      words[at + 3] = source[from + 3];
    } else {
      this.bytes.set(digest.subarray(digestStart, digestStart + DIGEST_BYTES), index * DIGEST_BYTES);
    }
    const now = !isAbsentDigest(words, at);
    if (was !== now) this.presentCount += now ? 1 : -1;
    this.dirtyChunks[index >>> DIRTY_CHUNK_SHIFT] = 1;
  }

  /** The last digest buffer set() was given, and its words (null: not on a 4-byte boundary). */
  private sourceBytes: Uint8Array | null = null;
  private sourceWords: Uint32Array | null = null;

  private takeSource(digest: Uint8Array): void {
    this.sourceBytes = digest;
    this.sourceWords = digest.byteOffset % 4 === 0 ? new Uint32Array(digest.buffer, digest.byteOffset, digest.length >>> 2) : null;
  }

  /** Page index becomes absent. */
  clear(index: number): void {
    const words = this.words;
    const at = index * DIGEST_WORDS;
    if (isAbsentDigest(words, at)) return;
    words[at] = 0;
    words[at + 1] = 0;
    words[at + 2] = 0;
    words[at + 3] = 0;
    this.presentCount--;
    this.dirtyChunks[index >>> DIRTY_CHUNK_SHIFT] = 1;
  }

  /** Pages first .. last (inclusive) become absent. */
  clearRange(first: number, last: number): void {
    for (let i = first; i <= last; i++) this.clear(i);
  }

  /** Every chunk is written by the next writeDirty(), changed or not (the file may disagree with the table). */
  markAllDirty(): void {
    this.dirtyChunks.fill(1);
  }

  /** Writes the changed chunks to the digests file (fd), runs of them coalesced, and clears their flags. No fsync. */
  writeDirty(fd: number): void {
    const dirty = this.dirtyChunks;
    const bytes = this.bytes;
    const chunkBytes = DIRTY_CHUNK_PAGES * DIGEST_BYTES;
    const maxChunks = DIGEST_WRITE_MAX_BYTES / chunkBytes;
    let c = dirty.indexOf(1);
    while (c >= 0) {
      let e = c + 1;
      while (e < dirty.length && dirty[e] !== 0 && e - c < maxChunks) e++;
      const from = c * chunkBytes;
      const to = Math.min(bytes.length, e * chunkBytes);
      pwriteFully(fd, bytes, from, to - from, from);
      dirty.fill(0, c, e);
      c = dirty.indexOf(1, e);
    }
  }

  private countPresent(): number {
    const words = this.words;
    let n = 0;
    for (let at = 0; at < words.length; at += DIGEST_WORDS) if (!isAbsentDigest(words, at)) n++;
    return n;
  }
}
