/**
 * Codec throughput on an in-memory stream: parse alone, and parse + an XXH3-128 digest of every page,
 * fed in socket-sized chunks. Usage: node dist/bench/parse.js [GiB=2] [chunkKiB=256] [runs=5]
 */
import { performance } from 'node:perf_hooks';
import { median } from '../src/common/median';
import { DIGEST_BYTES, digestOne, digestPages } from '../src/digest';
import { RecordKind, StreamParser, type StreamRecord } from '../src/qemu';
import { X86_PAGE_SIZE } from '../src/qemu/constants';
import { syntheticStream } from '../src/lab/harness/synthetic-stream';
import { benchPositionals, numberArg } from './command-line';

const argv = benchPositionals();
const gib = numberArg(argv[0], 2, 'GiB');
const chunkBytes = numberArg(argv[1], 256, 'KiB a chunk') * 1024;
const runs = numberArg(argv[2], 5, 'runs');

const t0 = performance.now();
const { stream, pages } = syntheticStream(gib);
console.log(`stream: ${(stream.length / 2 ** 30).toFixed(2)} GiB, ${pages.toLocaleString('en-US')} pages, built in ${((performance.now() - t0) / 1000).toFixed(1)} s; chunks of ${chunkBytes / 1024} KiB`);

/** Parses the stream; `onChunkPages` sees each chunk's in-chunk page offsets once the chunk is parsed. */
function parseOnce(withDigest: boolean): { seconds: number; counted: number; checksum: number } {
  const maxPagesPerChunk = Math.ceil(chunkBytes / X86_PAGE_SIZE) + 1;
  const offsets = new Uint32Array(maxPagesPerChunk);
  const digests = Buffer.alloc(maxPagesPerChunk * DIGEST_BYTES);
  const straddled = Buffer.alloc(DIGEST_BYTES);
  let count = 0;
  let counted = 0;
  let checksum = 0;
  let chunk: Buffer = stream;
  const parser = new StreamParser((r: StreamRecord) => {
    if (r.kind !== RecordKind.RamPage) return;
    counted++;
    if (!withDigest) return;
    if (r.data === chunk) {
      offsets[count++] = r.dataStart;
    } else {
      // Assembled from two chunks in the parser's scratch buffer: hash it now, before it is reused.
      digestOne(r.data, r.dataStart, r.dataLength, straddled, 0);
      checksum ^= straddled[0];
    }
  });
  const start = performance.now();
  for (let at = 0; at < stream.length; at += chunkBytes) {
    chunk = stream.subarray(at, Math.min(stream.length, at + chunkBytes));
    count = 0;
    parser.push(chunk);
    if (count > 0) {
      digestPages(chunk, offsets, count, X86_PAGE_SIZE, digests, 0);
      checksum ^= digests[0];
    }
  }
  parser.end();
  return { seconds: (performance.now() - start) / 1000, counted, checksum };
}

for (const [label, withDigest] of [
  ['parse', false],
  ['parse + XXH3-128 per page', true],
] as const) {
  const times: number[] = [];
  for (let i = 0; i < runs; i++) {
    const r = parseOnce(withDigest);
    if (r.counted !== pages) throw new Error(`parsed ${r.counted} pages of ${pages}`);
    times.push(r.seconds);
  }
  const s = median(times);
  console.log(`${label.padEnd(28)} ${(stream.length / s / 1e9).toFixed(2)} GB/s  (median of ${runs}: ${s.toFixed(3)} s; ${(pages / s / 1e6).toFixed(2)} M pages/s)`);
}
