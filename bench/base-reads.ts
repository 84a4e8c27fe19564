/**
 * Lone pages read at random from a store, as a receiving gateway reads the bases of Deltas that name a
 * sibling's snapshot or a page of its own stored long ago: one after another, and prefetched in batches
 * (PageStore.prefetchPages, native/pageio.c's reader pool) as the receiver does for the Deltas of each
 * chunk it receives. Prints µs per page, median of the runs; each run reads pages no run read before.
 *
 * Usage: node dist/bench/base-reads.js [MiB=1024] [pages per run=4096] [runs=5] [dir]
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { DIGEST_BYTES, digestContiguous } from '../src/digest';
import { PageStore } from '../src/store';
import { median } from '../src/common/median';
import { benchPositionals, numberArg } from './command-line';

const PAGE = 4096;
const argv = benchPositionals();
const mib = numberArg(argv[0], 1024, 'MiB');
const perRun = numberArg(argv[1], 4096, 'pages per run');
const runs = numberArg(argv[2], 5, 'runs');
const root = fs.mkdtempSync(path.join(argv[3] ?? process.env.BENCH_DIR ?? os.tmpdir(), 'bfmig-base-reads-'));

function fill(store: PageStore, pageCount: number): void {
  store.begin({ pageSize: PAGE, pageCount, layoutId: 'base-reads', layout: { blocks: [{ name: 'pc.ram', length: pageCount * PAGE }] } });
  const batch = 256;
  const pages = Buffer.allocUnsafe(batch * PAGE);
  const digests = Buffer.allocUnsafe(batch * DIGEST_BYTES);
  for (let first = 0; first < pageCount; first += batch) {
    for (let k = 0; k < batch; k++) pages.writeUInt32LE(first + k, k * PAGE);
    digestContiguous(pages, 0, batch, PAGE, digests, 0);
    for (let k = 0; k < batch && first + k < pageCount; k++) store.writePage(first + k, pages, k * PAGE, digests, k * DIGEST_BYTES);
  }
  store.commit('base-reads');
}

function main(): void {
  const pageCount = (mib * 1024 * 1024) / PAGE;
  const store = PageStore.open(root, 'vm');
  try {
    fill(store, pageCount);
    console.log(`store of ${mib} MiB (${store.directIo ? 'direct I/O' : 'page cache'}); ${perRun} lone pages a run, median of ${runs} runs`);
    // Pages spread over the whole store, never the same twice (an odd stride modulo a power of two).
    let next = 12345;
    const pick = (list: Uint32Array): void => {
      for (let k = 0; k < list.length; k++) list[k] = next = (next + 2654435761) % pageCount;
    };
    const out = Buffer.allocUnsafe(PAGE);
    const list = new Uint32Array(perRun);
    const ask = new Uint32Array(perRun);
    for (const batch of [1, 8, 32, 128]) {
      const us: number[] = [];
      for (let r = 0; r < runs; r++) {
        pick(list);
        const t = process.hrtime.bigint();
        for (let first = 0; first < perRun; first += batch) {
          const n = Math.min(batch, perRun - first);
          if (batch > 1) {
            ask.set(list.subarray(first, first + n));
            store.prefetchPages(ask, n);
          }
          for (let k = first; k < first + n; k++) store.readPages(list[k], 1, out, 0, false);
          if (out.readUInt32LE(0) !== list[first + n - 1]) throw new Error(`page ${list[first + n - 1]} read back wrong`);
        }
        us.push(Number(process.hrtime.bigint() - t) / 1000 / perRun);
      }
      console.log(`${batch === 1 ? 'one after another' : `prefetched ${String(batch).padStart(3)} at a time`}: ${median(us).toFixed(1)} µs a page (runs ${us.map((u) => u.toFixed(1)).join(', ')})`);
    }
  } finally {
    store.close();
    fs.rmSync(root, { recursive: true, force: true });
  }
}

main();
