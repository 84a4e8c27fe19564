/**
 * Many concurrent migrations of different VMs through one gateway pair, against one stream alone
 * measured in the same run.
 *
 * Two `bfmig gateway` processes route VMs solo, vm01 … vmNN to each other (one route per VM). Every
 * VM has a synthetic QEMU 7.2 stream of random pages of its own, so no two VMs share a byte of page
 * content. A source stand-in per VM plays its stream into its route port honouring backpressure; a
 * destination stand-in per VM at the far site hashes what arrives. Pass "first" goes A → B with
 * empty stores (nothing to reuse), pass "back" plays the same memory B → A (all reused). Each pass
 * runs solo alone, then the N VMs at once; every destination must receive exactly its own source's
 * bytes (SHA-256), every migration must complete at both gateways and every VM's store must verify
 * at both sites and claim the snapshot of its last migration. Prints aggregate throughput of the N
 * streams, the one stream's throughput, their ratio (target ≥ 0.8), CPU seconds of each gateway
 * process per phase and each gateway's peak RSS.
 *
 * With --real, every VM's stream is a real QEMU 7.2 migration stream instead: the test guest booted with
 * a workload seed of its own, migrated once to a file (cached under .cache/load-captures) and replayed.
 *
 * Usage: node dist/bench/load.js [vms=16] [MiB per VM=64] [--real]   (BFMIG_BENCH_STORE_DIR: where the stores go)
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { loopbackMultiRouteYaml, type LoopbackRoute } from '../src/lab/demo/loopback-config';
import { type SiteGateway, startSiteGateway } from '../src/lab/demo/site-gateway';
import { PageStore } from '../src/store';
import { PACKAGE_ROOT } from '../src/digest/package-root';
import { ensureGuestBuilt, freePort, QemuVm } from '../src/lab/vm/qemu-vm';
import { playStream, syntheticStream } from './synthetic';

/** One VM's migration stream and the digest its destination must see. */
export interface VmStream {
  vm: string;
  stream: Buffer;
  sha256: string;
}

export function vmStream(vm: string, stream: Buffer): VmStream {
  return { vm, stream, sha256: createHash('sha256').update(stream).digest('hex') };
}

/** What a destination stand-in received. */
export interface Received {
  bytes: number;
  sha256: string;
  reset: boolean;
}

/**
 * A destination stand-in: listens from the start (a port picked now and bound later could be taken by
 * then) and hashes everything each connection brings, one connection per migration.
 */
export class HashingDestination {
  private readonly outcomes: Received[] = [];
  private readonly waiting: Array<(r: Received) => void> = [];

  private constructor(private readonly server: net.Server) {
    server.on('connection', (socket) => {
      const hash = createHash('sha256');
      let bytes = 0;
      let reset = false;
      socket.on('data', (chunk: Buffer) => {
        hash.update(chunk);
        bytes += chunk.length;
      });
      socket.on('error', () => (reset = true));
      socket.on('end', () => socket.end());
      socket.on('close', () => {
        const outcome = { bytes, sha256: hash.digest('hex'), reset };
        const waiter = this.waiting.shift();
        if (waiter) waiter(outcome);
        else this.outcomes.push(outcome);
      });
    });
  }

  static listen(): Promise<HashingDestination> {
    return new Promise((resolve, reject) => {
      const server = net.createServer();
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => resolve(new HashingDestination(server)));
    });
  }

  get port(): number {
    return (this.server.address() as net.AddressInfo).port;
  }

  /** What the next connection (in order of closing) received. */
  next(): Promise<Received> {
    const ready = this.outcomes.shift();
    return ready ? Promise.resolve(ready) : new Promise((r) => this.waiting.push(r));
  }

  close(): Promise<void> {
    return new Promise((r) => this.server.close(() => r()));
  }
}

export interface LoadSite {
  name: string;
  gateway: SiteGateway;
  /** The gateway's data directory: one page store per VM. */
  data: string;
  /** Per VM: the route port its source connects to at this site. */
  routePorts: Map<string, number>;
  /** Per VM: its destination stand-in at this site. */
  destinations: Map<string, HashingDestination>;
}

/** Two gateways on loopback, each with one route per VM to the other; in this process (tests) or as `bfmig gateway` children (benchmark). */
export async function startLoadPair(dir: string, vms: readonly string[], own: 'in-process' | 'child-process'): Promise<[LoadSite, LoadSite]> {
  const ports = (): Promise<number[]> => Promise.all(vms.map(() => freePort()));
  const destinations = (): Promise<HashingDestination[]> => Promise.all(vms.map(() => HashingDestination.listen()));
  const [peerA, peerB] = [await freePort(), await freePort()];
  const [routeA, routeB] = [await ports(), await ports()];
  const [destA, destB] = [await destinations(), await destinations()];
  const byVm = <T>(list: T[]): Map<string, T> => new Map(vms.map((vm, i) => [vm, list[i]]));
  const start = async (name: string, peerPort: number, farPeerPort: number, route: number[], farDest: HashingDestination[], dest: HashingDestination[]): Promise<LoadSite> => {
    const data = path.join(dir, name);
    const routes: LoopbackRoute[] = vms.map((vm, i) => ({ vm, routePort: route[i], targetPort: farDest[i].port }));
    const gateway = await startSiteGateway(dir, name, loopbackMultiRouteYaml({ name, data, peerPort, farPeerPort, routes }), own);
    return { name, gateway, data, routePorts: byVm(route), destinations: byVm(dest) };
  };
  const closeAll = (): Promise<unknown> => Promise.all([...destA, ...destB].map((d) => d.close()));
  let a: LoadSite;
  try {
    a = await start('site-a', peerA, peerB, routeA, destB, destA);
  } catch (err) {
    await closeAll();
    throw err;
  }
  try {
    return [a, await start('site-b', peerB, peerA, routeB, destA, destB)];
  } catch (err) {
    await a.gateway.stop();
    await closeAll();
    throw err;
  }
}

/** Stops both gateways and closes every destination stand-in. */
export async function stopLoadPair(sites: readonly (LoadSite | undefined)[]): Promise<void> {
  for (const site of sites) {
    if (!site) continue;
    await site.gateway.stop();
    await Promise.all([...site.destinations.values()].map((d) => d.close()));
  }
}

/** One VM's migration in a pass. */
export interface VmOutcome {
  vm: string;
  received: Received;
  /** The destination got exactly its own source's bytes. */
  intact: boolean;
}

export interface PassResult {
  seconds: number;
  /** QEMU stream bytes of all VMs of the pass. */
  bytes: number;
  outcomes: VmOutcome[];
}

/** Migrates every VM of `streams` at once from `from` to `to`: starts the destinations, plays every source, waits for every destination. */
export async function runPass(from: LoadSite, to: LoadSite, streams: readonly VmStream[]): Promise<PassResult> {
  const arrivals = streams.map((s) => (to.destinations.get(s.vm) as HashingDestination).next());
  const t0 = process.hrtime.bigint();
  const played = streams.map((s) => playStream(from.routePorts.get(s.vm) as number, s.stream).then(() => null, (err: Error) => err));
  const received = await Promise.all(arrivals);
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const playErrors = await Promise.all(played);
  const outcomes = streams.map((s, i) => ({
    vm: s.vm,
    received: received[i],
    intact: playErrors[i] === null && !received[i].reset && received[i].bytes === s.stream.length && received[i].sha256 === s.sha256,
  }));
  return { seconds, bytes: streams.reduce((n, s) => n + s.stream.length, 0), outcomes };
}

/** Waits until `site` has reported `count` finished migrations (reports of a child gateway come from its log and may lag). */
export async function awaitReports(site: LoadSite, count: number, timeoutMs = 30_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (site.gateway.reports.length < count) {
    if (Date.now() > until) throw new Error(`${site.name} reported ${site.gateway.reports.length} of ${count} migrations`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** What a VM's store at one site says about itself. */
export interface StoreCheck {
  vm: string;
  /** Page indexes whose digest disagrees (verify()); empty when the store is sound. */
  badPages: number[];
  snapshotId: string | null;
  presentPages: number;
}

/** Opens each VM's store in `data` (the gateway must not be migrating it), verifies it and closes it. */
export function checkStores(data: string, vms: readonly string[]): StoreCheck[] {
  return vms.map((vm) => {
    const store = PageStore.open(data, vm);
    try {
      const badPages = store.verify();
      return { vm, badPages, snapshotId: store.snapshotId(), presentPages: store.meta()?.presentPages ?? 0 };
    } finally {
      store.close();
    }
  });
}

/**
 * A real QEMU migration stream of a guest of its own: the test guest booted with workload seed `seed`,
 * filling `mib` MiB, migrated by QEMU to a file (`exec:cat`). Cached in `dir` by its parameters.
 */
async function realCapture(dir: string, seed: number, memMiB: number, mib: number): Promise<Buffer> {
  const file = path.join(dir, `guest-m${memMiB}-w${mib}-s${seed}.mig`);
  if (!fs.existsSync(file)) {
    const vm = new QemuVm({ name: `capture-${seed}`, memMiB, workload: { mib, seed, intervalMs: 1000 } });
    try {
      await vm.start();
      await vm.waitForSerial(/WORKLOAD READY/, 180_000);
      vm.setMaxBandwidth(8 * 2 ** 30);
      await vm.migrate(`exec:cat > '${file}.part'`);
      await vm.waitForMigration({ timeoutMs: 120_000 });
      fs.renameSync(`${file}.part`, file);
    } finally {
      await vm.dispose();
    }
  }
  return fs.readFileSync(file);
}

async function main(): Promise<void> {
  const args = process.argv.slice(2).filter((a) => a !== '--real');
  const real = process.argv.includes('--real');
  const vmCount = Number(args[0] ?? 16);
  const mib = Number(args[1] ?? 64);
  if (!Number.isInteger(vmCount) || vmCount < 1 || !(mib > 0)) throw new Error('usage: node dist/bench/load.js [vms=16] [MiB per VM=64] [--real]');
  const vms = Array.from({ length: vmCount }, (_, i) => `vm${String(i + 1).padStart(2, '0')}`);
  // One stream alone is measured three times, each a VM of its own (a repeat of one VM would reuse
  // everything), and the median taken: a single short run swings with the machine's noise.
  const soloNames = ['solo1', 'solo2', 'solo3'];
  let make: (i: number) => Promise<Buffer> = (_i) => Promise.resolve(syntheticStream(mib / 1024).stream);
  if (real) {
    // Real QEMU streams, replayed: a guest of mib + 128 MiB (its kernel and initramfs need room) filling mib MiB.
    ensureGuestBuilt();
    const cache = path.join(PACKAGE_ROOT, '.cache', 'load-captures');
    fs.mkdirSync(cache, { recursive: true });
    make = (i) => realCapture(cache, 1000 + i, mib + 128, mib);
  }
  const solos: VmStream[] = [];
  for (const [i, vm] of soloNames.entries()) solos.push(vmStream(vm, await make(i)));
  const streams: VmStream[] = [];
  for (const [i, vm] of vms.entries()) streams.push(vmStream(vm, await make(soloNames.length + i)));
  if (new Set([...solos, ...streams].map((s) => s.sha256)).size !== vmCount + solos.length) throw new Error('two VMs got the same stream');
  const MiB = solos[0].stream.length / 2 ** 20;
  const kind = real ? `real QEMU 7.2 stream (a ${mib + 128} MiB guest filling ${mib} MiB with a seed of its own, captured once and replayed)` : 'synthetic QEMU 7.2 stream of its own random pages';
  console.log(`${vmCount} VMs + 3 solo VMs, each a ${MiB.toFixed(1)} MiB ${kind}; 2 bfmig gateway processes on loopback`);
  const allVms = [...solos.map((s) => s.vm), ...vms];

  const dir = fs.mkdtempSync(path.join(path.resolve(process.env.BFMIG_BENCH_STORE_DIR || os.tmpdir()), 'bfmig-load-'));
  const [a, b] = await startLoadPair(dir, allVms, 'child-process');
  let failures = 0;
  try {
    let finished = 0;
    const ratios: string[] = [];
    for (const [pass, from, to] of [
      ['first', a, b],
      ['back', b, a],
    ] as const) {
      const rates: number[] = [];
      const phases: Array<[string, VmStream[]]> = [...solos.map((s, i): [string, VmStream[]] => [`one stream #${i + 1}`, [s]]), [`${vmCount} streams  `, streams]];
      for (const [phase, group] of phases) {
        const cpuBefore = [from.gateway.cpuSeconds() ?? NaN, to.gateway.cpuSeconds() ?? NaN];
        const result = await runPass(from, to, group);
        finished += group.length;
        await Promise.all([awaitReports(from, finished), awaitReports(to, finished)]);
        const cpu = [(from.gateway.cpuSeconds() ?? NaN) - cpuBefore[0], (to.gateway.cpuSeconds() ?? NaN) - cpuBefore[1]];
        const bad = result.outcomes.filter((o) => !o.intact);
        const failed = [from, to].flatMap((s) => s.gateway.reports.slice(-group.length).filter((r) => r.result !== 'completed'));
        const reused = from.gateway.reports.slice(-group.length).reduce((n, r) => n + r.pagesReused, 0);
        const sent = from.gateway.reports.slice(-group.length).reduce((n, r) => n + r.pagesSent, 0);
        failures += bad.length + failed.length;
        const rate = result.bytes / result.seconds / 2 ** 20;
        rates.push(rate);
        console.log(
          `${pass.padEnd(5)} ${phase}  ${(result.bytes / 2 ** 20).toFixed(0).padStart(5)} MiB in ${result.seconds.toFixed(2).padStart(6)} s = ${rate.toFixed(0).padStart(4)} MiB/s` +
            `  pages sent ${sent} reused ${reused}  CPU s ${from.name} ${cpu[0].toFixed(2)} ${to.name} ${cpu[1].toFixed(2)}` +
            `  intact ${group.length - bad.length}/${group.length}  completed ${2 * group.length - failed.length}/${2 * group.length}`,
        );
      }
      const one = [...rates.slice(0, solos.length)].sort((x, y) => x - y)[1];
      const ratio = rates[solos.length] / one;
      ratios.push(`${pass} ${ratio.toFixed(2)}`);
      console.log(`${pass.padEnd(5)} aggregate ${rates[solos.length].toFixed(0)} MiB/s / one stream (median) ${one.toFixed(0)} MiB/s = ${ratio.toFixed(2)} (target >= 0.80)`);
    }
    console.log(`peak RSS MiB: site-a ${(a.gateway.peakRssMiB() ?? NaN).toFixed(0)} site-b ${(b.gateway.peakRssMiB() ?? NaN).toFixed(0)}`);
    const lastSnapshot = (site: LoadSite, vm: string): string | null => [...site.gateway.reports].reverse().find((r) => r.vm === vm)?.snapshotId ?? null;
    for (const site of [a, b]) {
      await site.gateway.stop();
      const checks = checkStores(site.data, allVms);
      const unsound = checks.filter((c) => c.badPages.length > 0 || c.snapshotId === null || c.snapshotId !== lastSnapshot(site, c.vm));
      failures += unsound.length;
      console.log(`stores at ${site.name}: ${checks.length - unsound.length}/${checks.length} verify and claim their last snapshot`);
    }
    console.log(`ratio ${ratios.join(', ')}; ${failures === 0 ? 'all migrations intact and completed' : `${failures} FAILURES`}`);
  } finally {
    await stopLoadPair([a, b]);
    fs.rmSync(dir, { recursive: true, force: true });
  }
  if (failures > 0) process.exitCode = 1;
}

if (require.main === module) {
  main().catch((err: unknown) => {
    console.error(err);
    process.exitCode = 1;
  });
}
