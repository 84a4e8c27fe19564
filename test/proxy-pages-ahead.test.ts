/**
 * Page digests made ahead: the page records that follow a page in the parser's input are digested in
 * one call, and each digest is used only for the record the parser finds at that place of that input.
 */
import * as digest from '../src/digest';
import { DIGEST_BYTES } from '../src/digest';
import { guestMemory, migrationStream, dirty, PAGE } from '../src/lab/harness/migration-stream';
import { StreamParser } from '../src/qemu/parser';
import { pageDataAhead, pageOffsetBefore, RamRecordWalk } from '../src/qemu/pages-ahead';
import { type RamBlock, type RamPageRecord, RecordKind } from '../src/qemu/records';
import { PageRetainer, type RetainedPages } from '../src/proxy/retained';

afterEach(() => jest.restoreAllMocks());

/** Whether the retainer's digest of `record` (asked for now) is that of the page the record carries. */
function digestIsOwn(retainer: PageRetainer, record: RamPageRecord, pagesAfter = -1): boolean {
  retainer.digestOf(record, pagesAfter);
  const own = Buffer.alloc(DIGEST_BYTES);
  digest.digestContiguous(record.data, record.dataStart, 1, PAGE, own, 0);
  return own.equals(retainer.digest);
}

describe('pageDataAhead', () => {
  test('finds the page data of the records that follow, past fill records, up to another kind of record', () => {
    // Two blocks, a third of their pages zero (fill records between the normal ones).
    const memory = guestMemory([['pc.ram', 96], ['vga.vram', 8]], 11, 0.3);
    const stream = migrationStream(memory, []);
    // The RAM records in stream order: normal pages with where their data begins, and whether each
    // record names its block (no CONTINUE: the first of a block).
    const records: { page: boolean; dataStart: number; named: boolean }[] = [];
    const parser = new StreamParser((r) => {
      if (r.kind !== RecordKind.RamPage && r.kind !== RecordKind.RamZero) return;
      records.push({ page: r.kind === RecordKind.RamPage, dataStart: r.dataStart, named: (r.flags & 0x20) === 0 });
    });
    parser.push(stream);
    parser.end();
    const starts = records.filter((r) => r.page).map((r) => r.dataStart);
    expect(starts.length).toBeGreaterThan(60);
    // From the first page record on: every later one up to the next record that names its block.
    const first = records.findIndex((r) => r.page);
    const nextNamed = records.findIndex((r, i) => i > first && r.named);
    const expected = records.slice(first + 1, nextNamed < 0 ? undefined : nextNamed).filter((r) => r.page).map((r) => r.dataStart);
    expect(expected.length).toBeGreaterThan(50);
    const offsets = new Uint32Array(256);
    const count = pageDataAhead(stream, starts[0] + PAGE, PAGE, offsets);
    expect(count).toBe(expected.length);
    expect(Array.from(offsets.subarray(0, count))).toEqual(expected);
    // At most offsets.length, and only whole pages.
    expect(pageDataAhead(stream, starts[0] + PAGE, PAGE, new Uint32Array(5))).toBe(5);
    const cut = stream.subarray(0, starts[3] + PAGE - 1);
    expect(pageDataAhead(cut, starts[0] + PAGE, PAGE, offsets)).toBe(2);
  });
});

describe('PageRetainer digests ahead', () => {
  /**
   * Parses `stream` in reads of `readBytes`, each copied into ONE buffer that is read into again (as the
   * gateways' pooled reads are), and checks every page digest against one made from the page alone.
   */
  function check(stream: Buffer, readBytes: number): { pages: number; onePageCalls: number; batchCalls: number } {
    const one = jest.spyOn(digest, 'digestOne');
    const batch = jest.spyOn(digest, 'digestPages');
    one.mockClear();
    batch.mockClear();
    const retainer = new PageRetainer(null);
    let pages = 0;
    let bad = 0;
    const parser = new StreamParser((r) => {
      if (r.kind !== RecordKind.RamPage) return;
      // The page as the parser hands it now (the read buffer holds it until the push returns).
      if (!digestIsOwn(retainer, r as RamPageRecord)) bad++;
      pages++;
    });
    const read = Buffer.alloc(readBytes);
    for (let at = 0; at < stream.length; at += readBytes) {
      const n = stream.copy(read, 0, at, at + readBytes);
      const chunk = n === readBytes ? read : read.subarray(0, n);
      retainer.newInput(chunk);
      parser.push(chunk);
    }
    parser.end();
    expect(bad).toBe(0);
    return { pages, onePageCalls: one.mock.calls.length, batchCalls: batch.mock.calls.length };
  }

  test('every digest is the page’s own, across reads of one buffer read into again', () => {
    const memory = guestMemory([['pc.ram', 2048], ['vga.vram', 64]], 5, 0.2);
    const first = migrationStream(memory, []);
    // A second stream, other content at the same places: digests kept from the first would be wrong.
    dirty(memory, 0.5, 9);
    const second = migrationStream(memory, [dirty(memory, 0.1, 3)]);
    for (const stream of [first, second]) {
      for (const readBytes of [256 * 1024, 100_003, 4099]) {
        const { pages, onePageCalls, batchCalls } = check(stream, readBytes);
        expect(pages).toBeGreaterThan(1500);
        if (readBytes >= 100_003) {
          // Reads of many pages: most pages were digested ahead, a call for several at a time.
          expect(onePageCalls).toBeLessThan(pages / 4);
          expect(batchCalls).toBeGreaterThan(0);
        }
      }
    }
  });

  test('a page digested ahead but not asked for is passed over: the next one still gets its own digest', () => {
    const memory = guestMemory([['pc.ram', 256]], 21, 0);
    const stream = migrationStream(memory, []);
    const retainer = new PageRetainer(null);
    let n = 0;
    let checked = 0;
    const parser = new StreamParser((r) => {
      if (r.kind !== RecordKind.RamPage) return;
      // Every third page is not kept (as a multifd-stale or unkept page): no digest asked for.
      if (n++ % 3 === 1) return;
      expect(digestIsOwn(retainer, r as RamPageRecord)).toBe(true);
      checked++;
    });
    retainer.newInput(stream);
    parser.push(stream);
    parser.end();
    expect(checked).toBeGreaterThan(150);
  });

  test('digests made ahead in one input are never used in the next, though it is the same buffer and the pages stand at the same places', () => {
    // Two guests of one layout, other content: their streams' records stand at the same offsets.
    const a = migrationStream(guestMemory([['pc.ram', 128]], 31, 0), []);
    const b = migrationStream(guestMemory([['pc.ram', 128]], 32, 0), []);
    expect(a.length).toBe(b.length);
    const read = Buffer.alloc(256 * 1024);
    const retainer = new PageRetainer(null);
    // Stream a: only the first page record is asked for; the rest of the read was digested ahead.
    let asked = 0;
    const first = new StreamParser((r) => {
      if (r.kind === RecordKind.RamPage && asked++ === 0) retainer.digestOf(r as RamPageRecord);
    });
    a.copy(read, 0, 0, read.length);
    retainer.newInput(read);
    first.push(read);
    // Stream b, read into the same buffer: every page but the first is asked for.
    let seen = 0;
    let checked = 0;
    const second = new StreamParser((r) => {
      if (r.kind !== RecordKind.RamPage || seen++ === 0) return;
      expect(digestIsOwn(retainer, r as RamPageRecord)).toBe(true);
      checked++;
    });
    b.copy(read, 0, 0, read.length);
    retainer.newInput(read);
    second.push(read);
    expect(checked).toBeGreaterThan(50);
  });

  test('a multifd packet’s pages, back to back: digested ahead as far as the packet goes, and afresh in the next read', () => {
    const PAGES = 40;
    const read = Buffer.alloc(PAGES * PAGE + 100);
    const retainer = new PageRetainer(null);
    const batch = jest.spyOn(digest, 'digestPages');
    const record = { kind: RecordKind.RamPage, data: read, dataStart: 0 } as unknown as RamPageRecord;
    // A packet of 30 pages 100 bytes into the read, then other bytes: only its own pages are digested.
    const packet = { at: 100, pages: 30 };
    for (const [fill, skipFirst] of [[1, false], [2, true], [3, false]] as const) {
      for (let k = 0; k < read.length; k++) read[k] = (k * 31 + fill * 97 + (k >>> 12) * 13) & 0xff;
      retainer.newInput(read);
      batch.mockClear();
      for (let k = skipFirst ? 1 : 0; k < packet.pages; k++) {
        record.dataStart = packet.at + k * PAGE;
        expect(digestIsOwn(retainer, record, packet.pages - 1 - k)).toBe(true);
      }
      // One call for the 29 (or 28) pages after the first one asked for.
      expect(batch).toHaveBeenCalledTimes(1);
      expect(batch.mock.calls[0][2]).toBe(packet.pages - 1 - (skipFirst ? 1 : 0));
    }
  });
});

describe('PageRetainer reads ahead the held versions of changed pages', () => {
  /** A store of 256 pages holding versions of some of them, recording what it is asked to read ahead. */
  function fakeStore(pageCount: number) {
    const digests = new Uint8Array(pageCount * DIGEST_BYTES);
    const saved = new Set<number>();
    const prefetched: number[][] = [];
    const store: RetainedPages = {
      begin: () => undefined,
      digests,
      writePage: () => undefined,
      markAbsent: () => undefined,
      readPages: () => undefined,
      readsBeforeWrite: (index) => !saved.has(index),
      prefetchPages: (indices, count) => void prefetched.push(Array.from(indices.subarray(0, count))),
    };
    return { store, digests, saved, prefetched };
  }

  test('of a packet’s pages digested ahead, those changed, held and not yet saved, by their place in the block', () => {
    const block: RamBlock = { name: 'pc.ram', length: 256 * PAGE, firstPage: 100 } as RamBlock;
    const { store, digests, saved, prefetched } = fakeStore(400);
    // A packet of 10 pages back to back, its offsets all over the block.
    const packet = Buffer.alloc(10 * PAGE);
    for (let i = 0; i < 10; i++) packet.fill(i + 1, i * PAGE, (i + 1) * PAGE);
    const offsets = Float64Array.from([7, 3, 200, 41, 9, 120, 66, 5, 250, 1], (p) => p * PAGE);
    const indexOf = (i: number): number => block.firstPage + offsets[i] / PAGE;
    // The store: pages 1, 2, 4, 6 and 8 of the packet held at another version (changed since); 3 held at
    // this very version (unchanged); 5, 7 and 9 not held; 6 already saved by the undo journal.
    for (const i of [1, 2, 4, 6, 8]) digests.fill(0xa0 + i, indexOf(i) * DIGEST_BYTES, (indexOf(i) + 1) * DIGEST_BYTES);
    digest.digestContiguous(packet, 3 * PAGE, 1, PAGE, digests, indexOf(3) * DIGEST_BYTES);
    saved.add(indexOf(6));
    const retainer = new PageRetainer(store);
    retainer.newInput(packet);
    const record = (i: number): RamPageRecord =>
      ({ kind: RecordKind.RamPage, flags: 0, block, offset: offsets[i], pageIndex: indexOf(i), byteValue: 0, data: packet, dataStart: i * PAGE, dataLength: PAGE, streamOffset: i * PAGE }) as RamPageRecord;
    retainer.digestOf(record(0), 9);
    retainer.prefetchChangedAhead(offsets, 1, block.firstPage);
    expect(prefetched).toEqual([[1, 2, 4, 8].map(indexOf)]);
    // The next pages' digests were made ahead already: nothing more is read ahead for them.
    retainer.digestOf(record(1), 8);
    retainer.prefetchChangedAhead(offsets, 2, block.firstPage);
    expect(prefetched.length).toBe(1);
  });

  /**
   * A main channel's stream of one block of 64 normal pages: the retainer, given its first page record,
   * digests the 63 after it ahead, and is asked to read ahead the held versions of those that changed.
   */
  function firstPageOfStream(stream: Buffer): { prefetchedFor: (retainer: PageRetainer, bytes?: Buffer) => void; block: RamBlock } {
    let first: RamPageRecord | null = null;
    const parser = new StreamParser((r) => {
      if (r.kind === RecordKind.RamPage && first === null) first = { ...r };
    });
    parser.push(stream);
    parser.end();
    const record = first as unknown as RamPageRecord;
    return {
      block: record.block,
      // `bytes`: the stream, or a copy of it bent after its first record.
      prefetchedFor: (retainer, bytes = stream) => {
        const inBytes = { ...record, data: bytes };
        retainer.newInput(bytes);
        retainer.digestOf(inBytes);
        retainer.prefetchChangedAheadInStream(inBytes);
      },
    };
  }

  test('of a main channel’s records digested ahead, the pages changed, held and not yet saved, by the offsets in their header words', () => {
    const memory = guestMemory([['pc.ram', 64]], 13, 0);
    const stream = migrationStream(memory, []);
    const { store, digests, saved, prefetched } = fakeStore(64);
    // Every page held at this very version but pages 2, 5, 9 and 40 (changed since) and 11 (not held);
    // page 9 already saved by the undo journal.
    for (let i = 0; i < 64; i++) digest.digestContiguous(memory.pages[i], 0, 1, PAGE, digests, i * DIGEST_BYTES);
    for (const i of [2, 5, 9, 40]) digests.fill(0xc0 + i, i * DIGEST_BYTES, (i + 1) * DIGEST_BYTES);
    digests.fill(0, 11 * DIGEST_BYTES, 12 * DIGEST_BYTES);
    saved.add(9);
    const { prefetchedFor, block } = firstPageOfStream(stream);
    expect(block.firstPage).toBe(0);
    prefetchedFor(new PageRetainer(store));
    expect(prefetched).toEqual([[2, 5, 40]]);

    // A header word naming a page past the block ends the pages read ahead there (they are only a guess
    // until the parser reads them): page 20's record made to name the block's length.
    const offsets = new Uint32Array(64);
    const pageRecordsAt = (bytes: Buffer): number[] => {
      const starts: number[] = [];
      new StreamParser((r) => void (r.kind === RecordKind.RamPage && starts.push(r.dataStart))).push(bytes);
      return starts;
    };
    const starts = pageRecordsAt(stream);
    expect(pageDataAhead(stream, starts[0] + PAGE, PAGE, offsets)).toBe(63);
    expect(pageOffsetBefore(stream, starts[20], PAGE)).toBe(20 * PAGE);
    const bent = Buffer.from(stream);
    const low = bent.readUInt32BE(starts[20] - 4);
    bent.writeUInt32BE((block.length + (low & (PAGE - 1))) >>> 0, starts[20] - 4);
    expect(pageOffsetBefore(bent, starts[20], PAGE)).toBe(block.length);
    prefetched.length = 0;
    prefetchedFor(new PageRetainer(store), bent);
    expect(prefetched).toEqual([[2, 5]]);
  });
});

describe('PageRetainer.lookAhead', () => {
  test.each([true, false])('the digests it makes are the pages’ own, whether or not the store reads any ahead (it reads held versions: %s)', (readsHeldVersions) => {
    const memory = guestMemory([['pc.ram', 300]], 17, 0.2);
    const stream = migrationStream(memory, []);
    const store: RetainedPages = {
      begin: () => undefined,
      digests: new Uint8Array(300 * DIGEST_BYTES).fill(7),
      writePage: () => undefined,
      markAbsent: () => undefined,
      readPages: () => undefined,
      readsBeforeWrite: () => true,
      readsHeldVersions,
      prefetchPages: () => undefined,
    };
    const retainer = new PageRetainer(store);
    // The first read, parsed; the walk starts where its last page record ends, and looks at the second.
    // (A read of at most 64 pages: as many as are digested ahead at once.)
    const cut = Math.floor(stream.length / 2);
    const reads = [Buffer.from(stream.subarray(0, cut)), Buffer.from(stream.subarray(cut, cut + 200 * 1024))];
    let block: RamBlock | null = null;
    let lastEnd = 0;
    let own = 0;
    let pages = 0;
    let reading = 0;
    const parser = new StreamParser((r) => {
      if (r.kind !== RecordKind.RamPage) return;
      block = r.block;
      lastEnd = parser.offset;
      if (reading === 1) {
        pages++;
        if (digestIsOwn(retainer, r as RamPageRecord)) own++;
      }
    });
    retainer.newInput(reads[0]);
    parser.push(reads[0]);
    const walk = new RamRecordWalk(PAGE, () => block);
    walk.resync(reads[0], lastEnd, block as unknown as RamBlock);
    const batch = jest.spyOn(digest, 'digestPages');
    retainer.lookAhead(reads[1], walk, reads[0]);
    expect(batch).toHaveBeenCalledTimes(1);
    batch.mockClear();
    reading = 1;
    retainer.newInput(reads[1]);
    parser.push(reads[1]);
    // Every page of the second read digested ahead, none again when parsed (but one that both reads hold).
    expect(pages).toBeGreaterThan(30);
    expect(own).toBe(pages);
    expect(batch).not.toHaveBeenCalled();
  });
});
