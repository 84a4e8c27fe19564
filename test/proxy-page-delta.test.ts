import * as path from 'node:path';
import { DIGEST_BYTES } from '../src/digest';
import { StreamDecoder } from '../src/proxy/decoder';
import { RebuildError } from '../src/proxy/rebuild-error';
import { StreamEncoder } from '../src/proxy/encoder';
import { RECENT_PAGES, RecentPages } from '../src/proxy/recent-pages';
import { BASES_WINDOW, ReadsAhead, runsWindow } from '../src/proxy/reads-ahead';
import { DirectPages } from '../src/store/direct-pages';
import { MultifdMigration } from '../src/proxy/multifd-migration';
import { applyPageDelta, DELTA_BASE_DIGEST_AT, DELTA_HEADER_BYTES, encodePageDelta, MAX_DELTA_BYTES } from '../src/proxy/page-delta';
import { QUIET_ADDS, QUIET_SAMPLE, RESEMBLANCE_AT, RESEMBLANCE_CACHE_PAGES, ResemblanceCache, resemblanceKey, ResemblanceWorth, WORTH_OFF_PAGES, WORTH_WINDOW_PAGES } from '../src/proxy/resemblance-cache';
import { pageBuffers, ReusedBuffers } from '../src/proxy/reused-buffers';
import { digestOne, digestWords, newDigestBuffer } from '../src/digest';
import { PageStore, UndoableStore } from '../src/store';
import { FRAME_HEADER_BYTES } from '../src/wire/frames';
import { copiesWithHeaders, dirty, guestMemory, migrationStream, PAGE, patchPages } from '../src/lab/harness/migration-stream';
import { TestStores } from './test-stores';

let root = '';
const stores = new TestStores();
beforeEach(() => {
  root = stores.dir('bfmig-delta-');
});

const openStore = (dir: string): PageStore => stores.open(dir, 'vm');

function lcg(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => (x = (Math.imul(x, 1103515245) + 12345) >>> 0);
}

function randomPage(next: () => number): Buffer {
  const page = Buffer.alloc(PAGE);
  for (let w = 0; w < PAGE; w += 4) page.writeUInt32LE(next(), w);
  return page;
}

describe('page deltas (native)', () => {
  test('patching the old page with the delta gives the new page, for changes anywhere', () => {
    const next = lcg(3);
    const out = Buffer.alloc(MAX_DELTA_BYTES);
    const rebuilt = Buffer.alloc(PAGE);
    for (let trial = 0; trial < 400; trial++) {
      const old = randomPage(next);
      const fresh = Buffer.from(old);
      const changes = trial % 40;
      for (let c = 0; c < changes; c++) fresh[next() % PAGE] = next() & 0xff;
      if (trial % 7 === 0) fresh[0] ^= 0x80; // the very first byte
      if (trial % 11 === 0) fresh[PAGE - 1] ^= 0x01; // and the last
      const length = encodePageDelta(old, 0, fresh, 0, PAGE, out, 0, MAX_DELTA_BYTES);
      expect(length).toBeGreaterThanOrEqual(0);
      // Each changed byte costs itself plus at most a few length bytes, and a word's neighbours at worst.
      expect(length).toBeLessThanOrEqual(((changes + 2) * 20));
      rebuilt.fill(0xee);
      applyPageDelta(old, 0, out, 0, length, PAGE, rebuilt, 0);
      expect(rebuilt.equals(fresh)).toBe(true);
    }
  });

  test('an unchanged page is an empty delta; a rewritten one does not fit', () => {
    const next = lcg(4);
    const old = randomPage(next);
    const out = Buffer.alloc(MAX_DELTA_BYTES);
    expect(encodePageDelta(old, 0, Buffer.from(old), 0, PAGE, out, 0, MAX_DELTA_BYTES)).toBe(0);
    expect(encodePageDelta(old, 0, randomPage(next), 0, PAGE, out, 0, MAX_DELTA_BYTES)).toBe(-1);
  });

  test('malformed deltas are refused, never written past the page', () => {
    const old = Buffer.alloc(PAGE, 1);
    const out = Buffer.alloc(PAGE + 64, 0xaa);
    const bad: [string, number[]][] = [
      ['a range past the page', [0x80, 0x20, 0x01, 0xff]], // skip 4096, then 1 byte
      ['a skip past the page', [0x81, 0x20, 0x00]],
      ['truncated data', [0x00, 0x05, 1, 2]],
      ['a truncated length', [0x80]],
      ['an overlong length', [0xff, 0xff, 0xff, 0x7f, 0x00]],
    ];
    for (const [what, bytes] of bad) {
      expect(() => applyPageDelta(old, 0, Buffer.from(bytes), 0, bytes.length, PAGE, out, 0)).toThrow(/page delta/);
      expect(out.subarray(PAGE).every((b) => b === 0xaa)).toBe(true);
      void what;
    }
    // Random bytes either patch within the page or are refused.
    const next = lcg(9);
    for (let trial = 0; trial < 2000; trial++) {
      const delta = Buffer.from(Array.from({ length: 1 + (next() % 12) }, () => next() & 0xff));
      try {
        applyPageDelta(old, 0, delta, 0, delta.length, PAGE, out, 0);
      } catch (err) {
        expect(String(err)).toMatch(/RangeError: page delta/);
      }
      expect(out.subarray(PAGE).every((b) => b === 0xaa)).toBe(true);
    }
  });
});

const LAYOUT: [string, number][] = [
  ['pc.ram', 2000],
  ['0000:00:02.0/vga.vram', 64],
];

/**
 * One migration through an encoder and a decoder over frames; returns the rebuilt stream and WAN bytes.
 * `multifdChannels`: the encoder is given a MultifdMigration, as a sending gateway's always is, expecting
 * that many channels (none join here).
 */
function migrate(stream: Buffer, sender: PageStore | UndoableStore, receiver: PageStore, deltas: boolean, tamper?: (payload: Buffer) => void, readsFree = true, multifdChannels?: number, receiverReadsAhead = false, wanBytesPerSecond = -1, pageWanUs = 0, beforePush?: (encoder: StreamEncoder, at: number) => void, chunkBytes = 50_000) {
  let wan = 0;
  const out: Buffer[] = [];
  const decoder = new StreamDecoder((b) => out.push(Buffer.from(b)), receiver);
  const encoder = new StreamEncoder(
    {
      literal: (bytes) => {
        wan += FRAME_HEADER_BYTES + bytes.length;
        decoder.literal(Buffer.from(bytes));
      },
      run: (payload) => {
        wan += FRAME_HEADER_BYTES + payload.length;
        decoder.run(payload);
      },
      delta: (payload) => {
        wan += FRAME_HEADER_BYTES + payload.length;
        const copy = Buffer.from(payload);
        tamper?.(copy);
        decoder.delta(copy);
      },
    },
    sender,
    (layout) => {
      encoder.reference = sender.digests;
      encoder.deltas = deltas;
      encoder.deltaReadsFree = readsFree;
      encoder.receiverReadsAhead = receiverReadsAhead;
      encoder.resemblanceWorth.observeWanRate(wanBytesPerSecond);
      encoder.pageWanUs = pageWanUs;
      if (multifdChannels !== undefined) {
        encoder.multifd = new MultifdMigration(sender, multifdChannels);
        encoder.multifd.begin(layout);
      }
    },
  );
  for (let at = 0; at < stream.length; at += chunkBytes) {
    beforePush?.(encoder, at);
    encoder.push(stream.subarray(at, at + chunkBytes));
  }
  encoder.end();
  decoder.end(stream.length, encoder.streamCheck);
  return { rebuilt: Buffer.concat(out), wan, encoder, decoder };
}

function firstLeg(seed: number) {
  const memory = guestMemory(LAYOUT, seed);
  const a = openStore(path.join(root, 'a'));
  const b = openStore(path.join(root, 'b'));
  const first = migrationStream(memory, []);
  expect(migrate(first, a, b, true).rebuilt.equals(first)).toBe(true);
  a.commit('snap-1');
  b.commit('snap-1');
  return { memory, a, b };
}

describe('Delta frames between an encoder and a decoder', () => {
  test('pages with small changes cross as deltas; the stream and both stores come out exact', () => {
    const { memory, a, b } = firstLeg(5);
    // At site B the guest changes 64 bytes in each of 10% of its pages, and also rewrites one page in
    // the middle of a pass twice (the second version patches the first).
    const changed = patchPages(memory, 0.1, 64, 11);
    const stream = migrationStream(memory, [changed.slice(0, 5)]);
    const withDeltas = migrate(stream, b, a, true);
    expect(withDeltas.rebuilt.equals(stream)).toBe(true);
    expect(Buffer.from(a.digests).equals(Buffer.from(b.digests))).toBe(true);
    const { counts } = withDeltas.encoder;
    expect(counts.pagesDelta).toBeGreaterThan(0.9 * changed.length);
    expect(withDeltas.decoder.counts.pagesDelta).toBe(counts.pagesDelta);
    expect(withDeltas.decoder.counts.deltaBytes).toBe(counts.deltaBytes);
    const page = Buffer.alloc(PAGE);
    for (const i of changed.slice(0, 50)) {
      a.readPages(i, 1, page, 0);
      expect(page.equals(memory.pages[i])).toBe(true);
    }
    // The changed pages cost well under a tenth of their size.
    a.commit('snap-2');
    b.commit('snap-2');
    const idle = migrate(migrationStream(memory, []), a, b, true);
    expect(withDeltas.wan - idle.wan).toBeLessThan(0.1 * changed.length * PAGE);
  });

  /**
   * Serves the store's reads from `held` (what it holds, page by page), the reads `slow` picks (by their
   * number, from 1) after a busy wait of `us` µs: read times the test chooses, whatever the disk does.
   */
  function timedReads(store: PageStore, held: readonly Buffer[], slow: (n: number) => boolean, us: number): () => number {
    let reads = 0;
    store.readPages = (index, count, dest, destStart) => {
      if (slow(++reads)) {
        const until = performance.now() + us / 1000;
        while (performance.now() < until);
      }
      for (let k = 0; k < count; k++) held[index + k].copy(dest, destStart + k * PAGE);
    };
    return () => reads;
  }

  test('while store reads are not free, a few reads that waited milliseconds do not turn deltas off for the rest of the leg', () => {
    const { memory, a, b } = firstLeg(5);
    const held = memory.pages.slice();
    const changed = patchPages(memory, 0.1, 64, 11);
    const stream = migrationStream(memory, []);
    const reads = timedReads(b, held, (n) => n >= 2 && n <= 4, 6000);
    const leg = migrate(stream, b, a, true, undefined, false);
    expect(reads()).toBeGreaterThan(0.9 * changed.length);
    expect(leg.rebuilt.equals(stream)).toBe(true);
    expect(leg.encoder.counts.pagesDelta).toBeGreaterThan(0.9 * changed.length);
  });

  test('while store reads are not free and keep being slow, the pages go whole, with a read now and then', () => {
    const { memory, a, b } = firstLeg(5);
    const held = memory.pages.slice();
    const changed = patchPages(memory, 0.1, 64, 11);
    const stream = migrationStream(memory, []);
    const reads = timedReads(b, held, () => true, 400);
    const leg = migrate(stream, b, a, true, undefined, false);
    expect(leg.rebuilt.equals(stream)).toBe(true);
    expect(leg.encoder.counts.pagesDelta).toBeLessThan(0.2 * changed.length);
    expect(leg.encoder.counts.pagesDelta).toBeGreaterThanOrEqual(9);
    // The delta reads until more than half of the last 16 were slow, then one try in 64; and the store's
    // own reads of the old versions it keeps until the migration commits (one a changed page).
    expect(reads()).toBeLessThan(changed.length + 9 + changed.length / 64 + 2);
  });

  test("with an undo journal, a Delta's read is the one the journal would make: made however slow reads are, and never made twice", () => {
    const { memory, a, b } = firstLeg(5);
    const held = memory.pages.slice();
    const changed = patchPages(memory, 0.1, 64, 11);
    const stream = migrationStream(memory, []);
    // Every read as slow as the one before, which without a journal leaves the pages whole (test above).
    const reads = timedReads(b, held, () => true, 400);
    const sender = new UndoableStore(b);
    const leg = migrate(stream, sender, a, true, undefined, false);
    expect(leg.rebuilt.equals(stream)).toBe(true);
    expect(leg.encoder.counts.pagesDelta).toBeGreaterThan(0.9 * changed.length);
    // One disk read a changed page: the Delta's, which the journal saved the old version from.
    expect(reads()).toBe(changed.length);
    // And the journal holds those old versions: a failed migration puts them back.
    sender.rollback();
    const page = Buffer.alloc(PAGE);
    b.readPages = PageStore.prototype.readPages;
    for (const i of changed.slice(0, 20)) {
      b.readPages(i, 1, page, 0);
      expect(page.equals(held[i])).toBe(true);
    }
  });

  test('pseudo-random rewrites go whole, at no more than 1% above a migration without deltas', () => {
    const { memory, a, b } = firstLeg(6);
    dirty(memory, 0.2, 12);
    const stream = migrationStream(memory, []);
    const aCopy = openStore(path.join(root, 'a2'));
    const bCopy = openStore(path.join(root, 'b2'));
    // The same two stores once more, so the two runs start alike.
    const again = migrationStream(guestMemory(LAYOUT, 6), []);
    migrate(again, aCopy, bCopy, false);
    aCopy.commit('snap-1');
    bCopy.commit('snap-1');
    const tried = migrate(stream, b, a, true);
    const plain = migrate(stream, bCopy, aCopy, false);
    expect(tried.rebuilt.equals(stream)).toBe(true);
    expect(tried.encoder.counts.pagesDelta).toBe(0);
    expect(tried.wan).toBeLessThanOrEqual(plain.wan * 1.01);
  });

  test('a Delta damaged on the way, or against a version the receiver does not hold, fails the migration', () => {
    const { memory, a, b } = firstLeg(7);
    const changed = patchPages(memory, 0.05, 16, 13);
    const stream = migrationStream(memory, []);
    expect(changed.length).toBeGreaterThan(0);
    // A byte of the patch flipped: the rebuilt page does not match the sender's digest.
    expect(() => migrate(stream, b, a, true, (p) => (p[p.length - 1] ^= 1))).toThrow(RebuildError);
  });

  test('a page whose content the receiver holds elsewhere goes as a reference to it', () => {
    const { memory, a, b } = firstLeg(9);
    // At B the guest moves pages around (page cache that moved): pages 100..199 take 1000..1099's content.
    for (let i = 0; i < 100; i++) memory.pages[100 + i] = Buffer.from(memory.pages[1000 + i]);
    const stream = migrationStream(memory, []);
    const leg = migrate(stream, b, a, true);
    expect(leg.rebuilt.equals(stream)).toBe(true);
    const nonZero = memory.pages.slice(1000, 1100).filter((p) => p.some((x) => x !== 0)).length;
    expect(leg.encoder.counts.pagesMatched).toBeGreaterThanOrEqual(nonZero);
    expect(leg.decoder.counts.pagesMatched).toBe(leg.encoder.counts.pagesMatched);
    expect(leg.encoder.counts.pagesSent).toBe(0);
    const page = Buffer.alloc(PAGE);
    a.readPages(150, 1, page, 0);
    expect(page.equals(memory.pages[1050])).toBe(true);
  });

  test('the content index is begun only once the pages that could have used it cost, on the WAN, what building it costs', () => {
    // 2,064 pages at 0.1 µs each: 206 µs, the WAN time of 7 pages at 1 Gbit/s (33 µs each), of 1 at 100 Mbit/s.
    const legWith = (moved: number, pageWanUs: number) => {
      root = stores.dir('bfmig-delta-');
      const { memory, a, b } = firstLeg(9);
      for (let i = 0; i < moved; i++) memory.pages[100 + i] = Buffer.from(memory.pages[1000 + i]);
      const stream = migrationStream(memory, []);
      const leg = migrate(stream, b, a, true, undefined, true, undefined, false, -1, pageWanUs);
      expect(leg.rebuilt.equals(stream)).toBe(true);
      expect(leg.decoder.counts.pagesMatched).toBe(leg.encoder.counts.pagesMatched);
      return { counts: leg.encoder.counts, nonZero: memory.pages.slice(1000, 1000 + moved).filter((p) => p.some((x) => x !== 0)).length };
    };
    // A back leg whose few changed pages moved: all go whole, the index would have cost more than them.
    const few = legWith(5, 33);
    expect(few.nonZero).toBeGreaterThan(2);
    expect(few.counts.pagesMatched).toBe(0);
    expect(few.counts.pagesSent).toBe(few.nonZero);
    // Many: the first 7 pay the rent, the rest go as references.
    const many = legWith(100, 33);
    expect(many.counts.pagesMatched).toBeGreaterThanOrEqual(many.nonZero - 7);
    expect(many.counts.pagesSent).toBe(7);
    // On a slow link one page pays for the index.
    const slow = legWith(100, 330);
    expect(slow.counts.pagesSent).toBe(1);
    expect(slow.counts.pagesMatched).toBeGreaterThanOrEqual(slow.nonZero - 1);
  });

  test('pages that go against their own version rent no content index: after a back leg of small changes, a few moved pages go whole', () => {
    root = stores.dir('bfmig-delta-');
    const { memory, a, b } = firstLeg(9);
    // At B the guest changes 64 bytes in 5% of its pages (about a hundred, each a Delta of its own version:
    // at 33 µs a page, what building the index costs fourteen times over had they gone whole)…
    const changed = new Set(patchPages(memory, 0.05, 64, 13));
    const kept = (i: number) => !changed.has(i) && memory.pages[i].some((x) => x !== 0);
    // …then, near the end of the pass, five pages take the content of five the receiver holds unchanged.
    const sources = [...Array(500).keys()].map((k) => 500 + k).filter(kept).slice(0, 5);
    const moved = [...Array(60).keys()].map((k) => 2000 + k).filter((i) => !changed.has(i)).slice(0, 5);
    expect(sources).toHaveLength(5);
    expect(moved).toHaveLength(5);
    sources.forEach((from, k) => (memory.pages[moved[k]] = Buffer.from(memory.pages[from])));
    const stream = migrationStream(memory, []);
    const leg = migrate(stream, b, a, true, undefined, true, undefined, false, -1, 33);
    expect(leg.rebuilt.equals(stream)).toBe(true);
    const { counts } = leg.encoder;
    expect(counts.pagesDelta).toBeGreaterThanOrEqual(changed.size - 2);
    // The Deltas paid no rent: five pages cost less than building the index, so they went whole.
    expect(counts.pagesMatched).toBe(0);
    expect(counts.pagesSent).toBe(5 + changed.size - counts.pagesDelta);
    expect(Buffer.from(a.digests).equals(Buffer.from(b.digests))).toBe(true);
  });

  test('pages sent while the content index is not looked in are not added to it: a copy of one later goes whole', () => {
    const { memory, a, b } = firstLeg(9);
    const next = lcg(21);
    const nonZero = (from: number, count: number) => memory.pages.slice(from, from + count).filter((p) => p.some((x) => x !== 0)).length;
    // At B: pages 100..119 take 1000..1019's content (the receiver holds it there); 300..319 get new
    // content, which 1500..1519 then copy.
    for (let i = 0; i < 20; i++) memory.pages[100 + i] = Buffer.from(memory.pages[1000 + i]);
    for (let i = 0; i < 20; i++) memory.pages[300 + i] = randomPage(next);
    for (let i = 0; i < 20; i++) memory.pages[1500 + i] = Buffer.from(memory.pages[300 + i]);
    memory.pages[1499] = randomPage(next);
    const stream = migrationStream(memory, []);
    // Lookups pay up to page 300, not from there to page 1499, and pay again from it.
    const off = stream.indexOf(memory.pages[300]) - 64;
    const onAgain = stream.indexOf(memory.pages[1499]);
    expect(off).toBeGreaterThan(stream.indexOf(memory.pages[119]));
    const lookups = (encoder: StreamEncoder, at: number) => {
      const on = at < off || at >= onAgain;
      encoder.deltaReadsFree = on;
      encoder.receiverReadsAhead = on;
    };
    const leg = migrate(stream, b, a, true, undefined, true, undefined, false, -1, 0, lookups, 4096);
    expect(leg.rebuilt.equals(stream)).toBe(true);
    expect(leg.encoder.counts.pagesMatched).toBe(nonZero(1000, 20));
    expect(leg.decoder.counts.pagesMatched).toBe(leg.encoder.counts.pagesMatched);
    // 300..319, 1499 and 1500..1519.
    expect(leg.encoder.counts.pagesSent).toBe(41);
  });

  test("while store reads are not free (the gateway, not the WAN, sets the pace) such a page goes whole: the receiver's read is not paid", () => {
    const { memory, b, a } = firstLeg(9);
    for (let i = 0; i < 100; i++) memory.pages[100 + i] = Buffer.from(memory.pages[1000 + i]);
    const stream = migrationStream(memory, []);
    const leg = migrate(stream, b, a, true, undefined, false);
    expect(leg.rebuilt.equals(stream)).toBe(true);
    expect(leg.encoder.counts.pagesMatched).toBe(0);
    expect(leg.decoder.counts.pagesMatched).toBe(0);
    const nonZero = memory.pages.slice(1000, 1100).filter((p) => p.some((x) => x !== 0)).length;
    expect(leg.encoder.counts.pagesSent).toBeGreaterThanOrEqual(nonZero);
  });

  /** Pages 500..599 become pages 100..199 with a 16-byte header of their own, as a heap copy of a file page. */
  const copiesOf = (memory: ReturnType<typeof guestMemory>): number[] => copiesWithHeaders(memory, 100, 500, 100);

  test.each([
    ['', undefined],
    [', with a multifd migration no channel joins (as a gateway runs the main channel)', 0],
  ])('a page like another one the receiver holds (a few bytes apart) goes as a delta against that page, on a first leg too%s', (_how, multifdChannels) => {
    const memory = guestMemory(LAYOUT, 10);
    const copies = copiesOf(memory);
    expect(copies.length).toBeGreaterThan(50);
    const a = openStore(path.join(root, 'a'));
    const b = openStore(path.join(root, 'b'));
    const stream = migrationStream(memory, []);
    const leg = migrate(stream, a, b, true, undefined, true, multifdChannels);
    expect(leg.rebuilt.equals(stream)).toBe(true);
    expect(Buffer.from(a.digests).equals(Buffer.from(b.digests))).toBe(true);
    expect(leg.encoder.counts.pagesDelta).toBeGreaterThanOrEqual(copies.length);
    expect(leg.decoder.counts.pagesDelta).toBe(leg.encoder.counts.pagesDelta);
    expect(leg.decoder.counts.pagesMatched).toBe(leg.encoder.counts.pagesMatched);
    const page = Buffer.alloc(PAGE);
    b.readPages(copies[7], 1, page, 0);
    expect(page.equals(memory.pages[copies[7]])).toBe(true);
    // Without them the copies cross whole: each costs a page, as a delta well under a tenth of one.
    const plain = migrate(stream, openStore(path.join(root, 'a2')), openStore(path.join(root, 'b2')), false);
    expect(plain.rebuilt.equals(stream)).toBe(true);
    expect(plain.wan - leg.wan).toBeGreaterThan(0.9 * copies.length * PAGE);
  });

  test('on a fast link the resemblance cache turns off once a window of pages kept saved less WAN time than it cost; on a slow one it stays', () => {
    // Pages alike early on (in the first window of pages kept) and late (after it); zero pages make none.
    const memory = guestMemory([['pc.ram', 9000]], 12);
    const early = copiesWithHeaders(memory, 100, 400, 100);
    const late = copiesWithHeaders(memory, 6000, 8700, 200);
    expect(early.length).toBeGreaterThan(50);
    expect(late.length).toBeGreaterThan(100);
    const stream = migrationStream(memory, []);
    const legAt = (bytesPerSecond: number, dir: string) => migrate(stream, openStore(path.join(root, `${dir}a`)), openStore(path.join(root, `${dir}b`)), true, undefined, true, undefined, false, bytesPerSecond);
    // 1 Gbit/s: the early Deltas saved about 3 ms of WAN time, keeping 4096 pages and making them cost
    // about 5 ms: the cache goes off for the rest of this guest, and the late pages alike go whole.
    const fast = legAt(125e6, 'fast');
    expect(fast.rebuilt.equals(stream)).toBe(true);
    expect(fast.encoder.resemblanceWorth.on).toBe(false);
    expect(fast.encoder.counts.pagesDelta).toBeGreaterThanOrEqual(early.length);
    expect(fast.encoder.counts.pagesDelta).toBeLessThan(early.length + late.length / 4);
    // 100 Mbit/s: the same Deltas saved ten times the WAN time; the pages alike go as Deltas.
    const slow = legAt(12.5e6, 'slow');
    expect(slow.rebuilt.equals(stream)).toBe(true);
    expect(slow.encoder.resemblanceWorth.on).toBe(true);
    expect(slow.encoder.counts.pagesDelta).toBeGreaterThan(early.length + 0.9 * late.length);
    expect(fast.wan - slow.wan).toBeGreaterThan(0.9 * late.length * PAGE);
  });

  test('with multifd channels, a page like another goes whole: a channel could change the base at the receiver first', () => {
    const memory = guestMemory(LAYOUT, 10);
    const copies = copiesOf(memory);
    const stream = migrationStream(memory, []);
    const leg = migrate(stream, openStore(path.join(root, 'a')), openStore(path.join(root, 'b')), true, undefined, true, 2);
    expect(leg.rebuilt.equals(stream)).toBe(true);
    expect(leg.encoder.counts.pagesDelta).toBe(0);
    expect(leg.encoder.counts.pagesSent).toBeGreaterThanOrEqual(copies.length);
  });

  test('while store reads are not free, a page like another goes whole', () => {
    const memory = guestMemory(LAYOUT, 10);
    const copies = copiesOf(memory);
    const stream = migrationStream(memory, []);
    const leg = migrate(stream, openStore(path.join(root, 'a')), openStore(path.join(root, 'b')), true, undefined, false);
    expect(leg.rebuilt.equals(stream)).toBe(true);
    expect(leg.encoder.counts.pagesDelta).toBe(0);
    expect(leg.encoder.counts.pagesSent).toBeGreaterThanOrEqual(copies.length);
  });

  /** Counts the store's reads of lone pages (a Delta's base), as the receiver makes them. */
  const countLoneReads = (store: PageStore): (() => number) => {
    let reads = 0;
    const read = store.readPages.bind(store);
    store.readPages = (index, count, dest, destStart, inStream) => {
      if (count === 1) reads++;
      read(index, count, dest, destStart, inStream);
    };
    return () => reads;
  };

  /** Pages 101, 103, … 299 become copies of the page before each, with a header of their own. */
  const copiesInterleaved = (memory: ReturnType<typeof guestMemory>): number[] => {
    const made: number[] = [];
    for (let page = 100; page < 300; page += 2) made.push(...copiesWithHeaders(memory, page, page + 1, 1));
    return made;
  };

  test('while store reads are not free but the receiver reads bases ahead, a page like another still goes as a delta; from the first such Delta on, the receiver takes bases from the pages it stored last, not from its store', () => {
    const memory = guestMemory(LAYOUT, 10);
    const copies = copiesInterleaved(memory);
    expect(copies.length).toBeGreaterThan(50);
    const stream = migrationStream(memory, []);
    const b = openStore(path.join(root, 'b'));
    const loneReads = countLoneReads(b);
    const leg = migrate(stream, openStore(path.join(root, 'a')), b, true, undefined, false, undefined, true);
    expect(leg.rebuilt.equals(stream)).toBe(true);
    expect(leg.encoder.counts.pagesDelta).toBeGreaterThanOrEqual(copies.length);
    expect(leg.decoder.counts.pagesDelta).toBe(leg.encoder.counts.pagesDelta);
    // The first Delta's base was stored before the receiver kept pages; content matches name any page.
    expect(loneReads()).toBeLessThanOrEqual(1 + leg.decoder.counts.pagesMatched);
    // Over, the leg gives the sender's resemblance cache and the receiver's recent pages back to the pool.
    const idle = pageBuffers.idleByteCount;
    leg.encoder.release();
    leg.decoder.release();
    expect(pageBuffers.idleByteCount).toBeGreaterThan(idle);
    // Bases all stored before the first Delta (the copies come later in the stream) are read from the store.
    const later = guestMemory(LAYOUT, 10);
    const farCopies = copiesOf(later);
    const laterStream = migrationStream(later, []);
    const c = openStore(path.join(root, 'c'));
    const cReads = countLoneReads(c);
    const farLeg = migrate(laterStream, openStore(path.join(root, 'a2')), c, true, undefined, false, undefined, true);
    expect(farLeg.rebuilt.equals(laterStream)).toBe(true);
    expect(cReads()).toBeGreaterThanOrEqual(farCopies.length);
  });

  test('a base kept in memory that changed in the store behind the decoder (as a multifd channel writes pages) is read from the store, never patched from the stale copy', () => {
    const memory = guestMemory(LAYOUT, 10);
    const copies = copiesInterleaved(memory);
    const stream = migrationStream(memory, []);
    const a = openStore(path.join(root, 'a'));
    const b = openStore(path.join(root, 'b'));
    const loneReads = countLoneReads(b);
    const out: Buffer[] = [];
    const decoder = new StreamDecoder((bytes) => out.push(Buffer.from(bytes)), b);
    let changed = 0;
    let alike = 0;
    const encoder = new StreamEncoder(
      {
        literal: (bytes) => decoder.literal(Buffer.from(bytes)),
        run: (payload) => decoder.run(payload),
        delta: (payload) => {
          const page = payload.readUInt32BE(0);
          const base = payload.readUInt32BE(4);
          // The second Delta against another page: the first one had the receiver start keeping pages.
          if (changed > 0 || base === page || payload.length === DELTA_HEADER_BYTES || alike++ < 1) return decoder.delta(Buffer.from(payload));
          // Another writer gives the base new content in b; the Delta is made against that content.
          const other = Buffer.from(memory.pages[base]);
          other[9] ^= 0x77;
          const otherDigest = newDigestBuffer();
          digestOne(other, 0, PAGE, otherDigest, 0);
          b.writePage(base, other, 0, otherDigest, 0);
          const redone = Buffer.alloc(DELTA_HEADER_BYTES + MAX_DELTA_BYTES);
          payload.copy(redone, 0, 0, DELTA_HEADER_BYTES);
          otherDigest.copy(redone, DELTA_BASE_DIGEST_AT);
          const length = encodePageDelta(other, 0, memory.pages[page], 0, PAGE, redone, DELTA_HEADER_BYTES, MAX_DELTA_BYTES);
          expect(length).toBeGreaterThan(0);
          changed++;
          decoder.delta(redone.subarray(0, DELTA_HEADER_BYTES + length));
        },
      },
      a,
      () => {
        encoder.reference = a.digests;
        encoder.deltas = true;
        encoder.deltaReadsFree = false;
        encoder.receiverReadsAhead = true;
      },
    );
    encoder.push(stream);
    encoder.end();
    decoder.end(stream.length, encoder.streamCheck);
    expect(copies.length).toBeGreaterThan(0);
    expect(changed).toBe(1);
    expect(Buffer.concat(out).equals(stream)).toBe(true);
    // The first Delta's base (stored before pages were kept) and the changed one come from the store.
    expect(loneReads()).toBe(2 + decoder.counts.pagesMatched);
  });

  test('a delta against a page like it, damaged on the way, fails the migration', () => {
    const memory = guestMemory(LAYOUT, 10);
    copiesOf(memory);
    const stream = migrationStream(memory, []);
    const a = openStore(path.join(root, 'a'));
    const b = openStore(path.join(root, 'b'));
    expect(() => migrate(stream, a, b, true, (p) => (p[p.length - 1] ^= 1))).toThrow(/does not rebuild/);
  });

  test.each([
    ['names a version the receiver does not hold', (p: Buffer) => void (p[DELTA_BASE_DIGEST_AT] ^= 1), /does not hold/],
    ['names a page outside the layout', (p: Buffer) => void p.writeUInt32BE(0xffffff, 0), /outside the RAM layout/],
    ['names another page than the record it completes', (p: Buffer) => void p.writeUInt32BE(p.readUInt32BE(0) === 0 ? 1 : 0, 0), /does not hold|does not rebuild|rebuilt page/],
    ['is cut short', (p: Buffer) => void p.fill(0, DELTA_HEADER_BYTES - DIGEST_BYTES, DELTA_HEADER_BYTES), /does not rebuild/],
  ])('a Delta that %s fails the migration', (_what, tamper, message) => {
    const { memory, a, b } = firstLeg(8);
    patchPages(memory, 0.05, 16, 14);
    const stream = migrationStream(memory, []);
    expect(() => migrate(stream, b, a, true, tamper)).toThrow(message);
  });
});

describe('resemblance keys and index', () => {
  /** A window of WORTH_WINDOW_PAGES pages kept, with `deltas` Deltas each `saved` bytes under a page. */
  const windowOf = (worth: ResemblanceWorth, deltas: number, saved: number): void => {
    for (let i = 0; i < deltas; i++) worth.delta(saved);
    for (let i = 0; i < WORTH_WINDOW_PAGES; i++) worth.pageKept();
  };

  test('the cache pays while its Deltas save more WAN time than keeping pages and making Deltas costs', () => {
    const worth = new ResemblanceWorth();
    // Until the WAN's rate is known, every window pays.
    windowOf(worth, 0, 0);
    expect(worth.on).toBe(true);
    // 1 Gbit/s, 600 Deltas saving 3.5 KB each (a guest of files): 16.8 ms saved against 9.3 ms.
    worth.observeWanRate(125e6);
    windowOf(worth, 600, 3500);
    expect(worth.on).toBe(true);
    // 1 Gbit/s, 100 Deltas saving 3.3 KB each (pseudo-random pages): 2.6 ms saved against 5.3 ms.
    windowOf(worth, 100, 3300);
    expect(worth.on).toBe(false);
    // Off for WORTH_OFF_PAGES candidate pages, then tried again.
    for (let i = 0; i < WORTH_OFF_PAGES - 1; i++) worth.passedOver();
    expect(worth.on).toBe(false);
    worth.passedOver();
    expect(worth.on).toBe(true);
    // 100 Mbit/s: the same window saves 26 ms, and pays.
    worth.observeWanRate(12.5e6);
    windowOf(worth, 100, 3300);
    expect(worth.on).toBe(true);
  });

  test('pages alike in their sample share a key; a sample of one repeated word names nothing', () => {
    const next = lcg(21);
    const page = randomPage(next);
    const like = Buffer.from(page);
    like.fill(0xab, 0, 64); // another header
    like.fill(0xcd, PAGE - 64); // and another end
    expect(resemblanceKey(page, 0)).not.toBe(0);
    expect(resemblanceKey(like, 0)).toBe(resemblanceKey(page, 0));
    const other = Buffer.from(page);
    other[RESEMBLANCE_AT + 5] ^= 1;
    expect(resemblanceKey(other, 0)).not.toBe(resemblanceKey(page, 0));
    // At an offset within a larger buffer, as a record's page is.
    const framed = Buffer.concat([Buffer.alloc(13), page]);
    expect(resemblanceKey(framed, 13)).toBe(resemblanceKey(page, 0));
    expect(resemblanceKey(Buffer.alloc(PAGE), 0)).toBe(0);
    expect(resemblanceKey(Buffer.alloc(PAGE, 0x5a), 0)).toBe(0);
  });

  test('the cache gives the entry last added with a key, holding that page, its content and its digest', () => {
    const cache = new ResemblanceCache(5000, PAGE);
    const next = lcg(22);
    const pages = Array.from({ length: 300 }, () => randomPage(next));
    const keys = pages.map((p) => resemblanceKey(p, 0));
    const digest = newDigestBuffer();
    const words = digestWords(digest);
    pages.forEach((p, page) => {
      digestOne(p, 0, PAGE, digest, 0);
      cache.add(keys[page], page, p, 0, words, 0);
    });
    let found = 0;
    keys.forEach((key, page) => {
      const entry = cache.find(key);
      // A later key of the same bucket may have taken its entry; a hit is always a page added with that key.
      if (entry < 0) return;
      const held = cache.pageOf(entry);
      expect(keys[held]).toBe(key);
      expect(cache.content().subarray(entry * PAGE, (entry + 1) * PAGE).equals(pages[held])).toBe(true);
      digestOne(pages[held], 0, PAGE, digest, 0);
      expect(Buffer.from(cache.digests.subarray(entry * DIGEST_BYTES, (entry + 1) * DIGEST_BYTES)).equals(digest)).toBe(true);
      if (held === page) found++;
    });
    expect(found).toBeGreaterThan(250);
    // Another page of the same key takes the entry: any page of a key serves.
    const like = Buffer.from(pages[0]);
    like.fill(1, 0, 16);
    cache.add(keys[0], 4000, like, 0, words, 0);
    expect(cache.pageOf(cache.find(keys[0]))).toBe(4000);
    expect(cache.find(0)).toBe(-1);
  });

  test('released at the end of a migration, the cache forgets every entry and its content serves the next cache, which starts empty', () => {
    const pool = new ReusedBuffers(64 * 1024 * 1024);
    const cache = new ResemblanceCache(5000, PAGE, pool);
    const next = lcg(23);
    const pages = Array.from({ length: 50 }, () => randomPage(next));
    const keys = pages.map((p) => resemblanceKey(p, 0));
    const words = digestWords(newDigestBuffer());
    pages.forEach((p, page) => cache.add(keys[page], page, p, 0, words, 0));
    const content = cache.content();
    expect(keys.filter((key) => cache.find(key) >= 0).length).toBeGreaterThan(40);
    cache.release();
    expect(keys.every((key) => cache.find(key) < 0)).toBe(true);
    expect(cache.content().length).toBe(0);
    // The next cache of that size takes the same memory, and holds none of what the last one did.
    expect(pool.idleByteCount).toBe(content.length);
    const later = new ResemblanceCache(5000, PAGE, pool);
    expect(keys.every((key) => later.find(key) < 0)).toBe(true);
    later.add(keys[0], 7, pages[0], 0, words, 0);
    expect(later.content().buffer).toBe(content.buffer);
    expect(later.pageOf(later.find(keys[0]))).toBe(7);
    expect(keys.slice(1).every((key) => later.find(key) < 0)).toBe(true);
    later.release();
  });

  test('the cache is bounded: no more entries than RESEMBLANCE_CACHE_PAGES, whatever the guest', () => {
    const cache = new ResemblanceCache(10_000_000, PAGE);
    const next = lcg(23);
    const page = randomPage(next);
    const words = new Uint32Array(4);
    for (let i = 0; i < 3 * RESEMBLANCE_CACHE_PAGES; i++) {
      page.writeUInt32LE(next(), RESEMBLANCE_AT);
      cache.add(resemblanceKey(page, 0), i, page, 0, words, 0);
    }
    expect(cache.content().length).toBe(RESEMBLANCE_CACHE_PAGES * PAGE);
    expect(cache.digests.length).toBe(RESEMBLANCE_CACHE_PAGES * DIGEST_BYTES);
  });
  test('while nothing resembles it keeps one key in QUIET_SAMPLE, and a key found brings every key back', () => {
    const cache = new ResemblanceCache(10_000_000, PAGE);
    const next = lcg(24);
    const page = randomPage(next);
    const words = new Uint32Array(4);
    const addNew = (i: number): number => {
      page.writeUInt32LE(next(), RESEMBLANCE_AT);
      const key = resemblanceKey(page, 0);
      cache.add(key, i, page, 0, words, 0);
      return key;
    };
    // QUIET_ADDS pages that nothing looked for found: each kept.
    for (let i = 0; i < QUIET_ADDS; i++) addNew(i);
    // Then a sample: of 4,000 more, about one in QUIET_SAMPLE is kept.
    const late = Array.from({ length: 4000 }, (_, i) => addNew(QUIET_ADDS + i));
    const keptLate = late.filter((key) => cache.find(key) >= 0).length;
    expect(keptLate).toBeGreaterThan(4000 / QUIET_SAMPLE / 2);
    expect(keptLate).toBeLessThan((4000 / QUIET_SAMPLE) * 2);
    // Those finds found keys: the next pages are kept, every one.
    const after = Array.from({ length: 200 }, (_, i) => addNew(QUIET_ADDS + 4000 + i));
    expect(after.filter((key) => cache.find(key) >= 0).length).toBeGreaterThan(195);
  });
});

describe('recent pages', () => {
  const pageOf = (n: number): Buffer => Buffer.alloc(PAGE, n & 0xff).fill(n >> 8, 0, 4);

  test('keeps the last version of each page stored, until as many newer pages have pushed it out, and drops one told stale', () => {
    const recent = new RecentPages(1000, PAGE, 4);
    const holds = (page: number, n: number): boolean => {
      const at = recent.find(page);
      return at >= 0 && recent.content.subarray(at, at + PAGE).equals(pageOf(n));
    };
    for (const p of [10, 11, 12]) recent.add(p, pageOf(p), 0);
    recent.used(); // Deltas against other pages keep coming
    recent.add(10, pageOf(99), 0); // a rewrite keeps its slot, with the new content
    expect(holds(10, 99)).toBe(true);
    expect(holds(11, 11)).toBe(true);
    recent.add(13, pageOf(13), 0);
    recent.add(14, Buffer.concat([Buffer.alloc(7), pageOf(14)]), 7); // the fifth page pushes out the oldest slot's
    expect(recent.find(10)).toBe(-1);
    expect(holds(11, 11) && holds(12, 12) && holds(13, 13) && holds(14, 14)).toBe(true);
    recent.forget(12);
    expect(recent.find(12)).toBe(-1);
    recent.used();
    recent.add(15, pageOf(15), 0);
    expect(holds(11, 11)).toBe(false); // 11 had the oldest slot left
    expect(holds(13, 13) && holds(14, 14) && holds(15, 15)).toBe(true);
    expect(recent.find(5000)).toBe(-1);
  });

  test('released, it forgets every page and keeps none stored later; its content goes back to the pool', () => {
    const pool = new ReusedBuffers(1024 * 1024);
    const recent = new RecentPages(1000, PAGE, 4, pool);
    for (const p of [1, 2, 3]) recent.add(p, pageOf(p), 0);
    const content = recent.content;
    recent.release();
    expect(pool.idleByteCount).toBe(4 * PAGE);
    expect([1, 2, 3].map((p) => recent.find(p))).toEqual([-1, -1, -1]);
    recent.used();
    recent.add(4, pageOf(4), 0);
    expect(recent.find(4)).toBe(-1);
    // The next one of that size takes the same memory, knowing none of those pages.
    const next = new RecentPages(1000, PAGE, 4, pool);
    expect(next.content.buffer).toBe(content.buffer);
    expect([1, 2, 3, 4].map((p) => next.find(p))).toEqual([-1, -1, -1, -1]);
    next.release();
  });

  test('stops copying once as many pages as it keeps were stored with no Delta naming another page, and starts again at the next', () => {
    const recent = new RecentPages(1000, PAGE, 4);
    for (const p of [1, 2, 3, 4]) recent.add(p, pageOf(p), 0);
    expect(recent.copying).toBe(false);
    recent.add(5, pageOf(5), 0); // not kept, and pushes nothing out
    recent.add(2, pageOf(99), 0); // rewritten meanwhile: its stale copy is forgotten
    expect([recent.find(5), recent.find(2)]).toEqual([-1, -1]);
    expect([1, 3, 4].every((p) => recent.find(p) >= 0)).toBe(true);
    recent.used();
    expect(recent.copying).toBe(true);
    recent.add(6, pageOf(6), 0);
    const at = recent.find(6);
    expect(at >= 0 && recent.content.subarray(at, at + PAGE).equals(pageOf(6))).toBe(true);
  });

  test('holds RECENT_PAGES pages at most, whatever the guest', () => {
    const recent = new RecentPages(3 * RECENT_PAGES, PAGE);
    const page = Buffer.alloc(PAGE);
    for (let p = 0; p < 3 * RECENT_PAGES; p++) {
      if (p % 1000 === 0) recent.used();
      recent.add(p, page, 0);
    }
    let kept = 0;
    for (let p = 0; p < 3 * RECENT_PAGES; p++) if (recent.find(p) >= 0) kept++;
    expect(kept).toBe(RECENT_PAGES);
    expect(recent.find(3 * RECENT_PAGES - 1)).toBeGreaterThanOrEqual(0);
    expect(recent.content.length).toBe(RECENT_PAGES * PAGE);
  });
});

describe('bases read ahead', () => {
  test('a multifd channel reads fewer Runs ahead the more channels share the store, never none', () => {
    const windows = (slots: number): number[] => [1, 4, 5, 6, 8, 10, 11, 12, 13, 16, 17, 64].map((channels) => runsWindow(channels, slots));
    expect(windows(64)).toEqual([12, 12, 10, 8, 6, 4, 3, 3, 2, 2, 1, 1]);
    expect(windows(32)).toEqual([12, 6, 4, 3, 2, 1, 1, 1, 1, 1, 1, 1]);
    // Every channel's window, its Run being read and one read in part fit the ranges a direct-I/O store
    // reads ahead (the native pool's own count) up to a third of that many channels.
    const slots = DirectPages.rangeSlots;
    expect(slots).toBeGreaterThanOrEqual(32);
    for (let channels = 1; channels <= Math.floor(slots / 3); channels++) expect(channels * (runsWindow(channels, slots) + 2)).toBeLessThanOrEqual(slots);
  });


  test('every base noted is read once, before its frame is rebuilt, with never more than BASES_WINDOW reads ahead of the frames rebuilt', () => {
    const issued: number[] = [];
    const ahead = new ReadsAhead(BASES_WINDOW, (indices, _counts, count) => void issued.push(...indices.subarray(0, count)));
    const noted = new Set<number>();
    const frames = 3000;
    // Bases noted a chunk at a time (a chunk of frames arrives), rebuilt one by one; some frames need no read.
    let seen = 0;
    for (let rebuilt = 0; rebuilt < frames; rebuilt++) {
      if (rebuilt === seen) {
        for (let k = 0; k < 700 && seen < frames; k++) {
          seen++;
          if (seen % 7 !== 0) {
            ahead.note(seen, 100000 + seen);
            noted.add(100000 + seen);
          }
        }
        ahead.advance(rebuilt);
      }
      const frame = rebuilt + 1;
      if (frame % 7 !== 0) expect(issued).toContain(100000 + frame);
      ahead.advance(frame);
      const inFlight = issued.filter((p) => p - 100000 > frame).length;
      expect(inFlight).toBeLessThanOrEqual(BASES_WINDOW);
    }
    expect(issued.length).toBe(noted.size);
    expect(new Set(issued).size).toBe(noted.size);
  });
});
