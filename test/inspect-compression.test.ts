/**
 * `bfmig inspect`'s compression ratio: the stream's Literal bytes (all but zero-page records) through
 * the sending gateway's zstd batches, counted as the frames they become.
 */
import { Readable } from 'node:stream';
import { inspectSource } from '../src/cli/inspect';
import { copiesWithHeaders, guestMemory, migrationStream, PAGE } from '../src/lab/harness/migration-stream';

const LAYOUT: [string, number][] = [['pc.ram', 512], ['vga.vram', 32]];

async function inspect(stream: Buffer): Promise<Awaited<ReturnType<typeof inspectSource>>> {
  // Chunks that cut records anywhere, as a socket or a file read would.
  const chunks: Buffer[] = [];
  for (let at = 0; at < stream.length; at += 10_007) chunks.push(stream.subarray(at, at + 10_007));
  return inspectSource(Readable.from(chunks));
}

describe('bfmig inspect: compression ratio', () => {
  test('pseudo-random pages do not shrink: the frames cost the Literal bytes and little more', async () => {
    const memory = guestMemory(LAYOUT, 7, 0.3);
    const report = await inspect(migrationStream(memory, []));
    expect(report.identical).toBe(true);
    // Every byte but the zero-page records goes as Literal.
    expect(report.compression.literalBytes).toBe(report.bytes - report.bytesByKind.ramZeroPages);
    expect(report.compression.ratio).toBeGreaterThan(0.98);
    expect(report.compression.ratio).toBeLessThan(1.01);
  });

  test('pages of text shrink, and zero pages do not count', async () => {
    const memory = guestMemory(LAYOUT, 7, 0.3);
    const text = Buffer.from('INSERT INTO accounts (id, owner, balance) VALUES (42, "ada", 1000);\n'.repeat(64)).subarray(0, PAGE);
    memory.pages.forEach((page, i) => {
      if (page.some((b) => b !== 0)) {
        text.copy(page);
        page.writeUInt32LE(i, 0); // every page its own
      }
    });
    const report = await inspect(migrationStream(memory, []));
    const nonZero = memory.pages.filter((p) => p.some((b) => b !== 0)).length;
    expect(report.ram.records.normal).toBe(nonZero);
    expect(report.compression.literalBytes).toBe(report.bytes - report.bytesByKind.ramZeroPages);
    expect(report.compression.literalBytes).toBeGreaterThan(nonZero * (PAGE + 8));
    expect(report.compression.ratio).toBeLessThan(0.1);
  });

  test('a first leg with deltas: pages alike go as deltas, and what is left is what zstd is given', async () => {
    const memory = guestMemory(LAYOUT, 8, 0.3);
    const copies = copiesWithHeaders(memory, 0, 256, 200);
    const report = await inspect(migrationStream(memory, []));
    const d = report.firstLegDeltas;
    expect(d.error).toBeUndefined();
    expect(d.carriedPages).toBe(report.ram.records.normal);
    expect(d.deltaPages).toBeGreaterThanOrEqual(copies.length);
    expect(d.share).toBeCloseTo(d.deltaPages / d.carriedPages);
    // A copy differs from its page in its 16-byte header: a few ranges besides the Delta's 40-byte header.
    expect(d.meanDeltaBytes).toBeLessThan(80);
    expect(d.compression.literalBytes).toBeLessThan(report.compression.literalBytes - 0.95 * copies.length * PAGE);
    expect(d.compression.ratio).toBeGreaterThan(0.98);
  });

  test('pseudo-random pages: nothing alike, a first leg with deltas carries them all whole', async () => {
    const report = await inspect(migrationStream(guestMemory(LAYOUT, 7, 0.3), []));
    expect(report.firstLegDeltas.error).toBeUndefined();
    expect(report.firstLegDeltas.deltaPages).toBe(0);
    expect(report.firstLegDeltas.compression.literalBytes).toBe(report.compression.literalBytes);
  });
});
