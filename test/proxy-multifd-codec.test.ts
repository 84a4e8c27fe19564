import { DIGEST_BYTES, digestOne } from '../src/digest';
import { MemoryPages, Rng } from '../src/lab/harness/fuzz';
import { dirty, guestMemory, type GuestMemory, patchPages } from '../src/lab/harness/migration-stream';
import { multifdInit, multifdMigration, multifdPacket, multifdRoundTrip, type MultifdFormat } from '../src/lab/harness/multifd-stream';
import { RebuildError } from '../src/proxy/rebuild-error';
import { DELTA_HEADER_BYTES, SIBLING_DELTA_LEAD_BYTES } from '../src/proxy/page-delta';
import { MultifdEncoder } from '../src/proxy/multifd-encoder';
import { Claim, MultifdMigration } from '../src/proxy/multifd-migration';
import { layoutOf, ReceiverTable, type SiblingPages } from '../src/proxy/retained';
import { newCounts } from '../src/proxy/transfer-counts';
import { EARLIER_BASES_PER_EPOCH, EpochStartPages } from '../src/proxy/epoch-start-pages';
import { MAX_RUN_HELD, RunError } from '../src/proxy/run';
import { StreamError } from '../src/qemu/errors';
import { RecordKind } from '../src/qemu/records';
import { MultifdParser, MultifdRecordKind } from '../src/qemu/multifd';
import { stores } from './multifd-stores';

const PAGE = 4096;


function digestOf(page: Buffer): Buffer {
  const d = Buffer.alloc(DIGEST_BYTES);
  digestOne(page, 0, PAGE, d, 0);
  return d;
}

/** Whether the store holds exactly `page` at `index`, by content and by digest. */
function holds(store: MemoryPages, index: number, page: Buffer): boolean {
  const read = Buffer.alloc(PAGE);
  store.readPages(index, 1, read, 0);
  return read.equals(page) && Buffer.from(store.digests.subarray(index * DIGEST_BYTES, (index + 1) * DIGEST_BYTES)).equals(digestOf(page));
}

const all = (memory: GuestMemory): number[] => memory.pages.map((_, i) => i);

/**
 * A store that records the lone pages asked for ahead (a Delta's base), those of them it held no version
 * of when asked, and which lone reads (inStream false) one of them covered.
 */
class LonePagesAskedAhead extends MemoryPages {
  readonly asked = new Set<number>();
  askedUnheld = 0;
  reads = 0;
  covered = 0;
  prefetchPages(indices: Uint32Array, count: number): void {
    for (let i = 0; i < count; i++) {
      this.asked.add(indices[i]);
      if (this.digests.subarray(indices[i] * DIGEST_BYTES, (indices[i] + 1) * DIGEST_BYTES).every((b) => b === 0)) this.askedUnheld++;
    }
  }
  override readPages(index: number, count: number, dest: Uint8Array, destStart: number, inStream?: boolean): void {
    if (inStream === false) {
      this.reads++;
      if (this.asked.has(index)) this.covered++;
    }
    super.readPages(index, count, dest, destStart);
  }
}

/** A store of the layout that holds nothing yet. */
function emptyStore(layout: ReturnType<typeof layoutOf>): MemoryPages {
  const store = new MemoryPages();
  store.begin(layout);
  return store;
}

/** A sender's store whose first write of each held page in a migration reads its old version (MemoryPages.journalled). */
function journalledPages(): MemoryPages {
  const store = new MemoryPages();
  store.journalled = true;
  return store;
}

/** Both sides' stores of the layout, the sender's journalled (journalledPages). */
function journalledStores(layout: ReturnType<typeof layoutOf>): { sender: MemoryPages; receiver: MemoryPages } {
  const sender = journalledPages();
  sender.begin(layout);
  const receiver = new MemoryPages();
  receiver.begin(layout);
  return { sender, receiver };
}

describe.each<MultifdFormat>(['qemu-7.2', 'qemu-10.0'])('multifd codec, %s packets', (format) => {
  /**
   * Versions of pages 9–11 of `memory` as QEMU 7.2 sends them around a repeated page 10 (each the held
   * version with a byte written at a few places), and packets of the format.
   */
  function repeatedPageParts(memory: GuestMemory): { nine: Buffer; tenFirst: Buffer; tenAgain: Buffer; eleven: Buffer; tenFinal: Buffer; packet: (n: number, pages: [number, Buffer][]) => Buffer; sync: (n: number) => Buffer } {
    const patched = (i: number, byte: number): Buffer => {
      const page = Buffer.from(memory.pages[i]);
      for (const at of [17, 900, 2500, 4000]) page[at] = byte;
      return page;
    };
    const [nine, tenFirst, tenAgain, eleven, tenFinal] = [patched(9, 1), patched(10, 2), patched(10, 3), patched(11, 4), patched(10, 5)];
    const packet = (n: number, pages: [number, Buffer][]): Buffer => multifdPacket({ format, block: 'pc.ram', packetNumber: n, pages: pages.map(([i, data]) => ({ offset: i * PAGE, data })) });
    const sync = (n: number): Buffer => multifdPacket({ format, packetNumber: n, block: '', pages: [], sync: true });
    return { nine, tenFirst, tenAgain, eleven, tenFinal, packet, sync };
  }

  test('rebuilds every channel byte for byte, and a second migration reuses the pages both stores keep', () => {
    const memory = guestMemory([['pc.ram', 1500], ['vga.vram', 300]], 11);
    const layout = layoutOf(memory.blocks);
    const { sender, receiver } = stores(memory);
    const first = multifdMigration(memory, { format, channels: 3, rounds: [all(memory)] });
    const one = multifdRoundTrip(first.channels, layout, { store: sender, reference: null }, receiver, { chunk: 10_000 });
    one.rebuilt.forEach((bytes, c) => expect(bytes.equals(first.channels[c])).toBe(true));
    const sum = (key: 'pagesSent' | 'pagesZero' | 'pagesReused', side: { counts: Record<typeof key, number> }[]): number => side.reduce((n, x) => n + x.counts[key], 0);
    expect(sum('pagesSent', one.encoders)).toBe(first.normalPages);
    expect(sum('pagesZero', one.decoders)).toBe(first.zeroPages);
    expect(sender.digests).toEqual(receiver.digests);

    // Back the other way and again: 10 % of the pages changed; the rest are rebuilt from the store.
    const changed = dirty(memory, 0.1, 5);
    const second = multifdMigration(memory, { format, channels: 3, rounds: [all(memory), changed] });
    const two = multifdRoundTrip(second.channels, layout, { store: sender, reference: sender.digests }, receiver, { chunk: 777 });
    two.rebuilt.forEach((bytes, c) => expect(bytes.equals(second.channels[c])).toBe(true));
    const reused = sum('pagesReused', two.encoders);
    expect(sum('pagesReused', two.decoders)).toBe(reused);
    expect(reused).toBeGreaterThan(0.8 * (first.normalPages));
    const wire = two.encoders.reduce((n, e) => n + e.sentBytes, 0);
    expect(wire).toBe(second.channels.reduce((n, b) => n + b.length, 0));
    memory.pages.forEach((page, i) => {
      if (format === 'qemu-10.0' || page.some((b) => b !== 0)) expect(holds(receiver, i, page)).toBe(true);
    });
    expect(sender.digests).toEqual(receiver.digests);
  });

  test('with PacketHeader frames, every packet’s header and offsets cross as one, a sixth of their size at most, rebuilt byte for byte wherever the chunks cut them', () => {
    const memory = guestMemory([['pc.ram', 1500], ['vga.vram', 300]], 12);
    const layout = layoutOf(memory.blocks);
    const { sender, receiver } = stores(memory);
    const first = multifdMigration(memory, { format, channels: 3, rounds: [all(memory)] });
    multifdRoundTrip(first.channels, layout, { store: sender, reference: null }, receiver, { chunk: 10_000, packetHeaders: true }).rebuilt.forEach((bytes, c) => expect(bytes.equals(first.channels[c])).toBe(true));
    const changed = dirty(memory, 0.05, 6);
    const second = multifdMigration(memory, { format, channels: 3, rounds: [all(memory), changed] });
    const packets = second.channels.map((bytes) => {
      let n = 0;
      const parser = new MultifdParser((r) => {
        if (r.kind === MultifdRecordKind.Packet) n++;
      });
      parser.push(bytes);
      return n;
    });
    // Chunks of 100 and 777 bytes cut most headers; reused input buffers are overwritten after each push.
    for (const chunk of [100, 777]) {
      const frames: { kind: string; payload: Buffer }[][] = [];
      const sending = sender.clone();
      const back = multifdRoundTrip(second.channels, layout, { store: sending, reference: sending.digests }, receiver.clone(), {
        chunk,
        reuseInput: true,
        packetHeaders: true,
        alterFrames: (c, sent) => (frames[c] = sent),
      });
      back.rebuilt.forEach((bytes, c) => expect(bytes.equals(second.channels[c])).toBe(true));
      frames.forEach((sent, c) => {
        const headers = sent.filter((f) => f.kind === 'header');
        expect(headers).toHaveLength(packets[c]);
        // Raw, 1,344 bytes. This guest's zero pages lie scattered among the others: its packets' offsets
        // come in runs of a few pages, a few bytes each.
        for (const h of headers) expect(h.payload.length).toBeLessThanOrEqual(1344 / 6);
        // What crosses as Literal bytes is the channel's first 64 bytes and the changed pages, no header.
        const literal = sent.filter((f) => f.kind === 'literal').reduce((n, f) => n + f.payload.length, 0);
        const pagesSent = back.encoders[c].counts.pagesSent;
        expect(literal).toBe(64 + pagesSent * PAGE);
      });
      const saved = back.encoders.reduce((n, e) => n + e.headerSavedBytes, 0);
      expect(back.decoders.reduce((n, d) => n + d.headerSavedBytes, 0)).toBe(saved);
      expect(saved).toBeGreaterThanOrEqual(packets.reduce((a, b) => a + b, 0) * (1344 - 1344 / 6));
    }
  });

  test('with Deltas taken on the channels, pages changed in a few bytes cross as Deltas against the version both sides hold, rebuilt byte for byte', () => {
    const memory = guestMemory([['pc.ram', 1500], ['vga.vram', 300]], 12);
    const layout = layoutOf(memory.blocks);
    const { sender, receiver } = journalledStores(layout);
    const first = multifdMigration(memory, { format, channels: 3, rounds: [all(memory)] });
    multifdRoundTrip(first.channels, layout, { store: sender, reference: null }, receiver, { chunk: 10_000, deltas: true });
    expect(sender.digests).toEqual(receiver.digests);
    // 64 bytes changed in 10% of the pages, and one page sent again in a later round.
    const changed = patchPages(memory, 0.1, 64, 13);
    const second = multifdMigration(memory, { format, channels: 3, rounds: [all(memory), changed] });
    const withoutDeltas = multifdRoundTrip(second.channels, layout, { store: sender.clone(), reference: sender.digests.slice() }, receiver.clone(), { chunk: 4321 });
    sender.newMigration();
    const two = multifdRoundTrip(second.channels, layout, { store: sender, reference: sender.digests }, receiver, { chunk: 4321, deltas: true });
    two.rebuilt.forEach((bytes, c) => expect(bytes.equals(second.channels[c])).toBe(true));
    const sum = (side: { counts: { pagesDelta: number; deltaBytes: number } }[], key: 'pagesDelta' | 'deltaBytes'): number => side.reduce((n, x) => n + x.counts[key], 0);
    const deltas = sum(two.encoders, 'pagesDelta');
    expect(sum(two.decoders, 'pagesDelta')).toBe(deltas);
    expect(sum(two.decoders, 'deltaBytes')).toBe(sum(two.encoders, 'deltaBytes'));
    // Before QEMU 9.0 a packet's first and last pages go whole (they may be a page QEMU sent twice).
    expect(deltas).toBeGreaterThan((format === 'qemu-10.0' ? 0.9 : 0.6) * changed.length);
    expect(sum(withoutDeltas.encoders, 'pagesDelta')).toBe(0);
    memory.pages.forEach((page, i) => {
      if (format === 'qemu-10.0' || page.some((b) => b !== 0)) expect(holds(receiver, i, page)).toBe(true);
    });
    expect(sender.digests).toEqual(receiver.digests);
    // What crossed: for each page that went whole before, a Delta under a tenth of its size.
    const whole = (trip: typeof two): number => trip.encoders.reduce((n, e) => n + e.counts.pagesSent, 0);
    expect(whole(withoutDeltas) - whole(two)).toBe(deltas);
    expect(sum(two.encoders, 'deltaBytes')).toBeLessThan(0.1 * deltas * PAGE);
  });

  describe('with SiblingDeltas taken on the channels', () => {
    /** A sibling's retained snapshot: its pages and digests, the lone reads made of it, and those asked for ahead. */
    class SiblingStore extends MemoryPages {
      readonly vm = 'sibling-a';
      readonly asked = new Set<number>();
      reads = 0;
      covered = 0;
      prefetchPages(indices: Uint32Array, count: number): void {
        for (let i = 0; i < count; i++) this.asked.add(indices[i]);
      }
      override readPages(index: number, count: number, dest: Uint8Array, destStart: number): void {
        this.reads++;
        if (this.asked.has(index)) this.covered++;
        super.readPages(index, count, dest, destStart);
      }
    }

    /**
     * A sibling's memory, retained, and a VM's whose first leg it serves: the VM shares 60% of the
     * sibling's pages in place and 10% elsewhere (page cache laid out differently); the rest are its own.
     */
    function siblings(): { memory: GuestMemory; sibling: SiblingStore; layout: ReturnType<typeof layoutOf>; shared: number } {
      const theirs = guestMemory([['pc.ram', 1200], ['vga.vram', 200]], 21);
      const memory = guestMemory([['pc.ram', 1200], ['vga.vram', 200]], 22);
      const layout = layoutOf(theirs.blocks);
      const sibling = new SiblingStore();
      sibling.begin(layout);
      theirs.pages.forEach((page, i) => sibling.writePage(i, page, 0, digestOf(page), 0));
      const rng = new Rng(23);
      let shared = 0;
      memory.pages.forEach((_, i) => {
        const roll = rng.below(10);
        const from = roll < 6 ? i : roll < 7 ? rng.below(theirs.pages.length) : -1;
        if (from < 0) return;
        memory.pages[i] = Buffer.from(theirs.pages[from]);
        if (memory.pages[i].some((b) => b !== 0)) shared++;
      });
      return { memory, sibling, layout, shared };
    }

    test("a first leg's pages that a sibling holds, anywhere in it, cross as references to it, rebuilt byte for byte and retained", () => {
      const { memory, sibling, layout, shared } = siblings();
      const { sender, receiver } = stores(memory);
      const migration = multifdMigration(memory, { format, channels: 3, rounds: [all(memory)] });
      const plain = multifdRoundTrip(migration.channels, layout, { store: sender.clone(), reference: null }, receiver.clone(), { chunk: 9000 });
      const trip = multifdRoundTrip(migration.channels, layout, { store: sender, reference: null }, receiver, { chunk: 9000, siblings: [sibling], readAhead: true });
      trip.rebuilt.forEach((bytes, c) => expect(bytes.equals(migration.channels[c])).toBe(true));
      const sum = (side: { counts: { pagesSibling: number; pagesSent: number; deltaBytes: number } }[], key: 'pagesSibling' | 'pagesSent' | 'deltaBytes'): number => side.reduce((n, x) => n + x.counts[key], 0);
      const referenced = sum(trip.encoders, 'pagesSibling');
      // Every shared page but those QEMU 7.2 sends as zero pages on the main channel, each a reference.
      expect(referenced).toBe(shared);
      expect(sum(trip.decoders, 'pagesSibling')).toBe(referenced);
      expect(sum(plain.encoders, 'pagesSibling')).toBe(0);
      expect(sum(plain.encoders, 'pagesSent') - sum(trip.encoders, 'pagesSent')).toBe(referenced);
      expect(sum(trip.encoders, 'deltaBytes')).toBe(referenced * (SIBLING_DELTA_LEAD_BYTES + DELTA_HEADER_BYTES));
      // Each sibling page was read once, and asked for ahead before that.
      expect(sibling.reads).toBe(referenced);
      expect(sibling.covered).toBe(referenced);
      memory.pages.forEach((page, i) => {
        if (format === 'qemu-10.0' || page.some((b) => b !== 0)) expect(holds(receiver, i, page)).toBe(true);
      });
      expect(sender.digests).toEqual(receiver.digests);
    });

    test('a sibling page that does not match its digest fails the migration and marks that sibling damaged', () => {
      const { memory, sibling, layout } = siblings();
      const { sender, receiver } = stores(memory);
      // The bytes of a page the VM shares in place change under the sibling's digest (a disk fault).
      const victim = memory.pages.findIndex((page, i) => page.some((b) => b !== 0) && holds(sibling, i, page) && i > 40);
      const damaged = Buffer.alloc(PAGE);
      sibling.readPages(victim, 1, damaged, 0);
      damaged[100] ^= 0x40;
      const digest = Buffer.from(sibling.digests.subarray(victim * DIGEST_BYTES, (victim + 1) * DIGEST_BYTES));
      sibling.writePage(victim, damaged, 0, digest, 0);
      const migration = multifdMigration(memory, { format, channels: 2, rounds: [all(memory)] });
      const damagedSiblings: SiblingPages[] = [];
      expect(() => multifdRoundTrip(migration.channels, layout, { store: sender, reference: null }, receiver, { siblings: [sibling], damagedSiblings })).toThrow(/does not match its digest/);
      expect(damagedSiblings).toEqual([sibling]);
    });
  });

  test("a back leg's Deltas have their bases read ahead: every lone read of one was asked for before it", () => {
    const memory = guestMemory([['pc.ram', 3000]], 16);
    const layout = layoutOf(memory.blocks);
    const sender = journalledPages();
    const receiver = new LonePagesAskedAhead();
    sender.begin(layout);
    receiver.begin(layout);
    multifdRoundTrip(multifdMigration(memory, { format, channels: 3, rounds: [all(memory)] }).channels, layout, { store: sender, reference: null }, receiver, { readAhead: true, deltas: true });
    patchPages(memory, 0.1, 64, 17);
    const second = multifdMigration(memory, { format, channels: 3, rounds: [all(memory)] });
    sender.newMigration();
    const [readsBefore, askedBefore] = [receiver.reads, receiver.asked.size];
    const trip = multifdRoundTrip(second.channels, layout, { store: sender, reference: sender.digests }, receiver, { chunk: 5000, readAhead: true, deltas: true });
    trip.rebuilt.forEach((bytes, c) => expect(bytes.equals(second.channels[c])).toBe(true));
    const deltas = trip.decoders.reduce((n, d) => n + d.counts.pagesDelta, 0);
    expect(deltas).toBeGreaterThan(100);
    expect(askedBefore).toBe(0); // a first leg has no Deltas
    expect(receiver.asked.size).toBe(deltas);
    // Every Delta's base was read alone, and asked for before that.
    expect(receiver.reads - readsBefore).toBe(deltas);
    expect(receiver.covered).toBe(deltas);
  });

  test("a back leg's Delta whose base its packet's Run has read ahead asks for no read of its own; every base read is covered all the same", () => {
    /** A store that reads ahead Runs' ranges and lone pages, and records which reads one of them covered. */
    class RangesAndPages extends MemoryPages {
      readonly ranges: [number, number][] = [];
      readonly lone = new Set<number>();
      readonly rangeSlots = 64;
      loneReads = 0;
      loneCovered = 0;
      prefetchRanges(starts: Uint32Array, counts: Uint32Array, count: number): void {
        for (let i = 0; i < count; i++) this.ranges.push([starts[i], counts[i]]);
      }
      prefetchPages(indices: Uint32Array, count: number): void {
        for (let i = 0; i < count; i++) this.lone.add(indices[i]);
      }
      override readPages(index: number, count: number, dest: Uint8Array, destStart: number, inStream?: boolean): void {
        if (inStream === false && count === 1) {
          this.loneReads++;
          if (this.lone.has(index) || this.ranges.some(([start, n]) => start <= index && index < start + n)) this.loneCovered++;
        }
        super.readPages(index, count, dest, destStart);
      }
    }
    const memory = guestMemory([['pc.ram', 6000]], 26);
    const layout = layoutOf(memory.blocks);
    const sender = journalledPages();
    const receiver = new RangesAndPages();
    sender.begin(layout);
    receiver.begin(layout);
    multifdRoundTrip(multifdMigration(memory, { format, channels: 3, rounds: [all(memory)] }).channels, layout, { store: sender, reference: null }, receiver, { readAhead: true, deltas: true });
    // Scattered changes of a few bytes: most follow a Run of held pages in their packet.
    patchPages(memory, 0.02, 64, 27);
    const second = multifdMigration(memory, { format, channels: 3, rounds: [all(memory)] });
    sender.newMigration();
    const trip = multifdRoundTrip(second.channels, layout, { store: sender, reference: sender.digests }, receiver, { chunk: 5000, readAhead: true, deltas: true });
    trip.rebuilt.forEach((bytes, c) => expect(bytes.equals(second.channels[c])).toBe(true));
    const deltas = trip.decoders.reduce((n, d) => n + d.counts.pagesDelta, 0);
    expect(deltas).toBeGreaterThan(50);
    // Each Delta's base read alone, once, and covered by a read ahead: its own, or its Run's range.
    expect(receiver.loneReads).toBe(deltas);
    expect(receiver.loneCovered).toBe(deltas);
    // Most were its Run's: at most the bases that follow no Run of theirs (a packet's first page) were asked alone.
    expect(receiver.lone.size).toBeLessThan(0.5 * deltas);
  });

  test.each([
    ['a damaged range', (p: Buffer) => void (p[p.length - 1] ^= 0x10), /does not rebuild the sender's page/],
    ['a base the receiver does not hold', (p: Buffer) => void (p[8] ^= 1), /does not hold/],
    ['another page', (p: Buffer) => void p.writeUInt32BE(p.readUInt32BE(0) + 1, 0), /the packet's next page is/],
  ])('a channel Delta with %s fails the migration', (_what, tamper, message) => {
    const memory = guestMemory([['pc.ram', 600]], 14);
    const layout = layoutOf(memory.blocks);
    const { sender, receiver } = journalledStores(layout);
    multifdRoundTrip(multifdMigration(memory, { format, channels: 2, rounds: [all(memory)] }).channels, layout, { store: sender, reference: null }, receiver, { deltas: true });
    patchPages(memory, 0.2, 32, 15);
    const second = multifdMigration(memory, { format, channels: 2, rounds: [all(memory)] });
    sender.newMigration();
    expect(() => multifdRoundTrip(second.channels, layout, { store: sender, reference: sender.digests }, receiver, { deltas: true, tamperDelta: tamper })).toThrow(message);
  });

  test('a back leg reads each Run’s pages ahead, a window at a time: the ranges asked for before the reads cover them, and little else', () => {
    /** A store that records the ranges asked for ahead, and which pages of its reads one of them covered. */
    class HintedPages extends MemoryPages {
      readonly asked: [number, number][] = [];
      readonly rangeSlots = 64;
      pagesRead = 0;
      pagesCovered = 0;
      prefetchRanges(starts: Uint32Array, counts: Uint32Array, count: number): void {
        for (let i = 0; i < count; i++) this.asked.push([starts[i], counts[i]]);
      }
      override readPages(index: number, count: number, dest: Uint8Array, destStart: number): void {
        this.pagesRead += count;
        for (let page = index; page < index + count; page++) if (this.asked.some(([start, n]) => start <= page && page < start + n)) this.pagesCovered++;
        super.readPages(index, count, dest, destStart);
      }
      /** Pages the ranges asked for hold, each counted as often as asked (a device reads them as often). */
      pagesAsked(): number {
        return this.asked.reduce((pages, [, n]) => pages + n, 0);
      }
    }
    // Enough packets for each channel that most of its Runs are read ahead after the first window of them
    // (MAX_RUNS_WINDOW) is rebuilt.
    const memory = guestMemory([['pc.ram', 16000], ['vga.vram', 1000]], 11, 0.05);
    const layout = layoutOf(memory.blocks);
    const sender = new MemoryPages();
    const receiver = new HintedPages();
    sender.begin(layout);
    receiver.begin(layout);
    const first = multifdMigration(memory, { format, channels: 3, rounds: [all(memory)] });
    multifdRoundTrip(first.channels, layout, { store: sender, reference: null }, receiver, { readAhead: true });
    expect(receiver.asked).toEqual([]); // a first leg has no Runs
    // Pages changed here and there, as on a guest's back leg: they cut their packets' Runs short.
    patchPages(memory, 0.02, 64, 12);
    const second = multifdMigration(memory, { format, channels: 3, rounds: [all(memory)] });
    const trip = multifdRoundTrip(second.channels, layout, { store: sender, reference: sender.digests }, receiver, { chunk: 5000, readAhead: true });
    trip.rebuilt.forEach((bytes, c) => expect(bytes.equals(second.channels[c])).toBe(true));
    const runs = trip.decoders.reduce((n, d) => n + d.counts.pagesReused, 0);
    expect(runs).toBeGreaterThan(0.85 * first.normalPages);
    // The Runs' pages (both blocks') were asked for before they were read. A packet's records span more
    // pages than they count (QEMU 7.2 sends zero pages on the main channel; 10.0 lists them among the
    // others, after); a Run reads as far as the store says its records lie, and a page that changed
    // since (a zero page now, or one no longer) puts that a page off, read when it comes.
    expect(receiver.pagesRead).toBeGreaterThan(0);
    expect(receiver.pagesCovered).toBeGreaterThan(0.99 * receiver.pagesRead);
    // And little else: where each Run asked for at least a packet's worth, the changed pages' short Runs
    // asked for 4 times the pages they read here, and a back leg's receiver 3.5 times what its Runs read
    // (docs/benchmarks.md, "Thirty-second session").
    expect(receiver.pagesAsked()).toBeLessThan(1.3 * receiver.pagesRead);
    for (const [, n] of receiver.asked) expect(n).toBeLessThanOrEqual(MAX_RUN_HELD);
    expect(receiver.asked.some(([start]) => start >= 16000)).toBe(true);
  });

  test.each([
    ['taken whole one after another (parked channels queue theirs)', { order: [2, 0, 1] }],
    ['interleaved', { interleave: true }],
  ])('rebuilds every channel byte for byte when each input buffer is read into again once pushed, %s', (_, shape) => {
    const memory = guestMemory([['pc.ram', 900], ['vga.vram', 100]], 17);
    const layout = layoutOf(memory.blocks);
    const { sender, receiver } = stores(memory);
    const first = multifdMigration(memory, { format, channels: 3, rounds: [all(memory)] });
    const one = multifdRoundTrip(first.channels, layout, { store: sender, reference: null }, receiver, { chunk: 6001, reuseInput: true, ...shape });
    one.rebuilt.forEach((bytes, c) => expect(bytes.equals(first.channels[c])).toBe(true));
    const changed = dirty(memory, 0.2, 9);
    const second = multifdMigration(memory, { format, channels: 3, rounds: [all(memory), changed] });
    const two = multifdRoundTrip(second.channels, layout, { store: sender, reference: sender.digests }, receiver, { chunk: 1234, reuseInput: true, ...shape });
    two.rebuilt.forEach((bytes, c) => expect(bytes.equals(second.channels[c])).toBe(true));
    expect(two.encoders.reduce((n, e) => n + e.counts.pagesReused, 0)).toBeGreaterThan(0.7 * first.normalPages);
    memory.pages.forEach((page, i) => {
      if (format === 'qemu-10.0' || page.some((b) => b !== 0)) expect(holds(receiver, i, page)).toBe(true);
    });
    expect(sender.digests).toEqual(receiver.digests);
  });

  test.each([
    ['the earlier channel first', [0, 1]],
    ['the later channel first', [1, 0]],
  ])('a page sent again on another channel after a SYNC ends in its final version on both sides, %s', (_, order) => {
    const memory = guestMemory([['pc.ram', 64]], 3, 0);
    const layout = layoutOf(memory.blocks);
    const oldPage = Buffer.alloc(PAGE, 0x11);
    const newPage = Buffer.alloc(PAGE, 0x22);
    const blockOf = { block: 'pc.ram', format };
    // Both stores hold the old version already, so the first send is a Run and the second is not.
    const { sender, receiver } = stores(memory);
    sender.writePage(5, oldPage, 0, digestOf(oldPage), 0);
    receiver.writePage(5, oldPage, 0, digestOf(oldPage), 0);
    const sync = (n: number): Buffer => multifdPacket({ format, packetNumber: n, block: '', pages: [], sync: true });
    const channels = [
      // Channel 0: page 5's old version (between two others: QEMU 7.2 may repeat a packet's first and
      // last page), then the SYNC of round 1; round 2 has nothing for it.
      Buffer.concat([multifdInit(0), multifdPacket({ ...blockOf, packetNumber: 0, pages: [4, 5, 6].map((i) => ({ offset: i * PAGE, data: i === 5 ? oldPage : memory.pages[i] })) }), sync(1), sync(4)]),
      // Channel 1: nothing in round 1; page 5's new version in round 2.
      Buffer.concat([multifdInit(1), sync(2), multifdPacket({ ...blockOf, packetNumber: 3, pages: [{ offset: 5 * PAGE, data: newPage }] }), sync(5)]),
    ];
    const trip = multifdRoundTrip(channels, layout, { store: sender, reference: sender.digests }, receiver, { chunk: 500, order });
    trip.rebuilt.forEach((bytes, c) => expect(bytes.equals(channels[c])).toBe(true));
    expect(trip.encoders[0].counts.pagesReused).toBe(1);
    expect(trip.encoders[1].counts.pagesSent).toBe(1);
    expect(holds(sender, 5, newPage)).toBe(true);
    expect(holds(receiver, 5, newPage)).toBe(true);
  });

  /**
   * Pages 8..12 held by both stores; in one epoch QEMU 7.2 sends page 10 twice, as packet 0's last page
   * (channel 0) and packet 1's first (channel 1); `repeat` is packet 1's copy. With `final`, a later epoch
   * sends page 10 once more (it was dirty again), on channel 0.
   */
  function repeatedPage(repeat: 'same' | 'rewritten', final: Buffer | null): { memory: GuestMemory; sender: MemoryPages; receiver: MemoryPages; channels: Buffer[] } {
    const memory = guestMemory([['pc.ram', 64]], 3, 0);
    const { sender, receiver } = stores(memory);
    for (const i of [8, 9, 10, 11, 12]) {
      sender.writePage(i, memory.pages[i], 0, digestOf(memory.pages[i]), 0);
      receiver.writePage(i, memory.pages[i], 0, digestOf(memory.pages[i]), 0);
    }
    const copy = repeat === 'same' ? memory.pages[10] : Buffer.alloc(PAGE, 0x33);
    const pages = (indexes: number[], page10: Buffer): { offset: number; data: Buffer }[] => indexes.map((i) => ({ offset: i * PAGE, data: i === 10 ? page10 : memory.pages[i] }));
    const sync = (n: number): Buffer => multifdPacket({ format, packetNumber: n, block: '', pages: [], sync: true });
    const later = (channel: number): Buffer[] =>
      final === null ? [] : [sync(2 + channel), ...(channel === 0 ? [multifdPacket({ format, block: 'pc.ram', packetNumber: 4, pages: [{ offset: 10 * PAGE, data: final }] })] : []), sync(5 + channel)];
    const channels = [
      Buffer.concat([multifdInit(0), multifdPacket({ format, block: 'pc.ram', packetNumber: 0, pages: pages([8, 9, 10], memory.pages[10]) }), ...later(0)]),
      Buffer.concat([multifdInit(1), multifdPacket({ format, block: 'pc.ram', packetNumber: 1, pages: pages([10, 11, 12], copy) }), ...later(1)]),
    ];
    return { memory, sender, receiver, channels };
  }

  test.each([
    // The sender reads packet 0's copy first and names it in a Run (the version both stores hold); the
    // receiver writes packet 1's copy over it before it rebuilds that Run, from the version it kept.
    ['whole, packet 0 first; decoded packet 1 first', [0, 1], [1, 0], false, 5],
    ['whole, packet 0 first; decoded in the same order', [0, 1], [0, 1], false, 5],
    ['whole, packet 1 first; decoded packet 0 first', [1, 0], [0, 1], false, 4],
    ['interleaved; decoded packet 1 first', [0, 1], [1, 0], true, 4],
    ['interleaved the other way; decoded packet 0 first', [1, 0], [0, 1], true, 4],
  ])('a page QEMU 7.2 sends twice in one epoch, rewritten in between, is rebuilt exactly and ends in its final version on both sides: channels read %s', (_, order, decodeOrder, interleave, reused) => {
    const final = Buffer.alloc(PAGE, 0x44);
    const { memory, sender, receiver, channels } = repeatedPage('rewritten', final);
    const trip = multifdRoundTrip(channels, layoutOf(memory.blocks), { store: sender, reference: sender.digests }, receiver, { chunk: 1000, order, decodeOrder, interleave });
    trip.rebuilt.forEach((bytes, c) => expect(bytes.equals(channels[c])).toBe(true));
    // Pages 8, 9, 11 and 12, and packet 0's copy of page 10 when the sender read it first; never the
    // rewritten copy, nor the first copy's version once the page was rewritten, nor the final one.
    expect(trip.encoders.reduce((n, e) => n + e.counts.pagesReused, 0)).toBe(reused);
    expect(trip.decoders.reduce((n, d) => n + d.counts.pagesReused, 0)).toBe(reused);
    // Read after the rewritten copy, packet 0's is no longer what the receiver holds: sent, not unordered.
    expect(trip.encoders.reduce((n, e) => n + e.counts.pagesUnordered, 0)).toBe(0);
    // Neither copy of the repeated page outlives the later epoch's version, whatever order they came in.
    for (const store of [sender, receiver]) expect(holds(store, 10, final)).toBe(true);
    expect(sender.digests).toEqual(receiver.digests);
  });

  test.each([
    ['whole, in the same order', [0, 1], [0, 1], false],
    ['whole, decoded in the opposite order', [0, 1], [1, 0], false],
    ['interleaved, decoded in the opposite order', [1, 0], [0, 1], true],
  ])('both copies of a page QEMU 7.2 sends twice in one epoch, unchanged, are named in Runs: channels read %s', (_, order, decodeOrder, interleave) => {
    const { memory, sender, receiver, channels } = repeatedPage('same', null);
    const trip = multifdRoundTrip(channels, layoutOf(memory.blocks), { store: sender, reference: sender.digests }, receiver, { chunk: 1000, order, decodeOrder, interleave });
    trip.rebuilt.forEach((bytes, c) => expect(bytes.equals(channels[c])).toBe(true));
    expect(trip.encoders.reduce((n, e) => n + e.counts.pagesSent, 0)).toBe(0);
    expect(trip.decoders.reduce((n, d) => n + d.counts.pagesReused, 0)).toBe(6);
    for (const store of [sender, receiver]) expect(holds(store, 10, memory.pages[10])).toBe(true);
  });

  /** The orders the two channels around a page QEMU 7.2 repeats are read and decoded in: [what, order, decodeOrder, interleave]. */
  const REPEATED_PAGE_ORDERS: [string, number[], number[], boolean][] = [
    ['whole, packet 0 first; decoded packet 1 first', [0, 1], [1, 0], false],
    ['whole, packet 1 first; decoded packet 0 first', [1, 0], [0, 1], false],
    ['interleaved; decoded packet 1 first', [0, 1], [1, 0], true],
  ];

  test.each(REPEATED_PAGE_ORDERS)('with Deltas on the channels, a page QEMU 7.2 sends twice in one epoch goes whole and the pages around it as Deltas, rebuilt exactly: channels read %s', (_, order, decodeOrder, interleave) => {
    const memory = guestMemory([['pc.ram', 64]], 3, 0);
    const layout = layoutOf(memory.blocks);
    const sender = journalledPages();
    const receiver = new MemoryPages();
    sender.begin(layout);
    receiver.begin(layout);
    for (const i of [8, 9, 10, 11, 12]) {
      sender.writePage(i, memory.pages[i], 0, digestOf(memory.pages[i]), 0);
      receiver.writePage(i, memory.pages[i], 0, digestOf(memory.pages[i]), 0);
    }
    sender.newMigration();
    const { nine, tenFirst, tenAgain, eleven, tenFinal, packet, sync } = repeatedPageParts(memory);
    const channels = [
      Buffer.concat([multifdInit(0), packet(0, [[8, memory.pages[8]], [9, nine], [10, tenFirst]]), sync(2), packet(4, [[10, tenFinal]]), sync(5)]),
      Buffer.concat([multifdInit(1), packet(1, [[10, tenAgain], [11, eleven], [12, memory.pages[12]]]), sync(3), sync(6)]),
    ];
    const trip = multifdRoundTrip(channels, layout, { store: sender, reference: sender.digests }, receiver, { chunk: 1000, order, decodeOrder, interleave, deltas: true });
    trip.rebuilt.forEach((bytes, c) => expect(bytes.equals(channels[c])).toBe(true));
    // Pages 9 and 11; never page 10, a packet's last and the next one's first.
    expect(trip.encoders.reduce((n, e) => n + e.counts.pagesDelta, 0)).toBe(2);
    expect(trip.decoders.reduce((n, d) => n + d.counts.pagesDelta, 0)).toBe(2);
    for (const store of [sender, receiver]) {
      expect(holds(store, 9, nine)).toBe(true);
      expect(holds(store, 10, tenFinal)).toBe(true);
      expect(holds(store, 11, eleven)).toBe(true);
    }
    expect(sender.digests).toEqual(receiver.digests);
  });

  test.each(REPEATED_PAGE_ORDERS)('with Deltas against other pages on the channels, before QEMU 9.0 none goes against a page QEMU may send twice in the epoch: channels read %s', (_, order, decodeOrder, interleave) => {
    const memory = guestMemory([['pc.ram', 64]], 5, 0);
    const layout = layoutOf(memory.blocks);
    const { sender, receiver } = journalledStores(layout);
    const { nine, tenFirst, tenAgain, eleven, tenFinal, packet, sync } = repeatedPageParts(memory);
    // Page 10 ends packet 0 and starts packet 1 (QEMU < 9.0 repeating it); pages 21, 22 and 25 repeat 10's
    // first copy, 9 and 11, each in the middle of a later packet of the epoch.
    const channels = [
      Buffer.concat([multifdInit(0), packet(0, [[8, memory.pages[8]], [9, nine], [10, tenFirst]]), packet(2, [[20, memory.pages[20]], [21, tenFirst], [22, nine], [23, memory.pages[23]]]), sync(4), packet(6, [[10, tenFinal]]), sync(7)]),
      Buffer.concat([multifdInit(1), packet(1, [[10, tenAgain], [11, eleven], [12, memory.pages[12]]]), packet(3, [[24, memory.pages[24]], [25, eleven], [26, memory.pages[26]]]), sync(5), sync(8)]),
    ];
    const trip = multifdRoundTrip(channels, layout, { store: sender, reference: new Uint8Array(layout.pageCount * DIGEST_BYTES) }, receiver, { chunk: 1000, order, decodeOrder, interleave, matches: true });
    trip.rebuilt.forEach((bytes, c) => expect(bytes.equals(channels[c])).toBe(true));
    // 22 against 9, 25 against 11; 21 goes whole (its match, page 10, may be overwritten in the epoch).
    expect(trip.encoders.reduce((n, e) => n + e.counts.pagesMatched, 0)).toBe(2);
    expect(trip.decoders.reduce((n, d) => n + d.counts.pagesMatched, 0)).toBe(2);
    for (const store of [sender, receiver]) {
      for (const [i, page] of [[21, tenFirst], [22, nine], [25, eleven], [10, tenFinal]] as const) expect(holds(store, i, page)).toBe(true);
    }
    expect(sender.digests).toEqual(receiver.digests);
  });

  test('a channel waits at a SYNC until every channel has reached it', () => {
    const memory = guestMemory([['pc.ram', 8]], 3, 0);
    const migration = new MultifdMigration(null, 2);
    migration.begin(layoutOf(memory.blocks));
    const sync = multifdPacket({ format, packetNumber: 0, block: '', pages: [], sync: true });
    const literal: number[] = [0, 0];
    const [a, b] = [0, 1].map((c) => new MultifdEncoder({ literal: (bytes) => (literal[c] += bytes.length), run: () => undefined }, migration));
    a.push(Buffer.concat([multifdInit(0), sync, sync]));
    expect(a.parked).toBe(true);
    expect(literal[0]).toBe(64 + sync.length);
    b.push(multifdInit(1));
    expect(a.parked).toBe(true);
    b.push(sync);
    // b passed the first SYNC (a was there already, so b goes on): a reads on to its second and waits.
    expect(literal[0]).toBe(64 + 2 * sync.length);
    expect([a.parked, b.parked]).toEqual([true, false]);
    b.push(sync);
    expect([a.parked, b.parked]).toEqual([false, false]);
  });

  test('with a timer, a channel past a SYNC also waits for the main channel’s EOS of the new epoch (QEMU 7.2), until it comes or the timer fires', () => {
    const memory = guestMemory([['pc.ram', 8]], 3, 0);
    const migration = new MultifdMigration(null, 1);
    migration.begin(layoutOf(memory.blocks));
    const timers: { ms: number; step: () => void }[] = [];
    migration.wakeAfter = (ms, step) => timers.push({ ms, step });
    const sync = (n: number): Buffer => multifdPacket({ format, packetNumber: n, block: '', pages: [], sync: true });
    const channel = new MultifdEncoder({ literal: () => undefined, run: () => undefined }, migration);
    // Setup: the SYNC, then the main channel's first EOS (its epochs are counted by EOS records).
    channel.push(Buffer.concat([multifdInit(0), sync(0)]));
    expect(channel.parked).toBe(false);
    migration.mainRecord(RecordKind.RamEos);
    // The next SYNC comes before the main channel's EOS: the channel waits for it, one timer set.
    channel.push(sync(1));
    expect(channel.parked).toBe(true);
    expect(timers).toHaveLength(1);
    migration.mainRecord(RecordKind.RamEos);
    expect(channel.parked).toBe(false);
    // Again, and this time the EOS does not come: the timer lets the channel go.
    channel.push(sync(2));
    expect([channel.parked, timers.length]).toEqual([true, 2]);
    timers[0].step(); // a stale timer (of the epoch before) lets nothing go
    expect(channel.parked).toBe(true);
    timers[1].step();
    expect(channel.parked).toBe(false);
    // Without a timer (QEMU 10.0's MULTIFD_FLUSH may stay in QEMU's buffer) nobody waits for the main channel.
    migration.wakeAfter = null;
    channel.push(sync(3));
    expect(channel.parked).toBe(false);
  });

  test('pages the receiver holds, read while the main channel is behind their epoch, go whole and are counted unordered', () => {
    const memory = guestMemory([['pc.ram', 8]], 3, 0);
    const layout = layoutOf(memory.blocks);
    const { sender } = stores(memory);
    for (const i of [0, 1, 2, 3]) sender.writePage(i, memory.pages[i], 0, digestOf(memory.pages[i]), 0);
    const migration = new MultifdMigration(sender, 1);
    migration.begin(layout);
    migration.receiverTable = new ReceiverTable(sender.digests);
    const timers: (() => void)[] = [];
    migration.wakeAfter = (_ms, step) => timers.push(step);
    const sync = (n: number): Buffer => multifdPacket({ format, packetNumber: n, block: '', pages: [], sync: true });
    const packet = (n: number, indexes: number[]): Buffer => multifdPacket({ format, packetNumber: n, block: 'pc.ram', pages: indexes.map((i) => ({ offset: i * PAGE, data: memory.pages[i] })) });
    const runs: Buffer[] = [];
    const channel = new MultifdEncoder({ literal: () => undefined, run: (payload) => runs.push(payload) }, migration);
    channel.push(Buffer.concat([multifdInit(0), sync(0)]));
    migration.mainRecord(RecordKind.RamEos);
    // The next epoch's main-channel EOS is late: the wait runs out, and pages 0 and 1 cross whole.
    channel.push(sync(1));
    expect(timers).toHaveLength(1);
    timers[0]();
    channel.push(packet(2, [0, 1]));
    expect(channel.counts).toMatchObject({ pagesSent: 2, pagesUnordered: 2, pagesReused: 0 });
    // Once the EOS is in, held pages are named in a Run again.
    migration.mainRecord(RecordKind.RamEos);
    channel.push(packet(3, [2, 3]));
    channel.end(() => undefined);
    expect(channel.counts).toMatchObject({ pagesSent: 2, pagesUnordered: 2, pagesReused: 2 });
    expect(runs).toHaveLength(1);
  });

  test('a channel that closes while it waits at its last SYNC ends once the others reach it', () => {
    const memory = guestMemory([['pc.ram', 8]], 3, 0);
    const migration = new MultifdMigration(null, 2);
    migration.begin(layoutOf(memory.blocks));
    const sync = multifdPacket({ format, packetNumber: 0, block: '', pages: [], sync: true });
    const [a, b] = [0, 1].map(() => new MultifdEncoder({ literal: () => undefined, run: () => undefined }, migration));
    const ended: string[] = [];
    a.push(Buffer.concat([multifdInit(0), sync]));
    a.end(() => ended.push('a'));
    expect(ended).toEqual([]);
    b.push(multifdInit(1));
    b.push(sync);
    expect(ended).toEqual(['a']);
    b.end(() => ended.push('b'));
    expect(ended).toEqual(['a', 'b']);
    expect(a.sentBytes).toBe(64 + sync.length);
  });
});

/** A guest whose pages repeat (`copies`) and resemble (`alike`: 16 bytes changed) earlier ones, as page cache and heaps do. */
function repetitiveMemory(): { memory: GuestMemory; copies: number; alike: number } {
  const memory = guestMemory([['pc.ram', 1600]], 41);
  const rng = new Rng(42);
  let copies = 0;
  let alike = 0;
  for (let i = 1; i < memory.pages.length; i++) {
    const roll = rng.below(10);
    if (roll >= 4) continue;
    const from = memory.pages[rng.below(i)];
    if (from.every((b) => b === 0)) continue;
    memory.pages[i] = Buffer.from(from);
    if (roll < 2) {
      copies++;
      continue;
    }
    for (let k = 0; k < 16; k++) memory.pages[i][rng.below(PAGE)] ^= 1 + rng.below(255);
    alike++;
  }
  return { memory, copies, alike };
}

describe('Deltas against other pages of the epoch on the channels', () => {

  test.each([
    ['decoded in the order sent', {}],
    ['decoded last channel first', { decodeOrder: [2, 1, 0] }],
    ['read interleaved, decoded last channel first', { interleave: true, decodeOrder: [2, 0, 1] }],
  ])("a first leg's pages that repeat or resemble another page sent in the epoch cross as Deltas against it, rebuilt byte for byte: %s", (_how, order) => {
    const { memory, copies, alike } = repetitiveMemory();
    const layout = layoutOf(memory.blocks);
    const sender = new MemoryPages();
    const receiver = new LonePagesAskedAhead();
    sender.begin(layout);
    receiver.begin(layout);
    const migration = multifdMigration(memory, { format: 'qemu-10.0', channels: 3, rounds: [all(memory)], leadingSync: true });
    const empty = (): Uint8Array => new Uint8Array(layout.pageCount * DIGEST_BYTES);
    const plain = multifdRoundTrip(migration.channels, layout, { store: sender.clone(), reference: empty() }, receiver.clone(), { chunk: 7000, ...order });
    const trip = multifdRoundTrip(migration.channels, layout, { store: sender, reference: empty() }, receiver, { chunk: 7000, matches: true, readAhead: true, ...order });
    trip.rebuilt.forEach((bytes, c) => expect(bytes.equals(migration.channels[c])).toBe(true));
    const sum = (side: { counts: { pagesMatched: number; pagesDelta: number; pagesSent: number } }[], key: 'pagesMatched' | 'pagesDelta' | 'pagesSent'): number => side.reduce((n, x) => n + x.counts[key], 0);
    const matched = sum(trip.encoders, 'pagesMatched');
    const deltas = sum(trip.encoders, 'pagesDelta');
    expect(sum(trip.decoders, 'pagesMatched')).toBe(matched);
    expect(sum(trip.decoders, 'pagesDelta')).toBe(deltas);
    // Nearly every copy finds its original, nearly every page alike one like it (a slot of the cache may
    // hold another page by then).
    expect(matched).toBeGreaterThan(0.9 * copies);
    expect(deltas).toBeGreaterThan(0.5 * alike);
    expect(sum(plain.encoders, 'pagesMatched') + sum(plain.encoders, 'pagesDelta')).toBe(0);
    expect(sum(plain.encoders, 'pagesSent') - sum(trip.encoders, 'pagesSent')).toBe(matched + deltas);
    // Their bases come from the pages the channels stored last, in memory; from the store only before
    // the first such Delta has had the receiver keep them.
    expect(receiver.reads).toBeLessThan(0.05 * (matched + deltas));
    // Each channel's frames are all seen before any is rebuilt, so no base of the leg was held when its
    // Delta was seen: it asked for none (a page still to be written, read ahead, is a read of the device
    // for nothing), and read from the store those it needed before the recent pages were kept.
    expect(receiver.reads).toBeGreaterThan(0);
    expect(receiver.asked.size).toBe(0);
    expect(receiver.askedUnheld).toBe(0);
    memory.pages.forEach((page, i) => expect(holds(receiver, i, page)).toBe(true));
    expect(sender.digests).toEqual(receiver.digests);
  });

  test.each([
    ['decoded in the order sent', undefined],
    ['decoded last channel first', [2, 1, 0]],
  ])('with the main channel a whole epoch ahead, zeroing every page, each Delta still goes against the version of its epoch: %s', (_how, decodeOrder) => {
    const { memory } = repetitiveMemory();
    const layout = layoutOf(memory.blocks);
    const { sender, receiver } = stores(memory);
    const migration = multifdMigration(memory, { format: 'qemu-10.0', channels: 3, rounds: [all(memory)], leadingSync: true });
    const zero = Buffer.alloc(PAGE);
    const trip = multifdRoundTrip(migration.channels, layout, { store: sender, reference: new Uint8Array(layout.pageCount * DIGEST_BYTES) }, receiver, {
      matches: true,
      decodeOrder,
      beforeDecode: (receiving) => {
        // The channels' pages are of epoch 1 (after their leading SYNC); the main channel reaches epoch 2.
        receiving.mainRecord(RecordKind.RamEos);
        receiving.mainRecord(RecordKind.RamEos);
        for (const page of all(memory)) if (receiving.mainPageReceived(page) !== Claim.Stale) receiver.writePage(page, zero, 0, digestOf(zero), 0);
      },
    });
    trip.rebuilt.forEach((bytes, c) => expect(bytes.equals(migration.channels[c])).toBe(true));
    expect(trip.decoders.reduce((n, d) => n + d.counts.pagesMatched + d.counts.pagesDelta, 0)).toBeGreaterThan(300);
    for (const page of all(memory)) expect(holds(receiver, page, zero)).toBe(true);
  });

  test("QEMU 7.2 packets: pages away from a packet's ends go against other pages away from them", () => {
    const { memory, copies } = repetitiveMemory();
    const layout = layoutOf(memory.blocks);
    const { sender, receiver } = stores(memory);
    const migration = multifdMigration(memory, { format: 'qemu-7.2', channels: 3, rounds: [all(memory)], leadingSync: true });
    const trip = multifdRoundTrip(migration.channels, layout, { store: sender, reference: new Uint8Array(layout.pageCount * DIGEST_BYTES) }, receiver, { matches: true, decodeOrder: [2, 1, 0] });
    trip.rebuilt.forEach((bytes, c) => expect(bytes.equals(migration.channels[c])).toBe(true));
    const matched = trip.encoders.reduce((n, e) => n + e.counts.pagesMatched, 0);
    expect(trip.decoders.reduce((n, d) => n + d.counts.pagesMatched, 0)).toBe(matched);
    // A packet's two ends are 2 of its pages (QEMU 7.2's packets here hold 128): most copies still match.
    expect(matched).toBeGreaterThan(0.8 * copies);
    memory.pages.forEach((page, i) => {
      if (page.some((b) => b !== 0)) expect(holds(receiver, i, page)).toBe(true);
    });
  });
});

describe("Deltas against other pages' versions of earlier epochs (QEMU 7.2 syncs the channels after every RAM section)", () => {
  /** Rounds of `size` pages each, as QEMU 7.2's short epochs slice a first leg. */
  const slices = (memory: GuestMemory, size: number): number[][] => {
    const rounds: number[][] = [];
    for (let at = 0; at < memory.pages.length; at += size) rounds.push(all(memory).slice(at, at + size));
    return rounds;
  };

  test.each<[MultifdFormat, readonly number[]]>([
    ['qemu-10.0', [2, 1, 0]],
    ['qemu-7.2', [2, 1, 0]],
    ['qemu-10.0', [0, 1, 2]],
  ])("%s packets, epochs of 64 pages, decoded in the order %j: a page like one of an earlier epoch goes against it, rebuilt byte for byte", (format, decodeOrder) => {
    const { memory } = repetitiveMemory();
    const layout = layoutOf(memory.blocks);
    const shape = { format, channels: 3, rounds: slices(memory, 64), pagesPerPacket: 16 };
    const trip = (earlierBases: boolean): ReturnType<typeof multifdRoundTrip> => {
      const { sender, receiver } = stores(memory);
      const migration = multifdMigration(memory, shape);
      const result = multifdRoundTrip(migration.channels, layout, { store: sender, reference: new Uint8Array(layout.pageCount * DIGEST_BYTES) }, receiver, { chunk: 5000, matches: true, earlierBases, decodeOrder });
      result.rebuilt.forEach((bytes, c) => expect(bytes.equals(migration.channels[c])).toBe(true));
      memory.pages.forEach((page, i) => {
        // QEMU 7.2 sends zero pages on the main channel, which this round trip leaves out.
        if (format === 'qemu-10.0' || page.some((b) => b !== 0)) expect(holds(receiver, i, page)).toBe(true);
      });
      return result;
    };
    const sameEpoch = trip(false);
    const earlier = trip(true);
    const elsewhere = (side: { counts: { pagesMatched: number; pagesDelta: number } }[]): number => side.reduce((n, x) => n + x.counts.pagesMatched + x.counts.pagesDelta, 0);
    expect(elsewhere(earlier.decoders)).toBe(elsewhere(earlier.encoders));
    const againstEarlier = earlier.encoders.reduce((n, e) => n + e.earlierBaseDeltas, 0);
    expect(sameEpoch.encoders.reduce((n, e) => n + e.earlierBaseDeltas, 0)).toBe(0);
    // Most pages' originals were sent in an earlier epoch: they go against them now.
    expect(againstEarlier).toBeGreaterThan(200);
    expect(elsewhere(earlier.encoders)).toBeGreaterThan(elsewhere(sameEpoch.encoders) + 0.9 * againstEarlier);
  });

  /**
   * Epoch 0: page 15 (A) on channel 1. Epoch 1: page 21 on channel 0 holds A's old content, and channel 1
   * writes A anew. The sending gateway reads page 21 first (its chunks end at the SYNC), so the page goes
   * against A's old version; the receiving gateway rebuilds channel 1 first, and A's new version is in
   * its store before page 21's Delta is rebuilt.
   */
  function overwrittenBase(format: MultifdFormat): { channels: Buffer[]; firstChunk: number; memory: GuestMemory; newA: Buffer } {
    const memory = guestMemory([['pc.ram', 32]], 77, 0);
    // Nothing like the old version, nor any other page: it goes whole, and does not wait for page 21.
    const newA = guestMemory([['pc.ram', 1]], 78, 0).pages[0];
    memory.pages[21] = Buffer.from(memory.pages[15]);
    const packet = (n: number, pages: [number, Buffer][]): Buffer => multifdPacket({ format, block: 'pc.ram', packetNumber: n, pages: pages.map(([i, data]) => ({ offset: i * PAGE, data })) });
    const sync = (n: number): Buffer => multifdPacket({ format, packetNumber: n, block: '', pages: [], sync: true });
    const range = (from: number, to: number): [number, Buffer][] => all(memory).slice(from, to).map((i) => [i, memory.pages[i]]);
    const epoch0 = [Buffer.concat([multifdInit(0), packet(0, range(0, 10)), sync(2)]), Buffer.concat([multifdInit(1), packet(1, range(10, 20)), sync(3)])];
    const channels = [
      Buffer.concat([epoch0[0], packet(4, [[20, memory.pages[20]], [21, memory.pages[21]], [22, memory.pages[22]]]), sync(6)]),
      Buffer.concat([epoch0[1], packet(5, [[23, memory.pages[23]], [15, newA], [24, memory.pages[24]]]), sync(7)]),
    ];
    memory.pages[15] = newA;
    return { channels, firstChunk: epoch0[0].length, memory, newA };
  }

  test.each<MultifdFormat>(['qemu-10.0', 'qemu-7.2'])('%s: a base written again in the epoch on another channel, rebuilt there first, is kept for the Delta (KeepVersion)', (format) => {
    const { channels, firstChunk, memory } = overwrittenBase(format);
    expect(channels[1].length - firstChunk).toBe(channels[0].length - firstChunk);
    const layout = layoutOf(memory.blocks);
    const { sender, receiver } = stores(memory);
    const trip = multifdRoundTrip(channels, layout, { store: sender, reference: new Uint8Array(layout.pageCount * DIGEST_BYTES) }, receiver, {
      chunk: firstChunk,
      interleave: true,
      matches: true,
      earlierBases: true,
      decodeOrder: [1, 0],
    });
    trip.rebuilt.forEach((bytes, c) => expect(bytes.equals(channels[c])).toBe(true));
    expect(trip.encoders[0].earlierBaseDeltas).toBe(1);
    expect(trip.decoders[0].counts.pagesMatched).toBe(1);
    expect(trip.encoders[1].versionsKept).toBe(1);
    for (let i = 0; i < 25; i++) expect(holds(receiver, i, memory.pages[i])).toBe(true);
  });

  test.each<[MultifdFormat, string]>([
    ['qemu-10.0', 'other content'],
    ['qemu-7.2', 'other content'],
    ['qemu-10.0', 'a zero page of the packet'],
  ])("%s: a base marked after its rewrite's packet began is kept all the same (KeepVersion with the page, not only at its packet's start), rewritten as %s", (format, rewrite) => {
    const memory = guestMemory([['pc.ram', 32]], 79, 0);
    const oldA = memory.pages[15];
    const zeroed = rewrite.startsWith('a zero');
    const newA = zeroed ? Buffer.alloc(PAGE) : guestMemory([['pc.ram', 1]], 80, 0).pages[0];
    memory.pages[21] = Buffer.from(oldA);
    const packet = (n: number, pages: [number, Buffer][]): Buffer =>
      multifdPacket({ format, block: 'pc.ram', packetNumber: n, pages: pages.filter(([, data]) => data.some((b) => b !== 0)).map(([i, data]) => ({ offset: i * PAGE, data })), zeroOffsets: pages.filter(([, data]) => data.every((b) => b === 0)).map(([i]) => i * PAGE) });
    const sync = (n: number): Buffer => multifdPacket({ format, packetNumber: n, block: '', pages: [], sync: true });
    const range = (from: number, to: number): [number, Buffer][] => all(memory).slice(from, to).map((i) => [i, memory.pages[i]]);
    const epoch0 = [Buffer.concat([multifdInit(0), packet(0, range(0, 10)), sync(2)]), Buffer.concat([multifdInit(1), packet(1, range(10, 20)), sync(3)])];
    // Channel 0: pages 20, 21 (A's old content), 22, 26. Channel 1: pages 23, 24, A anew, 25 (a zero page
    // goes after the normal ones, in the packet's header).
    const channels = [
      Buffer.concat([epoch0[0], packet(4, [[20, memory.pages[20]], [21, memory.pages[21]], [22, memory.pages[22]], [26, memory.pages[26]]]), sync(6)]),
      Buffer.concat([epoch0[1], packet(5, [[23, memory.pages[23]], [24, memory.pages[24]], [15, newA], [25, memory.pages[25]]]), sync(7)]),
    ];
    memory.pages[15] = newA;
    const layout = layoutOf(memory.blocks);
    const { sender, receiver } = stores(memory);
    const header = channels[0].indexOf(memory.pages[20]) - epoch0[0].length;
    // Channel 1 reads its packet's header and two pages first; then channel 0 its header and two pages
    // (page 21 goes against A's old version); then channel 1 page 15, A's new version.
    const cut = epoch0[0].length + header + 2 * PAGE + 10;
    const trip = multifdRoundTrip(channels, layout, { store: sender, reference: new Uint8Array(layout.pageCount * DIGEST_BYTES) }, receiver, { cuts: [epoch0[0].length, cut], interleave: true, order: [1, 0], matches: true, earlierBases: true, decodeOrder: [1, 0] });
    trip.rebuilt.forEach((bytes, c) => expect(bytes.equals(channels[c])).toBe(true));
    expect(trip.encoders[0].earlierBaseDeltas).toBe(1);
    expect(trip.encoders[1].versionsKept).toBe(1);
    for (let i = 0; i < 27; i++) expect(holds(receiver, i, memory.pages[i])).toBe(true);
  });

  test('without the KeepVersion frame the same Delta fails its digest check: no wrong byte is rebuilt', () => {
    const { channels, firstChunk, memory } = overwrittenBase('qemu-10.0');
    const layout = layoutOf(memory.blocks);
    const { sender, receiver } = stores(memory);
    const options = { chunk: firstChunk, interleave: true, matches: true, earlierBases: true, decodeOrder: [1, 0], dropKeepVersions: true };
    expect(() => multifdRoundTrip(channels, layout, { store: sender, reference: new Uint8Array(layout.pageCount * DIGEST_BYTES) }, receiver, options)).toThrow(/Delta from a version of page 15 this store does not hold/);
  });
});

describe("the main channel's KeepVersion frames (QEMU 7.2 sends zero pages on it)", () => {
  /** A receiving side with page 5 held, its main channel in epoch 1, and channels at the SYNCs given. */
  function receiving(syncs: number[]): { migration: MultifdMigration; page: Buffer } {
    const memory = guestMemory([['pc.ram', 16]], 5, 0);
    const layout = layoutOf(memory.blocks);
    const store = emptyStore(layout);
    store.writePage(5, memory.pages[5], 0, digestOf(memory.pages[5]), 0);
    const migration = new MultifdMigration(store, syncs.length);
    migration.begin(layout);
    for (const at of syncs) migration.join({ counts: newCounts(), fallback: null, syncs: at, synchronising: true, parked: false, retainedAll: false, mayReadOn: () => false, unpark: () => undefined });
    migration.mainRecord(RecordKind.RamEos);
    return { migration, page: memory.pages[5] };
  }

  test('with every channel in its epoch, the version held is kept for the epoch', () => {
    const { migration, page } = receiving([1, 1, 2]);
    migration.keepVersionOnMain(5);
    expect(migration.epochStart?.version(5, 1)?.equals(page)).toBe(true);
  });

  test('not with a channel behind it (the write is kept as overtaken), nor once every channel is past it', () => {
    for (const syncs of [[0, 1], [2, 2]]) {
      const { migration } = receiving(syncs);
      migration.keepVersionOnMain(5);
      expect(migration.epochStart?.version(5, 1) ?? null).toBeNull();
    }
  });

  test('a receiver keeps what a sender may ask in an epoch, each page once however often asked, and refuses more', () => {
    const pages = EARLIER_BASES_PER_EPOCH + 2;
    const memory = guestMemory([['pc.ram', pages]], 8, 0);
    const layout = layoutOf(memory.blocks);
    const store = emptyStore(layout);
    memory.pages.forEach((page, i) => store.writePage(i, page, 0, digestOf(page), 0));
    const kept = new EpochStartPages(store);
    for (let i = 0; i < EARLIER_BASES_PER_EPOCH; i++) kept.keep(i, 3, null, true);
    kept.keep(0, 3, null, true);
    expect(kept.version(7, 3)?.equals(memory.pages[7])).toBe(true);
    expect(() => kept.keep(EARLIER_BASES_PER_EPOCH, 3, null, true)).toThrow(RebuildError);
    // The next epoch starts over.
    kept.keep(EARLIER_BASES_PER_EPOCH + 1, 4, null, true);
    expect(kept.version(EARLIER_BASES_PER_EPOCH + 1, 4)?.equals(memory.pages[EARLIER_BASES_PER_EPOCH + 1])).toBe(true);
    expect(kept.version(7, 3)).toBeNull();
  });

  test('the sender asks for one before a main-channel write of a base a channel went against in that epoch, and only then', () => {
    const memory = guestMemory([['pc.ram', 16]], 6, 0);
    const migration = new MultifdMigration(null, 1);
    migration.begin(layoutOf(memory.blocks));
    migration.mainRecord(RecordKind.RamEos);
    migration.wentAgainstEarlier(5, 1);
    expect(migration.mainWriteKeeps(5)).toBe(true);
    expect(migration.mainWriteKeeps(6)).toBe(false);
    migration.mainRecord(RecordKind.RamEos);
    expect(migration.mainWriteKeeps(5)).toBe(false);
  });
});

describe('a main channel a whole epoch ahead of the channels (QEMU 7.2 sends zero pages on it)', () => {
  /**
   * The source sends an epoch's pages on the channels, their SYNCs, then the main channel's next epoch,
   * which may zero a page a channel just carried. The sending gateway read them in that order and named
   * the page in a channel's Run; the receiving gateway reads the main channel first (its connection
   * carries little and arrives early): the main channel's write of the page in the later epoch is kept
   * there before the channel's Run of the earlier one is rebuilt.
   */
  test.each([
    ['in a Run', 0],
    ['as the base of a Delta', 32],
  ])('a page it overwrites that a channel names %s is rebuilt from the version the sender named', (_how, patchBytes) => {
    const memory = guestMemory([['pc.ram', 400]], 31);
    const layout = layoutOf(memory.blocks);
    const { sender, receiver } = journalledStores(layout);
    multifdRoundTrip(multifdMigration(memory, { format: 'qemu-7.2', channels: 2, rounds: [all(memory)] }).channels, layout, { store: sender, reference: null }, receiver, { deltas: true });
    // Back: the pages as both sides hold them (as Runs), a few changed in 32 bytes (as Deltas).
    const patched = patchBytes > 0 ? new Set(patchPages(memory, 0.2, patchBytes, 33)) : new Set<number>();
    const back = multifdMigration(memory, { format: 'qemu-7.2', channels: 2, rounds: [all(memory)] });
    // Pages the main channel zeroes in the next epoch: held ones named in Runs, or changed ones sent as Deltas.
    const zeroed = all(memory).filter((i) => memory.pages[i].some((b) => b !== 0) && (patchBytes === 0 || patched.has(i))).filter((_, k) => k % 7 === 3 && k > 7);
    expect(zeroed.length).toBeGreaterThan(3);
    const zero = Buffer.alloc(PAGE);
    sender.newMigration();
    const trip = multifdRoundTrip(back.channels, layout, { store: sender, reference: sender.digests }, receiver, {
      deltas: true,
      beforeDecode: (receiving) => {
        // What the receiving main channel's codec does with its next epoch's marker and zero pages.
        receiving.mainRecord(RecordKind.RamEos);
        for (const page of zeroed) if (receiving.mainPageReceived(page) !== Claim.Stale) receiver.writePage(page, zero, 0, digestOf(zero), 0);
      },
    });
    trip.rebuilt.forEach((bytes, c) => expect(bytes.equals(back.channels[c])).toBe(true));
    const named = (key: 'pagesReused' | 'pagesDelta'): number => trip.decoders.reduce((n, d) => n + d.counts[key], 0);
    expect(named(patchBytes === 0 ? 'pagesReused' : 'pagesDelta')).toBeGreaterThan(zeroed.length);
    // The later version stays: the channels' older writes of those pages are dropped.
    for (const page of zeroed) expect(holds(receiver, page, zero)).toBe(true);
  });
});

describe('multifd codec under mutated input', () => {
  /** Every outcome allowed: rejected with a typed error, or rebuilt byte for byte. Anything else fails. */
  test.each([
    ['', false, false, false],
    [', with Deltas on the channel (a mutated page is a changed page)', true, false, false],
    [', with a sibling holding every page (a first leg: pages moved by a mutated offset are found elsewhere in it)', false, true, false],
    [', a first leg in epochs of 25 pages whose pages repeat earlier epochs\' (Deltas against them)', false, false, true],
  ])('never crashes and never rebuilds a byte wrong%s', (_how, deltas, withSibling, earlier) => {
    const memory = guestMemory([['pc.ram', 400]], 21);
    if (earlier) for (let i = 100; i < 400; i += 3) memory.pages[i] = Buffer.from(memory.pages[(i * 7) % 100]);
    const layout = layoutOf(memory.blocks);
    const seedStores = stores(memory);
    seedStores.sender.journalled = deltas;
    let deltaPages = 0;
    let againstEarlier = 0;
    const rounds = earlier ? Array.from({ length: 16 }, (_, r) => all(memory).slice(r * 25, r * 25 + 25)) : [all(memory)];
    const base = multifdMigration(memory, { format: 'qemu-10.0', channels: 1, rounds, pagesPerPacket: 16 });
    multifdRoundTrip(base.channels, layout, { store: seedStores.sender, reference: null }, seedStores.receiver);
    const sibling: SiblingPages = Object.assign(seedStores.receiver.clone(), { vm: 'sibling' });
    let siblingPages = 0;
    const rng = new Rng(0x5eed);
    let rebuilt = 0;
    let rejected = 0;
    for (let i = 0; i < 300; i++) {
      const input = Buffer.from(base.channels[0]);
      const edits = 1 + rng.below(4);
      for (let e = 0; e < edits; e++) {
        const at = rng.below(input.length);
        // Mostly in headers and offsets, where the length fields are.
        const inHeader = rng.below(3) > 0 ? at - (at % (320 + 128 * 8 + 16 * PAGE)) + rng.below(320 + 128 * 8) : at;
        input[Math.min(inHeader, input.length - 1)] = rng.below(4) === 0 ? 0xff : rng.below(256);
      }
      const cut = rng.below(3) === 0 ? input.subarray(0, rng.below(input.length)) : input;
      const sender = seedStores.sender.clone();
      const receiver = seedStores.receiver.clone();
      try {
        sender.newMigration();
        const chunk = 1 + rng.below(9000);
        const trip = withSibling
          ? multifdRoundTrip([cut], layout, { store: sender, reference: null }, emptyStore(layout), { chunk, siblings: [sibling], readAhead: rng.below(2) === 0 })
          : earlier
            ? multifdRoundTrip([cut], layout, { store: emptyStore(layout), reference: new Uint8Array(layout.pageCount * DIGEST_BYTES) }, emptyStore(layout), { chunk, matches: true, earlierBases: true })
            : multifdRoundTrip([cut], layout, { store: sender, reference: sender.digests }, receiver, { chunk, deltas });
        expect(trip.rebuilt[0].equals(cut)).toBe(true);
        deltaPages += trip.decoders[0].counts.pagesDelta;
        againstEarlier += trip.encoders[0].earlierBaseDeltas;
        siblingPages += trip.decoders[0].counts.pagesSibling;
        rebuilt++;
      } catch (err) {
        if (!(err instanceof StreamError || err instanceof RebuildError || err instanceof RunError)) throw err;
        rejected++;
      }
    }
    expect(rebuilt).toBeGreaterThan(0);
    expect(rejected).toBeGreaterThan(0);
    if (deltas) expect(deltaPages).toBeGreaterThan(0);
    if (withSibling) expect(siblingPages).toBeGreaterThan(0);
    if (earlier) expect(againstEarlier).toBeGreaterThan(0);
  });

  test('pages moved to other offsets across channels, read in any order, are rebuilt exactly or rejected', () => {
    const memory = guestMemory([['pc.ram', 300]], 23);
    const layout = layoutOf(memory.blocks);
    const seedStores = stores(memory);
    const before = multifdMigration(memory, { format: 'qemu-7.2', channels: 2, rounds: [all(memory)], pagesPerPacket: 8 });
    multifdRoundTrip(before.channels, layout, { store: seedStores.sender, reference: null }, seedStores.receiver);
    const changed = dirty(memory, 0.2, 9);
    const base = multifdMigration(memory, { format: 'qemu-7.2', channels: 2, rounds: [all(memory), changed], pagesPerPacket: 8 });
    const rng = new Rng(0xc0ffee);
    const packetBytes = 320 + 128 * 8;
    // Where each channel's offset slots in use are.
    const slots = base.channels.map((channel) => {
      const at: number[] = [];
      const parser = new MultifdParser((r) => {
        if (r.kind === MultifdRecordKind.Packet) for (let k = 0; k < r.normalPages + r.zeroPages; k++) at.push(r.streamOffset + 320 + 8 * k);
      });
      parser.push(channel);
      return at;
    });
    let moved = 0;
    let rebuilt = 0;
    for (let i = 0; i < 100; i++) {
      const channels = base.channels.map((c) => Buffer.from(c));
      for (let e = 0; e < 1 + rng.below(6); e++) {
        const c = rng.below(2);
        // A page moved to another page of the block (perhaps one the other channel sends in the same
        // epoch), or a byte anywhere flipped.
        if (rng.below(3) > 0) {
          channels[c].writeUInt32BE(rng.below(300) * PAGE, rng.pick(slots[c]) + 4);
          moved++;
        } else {
          channels[c][64 + rng.below(channels[c].length - 64)] ^= 1 + rng.below(255);
        }
      }
      const sender = seedStores.sender.clone();
      const receiver = seedStores.receiver.clone();
      try {
        const order = rng.below(2) === 0 ? [0, 1] : [1, 0];
        const decodeOrder = rng.below(2) === 0 ? [0, 1] : [1, 0];
        const trip = multifdRoundTrip(channels, layout, { store: sender, reference: sender.digests }, receiver, { chunk: 256 + rng.below(packetBytes * 3), order, decodeOrder });
        trip.rebuilt.forEach((bytes, c) => expect(bytes.equals(channels[c])).toBe(true));
        rebuilt++;
      } catch (err) {
        if (!(err instanceof StreamError || err instanceof RebuildError || err instanceof RunError)) throw err;
      }
    }
    expect(moved).toBeGreaterThan(100);
    expect(rebuilt).toBeGreaterThan(0);
  });
});
