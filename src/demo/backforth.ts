import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Writable } from 'node:stream';
import { parseConfig } from '../gateway/config';
import { loopbackSiteYaml } from './loopback-config';
import { Gateway } from '../gateway/gateway';
import { createLogger } from '../gateway/log';
import { GatewayMetrics } from '../gateway/metrics';
import type { MigrationReport } from '../gateway/session';
import { type MigrationInfo, QemuVm, disposeAllVms, ensureGuestBuilt, freePort } from '../vm/qemu-vm';
import { WanEmulator } from '../wan';

export interface BackForthOptions {
  legs: number;
  memMiB: number;
  workloadMiB: number;
  /** Share of the workload's pages the guest rewrites per second. */
  rewritePct: number;
  rateMbit: number;
  delayMs: number;
  machine: string;
  /** Also migrate directly, QEMU to QEMU through the same WAN emulator, for comparison. */
  direct: boolean;
  /** Prints progress lines; a TTY gets one updating line per leg. */
  out: NodeJS.WriteStream | Writable;
}

export interface LegResult {
  leg: number;
  path: 'direct' | 'bfmig';
  from: string;
  to: string;
  wanBytes: number;
  streamBytes: number;
  totalTimeMs: number;
  downtimeMs: number;
  pagesSent: number;
  pagesReused: number;
  verified: boolean;
}

interface Site {
  name: string;
  gateway: Gateway;
  /** The source QEMU at this site migrates to this port (the gateway's route). */
  routePort: number;
  /** The destination QEMU at this site listens here. */
  qemuPort: number;
  /** The far gateway's connections to this site arrive through this emulator. */
  inbound: WanEmulator;
}

const VERIFIED = /WORKLOAD VERIFY OK round=\d+ pages=\d+/;

/**
 * Migrates a self-verifying guest back and forth between two sites on this machine, through two
 * bfmig gateways joined by a user-space WAN emulator, and (optionally) directly through the same
 * emulator. Everything stays on loopback.
 */
export async function runBackForth(o: BackForthOptions): Promise<LegResult[]> {
  ensureGuestBuilt();
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'bfmig-backforth-'));
  const say = (line: string): void => void o.out.write(line + '\n');
  const sites: Site[] = [];
  const results: LegResult[] = [];
  const vmOptions = { machine: o.machine, memMiB: o.memMiB, workload: { mib: o.workloadMiB, seed: 5, rewritePct: o.rewritePct, intervalMs: 1000 } };
  try {
    const [peerA, peerB, routeA, routeB, qemuA, qemuB] = await Promise.all(Array.from({ length: 6 }, () => freePort()));
    const inboundA = new WanEmulator({ listen: { host: '127.0.0.1', port: 0 }, target: { host: '127.0.0.1', port: peerA }, rateMbit: o.rateMbit, delayMs: o.delayMs });
    const inboundB = new WanEmulator({ listen: { host: '127.0.0.1', port: 0 }, target: { host: '127.0.0.1', port: peerB }, rateMbit: o.rateMbit, delayMs: o.delayMs });
    const wanA = await inboundA.listen();
    const wanB = await inboundB.listen();
    const specs = [
      { name: 'site-a', peer: peerA, farWan: wanB.port, route: routeA, qemu: qemuA, farQemu: qemuB, inbound: inboundA },
      { name: 'site-b', peer: peerB, farWan: wanA.port, route: routeB, qemu: qemuB, farQemu: qemuA, inbound: inboundB },
    ];
    for (const s of specs) {
      const config = parseConfig(
        loopbackSiteYaml({ name: s.name, data: path.join(tmp, s.name), peerPort: s.peer, vm: 'demo-vm', routePort: s.route, farPeerPort: s.farWan, targetPort: s.farQemu }),
      );
      const log = createLogger({ name: s.name, level: 'warn', destination: fs.createWriteStream(path.join(tmp, `${s.name}.log`)) });
      const gateway = new Gateway(config, log, new GatewayMetrics({ defaultMetrics: false }));
      await gateway.start();
      sites.push({ name: s.name, gateway, routePort: s.route, qemuPort: s.qemu, inbound: s.inbound });
    }

    say(`guest: ${o.memMiB} MiB RAM (${o.machine}), workload ${o.workloadMiB} MiB of pseudo-random pages, rewriting ${o.rewritePct}%/s`);
    say(`WAN: ${o.rateMbit} Mbit/s, ${o.delayMs} ms one way (user-space emulator); QEMU max-bandwidth raised to 10 GiB/s`);
    for (const path_ of o.direct ? (['direct', 'bfmig'] as const) : (['bfmig'] as const)) {
      let vm = new QemuVm({ ...vmOptions, name: `${path_}-origin` });
      await vm.start();
      await vm.waitForSerial(/WORKLOAD READY/, 180_000);
      await vm.waitForSerial(VERIFIED, 60_000);
      for (let leg = 1; leg <= o.legs; leg++) {
        const from = sites[(leg - 1) % 2];
        const to = sites[leg % 2];
        const dest = new QemuVm({ ...vmOptions, name: `${path_}-leg${leg}`, incoming: `tcp:127.0.0.1:${to.qemuPort}` });
        await dest.start();
        let wanBefore = 0;
        let uri: string;
        let directWan: WanEmulator | null = null;
        if (path_ === 'direct') {
          directWan = new WanEmulator({ listen: { host: '127.0.0.1', port: 0 }, target: { host: '127.0.0.1', port: to.qemuPort }, rateMbit: o.rateMbit, delayMs: o.delayMs });
          uri = `tcp:127.0.0.1:${(await directWan.listen()).port}`;
        } else {
          wanBefore = to.inbound.bytesForward + to.inbound.bytesBackward;
          uri = `tcp:127.0.0.1:${from.routePort}`;
        }
        const history = from.gateway.history.length;
        await vm.migrate(uri);
        const info = await waitWithProgress(vm, `leg ${leg} ${path_.padEnd(6)} ${from.name} → ${to.name}`, o.out);
        const verified = await dest
          .waitForStatus('running', 60_000)
          .then(() => dest.waitForSerial(VERIFIED, 60_000))
          .then(
          () => true,
          () => false,
        );
        let wanBytes: number;
        let report: MigrationReport | undefined;
        if (directWan) {
          wanBytes = directWan.bytesForward + directWan.bytesBackward;
          await directWan.close();
        } else {
          for (let i = 0; i < 200 && from.gateway.history.length === history; i++) await sleep(25);
          report = from.gateway.history[history];
          wanBytes = to.inbound.bytesForward + to.inbound.bytesBackward - wanBefore;
        }
        const result: LegResult = {
          leg,
          path: path_,
          from: from.name,
          to: to.name,
          wanBytes,
          streamBytes: report?.streamBytes ?? info.ram?.transferred ?? 0,
          totalTimeMs: info['total-time'] ?? 0,
          downtimeMs: info.downtime ?? 0,
          pagesSent: report ? report.counts.pagesSent : info.ram?.normal ?? 0,
          pagesReused: report?.counts.pagesReused ?? 0,
          verified: verified && info.status === 'completed',
        };
        results.push(result);
        say(`leg ${leg} ${path_.padEnd(6)} ${from.name} → ${to.name}: ${mib(wanBytes)} over the WAN in ${(result.totalTimeMs / 1000).toFixed(1)} s, guest memory ${result.verified ? 'verified' : 'NOT VERIFIED'}`);
        await vm.dispose();
        vm = dest;
        if (!result.verified) {
          // Carry on with a fresh guest so the remaining legs are still measured.
          say(`  the guest did not survive leg ${leg}; booting a fresh one at ${to.name}`);
          await vm.dispose();
          vm = new QemuVm({ ...vmOptions, name: `${path_}-reboot${leg}` });
          await vm.start();
          await vm.waitForSerial(/WORKLOAD READY/, 180_000);
          await vm.waitForSerial(VERIFIED, 60_000);
        }
      }
      await vm.dispose();
    }
    return results;
  } finally {
    await disposeAllVms();
    for (const s of sites) {
      await s.gateway.stop(1);
      await s.inbound.close();
    }
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}

async function waitWithProgress(vm: QemuVm, label: string, out: NodeJS.WriteStream | Writable): Promise<MigrationInfo> {
  const tty = 'isTTY' in out && out.isTTY === true;
  const timer = tty
    ? setInterval(() => {
        vm.qmp('query-migrate').then(
          (r) => {
            const info = r as MigrationInfo;
            out.write(`\r${label}: ${info.status ?? '?'} ${mib(info.ram?.transferred ?? 0)} from QEMU   `);
          },
          () => undefined,
        );
      }, 500)
    : null;
  try {
    return await vm.waitForMigration({ timeoutMs: 900_000 });
  } finally {
    if (timer) {
      clearInterval(timer);
      out.write('\r\x1b[K');
    }
  }
}

export function formatTable(results: LegResult[]): string {
  const rows = [['leg', 'path', 'from → to', 'WAN bytes', 'WAN MiB', 'total time s', 'downtime ms', 'pages sent', 'pages reused', 'guest']];
  for (const r of results) {
    rows.push([
      String(r.leg),
      r.path,
      `${r.from} → ${r.to}`,
      r.wanBytes.toLocaleString('en-US'),
      (r.wanBytes / 2 ** 20).toFixed(2),
      (r.totalTimeMs / 1000).toFixed(2),
      String(r.downtimeMs),
      String(r.pagesSent),
      String(r.pagesReused),
      r.verified ? 'verified' : 'FAILED',
    ]);
  }
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  return rows.map((r) => r.map((c, i) => (i >= 3 && i <= 8 ? c.padStart(widths[i]) : c.padEnd(widths[i]))).join('  ')).join('\n');
}

const mib = (bytes: number): string => `${(bytes / 2 ** 20).toFixed(1)} MiB`;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
