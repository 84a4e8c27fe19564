/**
 * Gateway throughput on loopback, no WAN shaping, against a plain Node TCP relay pair measured in the
 * same run. A producer plays a synthetic ≥ 1 GiB QEMU stream into site A; a consumer at the other end
 * reads it as a destination QEMU would and checks it byte for byte (by XXH3-128 over all bytes).
 * Leg 1 goes A → B with empty stores (nothing to reuse); leg 2 plays the same memory B → A (all
 * reused). Each gateway runs as its own `bfmig gateway` process, so CPU seconds and peak RSS are its own.
 *
 * Usage: node dist/bench/throughput.js [GiB=1] [runs=5]
 * With BFMIG_BENCH_STORE_BUDGET=1MiB the gateways' stores keep nothing: the first leg then shows what
 * retention costs it (and the "back leg" reuses nothing: it is another first leg).
 */
import { procStats } from '../src/lab/demo/proc-stats';
import { checkingDestination, playStream } from '../src/lab/harness/qemu-standins';
import { syntheticStream } from '../src/lab/harness/synthetic-stream';
import { median } from '../src/common/median';
import { ContentIndex } from '../src/proxy/content-index';
import { MAX_IDLE_BYTES } from '../src/proxy/reused-buffers';
import { gatewayNodeArgs as nodeArgs, startRelay, withGatewayPair } from './loopback-processes';
import { benchPositionals, numberArg } from './command-line';

const argv = benchPositionals();
const gib = numberArg(argv[0], 1, 'GiB');
const runs = numberArg(argv[1], 5, 'runs');

async function main(): Promise<void> {
  const { stream } = syntheticStream(gib);
  const GiB = stream.length / 2 ** 30;
  console.log(`stream: ${GiB.toFixed(2)} GiB synthetic QEMU 7.2 stream of random pages; ${runs} runs each, medians; gateways run with node ${nodeArgs.join(' ') || '(no flags)'}`);

  /** Seconds for the stream through a plain relay pair, each relay in a process of its own as each gateway is. */
  async function relayRun(): Promise<{ seconds: number; cpu: number; systemCpu: number }> {
    const sink = await checkingDestination(stream);
    const second = await startRelay(sink.port);
    const first = await startRelay(second.port);
    const stats = (): { cpu: number; system: number } => {
      const [a, b] = [procStats(first.child.pid!), procStats(second.child.pid!)];
      return { cpu: a.cpuSeconds + b.cpuSeconds, system: a.systemSeconds + b.systemSeconds };
    };
    const before = stats();
    const t0 = process.hrtime.bigint();
    const delivered = sink.done.then(() => process.hrtime.bigint());
    await playStream(first.port, stream);
    const seconds = Number((await delivered) - t0) / 1e9;
    const after = stats();
    first.child.kill();
    second.child.kill();
    return { seconds, cpu: (after.cpu - before.cpu) / 2 / GiB, systemCpu: (after.system - before.system) / 2 / GiB };
  }

  const rows: string[] = [];
  const ratios: Record<string, number[]> = { first: [], back: [] };
  const committedRatios: Record<string, number[]> = { first: [], back: [] };
  const legTimes: Record<string, number[]> = { first: [], back: [] };
  const cpu: Record<string, number[]> = { 'first:send': [], 'first:receive': [], 'back:send': [], 'back:receive': [] };
  const systemCpu: Record<string, number[]> = { 'first:send': [], 'first:receive': [], 'back:send': [], 'back:receive': [] };
  const relayTimes: number[] = [];
  const relayCpu: number[] = [];
  const relaySystemCpu: number[] = [];
  let peakRss = 0;
  for (let r = 0; r < runs; r++) {
    // The relay pair is measured in every run, right before the gateways: each leg is compared with the
    // relay of its own run, so that a machine whose speed drifts during the benchmark does not skew the ratio.
    const relay = await relayRun();
    relayTimes.push(relay.seconds);
    relayCpu.push(relay.cpu);
    relaySystemCpu.push(relay.systemCpu);
    const relayGBs = stream.length / relay.seconds / 1e9;
    rows.push(`run ${r + 1} relay pair: ${relayGBs.toFixed(2)} GB/s`);
    await withGatewayPair('bfmig-tput-', async ({ name: legName, from, to, routePort, destPort }) => {
      const before = { from: procStats(from.pid!), to: procStats(to.pid!) };
      // The gateway dials its route's fixed target port: the destination listens there.
      const sink = await checkingDestination(stream, destPort);
      const t0 = process.hrtime.bigint();
      const delivered = sink.done.then(() => process.hrtime.bigint());
      // The source's connection closes once both gateways have committed their stores (Done): QEMU
      // does not wait for that, the migration is over when the destination has the whole stream.
      await playStream(routePort, stream);
      const seconds = Number((await delivered) - t0) / 1e9;
      const committedSeconds = Number(process.hrtime.bigint() - t0) / 1e9;
      committedRatios[legName].push(stream.length / committedSeconds / 1e9 / relayGBs);
      await new Promise((res) => setTimeout(res, 200));
      const after = { from: procStats(from.pid!), to: procStats(to.pid!) };
      ratios[legName].push(stream.length / seconds / 1e9 / relayGBs);
      legTimes[legName].push(seconds);
      cpu[`${legName}:send`].push((after.from.cpuSeconds - before.from.cpuSeconds) / GiB);
      cpu[`${legName}:receive`].push((after.to.cpuSeconds - before.to.cpuSeconds) / GiB);
      systemCpu[`${legName}:send`].push((after.from.systemSeconds - before.from.systemSeconds) / GiB);
      systemCpu[`${legName}:receive`].push((after.to.systemSeconds - before.to.systemSeconds) / GiB);
      peakRss = Math.max(peakRss, after.from.peakRssMiB, after.to.peakRssMiB);
      rows.push(`run ${r + 1} ${legName.padEnd(5)} leg: ${(stream.length / seconds / 1e9).toFixed(2)} GB/s to the destination, ${(stream.length / committedSeconds / 1e9).toFixed(2)} GB/s until both stores committed; peak RSS so far: sender ${after.from.peakRssMiB.toFixed(0)} MiB, receiver ${after.to.peakRssMiB.toFixed(0)} MiB`);
    });
  }
  for (const row of rows) console.log(row);
  const relayGBs = stream.length / median(relayTimes) / 1e9;
  console.log(`plain Node relay pair      ${relayGBs.toFixed(2)} GB/s; CPU s/GiB per relay ${median(relayCpu).toFixed(2)} (system ${median(relaySystemCpu).toFixed(2)})`);
  const cpuOf = (key: string): string => `${median(cpu[key]).toFixed(2)} (system ${median(systemCpu[key]).toFixed(2)})`;
  const pages = stream.length / 4104;
  const legGBs = (legName: string): number => stream.length / median(legTimes[legName]) / 1e9;
  console.log(`ratios are medians of each run's leg over that run's relay pair`);
  console.log(`first leg (nothing to reuse)  ${legGBs('first').toFixed(2)} GB/s = ${median(ratios.first).toFixed(2)}× the relay pair; CPU s/GiB: sending gateway ${cpuOf('first:send')}, receiving ${cpuOf('first:receive')}`);
  console.log(`back leg (all reused)         ${legGBs('back').toFixed(2)} GB/s = ${median(ratios.back).toFixed(2)}× the relay pair; CPU s/GiB: sending gateway ${cpuOf('back:send')}, receiving ${cpuOf('back:receive')}`);
  console.log(
    `until both stores committed (fsync included): first leg ${median(committedRatios.first).toFixed(2)}×, back leg ${median(committedRatios.back).toFixed(2)}× the relay pair`,
  );
  const budget = memoryBudget(pages);
  console.log(`peak RSS of a gateway process ${peakRss.toFixed(0)} MiB (budget ${budget.mib.toFixed(0)} MiB: ${budget.parts})`);
}

/**
 * What a gateway process may hold for one migration of `pages` pages, MiB: the process (Node, the store's
 * write queue and read-ahead, socket buffers) 100 MiB, the store's digest table 16 B a page, and on the
 * sending gateway the receiver's digest table (16 B a page) and the content index (ContentIndex.slotsFor,
 * 4 B a slot), and the page buffers a gateway with deltas on touches when it starts (the resemblance
 * cache's and the recent pages' content, MAX_IDLE_BYTES of reused-buffers.ts).
 */
function memoryBudget(pages: number): { mib: number; parts: string } {
  const MiB = 2 ** 20;
  const parts: [string, number][] = [
    ['process', 100 * MiB],
    ['digest table 16 B a page', 16 * pages],
    ["the receiver's table 16 B a page", 16 * pages],
    ['content index', 4 * ContentIndex.slotsFor(pages)],
    ['page buffers', MAX_IDLE_BYTES],
  ];
  const mib = parts.reduce((sum, [, bytes]) => sum + bytes, 0) / MiB;
  return { mib, parts: parts.map(([name, bytes]) => `${name} ${(bytes / MiB).toFixed(0)}`).join(' + ') };
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
