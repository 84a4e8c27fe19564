/**
 * PageStore throughput benchmark.
 *
 *   npx tsc -p tsconfig.json && node dist/bench/store.js [MiB] [dir]
 *
 * Default 1024 MiB of random 4 KiB pages, in a fresh temp dir under `dir`
 * (default: os.tmpdir(); BENCH_DIR also works). Figures are the median of
 * RUNS runs, MB/s = 1e6 B/s of page data:
 *
 *   write fresh      begin() with a new layoutId (reset: truncated sparse
 *                    file), writePage() for every page in order, commit()
 *                    (fsync pages + digests + meta) — "loop" is the
 *                    writePage() calls alone (with direct I/O the pages are
 *                    queued to the store's I/O thread; without, they reach the
 *                    page cache), "+commit" includes the fsyncs.
 *   write overwrite  the same with an unchanged layout (blocks already allocated).
 *   write N channels as "write fresh", the pages in the order N multifd channels bring them to a
 *                    gateway: packets of 128 pages dealt to the channels in turn, the channels
 *                    read 16 pages (a 64 KiB socket read) at a time in turn (BENCH_CHANNELS, default 4,8).
 *   read             readPages() in 64-page runs, in order, into one buffer
 *                    (direct I/O: from the device, read ahead by the I/O thread;
 *                    page cache: hot, the file was just written).
 *   read N channels  a packet's 128 pages per read, as the Runs of a back leg's N multifd
 *                    channels come: 64 packets of one channel (every N-th) in a row, then the next.
 *   verify           verify(): read + re-hash every present page.
 *   recovery         open() of a store left "dirty" (as after a crash).
 *
 * BFMIG_STORE_DIRECT_IO=0 measures the page-cache store.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomFillSync } from 'node:crypto';
import { DIGEST_BYTES, digestContiguous } from '../src/digest';
import { PageStore, type StoreLayout, storeCopyMode } from '../src/store';
import { X86_PAGE_SIZE as PAGE } from '../src/qemu/constants';
import { makeTempDir, removeTempDir } from '../src/lab/harness/temp-dir';
import { ReadsAhead, runsWindow } from '../src/proxy/reads-ahead';
import { benchPositionals, numberArg } from './command-line';

const RUNS = 3;
const READ_RUN = 64;
/** QEMU's multifd packets carry 128 pages; a 64 KiB socket read brings 16 of them. */
const PACKET_PAGES = 128;
const READ_PAGES = 16;
/** Runs of one channel read in a row: a socket read brings a channel's Run frames for that many packets. */
const RUN_BURST = 64;

/** Page indexes in the order `channels` multifd channels bring them, read in turn a socket read at a time. */
function channelOrder(pages: number, channels: number): Uint32Array {
  const order = new Uint32Array(pages);
  const next = Array.from({ length: channels }, (_, c) => c * PACKET_PAGES);
  let n = 0;
  while (n < pages) {
    for (let c = 0; c < channels; c++) {
      for (let k = 0; k < READ_PAGES && next[c] < pages; k++) order[n++] = next[c]++;
      // Its packet done, the channel goes on with its next one: `channels` packets further on.
      if (next[c] % PACKET_PAGES === 0) next[c] += (channels - 1) * PACKET_PAGES;
    }
  }
  return order;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

function seconds(t0: bigint): number {
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

function mbps(bytes: number, s: number): string {
  return `${(bytes / s / 1e6).toFixed(0).padStart(6)} MB/s`;
}

function main(): void {
  const argv = benchPositionals();
  const mib = numberArg(argv[0] ?? process.env.BENCH_MIB, 1024, 'MiB');
  if (!Number.isInteger(mib) || mib < 1) throw new Error(`size must be a positive whole number of MiB, got ${argv[0]}`);
  const base = argv[1] ?? process.env.BENCH_DIR ?? os.tmpdir();
  const total = mib * 1024 * 1024;
  const pages = total / PAGE;
  // A directory on the file system under test (O_DIRECT needs a disk, not the tmpfs /tmp may be).
  const root = makeTempDir('bfmig-bench-store-', { base });
  console.log(`PageStore bench: ${mib} MiB = ${pages} pages of ${PAGE} B in ${root} (copy: ${storeCopyMode()}; I/O: ${process.env.BFMIG_STORE_DIRECT_IO === '0' ? 'page cache' : 'O_DIRECT where the filesystem allows'})`);

  try {
    process.stdout.write('filling with random bytes and hashing... ');
    const src = Buffer.allocUnsafeSlow(total);
    for (let o = 0; o < total; o += 1 << 26) randomFillSync(src, o, Math.min(1 << 26, total - o));
    const digests = new Uint8Array(pages * DIGEST_BYTES);
    for (let p = 0; p < pages; p += 4096) digestContiguous(src, p * PAGE, Math.min(4096, pages - p), PAGE, digests, p * DIGEST_BYTES);
    process.stdout.write('done\n');

    const layout = (id: string): StoreLayout => ({ pageSize: PAGE, pageCount: pages, layoutId: id, layout: { bench: true } });
    const writeBuffers = (process.env.BENCH_WRITE_BUFFERS ?? '1048576')
      .split(',')
      .map((v) => Number(v));

    let store: PageStore | null = null;
    let layoutNo = 0;
    for (const wb of writeBuffers) {
      store?.close();
      fs.rmSync(path.join(root, 'vm'), { recursive: true, force: true });
      store = PageStore.open(root, 'vm', { writeBufferBytes: wb });
      const s = store;
      const writeAll = (id: string): [number, number] => {
        const t0 = process.hrtime.bigint();
        s.begin(layout(id));
        for (let i = 0; i < pages; i++) s.writePage(i, src, i * PAGE, digests, i * DIGEST_BYTES);
        const loop = seconds(t0);
        s.commit(`snap-${id}`);
        return [loop, seconds(t0)];
      };
      for (const mode of ['fresh', 'overwrite'] as const) {
        const loops: number[] = [];
        const alls: number[] = [];
        for (let r = 0; r < RUNS; r++) {
          const id = mode === 'fresh' ? `L${layoutNo++}` : `L${layoutNo - 1}`;
          const [loop, all] = writeAll(id);
          loops.push(loop);
          alls.push(all);
        }
        console.log(
          `  write ${mode.padEnd(9)} (buffer ${(wb / 1024).toFixed(0).padStart(5)} KiB)  loop ${mbps(total, median(loops))}   +commit ${mbps(total, median(alls))}`,
        );
      }
    }
    const s = store as PageStore;
    for (const channels of (process.env.BENCH_CHANNELS ?? '4,8').split(',').map(Number)) {
      const order = channelOrder(pages, channels);
      const loops: number[] = [];
      const alls: number[] = [];
      for (let r = 0; r < RUNS; r++) {
        const t0 = process.hrtime.bigint();
        s.begin(layout(`L${layoutNo++}`));
        for (const i of order) s.writePage(i, src, i * PAGE, digests, i * DIGEST_BYTES);
        loops.push(seconds(t0));
        s.commit(`snap-${layoutNo}`);
        alls.push(seconds(t0));
      }
      console.log(`  write as ${channels} multifd channels (fresh)`.padEnd(49) + `loop ${mbps(total, median(loops))}   +commit ${mbps(total, median(alls))}`);
    }

    // read: 64-page runs in order into one buffer; check the content once, untimed
    const dest = Buffer.allocUnsafeSlow(READ_RUN * PAGE);
    const readAll = (check: boolean): void => {
      for (let i = 0; i < pages; i += READ_RUN) {
        const n = Math.min(READ_RUN, pages - i);
        s.readPages(i, n, dest, 0);
        if (check && dest.compare(src, i * PAGE, (i + n) * PAGE, 0, n * PAGE) !== 0) {
          throw new Error(`read back pages ${i}..${i + n - 1} differ`);
        }
      }
    };
    readAll(true);
    const reads: number[] = [];
    for (let r = 0; r < RUNS; r++) {
      const t0 = process.hrtime.bigint();
      readAll(false);
      reads.push(seconds(t0));
    }
    const source = s.directIo ? 'from the device, read ahead' : 'hot page cache';
    console.log(`  read  ${READ_RUN}-page runs (${source})`.padEnd(49) + mbps(total, median(reads)));
    // As a back leg's multifd channels read their Runs: one Run per packet, its pages at once, and a
    // socket read of a channel brings the Runs of many of its packets (RUN_BURST), every N-th packet.
    const packet = Buffer.allocUnsafeSlow(PACKET_PAGES * PAGE);
    const packets = Math.floor(pages / PACKET_PAGES);
    // Read ahead as a receiving channel does (MultifdDecoder.aheadOfRun): a burst's Runs noted as it
    // arrives, a window of them read by the store's reader pool ahead of the one rebuilt.
    for (const channels of (process.env.BENCH_CHANNELS ?? '4,8').split(',').map(Number)) {
      for (const ahead of [false, true]) {
        const times: number[] = [];
        for (let r = 0; r < RUNS; r++) {
          const t0 = process.hrtime.bigint();
          const runs = new ReadsAhead(runsWindow(channels, s.rangeSlots), (starts, counts, n) => s.prefetchRanges(starts, counts, n));
          let seen = 0;
          let rebuilt = 0;
          for (let burst = 0; burst * RUN_BURST * channels < packets; burst++) {
            for (let c = 0; c < channels; c++) {
              const packetOf = (b: number): number => (burst * RUN_BURST + b) * channels + c;
              if (ahead) {
                for (let b = 0; b < RUN_BURST; b++) if (packetOf(b) < packets) runs.note(++seen, packetOf(b) * PACKET_PAGES, PACKET_PAGES);
                runs.advance(rebuilt);
              }
              for (let b = 0; b < RUN_BURST; b++) {
                if (packetOf(b) >= packets) continue;
                if (ahead) runs.advance(++rebuilt);
                s.readPages(packetOf(b) * PACKET_PAGES, PACKET_PAGES, packet, 0);
              }
            }
          }
          times.push(seconds(t0));
        }
        console.log(`  read  Runs as ${channels} multifd channels${ahead ? ', read ahead' : ''}`.padEnd(49) + mbps(packets * PACKET_PAGES * PAGE, median(times)));
      }
    }

    const verifies: number[] = [];
    for (let r = 0; r < RUNS; r++) {
      const t0 = process.hrtime.bigint();
      const bad = s.verify();
      verifies.push(seconds(t0));
      if (bad.length !== 0) throw new Error(`verify found ${bad.length} bad pages`);
    }
    console.log(`  verify (read + re-hash every page)             ${mbps(total, median(verifies))}`);

    // recovery: mark the store dirty as a crash would leave it, then reopen
    s.close();
    const metaPath = path.join(root, 'vm', 'meta.json');
    const recoveries: number[] = [];
    for (let r = 0; r < RUNS; r++) {
      const meta = JSON.parse(fs.readFileSync(metaPath, 'utf8')) as Record<string, unknown>;
      fs.writeFileSync(metaPath, JSON.stringify({ ...meta, state: 'dirty', snapshotId: null }));
      const t0 = process.hrtime.bigint();
      const re = PageStore.open(root, 'vm');
      recoveries.push(seconds(t0));
      if (!/recovered/.test(re.warnings.join())) throw new Error('no recovery happened');
      re.close();
    }
    console.log(`  recovery open() of a dirty store               ${mbps(total, median(recoveries))}  (${median(recoveries).toFixed(2)} s)`);
  } finally {
    removeTempDir(root);
  }
}

main();
