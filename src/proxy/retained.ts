import { createHash } from 'node:crypto';
import { DIGEST_BYTES, DIGEST_WORDS, digestOne, digestPages, digestWords, isAbsentDigest, newDigestBuffer, sameDigestWords, zeroPageDigest } from '../digest';
import { copyBytes } from '../common/copy';
import { RamFlag, X86_PAGE_SIZE } from '../qemu/constants';
import { pageDataAhead, pageOffsetBefore, type RamRecordWalk } from '../qemu/pages-ahead';
import { type RamBlock, type RamPageRecord, RecordKind } from '../qemu/records';

/** The store's data-path face (src/store PageStore implements it). */
export interface RetainedPages {
  begin(layout: PageLayout): void;
  /** 16 bytes per page; all zero = not held. */
  readonly digests: Uint8Array;
  writePage(index: number, src: Uint8Array, srcStart: number, digest: Uint8Array, digestStart: number): void;
  markAbsent(index: number): void;
  /** The page's content no longer matches its digest: it stops being held (default: markAbsent). */
  dropCorrupt?(index: number): void;
  /** inStream (default true): one of a series read in ascending order, worth reading ahead; false for a lone page. */
  readPages(index: number, count: number, dest: Uint8Array, destStart: number, inStream?: boolean): void;
  /**
   * Whether the store reads page `index` itself before its next version is written (an undo journal
   * saving the version it replaces), taking it from a lone readPages() of that page made just before:
   * such a read costs no disk read a plain write of the page would not. Absent: never.
   */
  readsBeforeWrite?(index: number): boolean;
  /** False while readsBeforeWrite() says no of every page (no snapshot to save pages of). Absent: ask it. */
  readonly readsHeldVersions?: boolean;
  /** A hint: lone pages among indices[0 .. count-1] will be read soon (the array may be compacted in place). */
  prefetchPages?(indices: Uint32Array, count: number): void;
  /** A hint: ranges [starts[i], starts[i] + counts[i]) will be read soon, each at once (the arrays may be compacted in place). */
  prefetchRanges?(starts: Uint32Array, counts: Uint32Array, count: number): void;
  /** How many such ranges the store holds read ahead at once, shared by a migration's channels (0 or absent: none). */
  readonly rangeSlots?: number;
}

/** A sibling's retained snapshot as the receiver reads it: never written by this migration. */
export type SiblingPages = Pick<RetainedPages, 'digests' | 'readPages' | 'prefetchPages'> & { readonly vm: string };

export interface PageLayout {
  pageSize: number;
  pageCount: number;
  /** Changes whenever block names or sizes change: pages of another layout mean nothing. */
  layoutId: string;
  layout: { blocks: { name: string; length: number }[] };
}

export function layoutOf(blocks: readonly RamBlock[]): PageLayout {
  const list = blocks.map((b) => ({ name: b.name, length: b.length }));
  const last = blocks[blocks.length - 1];
  return {
    pageSize: X86_PAGE_SIZE,
    pageCount: last ? last.firstPage + last.pages : 0,
    layoutId: createHash('sha256').update(JSON.stringify(list)).digest('hex').slice(0, 32),
    layout: { blocks: list },
  };
}

/**
 * What the receiver holds, as a sender follows it (16 bytes a page, all zero = not held): the table, and
 * the same memory as words (digestWords) for the per-page comparisons. A migration's main-channel encoder
 * and its multifd channels share one.
 */
export class ReceiverTable {
  readonly words: Uint32Array;

  constructor(readonly bytes: Uint8Array) {
    this.words = digestWords(bytes);
  }
}

/** Compares 16-byte digests in place, allocating nothing. */
export function sameDigest(a: Uint8Array, aAt: number, b: Uint8Array, bAt: number): boolean {
  for (let i = 0; i < DIGEST_BYTES; i++) if (a[aAt + i] !== b[bAt + i]) return false;
  return true;
}

/** Whether a digest table (16 bytes a page) holds page `page` at the version whose digest is digest[digestAt…]. */
export function holdsVersion(digests: Uint8Array, page: number, digest: Uint8Array, digestAt: number): boolean {
  return (page + 1) * DIGEST_BYTES <= digests.length && sameDigest(digests, page * DIGEST_BYTES, digest, digestAt);
}


/** Most pages digested ahead at once: a 256 KiB read holds 63 page records. */
const AHEAD_PAGES = 64;

/** Pages of an input digested ahead: where its pages' data begin, their digests (and as words), their pages. */
class PagesAhead {
  /** The input they are of (null: none). */
  input: Buffer | null = null;
  readonly offsets = new Uint32Array(AHEAD_PAGES);
  readonly digests = new Uint8Array(AHEAD_PAGES * DIGEST_BYTES);
  readonly words = digestWords(this.digests);
  readonly pages = new Uint32Array(AHEAD_PAGES);
  count = 0;
  /** When lookAhead() walked it (a count of walks). */
  walkedAt = 0;
}

/**
 * Keeps a store in step with the RAM records of a stream, the same way on both gateways: the last
 * version of each page wins; pages whose content the stream does not give in clear are dropped.
 *
 * The page records that follow a page in the input the parser reads (told by newInput()) are digested
 * ahead, all in one call: a call a page cost about twice as much as the digest itself. A digest made
 * ahead is used only for the record the parser finds at that very place of that very input, within the
 * push that input was given in (newInput() forgets them all: the input's buffer may be read into again).
 * So are those of the inputs to come that lookAhead() was given.
 */
export class PageRetainer {
  /** The digest of the last record passed to digestOf(), and the same as words (digestWords). */
  readonly digest = newDigestBuffer();
  readonly digestWords = digestWords(this.digest);
  private readonly fillPage = Buffer.alloc(X86_PAGE_SIZE);
  private fillValue = 0;
  /** The input the parser reads now: only its pages are digested ahead. */
  private input: Buffer | null = null;
  /** The pages of `input` digested ahead (their offsets only grow), and which of them is next. */
  private ahead = new PagesAhead();
  private aheadNext = 0;
  /**
   * The inputs to come that lookAhead() walked: the one the caller holds back and the one just read
   * (a sending gateway pushes the first while the second is read ahead). newInput() takes either's.
   */
  private readonly walked = [new PagesAhead(), new PagesAhead()];
  private walks = 0;
  /** A page whose data two reads hold, put together (prefetchStraddled), its index and digest. */
  private straddled: { bytes: Buffer; index: Uint32Array; digest: Uint8Array; words: Uint32Array } | null = null;
  /** Pages the last digestOf() digested ahead (0: it used a digest made before, or made none). */
  private madeAhead = 0;
  /** The pages digested ahead, by index (prefetchChangedAhead), and those of them to read ahead; reused. */
  private readonly pagesAhead = new Uint32Array(AHEAD_PAGES);
  private readonly changedAhead = new Uint32Array(AHEAD_PAGES);

  /** Looked up once: a zero page's record takes it on the per-page path. */
  private readonly zeroDigest = zeroPageDigest(X86_PAGE_SIZE);

  constructor(readonly store: RetainedPages | null) {}

  /**
   * The parser is about to read `bytes`: pages digested ahead in an earlier input are forgotten, and
   * those lookAhead() digested in this one are taken.
   */
  newInput(bytes: Buffer): void {
    this.input = bytes;
    this.aheadNext = 0;
    const walked = this.walked;
    for (let i = 0; i < walked.length; i++) {
      if (walked[i].input !== bytes) continue;
      // The sets trade places: nothing is copied.
      const spent = this.ahead;
      this.ahead = walked[i];
      walked[i] = spent;
      spent.input = null;
      return;
    }
    this.ahead.input = bytes;
    this.ahead.count = 0;
  }

  /**
   * An input the parser reads after the one it reads now (or next) is `bytes`: `walk` says where its
   * pages lie. They are digested now (newInput() hands the digests to digestOf()), and the store reads
   * ahead those that changed and that it will read before writing them, a whole input earlier than
   * prefetchChangedAheadInStream() would: reads asked for under 50 us before they were wanted held a
   * back leg's sender 50-100 ms, those asked for 200 us or more before, nothing (docs/design.md,
   * "Reading a chunk ahead").
   */
  lookAhead(bytes: Buffer, walk: RamRecordWalk, before: Buffer | null): void {
    // Into the set of this input if it was walked before (walked again from the parser's position), else
    // a free one, else that of the input walked before the other (pushed without it).
    const walked = this.walked;
    const a = walked[0];
    const b = walked[1];
    const set = a.input === bytes ? a : b.input === bytes ? b : a.input === null ? a : b.input === null ? b : a.walkedAt < b.walkedAt ? a : b;
    set.walkedAt = ++this.walks;
    const count = walk.walk(bytes, set.offsets, set.pages);
    set.input = bytes;
    set.count = count;
    // The digests whatever is read ahead: newInput() hands them to digestOf() as those of these pages.
    if (count > 0) digestPages(bytes, set.offsets, count, X86_PAGE_SIZE, set.digests, 0);
    if (!this.prefetchesChanged()) return;
    if (walk.straddledPage >= 0 && before !== null) this.prefetchStraddled(walk, before, bytes);
    if (count > 0) this.prefetchChanged(set.pages, set.words, count);
  }

  /**
   * The page whose data `walk` found begun in `before` (the read walked before `bytes`) and ended in
   * `bytes`: put together (a copy of one page), digested, and read ahead as prefetchChanged() would.
   */
  private prefetchStraddled(walk: RamRecordWalk, before: Buffer, bytes: Buffer): void {
    const from = walk.straddledFrom;
    const head = walk.straddledBefore;
    if (from + head > before.length || X86_PAGE_SIZE - head > bytes.length) return; // not the read walked before
    let page = this.straddled;
    if (page === null) {
      const digest = newDigestBuffer();
      page = this.straddled = { bytes: Buffer.alloc(X86_PAGE_SIZE), index: new Uint32Array(1), digest, words: digestWords(digest) };
    }
    copyBytes(before, from, page.bytes, 0, head);
    copyBytes(bytes, 0, page.bytes, head, X86_PAGE_SIZE - head);
    digestOne(page.bytes, 0, X86_PAGE_SIZE, page.digest, 0);
    page.index[0] = walk.straddledPage;
    this.prefetchChanged(page.index, page.words, 1);
  }

  /**
   * Computes the record's page digest into `digest`; false when its content is not in clear.
   * `pagesAfter`: how many pages follow this one's data back to back (a multifd packet's), or -1 for
   * a main channel's page, whose next records are looked for.
   */
  digestOf(record: RamPageRecord, pagesAfter = -1): boolean {
    this.madeAhead = 0;
    if (record.kind === RecordKind.RamPage) {
      const data = record.data;
      const start = record.dataStart;
      const pagesAhead = this.ahead;
      if (data === this.input && pagesAhead.count > 0) {
        // Records passed over (a page not kept) leave their digests unused; offsets only grow.
        const offsets = pagesAhead.offsets;
        let next = this.aheadNext;
        while (next < pagesAhead.count && offsets[next] < start) next++;
        this.aheadNext = next;
        if (next < pagesAhead.count && offsets[next] === start) {
          const from = next * DIGEST_WORDS;
          const words = this.digestWords;
          const ahead = pagesAhead.words;
          words[0] = ahead[from];
          words[1] = ahead[from + 1];
          words[2] = ahead[from + 2];
          words[3] = ahead[from + 3];
          this.aheadNext = next + 1;
          return true;
        }
      }
      digestOne(data, start, X86_PAGE_SIZE, this.digest, 0);
      if (data === this.input) this.digestAhead(data, start + X86_PAGE_SIZE, pagesAfter);
      return true;
    }
    if (record.kind === RecordKind.RamZero) {
      if (record.byteValue === 0) {
        this.zeroDigest.copy(this.digest);
      } else {
        this.fill(record.byteValue);
        digestOne(this.fillPage, 0, X86_PAGE_SIZE, this.digest, 0);
      }
      return true;
    }
    return false;
  }

  /**
   * Digests the pages that follow from `at` in the input: `pagesAfter` pages back to back, or (-1) those
   * of the records that seem to follow one another there.
   */
  private digestAhead(input: Buffer, at: number, pagesAfter: number): void {
    const ahead = this.ahead;
    const offsets = ahead.offsets;
    let count = 0;
    if (pagesAfter < 0) {
      count = pageDataAhead(input, at, X86_PAGE_SIZE, offsets);
    } else {
      const most = Math.min(pagesAfter, offsets.length, Math.floor((input.length - at) / X86_PAGE_SIZE));
      for (; count < most; count++) offsets[count] = at + count * X86_PAGE_SIZE;
    }
    ahead.count = count;
    this.aheadNext = 0;
    this.madeAhead = count;
    if (count > 0) digestPages(input, offsets, count, X86_PAGE_SIZE, ahead.digests, 0);
  }

  /**
   * Has the store read ahead the versions it holds of the pages the last digestOf() digested ahead (a
   * multifd packet's next pages, back to back: page i of them is the block's page firstPage +
   * offsets[from + i] / 4096) that changed since and that the store will read before their new version
   * is written (its undo journal saving the old one, which a Delta's base at the sender is too).
   * Read one by one as their records come, each such read cost the sending gateway's main thread half a
   * millisecond on a busy host: 0.3 s of a 4-channel back leg at 1 Gbit/s (docs/benchmarks.md,
   * "Twenty-seventh session"). Only a hint: what is read is checked as before.
   */
  prefetchChangedAhead(offsets: Float64Array, from: number, firstPage: number): void {
    const count = this.madeAhead;
    if (count === 0 || !this.prefetchesChanged()) return;
    const pages = this.pagesAhead;
    for (let i = 0; i < count; i++) pages[i] = firstPage + offsets[from + i] / X86_PAGE_SIZE;
    this.prefetchChanged(pages, this.ahead.words, count);
  }

  /**
   * The same for a main channel's page record, just given to digestOf(): the records it digested ahead
   * follow this one in its block, each naming its page in its header word. Read as a series instead,
   * a single-channel back leg's sender read its whole store through the stream read-ahead (229 MB for
   * 4.5 MB of changed pages' old versions, docs/benchmarks.md, "Thirty-fifth session").
   */
  prefetchChangedAheadInStream(record: RamPageRecord): void {
    const count = this.madeAhead;
    if (count === 0 || record.kind !== RecordKind.RamPage || !this.prefetchesChanged()) return;
    const block = record.block;
    const offsets = this.ahead.offsets;
    const pages = this.pagesAhead;
    let n = 0;
    for (; n < count; n++) {
      // Only a guess until the parser reads the record (pageDataAhead): a page past the block ends it.
      const offset = pageOffsetBefore(record.data, offsets[n], X86_PAGE_SIZE);
      if (offset >= block.length) break;
      pages[n] = block.firstPage + offset / X86_PAGE_SIZE;
    }
    this.prefetchChanged(pages, this.ahead.words, n);
  }

  /** Whether the store can read pages ahead and says which it reads before writing them (and may read some). */
  prefetchesChanged(): boolean {
    const store = this.store;
    return store !== null && store.prefetchPages !== undefined && store.readsBeforeWrite !== undefined && store.readsHeldVersions !== false;
  }

  /**
   * Has the store read ahead those of pages[0 .. count-1] (of digests ahead[0 .. count-1]) that changed
   * and that it will read before writing them.
   */
  private prefetchChanged(pages: Uint32Array, ahead: Uint32Array, count: number): void {
    const store = this.store as Required<Pick<RetainedPages, 'prefetchPages' | 'readsBeforeWrite'>> & RetainedPages;
    const words = this.storeWords(store);
    const changed = this.changedAhead;
    let n = 0;
    for (let i = 0; i < count; i++) {
      const index = pages[i];
      const at = index * DIGEST_WORDS;
      if (at + DIGEST_WORDS > words.length || isAbsentDigest(words, at) || sameDigestWords(words, at, ahead, i * DIGEST_WORDS)) continue;
      if (store.readsBeforeWrite(index)) changed[n++] = index;
    }
    if (n > 0) store.prefetchPages(changed, n);
  }

  /** Stores the record's page (digestOf() must have been called for it) unless the store has it already. */
  retain(record: RamPageRecord, known: boolean): void {
    const store = this.store;
    if (!store) return;
    const i = record.pageIndex;
    if (!known) {
      store.markAbsent(i);
      return;
    }
    if (sameDigestWords(this.storeWords(store), i * DIGEST_WORDS, this.digestWords, 0)) return;
    if (record.kind === RecordKind.RamPage) {
      store.writePage(i, record.data, record.dataStart, this.digest, 0);
    } else {
      this.fill(record.byteValue);
      store.writePage(i, this.fillPage, 0, this.digest, 0);
    }
  }

  /** The store's digest table as words, made again only when the store hands out another table. */
  private storeWords(store: RetainedPages): Uint32Array {
    const table = store.digests;
    if (table !== this.storeTable) {
      this.storeTable = table;
      this.storeTableWords = digestWords(table);
    }
    return this.storeTableWords;
  }

  private storeTable: Uint8Array | null = null;
  private storeTableWords: Uint32Array = new Uint32Array(0);

  private fill(value: number): void {
    if (this.fillValue !== value) {
      this.fillPage.fill(value);
      this.fillValue = value;
    }
  }
}

/** Flags of a record that continues a run: its kind plus CONTINUE (no block name). */
export function continuingFlags(held: boolean): number {
  return (held ? RamFlag.Page : RamFlag.Zero) | RamFlag.Continue;
}
