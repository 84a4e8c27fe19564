/**
 * RamRecordWalk: where the whole pages of a read lie, said before the parser reads it, from the walk
 * through the reads before (or, once lost, from the parser's position after the read before).
 */
import { guestMemory, migrationStream, dirty, PAGE } from '../src/lab/harness/migration-stream';
import { StreamParser } from '../src/qemu/parser';
import { RamRecordWalk } from '../src/qemu/pages-ahead';
import { type RamBlock, RecordKind } from '../src/qemu/records';

/** A pseudo-random generator, so that a failing cut can be replayed. */
function lcg(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

interface WalkResult {
  /** Pages the walk named, each checked against the parser's record at that place. */
  named: number;
  /** Page records lying whole in a read, and of those the ones the walk named before that read was parsed. */
  whole: number;
  wrong: string[];
  /** Reads, and those the walk had been through before the parser read them. */
  reads: number;
  walked: number;
  /** Pages whose data two reads hold, found by the parser, and of those the ones the walk said so of. */
  straddling: number;
  straddlingNamed: number;
}

/**
 * Cuts `stream` into reads of sizes from `sizes`, and for each read: walks it (before the parser has
 * read it), then parses it, then, if the walk is lost, starts it again at the parser's last RAM record,
 * as StreamEncoder does.
 */
function walkAlongside(stream: Buffer, sizes: () => number): WalkResult {
  const blocks = new Map<string, RamBlock>();
  const walk = new RamRecordWalk(PAGE, (name) => blocks.get(name) ?? null);
  let current: Buffer | null = null;
  let lastRamEnd = -1;
  let lastBlock: RamBlock | null = null;
  const seen = new Map<number, number>(); // data offset in the read -> page, for page records whose data the parser found whole in it
  let straddler: { page: number; bytes: Buffer } | null = null; // a page record completed in the read whose data began in the one before
  const parser = new StreamParser((r) => {
    if (r.kind === RecordKind.RamBlockList) {
      for (const b of r.blocks) blocks.set(b.name, b);
      walk.lose();
    }
    if (r.kind === RecordKind.RamPage || r.kind === RecordKind.RamZero) {
      lastRamEnd = parser.offset;
      lastBlock = r.block;
      if (r.kind === RecordKind.RamPage && r.data === current) seen.set(r.dataStart, r.pageIndex);
      else if (r.kind === RecordKind.RamPage) straddler = { page: r.pageIndex, bytes: Buffer.from(r.data.subarray(r.dataStart, r.dataStart + PAGE)) };
    }
  });
  const dataAt = new Uint32Array(64);
  const pages = new Uint32Array(64);
  const result: WalkResult = { named: 0, whole: 0, wrong: [], reads: 0, walked: 0, straddling: 0, straddlingNamed: 0 };
  let previous: Buffer | null = null;
  for (let at = 0; at < stream.length; ) {
    const read = Buffer.from(stream.subarray(at, Math.min(stream.length, at + sizes())));
    result.reads++;
    if (walk.synced) result.walked++;
    const count = walk.walk(read, dataAt, pages);
    // A page the walk says began in the read before: put together as the retainer does.
    const said =
      walk.straddledPage >= 0 && previous !== null
        ? { page: walk.straddledPage, bytes: Buffer.concat([previous.subarray(walk.straddledFrom, walk.straddledFrom + walk.straddledBefore), read.subarray(0, PAGE - walk.straddledBefore)]) }
        : null;
    current = read;
    seen.clear();
    straddler = null;
    parser.push(read);
    result.whole += seen.size;
    const found = straddler as { page: number; bytes: Buffer } | null;
    if (found !== null) result.straddling++;
    if (said !== null) {
      if (found === null || found.page !== said.page || !found.bytes.equals(said.bytes)) result.wrong.push(`read at ${at}: page ${said.page} said to begin in the read before, the parser found ${found?.page ?? 'none'}`);
      else result.straddlingNamed++;
    }
    previous = read;
    for (let i = 0; i < count; i++) {
      result.named++;
      if (seen.get(dataAt[i]) !== pages[i]) result.wrong.push(`read at ${at}: page ${pages[i]} at ${dataAt[i]}, the parser found ${seen.get(dataAt[i]) ?? 'no page'} there`);
    }
    if (!walk.synced && lastBlock !== null && lastRamEnd >= at && lastRamEnd <= at + read.length) walk.resync(read, lastRamEnd - at, lastBlock);
    at += read.length;
  }
  parser.end();
  return result;
}

describe('RamRecordWalk', () => {
  const memory = guestMemory([['pc.ram', 640], ['vga.vram', 64]], 5, 0.3);
  const stream = migrationStream(memory, [dirty(memory, 0.2, 6), dirty(memory, 0.05, 7)]);

  test.each([
    ['256 KiB reads', 256 * 1024, 0],
    ['reads of 1 to 64 KiB', 1, 64 * 1024],
    ['reads of two pages and a bit', 2 * PAGE + 3, 0],
  ])('names only pages the parser finds there, and nearly all whole pages of each read: %s', (_name, least, spread) => {
    const random = lcg(least + spread);
    const result = walkAlongside(stream, () => least + Math.floor(random() * spread));
    expect(result.wrong).toEqual([]);
    // Lost only where the stream is not RAM records (its start, the device state) and for the read after
    // each loss: nearly every page lying whole in a read was named before the read was parsed.
    expect(result.whole).toBeGreaterThan(300);
    expect(result.named).toBeGreaterThan(result.whole * 0.9);
    // Pages whose data two reads hold: said of nearly every one, and put together right (above).
    expect(result.straddling).toBeGreaterThan(5);
    expect(result.straddlingNamed).toBeGreaterThan(result.straddling * 0.8);
  });

  test('reads that cut every record head (7 to 300 bytes): the walk pieces the heads together and stays on the records', () => {
    const random = lcg(7);
    const result = walkAlongside(stream, () => 7 + Math.floor(random() * 293));
    expect(result.wrong).toEqual([]);
    expect(result.reads).toBeGreaterThan(10_000);
    expect(result.walked).toBeGreaterThan(result.reads * 0.95);
  });

  test('QEMU 10 streams: SWITCHOVER_START and a postcopy package lose it, and the parser finds it again', () => {
    const shaped = migrationStream(memory, [dirty(memory, 0.2, 8), dirty(memory, 0.1, 9)], { machine: 'pc-i440fx-10.0', switchoverStart: true, postcopyAt: 1 });
    const random = lcg(11);
    const result = walkAlongside(shaped, () => 20_000 + Math.floor(random() * 100_000));
    expect(result.wrong).toEqual([]);
    expect(result.named).toBeGreaterThan(result.whole * 0.8);
  });

  test('a walk that meets no RAM record is lost, and names nothing', () => {
    const walk = new RamRecordWalk(PAGE, () => null);
    const dataAt = new Uint32Array(64);
    const pages = new Uint32Array(64);
    expect(walk.walk(stream, dataAt, pages)).toBe(0); // never synced
    // A record naming a block the stream did not list.
    walk.resync(Buffer.alloc(0), 0, { index: 0, name: 'pc.ram', length: 640 * PAGE, firstPage: 0, pages: 640 });
    const named = Buffer.concat([Buffer.from([0, 0, 0, 0, 0, 0, 0, 0x08, 3]), Buffer.from('rom'), Buffer.alloc(PAGE)]);
    expect(walk.walk(named, dataAt, pages)).toBe(0);
    expect(walk.synced).toBe(false);
    // A page past its block's end.
    walk.resync(Buffer.alloc(0), 0, { index: 0, name: 'pc.ram', length: PAGE, firstPage: 0, pages: 1 });
    const past = Buffer.concat([Buffer.from([0, 0, 0, 0, 0, 0, 0x10, 0x28]), Buffer.alloc(PAGE)]);
    expect(walk.walk(past, dataAt, pages)).toBe(0);
    expect(walk.synced).toBe(false);
  });
});
