/**
 * Page-digest throughput benchmark.
 *
 *   npm run bench:digest            # tsc, then node dist/bench/digest.js
 *   node dist/bench/digest.js [MiB] # default 1024 MiB of random 4 KiB pages
 *
 * Each method hashes every page of the same random buffer, walking it in
 * 256 KiB chunks; the figure is the median of RUNS runs (GB/s = 1e9 B/s).
 */
import { createHash, randomFillSync } from 'node:crypto';
import { createXXHash128 } from 'hash-wasm';
import xxhash from 'xxhash-wasm';
import {
  DIGEST_BYTES,
  availableDigestVariants,
  digestContiguous,
  digestOne,
  digestPages,
  selectDigestVariant,
} from '../src/digest';
import { X86_PAGE_SIZE as PAGE } from '../src/qemu/constants';
import { benchPositionals, numberArg } from './command-line';

const CHUNK = 256 * 1024;
const PAGES_PER_CHUNK = CHUNK / PAGE;
const RUNS = 5;

interface Result {
  name: string;
  note: string;
  seconds: number[];
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

function time(fn: () => void): number {
  const t0 = process.hrtime.bigint();
  fn();
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

async function main(): Promise<void> {
  const argv = benchPositionals();
  const mib = numberArg(argv[0] ?? process.env.BENCH_MIB, 1024, 'MiB');
  if (!Number.isInteger(mib) || mib < 1 || (mib * 1024 * 1024) % CHUNK !== 0) {
    throw new Error(`size must be a positive whole number of MiB, got ${argv[0]}`);
  }
  const total = mib * 1024 * 1024;
  const chunks = total / CHUNK;
  const pages = total / PAGE;

  process.stdout.write(`filling ${mib} MiB with random bytes... `);
  const src = Buffer.allocUnsafeSlow(total);
  for (let o = 0; o < total; o += 1 << 26) randomFillSync(src, o, Math.min(1 << 26, total - o));
  process.stdout.write('done\n');

  // All results of a run go to one preallocated table, as in the proxy.
  const out = new Uint8Array(pages * DIGEST_BYTES);
  const offsets = Uint32Array.from({ length: PAGES_PER_CHUNK }, (_, i) => i * PAGE);
  let sink = 0; // defeats dead-code elimination of the JS-side hashes

  const results: Result[] = [];
  const run = (name: string, note: string, fn: () => void): void => {
    fn(); // warm-up (JIT, wasm tier-up, page faults in `out`)
    const seconds: number[] = [];
    for (let r = 0; r < RUNS; r++) seconds.push(time(fn));
    results.push({ name, note, seconds });
    const s = median(seconds);
    console.log(`  ${name.padEnd(34)} ${(total / s / 1e9).toFixed(2).padStart(7)} GB/s`);
  };

  const variants = availableDigestVariants();
  for (const v of variants) {
    selectDigestVariant(v);
    run(`native XXH3-128 contiguous [${v}]`, '1 call / 256 KiB chunk', () => {
      for (let c = 0; c < chunks; c++) {
        digestContiguous(src, c * CHUNK, PAGES_PER_CHUNK, PAGE, out, c * PAGES_PER_CHUNK * DIGEST_BYTES);
      }
    });
    run(`native XXH3-128 offsets [${v}]`, '1 call / 256 KiB chunk', () => {
      for (let c = 0; c < chunks; c++) {
        // Offsets relative to a chunk view, as a record parser would produce.
        const view = src.subarray(c * CHUNK, (c + 1) * CHUNK);
        digestPages(view, offsets, PAGES_PER_CHUNK, PAGE, out, c * PAGES_PER_CHUNK * DIGEST_BYTES);
      }
    });
    // Same byte count, but one 256 KiB chunk over and over: the data is in
    // L2/L3, as when the proxy hashes a chunk it has just read from a socket.
    run(`native XXH3-128 hot chunk [${v}]`, '1 call / chunk, in cache', () => {
      for (let c = 0; c < chunks; c++) {
        digestContiguous(src, 0, PAGES_PER_CHUNK, PAGE, out, c * PAGES_PER_CHUNK * DIGEST_BYTES);
      }
    });
  }
  selectDigestVariant('auto');
  run(`native XXH3-128 digestOne [${variants[0]}]`, '1 call / page', () => {
    for (let p = 0; p < pages; p++) digestOne(src, p * PAGE, PAGE, out, p * DIGEST_BYTES);
  });

  const h128 = await createXXHash128();
  run('hash-wasm xxhash128', 'reused hasher, per page', () => {
    for (let p = 0; p < pages; p++) {
      const d = h128.init().update(src.subarray(p * PAGE, (p + 1) * PAGE)).digest('binary');
      sink ^= d[0];
    }
  });

  const { h64Raw } = await xxhash();
  run('xxhash-wasm h64Raw (64-bit only)', 'per page', () => {
    let acc = 0n;
    for (let p = 0; p < pages; p++) acc ^= h64Raw(src.subarray(p * PAGE, (p + 1) * PAGE));
    sink ^= Number(acc & 0xffn);
  });

  run('node:crypto sha256', 'per page', () => {
    for (let p = 0; p < pages; p++) {
      const d = createHash('sha256').update(src.subarray(p * PAGE, (p + 1) * PAGE)).digest();
      sink ^= d[0];
    }
  });

  console.log(`\n${mib} MiB = ${pages} pages of ${PAGE} B, ${CHUNK / 1024} KiB chunks, median of ${RUNS} runs`);
  console.log(`node ${process.version}, ${process.arch}, kernels available: ${variants.join(', ')}\n`);
  const header = ['method', 'calls', 'GB/s', 'min..max GB/s', 'ns/page'];
  const rows = results.map((r) => {
    const med = median(r.seconds);
    const lo = total / Math.max(...r.seconds) / 1e9;
    const hi = total / Math.min(...r.seconds) / 1e9;
    return [r.name, r.note, (total / med / 1e9).toFixed(2), `${lo.toFixed(1)}..${hi.toFixed(1)}`, ((med / pages) * 1e9).toFixed(0)];
  });
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i].length)));
  const line = (cells: string[]): string =>
    '| ' + cells.map((c, i) => (i >= 2 ? c.padStart(widths[i]) : c.padEnd(widths[i]))).join(' | ') + ' |';
  console.log(line(header));
  console.log('|' + widths.map((w, i) => (i >= 2 ? '-'.repeat(w + 1) + ':' : '-'.repeat(w + 2))).join('|') + '|');
  for (const row of rows) console.log(line(row));
  if (sink === -1) console.log(sink);
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
