/**
 * Multifd codec throughput, encode + decode (MultifdEncoder → frames → MultifdDecoder, stores in memory)
 * of one QEMU 10.0 migration of a guest memory image, spread over 1 or N channels:
 * - "one thread": every channel's codecs in this thread, with the SYNC barrier between them;
 * - "workers": each channel's codecs in a worker thread of its own, with stores of its own (no barrier
 *   across threads: an upper bound of what independent channels give on more than one core).
 * Two cases: "cold" (no reference: every page goes in full and is digested on both sides; the stores
 * hold it already, so nothing is written) and "warm" (the receiver holds every page: each becomes part
 * of a Run, read back from the in-memory store and checked). The machine's other load shows in the
 * figures: compare runs made together.
 * Usage: node dist/bench/multifd-codec.js [MiB=256] [channels=4] [runs=3]
 */
import { performance } from 'node:perf_hooks';
import { isMainThread, parentPort, Worker, workerData } from 'node:worker_threads';
import { MemoryPages } from '../src/lab/harness/fuzz';
import { guestMemory } from '../src/lab/harness/migration-stream';
import { multifdMigration, multifdRoundTrip } from '../src/lab/harness/multifd-stream';
import { layoutOf, type PageLayout } from '../src/proxy/retained';
import { benchPositionals, numberArg } from './command-line';

type Case = 'cold' | 'warm';

/** Stores that have seen the migration once, as after an earlier migration of the same memory. */
function filledStores(channels: readonly Buffer[], layout: PageLayout): { sender: MemoryPages; receiver: MemoryPages } {
  const sender = new MemoryPages();
  const receiver = new MemoryPages();
  sender.begin(layout);
  receiver.begin(layout);
  multifdRoundTrip(channels, layout, { store: sender, reference: null }, receiver);
  return { sender, receiver };
}

function timedTrip(channels: readonly Buffer[], layout: PageLayout, stores: { sender: MemoryPages; receiver: MemoryPages }, kind: Case): number {
  const start = performance.now();
  multifdRoundTrip(channels, layout, { store: stores.sender, reference: kind === 'warm' ? stores.sender.digests : null }, stores.receiver, { discardOutput: true });
  return (performance.now() - start) / 1000;
}

function median(values: number[]): number {
  return [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)];
}

interface WorkerJob {
  channel: Buffer;
  layout: PageLayout;
}

if (!isMainThread) {
  const job = workerData as WorkerJob;
  const channel = Buffer.from(job.channel.buffer, job.channel.byteOffset, job.channel.length);
  const stores = filledStores([channel], job.layout);
  parentPort?.on('message', (kind: Case | 'exit') => {
    if (kind === 'exit') process.exit(0);
    parentPort?.postMessage(timedTrip([channel], job.layout, stores, kind));
  });
  parentPort?.postMessage('ready');
} else {
  void main();
}

async function main(): Promise<void> {
  const argv = benchPositionals();
  const mib = numberArg(argv[0], 256, 'MiB');
  const n = numberArg(argv[1], 4, 'channels');
  const runs = numberArg(argv[2], 3, 'runs');
  const memory = guestMemory([['pc.ram', (mib * 256) >>> 0]], 17, 0.05);
  const layout = layoutOf(memory.blocks);
  const all = memory.pages.map((_, i) => i);
  console.log(`guest ${mib} MiB, ${memory.pages.length} pages (5 % zero), QEMU 10.0 packets, ${runs} runs (median)`);
  for (const channels of [1, n]) {
    const built = multifdMigration(memory, { format: 'qemu-10.0', channels, rounds: [all] });
    const bytes = built.channels.reduce((sum, c) => sum + c.length, 0);
    const stores = filledStores(built.channels, layout);
    for (const kind of ['cold', 'warm'] as const) {
      timedTrip(built.channels, layout, stores, kind); // warm-up
      const seconds = median(Array.from({ length: runs }, () => timedTrip(built.channels, layout, stores, kind)));
      console.log(`${channels} channel(s), one thread, ${kind}: ${(bytes / seconds / 1e9).toFixed(2)} GB/s encode+decode (${(seconds * 1000).toFixed(0)} ms for ${(bytes / 2 ** 20).toFixed(0)} MiB)`);
    }
    if (channels === 1) continue;
    const workers = built.channels.map((channel) => new Worker(__filename, { workerData: { channel, layout } satisfies WorkerJob }));
    for (const w of workers) {
      w.on('error', (err) => {
        throw err;
      });
    }
    const next = (w: Worker): Promise<unknown> => new Promise((resolve) => w.once('message', resolve));
    await Promise.all(workers.map(next));
    for (const kind of ['cold', 'warm'] as const) {
      const times: number[] = [];
      for (let r = -1; r < runs; r++) {
        const start = performance.now();
        const done = workers.map(next);
        for (const w of workers) w.postMessage(kind);
        await Promise.all(done);
        if (r >= 0) times.push((performance.now() - start) / 1000); // run -1 warms up
      }
      const seconds = median(times);
      console.log(`${channels} channels, ${channels} worker threads, ${kind}: ${(bytes / seconds / 1e9).toFixed(2)} GB/s encode+decode (${(seconds * 1000).toFixed(0)} ms)`);
    }
    for (const w of workers) w.postMessage('exit');
  }
}
