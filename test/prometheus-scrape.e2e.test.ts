/**
 * A real Prometheus server scrapes two gateways while a real guest (QEMU 10.0 where installed, else 7.2)
 * migrates A → B → A
 * through them: what its query API says the migrations saved is what the gateways' own log lines say,
 * the recording rules of deploy/prometheus agree, and no alert fires.
 */
import * as path from 'node:path';
import { type LoggedGateway, startLoggedGateway } from '../src/lab/harness/gateway-pair';
import { loopbackSiteYaml } from '../src/lab/harness/loopback-config';
import { ensureGuestBuilt } from '../src/lab/vm/guest-image';
import { freePort } from '../src/lab/vm/ports';
import { disposeAllVms, QemuVm } from '../src/lab/vm/qemu-vm';
import { steadiestQemu } from '../src/lab/vm/qemu-releases';
import { onPath, requireInCi } from './mounts';
import { eventually } from './eventually';
import { PrometheusServer } from './prometheus-server';
import { suiteTempDir } from './temp-dir';

const SKIP = process.env.BFMIG_SKIP_E2E === '1';
const VERIFIED = /WORKLOAD VERIFY OK round=\d+ pages=\d+/;
/**
 * What this suite checks is the metrics, not a QEMU release: 10.0 where installed (CI installs it), since
 * QEMU 7.2's software emulation now and then panics a guest right after it resumes (README, "Known
 * problem"; seen here once in CI, on the first leg's destination).
 */
const { machine, qemuBinary } = steadiestQemu();
const QEMU = { machine, qemuBinary };

/** A site: its gateway (with its log lines), the port its source QEMU migrates to, the port its destination QEMU listens on. */
type Site = Pick<LoggedGateway, 'gateway' | 'logs'> & { name: string; routePort: number; qemuPort: number };

/** A 'migration completed' log line: the gateway's own account of one migration. */
interface Completed {
  vm: string;
  direction: 'send' | 'receive';
  streamBytes: number;
  wanBytes: number;
}

const completed = (site: Site): Completed[] => site.logs.filter((l) => l.msg === 'migration completed') as unknown as Completed[];

(SKIP || !requireInCi(onPath('prometheus'), "a Prometheus server (Debian's prometheus package)") ? describe.skip : describe)('Prometheus scraping two gateways during a real migration', () => {
  let tmp = '';
  const sites: Site[] = [];
  let prometheus: PrometheusServer | null = null;
  const options = { ...QEMU, memMiB: 256, workload: { mib: 64, seed: 5, rewritePct: 0, intervalMs: 500 } };

  beforeAll(async () => {
    ensureGuestBuilt();
    tmp = suiteTempDir('bfmig-prom-');
    const [peerA, peerB, routeA, routeB, qemuA, qemuB] = await Promise.all(Array.from({ length: 6 }, () => freePort()));
    const specs = [
      { name: 'site-a', peer: peerA, farPeer: peerB, route: routeA, qemu: qemuA, farQemu: qemuB },
      { name: 'site-b', peer: peerB, farPeer: peerA, route: routeB, qemu: qemuB, farQemu: qemuA },
    ];
    const targets = new Map<string, { host: string; port: number }>();
    for (const s of specs) {
      const yaml = loopbackSiteYaml({ name: s.name, data: path.join(tmp, s.name), peerPort: s.peer, vm: 'vm1', routePort: s.route, farPeerPort: s.farPeer, targetPort: s.farQemu }) + 'metrics: 127.0.0.1:0\n';
      const { gateway, logs } = await startLoggedGateway(s.name, yaml);
      const metrics = gateway.bound.get('metrics');
      if (!metrics) throw new Error(`${s.name} serves no metrics`);
      targets.set(s.name, metrics);
      sites.push({ name: s.name, gateway, routePort: s.route, qemuPort: s.qemu, logs });
    }
    prometheus = await PrometheusServer.start(suiteTempDir('bfmig-prom-server-'), targets);
  });

  afterAll(async () => {
    await disposeAllVms();
    await prometheus?.stop();
    for (const s of sites) await s.gateway.stop(1);
  });

  /** The VM running at `from` migrates through both gateways to a fresh QEMU at `to`. */
  async function leg(source: QemuVm, from: Site, to: Site, n: number): Promise<QemuVm> {
    const dest = new QemuVm({ ...options, name: `prom-leg${n}-${to.name}`, incoming: `tcp:127.0.0.1:${to.qemuPort}` });
    await dest.start();
    await source.migrate(`tcp:127.0.0.1:${from.routePort}`);
    expect((await source.waitForMigration({ timeoutMs: 300_000 })).status).toBe('completed');
    await dest.waitForStatus('running', 60_000);
    await dest.waitForSerial(VERIFIED, 60_000);
    await eventually(async () => completed(from).length === n && completed(to).length === n, 30_000, () => 'the gateways did not report the migration');
    return dest;
  }

  test('its query API reports the savings the gateways logged; the recording rules agree; no alert fires', async () => {
    const prom = prometheus as PrometheusServer;
    const [a, b] = sites;
    const query = (expr: string): ReturnType<PrometheusServer['query']> => prom.query(expr);
    // Both gateways scraped, with the route's send counters at 0, before anything migrates.
    await eventually(async () => (await query('bfmig_wan_bytes_total{job="bfmig",direction="send"} == 0')).length === 2, 30_000, () => `no first scrape:\n${prom.log}`);

    let vm = new QemuVm({ ...options, name: 'prom-origin' });
    await vm.start();
    await vm.waitForSerial(/WORKLOAD READY/, 180_000);
    for (const [n, [from, to]] of ([[a, b], [b, a]] as const).entries()) {
      const dest = await leg(vm, from, to, n + 1);
      await vm.dispose();
      vm = dest;
    }

    // The gateways' own account: one send and one receive line per leg.
    const lines = [...completed(a), ...completed(b)];
    const sends = lines.filter((l) => l.direction === 'send');
    expect(sends).toHaveLength(2);
    const wan = sends.reduce((sum, l) => sum + l.wanBytes, 0);
    const stream = sends.reduce((sum, l) => sum + l.streamBytes, 0);
    const sum = async (expr: string): Promise<number | undefined> => (await query(expr))[0]?.value;
    // Prometheus has scraped the final totals, and every side's end (its count and last-migration gauges
    // are set together).
    await eventually(
      async () =>
        (await sum('sum(bfmig_wan_bytes_total{direction="send"})')) === wan &&
        (await sum('sum(bfmig_qemu_stream_bytes_total{direction="send"})')) === stream &&
        (await sum('sum(bfmig_migrations_total{result="completed"})')) === lines.length,
      30_000,
      () => `Prometheus never scraped the final totals (WAN ${wan} B, stream ${stream} B, ${lines.length} migrations)`,
    );

    // Each gateway's last migration, each direction: the ratio Prometheus holds is the one its log line gives.
    for (const site of sites) {
      for (const direction of ['send', 'receive'] as const) {
        const last = completed(site).filter((l) => l.direction === direction).at(-1) as Completed;
        const scraped = await query(`bfmig_saving_ratio{site="${site.name}",vm="vm1",direction="${direction}"}`);
        expect(scraped).toHaveLength(1);
        expect(scraped[0].value).toBeCloseTo(1 - last.wanBytes / last.streamBytes, 12);
      }
    }
    // The way back reused the pages the first leg left at A's far site: it saved almost everything.
    const back = completed(b).find((l) => l.direction === 'send') as Completed;
    expect(1 - back.wanBytes / back.streamBytes).toBeGreaterThan(0.9);

    // The VM's saving over both legs, from the counters.
    const saving = 1 - wan / stream;
    const overall = await query('1 - sum by (vm) (bfmig_wan_bytes_total{direction="send"}) / sum by (vm) (bfmig_qemu_stream_bytes_total{direction="send"})');
    expect(overall.map((s) => s.metric.vm)).toEqual(['vm1']);
    expect(overall[0].value).toBeCloseTo(saving, 12);
    // The recording rule: increase() over the last hour. It extrapolates each gateway's counters past
    // their last scrape by up to one scrape interval (1 s) over the time they have been scraped, and
    // the two gateways are scraped at different instants, so it nears the counters' figure as that
    // time grows: within 0.01 once it is about a minute.
    await eventually(
      async () => Math.abs(((await sum('vm:bfmig_saving:ratio1h{vm="vm1"}')) ?? NaN) - saving) < 0.01,
      180_000,
      () => `vm:bfmig_saving:ratio1h is not near ${saving}`,
    );
    // WAN bytes per second per VM and direction: the route's send series count from 0, so each is seen.
    // Waited for, as the totals above are: once (a CI run on a loaded host) the rule's output lacked the
    // receive series right after the legs, which a scrape that overran its 1 s interval would explain.
    const rateExpr = 'vm_direction:bfmig_wan_bytes:rate5m{vm="vm1"}';
    const directions = async (): Promise<string> => (await query(rateExpr)).map((r) => r.metric.direction).sort().join(',');
    await eventually(async () => (await directions()) === 'receive,send', 30_000, () => `${rateExpr} has no receive and send series`);
    const rates = await query(rateExpr);
    expect(rates.map((r) => r.metric.direction).sort()).toEqual(['receive', 'send']);
    expect(rates.find((r) => r.metric.direction === 'send')?.value).toBeGreaterThan(0);

    expect(await query('ALERTS{alertstate="firing"}')).toEqual([]);
    const recorded = (await sum('vm:bfmig_saving:ratio1h{vm="vm1"}')) ?? NaN;
    // eslint-disable-next-line no-console
    console.log(`Prometheus: vm1 saved ${(saving * 100).toFixed(2)} % over A → B → A (WAN ${wan} B of ${stream} B stream; recording rule ${(recorded * 100).toFixed(2)} %); back leg ${((1 - back.wanBytes / back.streamBytes) * 100).toFixed(2)} %`);
  }, 900_000);
});
