/**
 * The product end to end: two gateways on loopback, a self-verifying guest in real QEMU migrating
 * A → B → A → B through them. Captures on both sides of the gateway pair prove each rebuilt stream
 * byte-identical to what the source QEMU sent; the guest verifies its memory after every leg.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Capture } from '../src/lab/capture';
import { listSnapshots } from '../src/cli/snapshots';
import { restoreSnapshot } from '../src/cli/restore';
import { startLoggedGateway } from '../src/lab/harness/gateway-pair';
import { loopbackSiteYaml } from '../src/lab/harness/loopback-config';
import type { Gateway } from '../src/gateway/gateway';
import type { GatewayMetrics } from '../src/gateway/metrics';
import type { MigrationReport } from '../src/gateway/session';
import { MigrationFailedError } from '../src/lab/vm/qmp-types';
import { QemuVm, disposeAllVms } from '../src/lab/vm/qemu-vm';
import { resumeSource, verifiedOrSourceBroken } from '../src/lab/vm/replay-verdict';
import { ensureGuestBuilt } from '../src/lab/vm/guest-image';
import { freePort } from '../src/lab/vm/ports';
import { suiteTempDir } from './temp-dir';

const SKIP = process.env.BFMIG_SKIP_E2E === '1';
const VERIFIED = /WORKLOAD VERIFY OK round=\d+ pages=\d+/;

interface Site {
  name: string;
  gateway: Gateway;
  metrics: GatewayMetrics;
  /** The source QEMU here migrates to this port (a capture in front of the gateway's route). */
  routePort: number;
  /** The destination QEMU here listens on this port (behind a capture). */
  qemuPort: number;
  /** The far gateway dials this port to reach our destination QEMU: a capture forwarding to qemuPort. */
  targetPort: number;
  logs: Array<Record<string, unknown>>;
}

(SKIP ? describe.skip : describe)('gateways: back and forth with real QEMU', () => {
  let tmp = '';
  const sites: Site[] = [];
  const options = { machine: 'pc-i440fx-7.2', memMiB: 256, workload: { mib: 64, seed: 11, rewritePct: 0, intervalMs: 500 } };

  beforeAll(async () => {
    ensureGuestBuilt();
    tmp = suiteTempDir('bfmig-gw-');
    const ports = await Promise.all(Array.from({ length: 10 }, () => freePort()));
    const [peerA, peerB, routeA, routeB, gwRouteA, gwRouteB, qemuA, qemuB, targetA, targetB] = ports;
    const specs = [
      { name: 'site-a', peer: peerA, farPeer: peerB, route: routeA, gwRoute: gwRouteA, qemu: qemuA, target: targetA, farTarget: targetB },
      { name: 'site-b', peer: peerB, farPeer: peerA, route: routeB, gwRoute: gwRouteB, qemu: qemuB, target: targetB, farTarget: targetA },
    ];
    for (const s of specs) {
      const yaml = loopbackSiteYaml({ name: s.name, data: path.join(tmp, s.name), peerPort: s.peer, vm: 'vm1', routePort: s.gwRoute, farPeerPort: s.farPeer, targetPort: s.farTarget });
      const { gateway, metrics, logs } = await startLoggedGateway(s.name, yaml);
      sites.push({ name: s.name, gateway, metrics, routePort: s.route, qemuPort: s.qemu, targetPort: s.target, logs });
    }
  });

  afterAll(async () => {
    await disposeAllVms();
    for (const s of sites) await s.gateway.stop(1);
  });

  /** One leg: the VM running at `from` migrates through both gateways to a fresh QEMU at `to`. */
  async function leg(source: QemuVm, from: Site, to: Site, n: number, returnPath = false, repeated = false): Promise<{ dest: QemuVm; sent: MigrationReport; received: MigrationReport; firstSent: MigrationReport }> {
    const dest = new QemuVm({ ...options, name: `leg${n}-${to.name}`, incoming: `tcp:127.0.0.1:${to.qemuPort}` });
    await dest.start();
    if (returnPath) {
      await dest.setMigrationCapabilities({ 'return-path': true });
      await source.setMigrationCapabilities({ 'return-path': true });
    }
    const sourceSide = new Capture({ listen: { host: '127.0.0.1', port: from.routePort }, out: path.join(tmp, `leg${n}-source.mig`), forward: { host: '127.0.0.1', port: from.gateway.bound.get('route:vm1')?.port ?? 0 } });
    const destSide = new Capture({ listen: { host: '127.0.0.1', port: to.targetPort }, out: path.join(tmp, `leg${n}-dest.mig`), forward: { host: '127.0.0.1', port: to.qemuPort } });
    await sourceSide.listen();
    await destSide.listen();
    const historyFrom = from.gateway.history.length;
    const historyTo = to.gateway.history.length;
    await source.migrate(`tcp:127.0.0.1:${from.routePort}`);
    const info = await source.waitForMigration({ timeoutMs: 300_000 });
    expect(info.status).toBe('completed');
    const [a, b] = await Promise.all([sourceSide.done, destSide.done]);
    const lastLines = (s: Site): string => s.logs.slice(-12).map((l) => JSON.stringify(l)).join('\n');
    if (a.error || b.error) console.log(lastLines(from), '\n----\n', lastLines(to));
    expect(a.error).toBeNull();
    expect(b.error).toBeNull();
    // The destination QEMU received exactly the bytes the source QEMU sent (checked before the guest, so
    // that a guest failure after an identical rebuild is known to lie outside the gateways).
    const sent = fs.readFileSync(path.join(tmp, `leg${n}-source.mig`));
    const received = fs.readFileSync(path.join(tmp, `leg${n}-dest.mig`));
    expect(received.length).toBe(sent.length);
    expect(received.equals(sent)).toBe(true);
    for (let i = 0; i < 100 && (from.gateway.history.length === historyFrom || to.gateway.history.length === historyTo); i++) {
      await new Promise((r) => setTimeout(r, 50));
    }
    const sentReport = from.gateway.history[historyFrom];
    const receivedReport = to.gateway.history[historyTo];
    expect(sentReport).toMatchObject({ direction: 'send', result: 'completed', streamBytes: sent.length });
    expect(receivedReport).toMatchObject({ direction: 'receive', result: 'completed', streamBytes: sent.length, snapshotId: sentReport.snapshotId });
    // QEMU 7.2's TCG now and then sends a state that does not run (README, "Known problem"). The bytes
    // were identical; if the source's own bytes fail in a fresh QEMU with no gateway too, the leg is
    // repeated once from the source, which still holds the intact guest. Otherwise the test fails.
    const verdict = await verifiedOrSourceBroken(dest, path.join(tmp, `leg${n}-source.mig`), VERIFIED);
    if (verdict) {
      if (repeated) throw new Error(`leg ${n} repeated: ${verdict.detail}`);
      // eslint-disable-next-line no-console
      console.log(`leg ${n}: the destination guest failed after a byte-identical rebuild and ${verdict.detail}: repeating the leg once`);
      await dest.dispose();
      await resumeSource(source, VERIFIED);
      // The gateways' figures are the first attempt's (what they did with the bytes is checked above).
      return { ...(await leg(source, from, to, n, returnPath, true)), firstSent: sentReport };
    }
    return { dest, sent: sentReport, received: receivedReport, firstSent: sentReport };
  }

  test('A → B → A → B → A: byte-identical rebuilds, verified guest, back legs cost only what changed', async () => {
    const [a, b] = sites;
    let vm = new QemuVm({ ...options, name: 'origin' });
    await vm.start();
    await vm.waitForSerial(/WORKLOAD READY/, 180_000);
    const legs: MigrationReport[] = [];
    let lastSnapshotId = '';
    const route: [Site, Site][] = [
      [a, b],
      [b, a],
      [a, b],
      [b, a],
    ];
    for (const [n, [from, to]] of route.entries()) {
      // The last leg turns on QEMU's return path: the destination talks back through both gateways.
      const result = await leg(vm, from, to, n + 1, n === 3);
      await vm.dispose();
      vm = result.dest;
      legs.push(result.firstSent);
      lastSnapshotId = result.sent.snapshotId ?? '';
    }
    const [first, second, third, fourth] = legs;
    expect(fourth.mode).toBe('shared-snapshot');
    expect(fourth.wanBytesIn).toBeGreaterThan(first.wanBytesIn);
    expect(first.mode).toBe('none');
    // Nothing held at B: only pages QEMU sent twice with the same content (in a later pass) are reused.
    expect(first.counts.pagesReused).toBeLessThan(0.01 * first.counts.pagesSent);
    expect(second.mode).toBe('shared-snapshot');
    expect(third.mode).toBe('shared-snapshot');
    // An idle guest's way back costs a small fraction of the first leg.
    for (const back of [second, third]) {
      expect(back.counts.pagesReused).toBeGreaterThan(16384);
      expect(back.wanBytesOut).toBeLessThan(first.wanBytesOut * 0.05);
    }
    // The far site fails: the VM (now back at A) is gone. B retained the last migration's snapshot —
    // it sent it — and `bfmig restore` brings the VM back in a fresh QEMU there.
    await vm.dispose();
    const restorePort = await freePort();
    const restored = new QemuVm({ ...options, name: 'restored-at-b', incoming: `tcp:127.0.0.1:${restorePort}` });
    await restored.start();
    expect(listSnapshots(path.join(tmp, 'site-b'))).toMatchObject([{ vm: 'vm1', snapshotId: lastSnapshotId, restorable: true, machineType: 'pc-i440fx-7.2', minQemuRelease: '7.2' }]);
    const result = await restoreSnapshot(path.join(tmp, 'site-b'), 'vm1', { host: '127.0.0.1', port: restorePort });
    expect(result.snapshotId).toBe(lastSnapshotId);
    await restored.waitForStatus('running', 60_000);
    await restored.waitForSerial(VERIFIED, 60_000);
    vm = restored;

    const text = await b.metrics.registry.metrics();
    expect(text).toMatch(/bfmig_migrations_total\{[^}]*result="completed"[^}]*\} [1-9]/);
    expect(a.logs.some((l) => l.msg === 'migration completed')).toBe(true);
    // eslint-disable-next-line no-console
    console.log(legs.map((l, i) => `leg ${i + 1}: stream ${l.streamBytes} B, WAN ${l.wanBytesOut} B, sent ${l.counts.pagesSent}, reused ${l.counts.pagesReused}, zero ${l.counts.pagesZero}, ${l.seconds.toFixed(2)} s`).join('\n'));
  }, 900_000);

  test('an unreachable peer fails the source migration promptly; the VM keeps running', async () => {
    const closedPort = await freePort();
    const routePort = await freePort();
    const { gateway } = await startLoggedGateway(
      'lonely',
      ['name: lonely', `data: ${path.join(tmp, 'lonely')}`, 'peerListen: 127.0.0.1:0', 'routes:', '  - vm: vm2', `    listen: 127.0.0.1:${routePort}`, `    peer: 127.0.0.1:${closedPort}`, '    target: 127.0.0.1:4444'].join('\n'),
    );
    const vm = new QemuVm({ ...options, name: 'lonely-source' });
    try {
      await vm.start();
      await vm.waitForSerial(/WORKLOAD READY/, 180_000);
      const t0 = Date.now();
      await vm.migrate(`tcp:127.0.0.1:${routePort}`);
      const failure = await vm.waitForMigration({ timeoutMs: 60_000 }).then(
        () => null,
        (err: unknown) => err,
      );
      expect(failure).toBeInstanceOf(MigrationFailedError);
      expect((failure as MigrationFailedError).info.status).toBe('failed');
      expect(Date.now() - t0).toBeLessThan(15_000);
      expect(await vm.status()).toMatchObject({ status: 'running', running: true });
      const round = Number(/round=(\d+)/.exec(vm.serial.split('\n').reverse().find((l) => VERIFIED.test(l)) ?? 'round=0')?.[1]);
      await vm.waitForSerial(new RegExp(`WORKLOAD VERIFY OK round=${round + 1} `), 30_000);
      expect(gateway.history.at(-1)).toMatchObject({ vm: 'vm2', direction: 'send', result: 'failed' });
    } finally {
      await vm.dispose();
      await gateway.stop(1);
    }
  }, 300_000);
});
