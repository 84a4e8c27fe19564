/**
 * The first leg of a sibling VM, on real QEMU: guest A (the image's first guest) migrates site-a →
 * site-b through a gateway pair; then guest B, booted from the same image (the same kernel and initrd,
 * the same files corpus, but its own workload seed, so its own selection of file pages), migrates
 * site-a → site-b for the first time: directly (QEMU to QEMU over the same emulated WAN), through the
 * pair on a route that names A as B's sibling, and through the pair on a route that names none. Prints
 * WAN bytes, times, the ratio to direct, and where B's pages went.
 * With `--multifd N`, every leg has QEMU's multifd on with N channels (each path carries them).
 * Usage: node dist/bench/sibling-leg.js [--mbit 100,1000] [--delay-ms 20] [--mem-mib 256] [--workload-mib 128] [--seeds 5,6] [--qemu 10.0] [--multifd N]
 * Gateways run as `bfmig gateway` child processes.
 */
import * as path from 'node:path';
import { loopbackMultiRouteYaml } from '../src/lab/harness/loopback-config';
import { type GatewayLegReport, type SiteGateway, startSiteGateway } from '../src/lab/harness/site-gateway';
import { makeTempDir, removeTempDir } from '../src/lab/harness/temp-dir';
import { arrivedVerified, VERIFIED } from '../src/lab/demo/backforth';
import { ensureGuestBuilt } from '../src/lab/vm/guest-image';
import { freePort } from '../src/lab/vm/ports';
import { disposeAllVms, QemuVm } from '../src/lab/vm/qemu-vm';
import { QEMU_RELEASES, type QemuRelease, qemuBinary } from '../src/lab/vm/qemu-releases';
import { WanEmulator } from '../src/lab/wan/emulator';
import { gatewayNodeArgs } from './loopback-processes';
import { benchOptions } from './command-line';

const MiB = 2 ** 20;

interface Leg {
  /** What the leg is, as printed. */
  label: string;
  wanBytes: number;
  seconds: number;
  verified: boolean;
  report: GatewayLegReport | null;
}

interface Site {
  gateway: SiteGateway;
  /** Where the far gateway's connections arrive (through the WAN emulator). */
  inbound: WanEmulator;
  routePorts: Record<string, number>;
  qemuPort: number;
}

interface Setup {
  qemu: QemuRelease;
  memMiB: number;
  workloadMiB: number;
  mbit: number;
  delayMs: number;
  /** multifd channels; 0: multifd off. */
  channels: number;
}

async function startPair(dir: string, s: Setup, qemuPorts: [number, number]): Promise<[Site, Site]> {
  const ports = await Promise.all(Array.from({ length: 8 }, () => freePort()));
  const [peerA, peerB] = ports;
  const inbound = [peerA, peerB].map((port) => new WanEmulator({ listen: { host: '127.0.0.1', port: 0 }, target: { host: '127.0.0.1', port }, rateMbit: s.mbit, delayMs: s.delayMs }));
  const far = [(await inbound[1].listen()).port, (await inbound[0].listen()).port];
  const sites: Site[] = [];
  for (const i of [0, 1]) {
    const name = i === 0 ? 'site-a' : 'site-b';
    const routes = [
      { vm: 'guest-a', routePort: ports[2 + 3 * i], targetPort: qemuPorts[1 - i] },
      { vm: 'guest-b', routePort: ports[3 + 3 * i], targetPort: qemuPorts[1 - i], siblings: ['guest-a'] },
      { vm: 'guest-b-alone', routePort: ports[4 + 3 * i], targetPort: qemuPorts[1 - i] },
    ];
    const yaml = loopbackMultiRouteYaml({ name, data: path.join(dir, name), peerPort: ports[i], farPeerPort: far[i], routes });
    const gateway = await startSiteGateway(dir, name, yaml, 'child-process', { nodeArgs: gatewayNodeArgs });
    sites.push({ gateway, inbound: inbound[i], routePorts: Object.fromEntries(routes.map((r) => [r.vm, r.routePort])), qemuPort: qemuPorts[i] });
  }
  return [sites[0], sites[1]];
}

/** Boots a guest of the image with workload `seed` and waits until its workload has verified itself. */
async function bootGuest(s: Setup, name: string, seed: number): Promise<QemuVm> {
  const vm = new QemuVm({ name, machine: s.qemu === '10.0' ? 'pc-i440fx-10.0' : 'pc-i440fx-7.2', memMiB: s.memMiB, qemuBinary: qemuBinary(s.qemu), workload: { mib: s.workloadMiB, seed, content: 'files' } });
  await vm.start();
  await vm.waitForSerial(/WORKLOAD READY/, 300_000);
  await vm.waitForSerial(VERIFIED, 120_000);
  return vm;
}

/** One leg of a guest with workload `seed`, booted at site-a, to site-b: direct, or through `route` of the pair. */
async function leg(s: Setup, label: string, seed: number, pair: [Site, Site], route: string | null): Promise<Leg> {
  const [from, to] = pair;
  const name = `${route ?? 'direct'}-${seed}`; // QEMU's -name takes no commas
  const source = await bootGuest(s, `${name}-src`, seed);
  const incoming = `tcp:127.0.0.1:${to.qemuPort}`;
  // multifd must be on at the destination before the stream arrives, and multifd-channels match.
  const dest = new QemuVm({ ...source.destinationOptions(s.channels > 0 ? 'defer' : incoming, `${name}-dst`) });
  try {
    await dest.start();
    if (s.channels > 0) {
      for (const vm of [dest, source]) {
        await vm.setMigrationCapabilities({ multifd: true });
        await vm.setMigrationParameters({ 'multifd-channels': s.channels });
      }
      await dest.migrateIncoming(incoming);
    }
    let direct: WanEmulator | null = null;
    let uri: string;
    const wanBefore = to.inbound.bytesForward + to.inbound.bytesBackward;
    const reportsBefore = from.gateway.reports.length;
    if (route === null) {
      direct = new WanEmulator({ listen: { host: '127.0.0.1', port: 0 }, target: { host: '127.0.0.1', port: to.qemuPort }, rateMbit: s.mbit, delayMs: s.delayMs });
      uri = `tcp:127.0.0.1:${(await direct.listen()).port}`;
    } else {
      uri = `tcp:127.0.0.1:${from.routePorts[route]}`;
    }
    await source.migrate(uri);
    const info = await source.waitForMigration({ timeoutMs: 900_000 });
    const verified = await arrivedVerified(dest);
    let wanBytes: number;
    let report: GatewayLegReport | null = null;
    if (direct) {
      wanBytes = direct.bytesForward + direct.bytesBackward;
      await direct.close();
    } else {
      const until = Date.now() + 30_000;
      while (from.gateway.reports.length === reportsBefore && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
      report = from.gateway.reports[reportsBefore] ?? null;
      wanBytes = to.inbound.bytesForward + to.inbound.bytesBackward - wanBefore;
    }
    return { label, wanBytes, seconds: (info['total-time'] ?? 0) / 1000, verified: verified && (report === null || report.result === 'completed'), report };
  } finally {
    await source.dispose();
    await dest.dispose();
  }
}

function line(l: Leg, direct: Leg | null): string {
  const ratio = direct ? ` = ${(l.wanBytes / direct.wanBytes).toFixed(3)}× direct` : '';
  const r = l.report;
  const pages = r ? `; zstd saved ${(r.compressionSavedBytes / MiB).toFixed(1)} MiB; pages: ${r.pagesSent} whole, ${r.pagesSibling} from the sibling, ${r.pagesMatched} matched within the VM, ${r.pagesDelta} deltas, ${r.pagesReused} reused, ${r.pagesZero} zero` : '';
  return `  ${l.label.padEnd(34)} ${(l.wanBytes / MiB).toFixed(1).padStart(7)} MiB in ${l.seconds.toFixed(1).padStart(5)} s${ratio}${pages}${l.verified ? '' : ', guest NOT VERIFIED'}`;
}

async function runAt(s: Setup, seeds: [number, number]): Promise<void> {
  const dir = makeTempDir('bfmig-sibling-leg-');
  const qemuPorts: [number, number] = [await freePort(), await freePort()];
  const pair = await startPair(dir, s, qemuPorts);
  try {
    console.log(`WAN ${s.mbit} Mbit/s, ${s.delayMs} ms one way; QEMU ${s.qemu}, ${s.memMiB} MiB guests, ${s.workloadMiB} MiB workload of file pages${s.channels > 0 ? `; multifd, ${s.channels} channels` : ''}`);
    const a = await leg(s, `guest A (seed ${seeds[0]}) through bfmig`, seeds[0], pair, 'guest-a');
    console.log(line(a, null));
    const direct = await leg(s, `guest B (seed ${seeds[1]}) direct`, seeds[1], pair, null);
    console.log(line(direct, null));
    const alone = await leg(s, 'guest B through bfmig, no sibling', seeds[1], pair, 'guest-b-alone');
    console.log(line(alone, direct));
    const sibling = await leg(s, 'guest B through bfmig, sibling A', seeds[1], pair, 'guest-b');
    console.log(line(sibling, direct));
    const target = 0.3;
    const ratio = sibling.wanBytes / direct.wanBytes;
    console.log(`  first leg of the sibling: ${ratio.toFixed(3)}× direct (target ≤ ${target}: ${ratio <= target ? 'PASS' : `FAIL by ${((ratio / target - 1) * 100).toFixed(0)}%`}); the sibling saved ${((1 - sibling.wanBytes / alone.wanBytes) * 100).toFixed(1)}% of the leg without it`);
    const r = sibling.report;
    if (r) {
      const normal = r.pagesSent + r.pagesSibling + r.pagesMatched + r.pagesReused + r.pagesDelta;
      console.log(`  of B's ${normal} normal pages: ${((r.pagesSibling / normal) * 100).toFixed(1)}% from the sibling, ${((r.pagesMatched / normal) * 100).toFixed(1)}% within the VM, ${((r.pagesDelta / normal) * 100).toFixed(1)}% as deltas (against a page like it, or its own older version), ${((r.pagesSent / normal) * 100).toFixed(1)}% held nowhere (sent whole, compressed where the WAN set the pace)`);
    }
  } finally {
    for (const site of pair) {
      await site.gateway.stop();
      await site.inbound.close();
    }
    await disposeAllVms();
    removeTempDir(dir);
  }
}

async function main(): Promise<void> {
  const { values } = benchOptions({ mbit: { type: 'string' }, 'delay-ms': { type: 'string' }, 'mem-mib': { type: 'string' }, 'workload-mib': { type: 'string' }, seeds: { type: 'string' }, qemu: { type: 'string' }, multifd: { type: 'string' } });
  const qemu = (values.qemu ?? '10.0') as QemuRelease;
  if (!(QEMU_RELEASES as readonly string[]).includes(qemu)) throw new Error(`--qemu takes ${QEMU_RELEASES.join(' or ')}`);
  const [seedA, seedB] = (values.seeds ?? '5,6').split(',').map(Number);
  const channels = Number(values.multifd ?? 0);
  if (!Number.isInteger(channels) || channels < 0) throw new Error('--multifd takes a number of channels');
  ensureGuestBuilt();
  for (const mbit of (values.mbit ?? '100,1000').split(',').map(Number)) {
    await runAt({ qemu, memMiB: Number(values['mem-mib'] ?? 256), workloadMiB: Number(values['workload-mib'] ?? 128), mbit, delayMs: Number(values['delay-ms'] ?? 20), channels }, [seedA, seedB]);
  }
}

if (require.main === module) {
  main().catch((err: unknown) => {
    console.error(err);
    process.exitCode = 1;
  });
}
