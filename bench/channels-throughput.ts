/**
 * Multifd migrations through the gateway pair on loopback, with 1, 2, 4 and 8 channels, against a plain
 * Node relay pair carrying the same connections in the same run. A stand-in source opens a QEMU 10.0
 * migration as QEMU does (the main channel up to its RAM block list, then every channel's initial
 * packet), and once the destination has every connection sends the rest of all of them at once; the
 * stand-in destination keeps what each connection brought, checked byte for byte. The guest's pages
 * (5 % zero) travel on the channels, one round and a SYNC on each channel before and after it. First leg
 * A → B with empty stores (nothing to reuse), back leg B → A with the same memory (all reused). Each
 * gateway and each relay runs as a process of its own: CPU seconds are its own, all threads included.
 * Times run from the first byte after the connections are up to the destination's last.
 *
 * Usage: node dist/bench/channels-throughput.js [MiB=256] [runs=3] [channel counts=1,2,4,8]
 */
import { procStats } from '../src/lab/demo/proc-stats';
import { freePort } from '../src/lab/vm/ports';
import { waitFor } from '../src/lab/harness/gateway-pair';
import { guestMemory, migrationStream, PAGE, streamStart } from '../src/lab/harness/migration-stream';
import { multifdMigration } from '../src/lab/harness/multifd-stream';
import { ChannelsDestination, type ReceivedChannel, sourceChannel } from '../src/lab/harness/qemu-standins';
import { MULTIFD_INIT_BYTES } from '../src/qemu/multifd';
import { median } from '../src/common/median';
import { startRelay, withGatewayPair } from './loopback-processes';
import { benchPositionals, numberArg } from './command-line';

const argv = benchPositionals();
const mib = numberArg(argv[0], 256, 'MiB');
const runs = numberArg(argv[1], 3, 'runs');
const counts = (argv[2] ?? '1,2,4,8').split(',').map(Number);
const BLOCKS: [string, number][] = [['pc.ram', mib * 256]];

interface Migration {
  main: Buffer;
  channels: Buffer[];
  bytes: number;
}

const memory = guestMemory(BLOCKS, 7, 0.05);
const all = memory.pages.map((_, i) => i);
/** The main channel: device state and RAM markers, no pages (QEMU 10.0 sends even zero pages on the channels). */
const mainStream = migrationStream(memory, [], { machine: 'pc-i440fx-7.2', multifd: 'qemu-10.0' });

function migrationOf(channels: number): Migration {
  const main = mainStream;
  const built = multifdMigration(memory, { format: 'qemu-10.0', channels, rounds: [all], leadingSync: true });
  return { main, channels: built.channels, bytes: main.length + built.channels.reduce((sum, c) => sum + c.length, 0) };
}

/** Every connection reached the destination as the source sent it, the main one first. */
function checkRebuilt(got: ReceivedChannel[], run: Migration): void {
  const byId = new Map(got.slice(1).map((c) => [c.bytes[24], c.bytes]));
  const whole = got.every((c) => !c.reset) && got[0].bytes.equals(run.main) && run.channels.every((bytes, id) => byId.get(id)?.equals(bytes));
  if (!whole) throw new Error('the destination did not get every connection byte for byte');
}

/**
 * One migration into `routePort`, its destination listening on `destPort`; resolves with the seconds
 * from the bulk's first byte to the destination's last, once the source's main connection has closed
 * (through the gateways: once both stores have committed).
 */
async function migrate(run: Migration, routePort: number, destPort: number): Promise<number> {
  const dest = await ChannelsDestination.listen(destPort);
  try {
    const start = streamStart(BLOCKS.map(([name, pages]) => [name, pages * PAGE])).length;
    const main = await sourceChannel(routePort);
    await main.write(run.main.subarray(0, start));
    const channels = await Promise.all(run.channels.map(() => sourceChannel(routePort)));
    await Promise.all(channels.map((c, i) => c.write(run.channels[i].subarray(0, MULTIFD_INIT_BYTES))));
    // Through the gateways a channel reaches the destination once both have joined it to the migration.
    await waitFor(() => dest.accepted === 1 + channels.length, 30_000);
    const t0 = process.hrtime.bigint();
    const sent = [main.write(run.main.subarray(start)), ...channels.map((c, i) => c.write(run.channels[i].subarray(MULTIFD_INIT_BYTES)))];
    await Promise.all(sent);
    for (const c of [main, ...channels]) c.socket.end();
    const got = await dest.settled(1 + channels.length);
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    checkRebuilt(got, run);
    await main.closed;
    return seconds;
  } finally {
    await dest.close();
  }
}

type Leg = 'first' | 'back';

interface Row {
  relay: number[];
  relayCpu: number[];
  seconds: Record<Leg, number[]>;
  ratio: Record<Leg, number[]>;
  sendCpu: Record<Leg, number[]>;
  receiveCpu: Record<Leg, number[]>;
}

async function relayRun(run: Migration): Promise<{ seconds: number; cpu: number }> {
  const destPort = await freePort();
  const second = await startRelay(destPort);
  const first = await startRelay(second.port);
  const cpu = (): number => procStats(first.child.pid!).cpuSeconds + procStats(second.child.pid!).cpuSeconds;
  try {
    const before = cpu();
    const seconds = await migrate(run, first.port, destPort);
    return { seconds, cpu: (cpu() - before) / 2 };
  } finally {
    first.child.kill();
    second.child.kill();
  }
}

async function gatewayRun(run: Migration, row: Row, relayGBs: number): Promise<void> {
  await withGatewayPair('bfmig-channels-', async ({ name: leg, from, to, routePort, destPort }) => {
    const before = { from: procStats(from.pid!).cpuSeconds, to: procStats(to.pid!).cpuSeconds };
    const seconds = await migrate(run, routePort, destPort);
    row.seconds[leg].push(seconds);
    row.ratio[leg].push(run.bytes / seconds / 1e9 / relayGBs);
    row.sendCpu[leg].push(procStats(from.pid!).cpuSeconds - before.from);
    row.receiveCpu[leg].push(procStats(to.pid!).cpuSeconds - before.to);
  });
}

async function main(): Promise<void> {
  console.log(`guest ${mib} MiB (5 % zero pages), QEMU 10.0 multifd; ${runs} runs per channel count, medians; each leg against the relay pair of its own run`);
  const rows = new Map<number, Row>();
  for (const n of counts) {
    const run = migrationOf(n);
    const row: Row = { relay: [], relayCpu: [], seconds: { first: [], back: [] }, ratio: { first: [], back: [] }, sendCpu: { first: [], back: [] }, receiveCpu: { first: [], back: [] } };
    rows.set(n, row);
    for (let r = 0; r < runs; r++) {
      const relay = await relayRun(run);
      row.relay.push(relay.seconds);
      row.relayCpu.push(relay.cpu);
      await gatewayRun(run, row, run.bytes / relay.seconds / 1e9);
    }
    const gbs = (seconds: number[]): string => (run.bytes / median(seconds) / 1e9).toFixed(2);
    console.log(`${n} channel(s), ${(run.bytes / 2 ** 20).toFixed(0)} MiB over ${n + 1} connections:`);
    console.log(`  relay pair  ${gbs(row.relay)} GB/s, CPU s per relay ${median(row.relayCpu).toFixed(2)}`);
    for (const leg of ['first', 'back'] as const) {
      console.log(
        `  ${leg.padEnd(5)} leg   ${gbs(row.seconds[leg])} GB/s = ${median(row.ratio[leg]).toFixed(2)}× the relay pair (runs ${row.ratio[leg].map((x) => x.toFixed(2)).join(', ')}); CPU s: sending gateway ${median(row.sendCpu[leg]).toFixed(2)}, receiving ${median(row.receiveCpu[leg]).toFixed(2)}`,
      );
    }
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
