import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { RecordKind, StreamError, StreamParser, StreamWriter, type StreamRecord } from '../src/qemu';
import { StreamInspector } from '../src/qemu/inspect';
import { buildFixtures, type Fixture } from '../src/lab/harness/fixtures';

const FIXTURES = join(__dirname, '..', 'fixtures');
const fixtures = buildFixtures();

/** Parses `bytes` split into the given chunks; returns the rewrite and the outcome. */
function roundTrip(bytes: Buffer, cuts: number[]): { out: Buffer; error: StreamError | null; fallback: string | null; records: number } {
  const outParts: Buffer[] = [];
  const writer = new StreamWriter((b) => outParts.push(Buffer.from(b)), 1024);
  let records = 0;
  const parser = new StreamParser((r: StreamRecord) => {
    records++;
    writer.write(r);
  });
  let error: StreamError | null = null;
  try {
    let from = 0;
    for (const cut of [...cuts, bytes.length]) {
      parser.push(bytes.subarray(from, cut));
      from = cut;
    }
    parser.end();
  } catch (err) {
    if (!(err instanceof StreamError)) throw err;
    error = err;
  }
  writer.flush();
  return { out: Buffer.concat(outParts), error, fallback: parser.fallbackReason, records };
}

/** Bytes at each end of a page's payload cut at every offset: a chunk ending there holds all or none of it, or nearly. */
const PAGE_EDGE = 64;
/** Within a page's payload, between its edges, one offset in this many is a cut. */
const PAGE_INTERIOR_STRIDE = 61;

/**
 * The interiors of the whole pages' payloads, [start, end) each: a cut there leaves the payload split in
 * two, which the parser gathers the same way wherever the cut falls. Splitting a stream at every offset
 * is quadratic in its length and most of a fixture's bytes are pages: these offsets are sampled, every
 * other one (headers, device state, the pages' edges) is a cut.
 */
function pageInteriors(bytes: Buffer): [number, number][] {
  const interiors: [number, number][] = [];
  const parser = new StreamParser((r) => {
    if (r.kind === RecordKind.RamPage && r.data.buffer === bytes.buffer) {
      const start = r.data.byteOffset - bytes.byteOffset + r.dataStart;
      interiors.push([start + PAGE_EDGE, start + r.dataLength - PAGE_EDGE]);
    }
  });
  try {
    parser.push(bytes);
    parser.end();
  } catch (err) {
    if (!(err instanceof StreamError)) throw err;
  }
  return interiors;
}

/** The index in `interiors` of the one holding `cut`, or -1. */
function interiorOf(interiors: [number, number][], cut: number): number {
  return interiors.findIndex(([start, end]) => cut >= start && cut < end);
}

function checkOutcome(f: Fixture, result: ReturnType<typeof roundTrip>): void {
  const e = f.expect;
  if (e.outcome === 'error') {
    expect(result.error?.code).toBe(e.code);
    expect(result.error?.offset).toBe(e.offset);
  } else {
    expect(result.error).toBeNull();
    expect(result.out.equals(f.bytes)).toBe(true);
    if (e.outcome === 'fallback') expect(result.fallback).toContain(e.reasonIncludes);
    else expect(result.fallback).toBeNull();
  }
}

describe('hand-built fixtures', () => {
  test('fixtures/ holds exactly what src/lab/harness/fixtures.ts builds', () => {
    const manifest = JSON.parse(readFileSync(join(FIXTURES, 'manifest.json'), 'utf8')) as { file: string }[];
    expect(manifest.map((m) => m.file)).toEqual(fixtures.map((f) => `${f.name}.bin`));
    for (const f of fixtures) expect(readFileSync(join(FIXTURES, `${f.name}.bin`)).equals(f.bytes)).toBe(true);
  });

  test.each(fixtures.map((f) => [f.name, f] as const))('%s: parsed whole', (_name, f) => {
    checkOutcome(f, roundTrip(f.bytes, []));
  });

  test.each(fixtures.map((f) => [f.name, f] as const))('%s: split at every offset, and byte by byte', (_name, f) => {
    const interiors = pageInteriors(f.bytes);
    const interiorsCut = new Set<number>();
    for (let cut = 0; cut <= f.bytes.length; cut++) {
      const page = interiorOf(interiors, cut);
      if (page >= 0 && (cut - interiors[page][0]) % PAGE_INTERIOR_STRIDE !== 0) continue;
      checkOutcome(f, roundTrip(f.bytes, [cut]));
      if (page >= 0) interiorsCut.add(page);
    }
    // Sampled, not skipped: every page's interior was cut somewhere.
    expect(interiorsCut.size).toBe(interiors.length);
    checkOutcome(f, roundTrip(f.bytes, Array.from({ length: f.bytes.length }, (_, i) => i + 1)));
    // Three-way splits around every position near record boundaries exercise carried partial records.
    for (let cut = 1; cut + 7 < f.bytes.length; cut += 97) checkOutcome(f, roundTrip(f.bytes, [cut, cut + 3, cut + 7]));
  });

  test.each(fixtures.filter((f) => f.expect.outcome === 'ok').map((f) => [f.name, f] as const))('%s: inspector counts', (_name, f) => {
    const e = f.expect;
    if (e.outcome !== 'ok') throw new Error('unreachable');
    const inspector = new StreamInspector();
    inspector.push(f.bytes);
    const report = inspector.end();
    expect(report.identical).toBe(true);
    expect(report.complete).toBe(true);
    expect(report.framing).toBe(e.framing);
    expect(report.ram.records.normal).toBe(e.normal);
    expect(report.ram.records.zero).toBe(e.zero);
    expect(report.ram.records.xbzrle).toBe(e.xbzrle ?? 0);
    expect(report.ram.records.compressed).toBe(e.compressed ?? 0);
    expect(report.sections).toHaveLength(e.sections);
    expect(Object.values(report.bytesByKind).reduce((a, b) => a + b, 0)).toBe(f.bytes.length);
  });
});

describe('parser records', () => {
  test('pages carry block, offset and a view of the payload without copying whole pages', () => {
    const f = fixtures.find((x) => x.name === 'current-basic');
    if (!f) throw new Error('fixture missing');
    const seen: { block: string; offset: number; pageIndex: number; sameBuffer: boolean }[] = [];
    const parser = new StreamParser((r) => {
      if (r.kind === RecordKind.RamPage) {
        seen.push({ block: r.block.name, offset: r.offset, pageIndex: r.pageIndex, sameBuffer: r.data.buffer === f.bytes.buffer });
      }
    });
    parser.push(f.bytes);
    parser.end();
    expect(seen.map((s) => [s.block, s.offset, s.pageIndex])).toEqual([
      ['pc.ram', 0, 0],
      ['pc.ram', 8192, 2],
      ['0000:00:02.0/vga.vram', 0, 8],
      ['0000:00:02.0/vga.vram', 4096, 9],
      ['pc.ram', 0, 0],
    ]);
    expect(seen.every((s) => s.sameBuffer)).toBe(true);
  });

  test('a failed parser refuses more input with the same error', () => {
    const parser = new StreamParser(() => undefined);
    expect(() => parser.push(Buffer.from('nonsense'))).toThrow(StreamError);
    expect(() => parser.push(Buffer.from('QEVM'))).toThrow(/BAD_MAGIC/);
  });
});
