/**
 * The fault matrix, with real QEMU and real processes on loopback: two `bfmig gateway` child processes
 * joined through TCP relays that stand for the WAN link, and one self-verifying guest that keeps moving
 * between the sites. Each fault hits a migration of that guest (or, for the malformed streams, a
 * stream played into the gateway beside it). Every fault must end in a clean failure: the source QEMU
 * reports a failed migration and its VM keeps running and verifying, the destination QEMU never runs
 * what it got. The migration of that VM started right after the failure must succeed, the guest must
 * verify at the destination, and both stores must hold only pages that match their digests.
 *
 * QEMU's return path is on, as the README recommends: a fault found after the source QEMU has written
 * its last byte (a fast local leg buffers megabytes) reaches it only that way.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { checkStores } from '../src/lab/harness/stores';
import { Capture } from '../src/lab/capture';
import { loopbackMultiRouteYaml } from '../src/lab/harness/loopback-config';
import { type GatewayLegReport, type SiteGateway, startSiteGateway } from '../src/lab/harness/site-gateway';
import { TcpRelay } from '../src/lab/wan';
import { QemuVm, disposeAllVms, type QemuVmOptions } from '../src/lab/vm/qemu-vm';
import { resumeSource, verifiedOrSourceBroken } from '../src/lab/vm/replay-verdict';
import { ensureGuestBuilt } from '../src/lab/vm/guest-image';
import { freePort } from '../src/lab/vm/ports';
import { qemuBinary, qemuInstalled, type QemuRelease } from '../src/lab/vm/qemu-releases';
import { canMountTmpfs, requireInCi } from './mounts';
import { suiteTempDir } from './temp-dir';

/** The QEMU the matrix runs on: 7.2 in the default run, 10.0 with BFMIG_FAULTS_QEMU=10.0 (CI runs both). */
const RELEASE = (process.env.BFMIG_FAULTS_QEMU ?? '7.2') as QemuRelease;
const SKIP = process.env.BFMIG_SKIP_E2E === '1' || (RELEASE !== '7.2' && !requireInCi(qemuInstalled(RELEASE), `QEMU ${RELEASE} (scripts/install-qemu10.sh)`));
const VERIFIED = /WORKLOAD VERIFY OK round=\d+ pages=\d+/;
const VM = 'vm1';
const PAGE = 4096;
/** Slow enough that a fault lands mid-migration: the guest's 64 MiB of data take some 4 s. */
const SLOW = 16 * 1024 * 1024;
const FAST = 4 * 1024 * 1024 * 1024;
/**
 * A row takes some 15 s, but one whose leg QEMU 7.2 sent broken repeats it (migrateOn): the wait for the
 * guest, the replay of the capture and the second leg can each take a minute on a busy machine, past
 * jest's default of two.
 */
jest.setTimeout(480_000);

interface Site {
  name: string;
  yaml: string;
  data: string;
  gateway: SiteGateway;
  /** The source QEMU here migrates to this port (the gateway's route for vm1). */
  routePort: number;
  /** A destination QEMU here listens on this port; the far gateway dials it. */
  qemuPort: number;
  /** The link the far site's gateway reaches this site's gateway through. */
  link: TcpRelay;
}

/** One row of the matrix, printed at the end (the README's fault table comes from it). */
interface Outcome {
  fault: string;
  source: string;
  destination: string;
  storeClaims: string;
  restart: string;
}

/** The snapshot a site's store claims, read from its meta file without opening (and so recovering) it. */
function claimedSnapshot(site: Site): string | null {
  try {
    return (JSON.parse(fs.readFileSync(path.join(site.data, VM, 'meta.json'), 'utf8')) as { snapshotId: string | null }).snapshotId;
  } catch {
    return null;
  }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function waitUntil(what: string | (() => string), condition: () => boolean | Promise<boolean>, timeoutMs = 30_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${typeof what === 'string' ? what : what()}`);
    await sleep(50);
  }
}

(SKIP ? describe.skip : describe)(`fault matrix with real QEMU ${RELEASE}`, () => {
  let tmp = '';
  let a: Site;
  let b: Site;
  /** The running guest, and the site it runs at. */
  let vm: QemuVm;
  let here: Site;
  /** A real QEMU stream of this guest (its first leg), for the malformed-stream faults. */
  let captured: Buffer;
  const outcomes: Outcome[] = [];
  const options: QemuVmOptions = {
    machine: RELEASE === '7.2' ? 'pc-i440fx-7.2' : 'pc-i440fx-10.0',
    qemuBinary: qemuBinary(RELEASE),
    memMiB: 256,
    workload: { mib: 64, seed: 23, rewritePct: 0, intervalMs: 500 },
  };
  const there = (): Site => (here === a ? b : a);

  /** The QEMUs a row started; the one that is the guest afterwards stays, the others go once the row ends. */
  const rowVms = new Set<QemuVm>();
  function rowVm(o: QemuVmOptions): QemuVm {
    const made = new QemuVm(o);
    rowVms.add(made);
    return made;
  }

  /**
   * A row that failed midway must not take the rows after it down: its destination QEMUs still hold
   * the sites' QEMU ports, a gateway it killed is not running, and the guest may still be migrating
   * with the row's capabilities on. (A row that passed has left nothing of this behind.)
   */
  afterEach(async () => {
    for (const made of rowVms) if (made !== vm) await made.dispose();
    rowVms.clear();
    for (const site of [a, b]) if (site && !site.gateway.alive()) await startGateway(site);
    if (!vm || vm.exit) return;
    const info = await vm.queryMigrate().catch(() => null);
    if (info && ['setup', 'active', 'device', 'pre-switchover'].includes(info.status ?? '')) {
      await vm.qmp('migrate_cancel').catch(() => undefined);
      await vm.waitForMigration({ timeoutMs: 30_000, allowFailure: true }).catch(() => undefined);
    }
    await vm.setMigrationCapabilities({ 'postcopy-ram': false, multifd: false }).catch(() => undefined);
  });

  async function startGateway(site: Site): Promise<void> {
    site.gateway = await startSiteGateway(tmp, site.name, site.yaml, 'child-process');
  }

  beforeAll(async () => {
    ensureGuestBuilt();
    tmp = suiteTempDir('bfmig-faultmx-');
    const [peerA, peerB, routeA, routeB, qemuA, qemuB] = await Promise.all(Array.from({ length: 6 }, () => freePort()));
    // linkToB carries A's gateway to B's, and the other way round.
    const linkToB = new TcpRelay({ listen: { host: '127.0.0.1', port: 0 }, target: { host: '127.0.0.1', port: peerB } });
    const linkToA = new TcpRelay({ listen: { host: '127.0.0.1', port: 0 }, target: { host: '127.0.0.1', port: peerA } });
    const [toB, toA] = [await linkToB.listen(), await linkToA.listen()];
    const site = (name: string, peer: number, farLink: number, route: number, qemu: number, farQemu: number, link: TcpRelay): Site => {
      const data = path.join(tmp, name);
      fs.mkdirSync(data);
      const yaml = loopbackMultiRouteYaml({ name, data, peerPort: peer, farPeerPort: farLink, routes: [{ vm: VM, routePort: route, targetPort: farQemu }] });
      return { name, yaml, data, routePort: route, qemuPort: qemu, link, gateway: null as unknown as SiteGateway };
    };
    a = site('site-a', peerA, toB.port, routeA, qemuA, qemuB, linkToA);
    b = site('site-b', peerB, toA.port, routeB, qemuB, qemuA, linkToB);
    await startGateway(a);
    await startGateway(b);
    vm = new QemuVm({ ...options, name: 'origin' });
    await vm.start();
    await vm.setMigrationCapabilities({ 'return-path': true });
    await vm.waitForSerial(/WORKLOAD READY/, 180_000);
    here = a;
  });

  afterAll(async () => {
    await disposeAllVms();
    for (const s of [a, b]) {
      await s?.gateway?.stop();
      await s?.link.close();
    }
    if (outcomes.length > 0) {
      console.log(
        ['fault matrix (real QEMU):', ...outcomes.map((o) => `- ${o.fault} | source: ${o.source} | destination: ${o.destination} | stores: ${o.storeClaims} | next migration: ${o.restart}`)].join(
          '\n',
        ),
      );
    }
  });

  /** Reports `site`'s gateway has written since `count`, once it has written `n` more. */
  async function reportsAfter(site: Site, count: number, n = 1): Promise<GatewayLegReport[]> {
    await waitUntil(`${site.name} to report`, () => site.gateway.reports.length >= count + n);
    return site.gateway.reports.slice(count);
  }

  /**
   * The receiving gateway's report of the leg whose snapshot is `snapshotId`, among its reports after
   * `count`. The failed migration before a restart is reported once all its sessions have ended, which
   * can be after the restart began: on a slow host a cancelled multifd migration's 'failed' came after
   * `count` was taken, and was read as the restart's. Without a snapshot (a store that kept nothing),
   * the first report after `count`; if none names the snapshot in time, the last one, for the message.
   */
  async function receiveReportOf(site: Site, count: number, snapshotId: string | null): Promise<GatewayLegReport> {
    const [first] = await reportsAfter(site, count);
    if (snapshotId === null) return first;
    const named = (): GatewayLegReport | undefined => site.gateway.reports.slice(count).find((r) => r.snapshotId === snapshotId);
    await waitUntil(`${site.name} to report snapshot ${snapshotId}`, () => named() !== undefined).catch(() => undefined);
    return named() ?? (site.gateway.reports.at(-1) as GatewayLegReport);
  }

  /** The last lines `site`'s gateway logged, for a failure's message. */
  const logTail = (site: Site): string => [`${site.name}:`, ...site.gateway.logLines.slice(-12)].join('\n');

  /** A destination QEMU at `site`, waiting for the stream. */
  async function destinationAt(site: Site, label: string): Promise<QemuVm> {
    const dest = rowVm({ ...options, name: `${label}-at-${site.name}`, incoming: `tcp:127.0.0.1:${site.qemuPort}` });
    await dest.start();
    // With the return path a destination that fails to load tells the source, which then fails the
    // migration and resumes its VM even when it had already sent its last byte.
    await dest.setMigrationCapabilities({ 'return-path': true });
    return dest;
  }

  /** The guest moves from `here` to the other site; it must complete and verify there. Returns the send report. */
  async function migrateOn(repeated = false): Promise<GatewayLegReport> {
    const from = here;
    const to = there();
    const counts = [from.gateway.reports.length, to.gateway.reports.length];
    const dest = await destinationAt(to, 'next');
    // What the source sent, kept to tell a guest state QEMU 7.2 sent broken from one the gateways broke.
    const capturePort = await freePort();
    const out = path.join(tmp, 'leg.mig');
    const capture = new Capture({ listen: { host: '127.0.0.1', port: capturePort }, out, forward: { host: '127.0.0.1', port: from.routePort } });
    await capture.listen();
    vm.setMaxBandwidth(FAST);
    await vm.migrate(`tcp:127.0.0.1:${capturePort}`);
    const info = await vm.waitForMigration({ timeoutMs: 300_000 });
    expect(info.status).toBe('completed');
    expect((await capture.done).error).toBeNull();
    const [sent] = await reportsAfter(from, counts[0]);
    expect(sent).toMatchObject({ vm: VM, direction: 'send', result: 'completed' });
    const received = await receiveReportOf(to, counts[1], sent.snapshotId);
    expect(received).toMatchObject({ vm: VM, direction: 'receive', result: 'completed' });
    const verdict = await verifiedOrSourceBroken(dest, out, VERIFIED);
    if (verdict) {
      // The source's own bytes fail with no gateway too (README, "Known problem"): once, the leg is
      // repeated from the source, which still holds the intact guest.
      if (repeated) throw new Error(`leg repeated: ${verdict.detail}`);
      console.log(`the destination guest failed and ${verdict.detail}: repeating the leg once`);
      await dest.dispose();
      await resumeSource(vm, VERIFIED);
      return migrateOn(true);
    }
    await vm.dispose();
    vm = dest;
    here = to;
    return sent;
  }

  /**
   * Starts a migration of the guest to the other site, slowly, and calls `inject` once `atBytes` have
   * left the source. The migration must fail at the source while the guest runs on and verifies; the
   * destination QEMU must not run. Returns what the destination did.
   */
  async function failingMigration(inject: (dest: QemuVm) => Promise<void>, atBytes = 8 * 1024 * 1024, ending: 'failed' | 'cancelled' = 'failed'): Promise<string> {
    const dest = await destinationAt(there(), 'faulted');
    vm.setMaxBandwidth(SLOW);
    await vm.migrate(`tcp:127.0.0.1:${here.routePort}`);
    await waitUntil('the migration to get under way', async () => {
      const info = await vm.queryMigrate();
      return (info.ram?.transferred ?? 0) >= atBytes || info.status === 'completed' || info.status === 'failed';
    });
    expect((await vm.queryMigrate()).status).toBe('active');
    await inject(dest);
    return expectCleanFailure(dest, ending);
  }

  /** The source failed (or was cancelled) and runs on, verified; the destination QEMU exited without running the guest. */
  async function expectCleanFailure(dest: QemuVm | null, ending: 'failed' | 'cancelled' = 'failed'): Promise<string> {
    const info = await vm.waitForMigration({ timeoutMs: 120_000, allowFailure: true });
    expect(info.status).toBe(ending);
    // QEMU reports the migration over before its migration thread resumes the VM (finish-migrate until then).
    await vm.waitForStatus('running', 10_000);
    const mark = vm.serialMark();
    await vm.waitForSerial(VERIFIED, 60_000, { since: mark });
    if (!dest) return 'n/a';
    const exited = await dest.waitForExit(30_000);
    let how = exited ? `exited (code ${dest.exit?.code ?? dest.exit?.signal})` : 'still waiting, never ran';
    if (!exited) {
      // Still waiting for a stream that will not come: it must not be running the guest.
      const status = await dest.qmp<{ status: string }>('query-status', undefined, 10_000).then(
        (reply) => reply.status,
        (err: unknown) => {
          // A destination waits in its main thread for every multifd channel's SYNC packet
          // (multifd_recv_sync_main), and a channel thread that failed or ended never posts it: one
          // already waiting there hangs, monitor and all. 7.2 and 10.0.2 alike (10.0's on a slow host,
          // two runs of two): README, "Known problem".
          if (err instanceof Error && /no reply/.test(err.message)) return null;
          throw err;
        },
      );
      expect(status).not.toBe('running');
      if (status === null) {
        // It never ran: its guest printed nothing.
        expect(dest.serial).not.toMatch(/WORKLOAD/);
        how = 'hung in its multifd sync (monitor silent), never ran';
      }
    }
    await dest.dispose();
    return how;
  }

  /** Both stores verify, and claim the snapshot of the last completed migration. */
  function expectStoresSound(snapshotId: string | null): void {
    for (const site of [a, b]) {
      const [check] = checkStores(site.data, [VM]);
      expect({ site: site.name, bad: check.badPages }).toEqual({ site: site.name, bad: [] });
      if (snapshotId !== null) expect({ site: site.name, snapshot: check.snapshotId }).toEqual({ site: site.name, snapshot: snapshotId });
    }
  }

  /** The migration started right after the failure succeeds; both stores are sound afterwards. */
  async function restartSucceeds(): Promise<string> {
    const sent = await migrateOn();
    expectStoresSound(sent.snapshotId);
    // The failure cost no retention: the restart reuses (nearly) every page the far site held.
    expect(sent.pagesReused).toBeGreaterThan(0.9 * (sent.pagesReused + sent.pagesSent));
    return `completed and verified (${sent.pagesSent} pages sent, ${sent.pagesReused} reused)`;
  }

  /**
   * What each store claims right after a failure: the snapshot it started from or none, never another.
   * `kept` names faults where both stores must still claim the one they started from (nothing of
   * either was lost: the failed migration's changes were put back from the undo journal).
   */
  const claims = (before: [string | null, string | null], kept = false): string => {
    const now = [claimedSnapshot(a), claimedSnapshot(b)];
    for (const [i, claim] of now.entries()) expect([before[i], null]).toContain(claim);
    if (kept) expect(now).toEqual(before);
    return now.map((c, i) => (c === null ? 'none' : c === before[i] ? 'previous snapshot' : 'other')).join(' / ');
  };

  test('first leg, captured: A → B completes and verifies', async () => {
    const out = path.join(tmp, 'first-leg.mig');
    for (let attempt = 1; ; attempt++) {
      const counts = [a.gateway.reports.length, b.gateway.reports.length];
      const capturePort = await freePort();
      const capture = new Capture({ listen: { host: '127.0.0.1', port: capturePort }, out, forward: { host: '127.0.0.1', port: a.routePort } });
      await capture.listen();
      const dest = await destinationAt(b, 'first');
      vm.setMaxBandwidth(FAST);
      await vm.migrate(`tcp:127.0.0.1:${capturePort}`);
      expect((await vm.waitForMigration({ timeoutMs: 300_000 })).status).toBe('completed');
      expect((await capture.done).error).toBeNull();
      // Both gateways' reports of this leg before the next: a receiving gateway reports once its store
      // has committed, which can come after QEMU says the migration completed, and a late report here
      // would be taken for the leg back's.
      const [sent] = await reportsAfter(a, counts[0]);
      const [received] = await reportsAfter(b, counts[1]);
      expect(sent).toMatchObject({ vm: VM, direction: 'send', result: 'completed' });
      expect(received).toMatchObject({ vm: VM, direction: 'receive', result: 'completed' });
      const verdict = await verifiedOrSourceBroken(dest, out, VERIFIED);
      if (!verdict) {
        await vm.dispose();
        vm = dest;
        break;
      }
      // As in migrateOn: QEMU 7.2 sent a state that fails with no gateway too; once, the leg is repeated.
      if (attempt > 1) throw new Error(`first leg repeated: ${verdict.detail}`);
      console.log(`first leg: the destination guest failed and ${verdict.detail}: repeating the leg once`);
      await dest.dispose();
      await resumeSource(vm, VERIFIED);
    }
    here = b;
    captured = fs.readFileSync(out);
    expect(captured.length).toBeGreaterThan(64 * 1024 * 1024);
    // And back, so that both sites retain this guest's snapshot.
    await migrateOn();
  });

  test('WAN link drops mid-migration', async () => {
    const before: [string | null, string | null] = [claimedSnapshot(a), claimedSnapshot(b)];
    let cut = 0;
    const destination = await failingMigration(async () => {
      // What QEMU counts as sent may still sit in socket buffers before the gateway has dialled its peer.
      await waitUntil('the main channel\'s WAN connection', () => there().link.stats().active === 1);
      cut = await there().link.cut();
    });
    expect(cut).toBe(1);
    outcomes.push({ fault: 'WAN link drops mid-migration', source: 'failed, VM runs and verifies', destination, storeClaims: claims(before, true), restart: await restartSucceeds() });
  });

  // Postcopy exists in 7.2 too, but its software emulation panics a guest written to during a long
  // migration; 10.0's does not.
  (RELEASE === '7.2' ? test.skip : test)('postcopy: the WAN link drops after the switch; QEMU recovers directly, not through the gateways', async () => {
    const before: [string | null, string | null] = [claimedSnapshot(a), claimedSnapshot(b)];
    const to = there();
    const postcopy = { 'return-path': true, 'postcopy-ram': true };
    const dest = rowVm({ ...options, name: `postcopy-at-${to.name}`, incoming: 'defer' });
    await dest.start();
    await dest.setMigrationCapabilities(postcopy);
    await dest.migrateIncoming(`tcp:127.0.0.1:${to.qemuPort}`);
    await vm.setMigrationCapabilities(postcopy);
    vm.setMaxBandwidth(SLOW);
    const reported = [here.gateway.reports.length, to.gateway.reports.length];
    await vm.migrate(`tcp:127.0.0.1:${here.routePort}`);
    await waitUntil('the migration to get under way', async () => ((await vm.queryMigrate()).ram?.transferred ?? 0) >= 8 * 1024 * 1024);
    await vm.qmp('migrate-start-postcopy');
    // Only the source is asked from here on: the destination's main thread may block on a page that
    // has not arrived (a postcopy destination answers only out-of-band commands then). Its events still
    // come: the cut must come after its RESUME, once it runs the guest. Cut while it was still loading
    // the device state the switch sent (the receiving gateway may hold that tail until a check covers
    // it), the destination failed the load and exited ("load of migration failed: Input/output error")
    // instead of pausing, and the guest, half of it at each end, was lost.
    await waitUntil('postcopy to move some pages, and the destination to run the guest', async () => {
      const info = await vm.queryMigrate();
      return info.status === 'postcopy-active' && (info.ram?.['postcopy-bytes'] ?? 0) >= 4 * 1024 * 1024 && dest.qmpEvents.some((e) => e.event === 'RESUME');
    });
    expect(await to.link.cut()).toBe(1);
    // Both QEMUs pause (postcopy cannot fail back: the guest already ran at the destination).
    await waitUntil('the source to pause', async () => (await vm.queryMigrate()).status === 'postcopy-paused', 60_000);
    // The stores claim again only once their gateways have rolled the failed migration back.
    await reportsAfter(here, reported[0]);
    await reportsAfter(to, reported[1]);
    const storeClaims = claims(before, true);
    // The gateways failed the migration and closed both QEMU connections; a resumed channel carries no
    // stream header (it opens with RECV_BITMAP commands), so a route cannot take it. QEMU's own
    // recovery over a direct connection completes it. migrate-recover succeeds once the destination
    // has paused too (it answers out of band, whatever its main thread waits for).
    const recoverPort = await freePort();
    let refused = '';
    await waitUntil(
      () => `the destination to pause and listen for the recovery (last answer: ${refused || 'none'}; destination ${dest.exit ? 'exited' : 'alive'})`,
      () =>
        dest.qmpOob('migrate-recover', { uri: `tcp:127.0.0.1:${recoverPort}` }).then(
          () => true,
          (err: unknown) => {
            refused = err instanceof Error ? err.message : String(err);
            return false;
          },
        ),
      60_000,
    );
    vm.setMaxBandwidth(FAST);
    await vm.qmp('migrate', { uri: `tcp:127.0.0.1:${recoverPort}`, resume: true });
    expect((await vm.waitForMigration({ timeoutMs: 300_000 })).status).toBe('completed');
    const mark = dest.serialMark();
    await dest.waitForSerial(VERIFIED, 60_000, { since: mark });
    await vm.dispose();
    vm = dest;
    here = to;
    await vm.setMigrationCapabilities({ 'postcopy-ram': false });
    outcomes.push({
      fault: 'postcopy: WAN link drops after the switch',
      source: 'postcopy-paused; recovered over a direct connection, completed',
      destination: 'postcopy-paused, then ran and verified after recovery',
      storeClaims,
      restart: await restartSucceeds(),
    });
  });

  /**
   * Starts a slow 4-channel multifd migration to the other site and waits until it is under way on every
   * channel; returns its destination QEMU. The source's multifd capability is switched off again by `done`.
   */
  async function multifdUnderWay(): Promise<{ dest: QemuVm; done: () => Promise<void> }> {
    const to = there();
    const multifd = { 'return-path': true, multifd: true };
    const channels = { 'multifd-channels': 4 };
    const dest = rowVm({ ...options, name: `multifd-at-${to.name}`, incoming: 'defer' });
    await dest.start();
    await dest.setMigrationCapabilities(multifd);
    await dest.setMigrationParameters(channels);
    await dest.migrateIncoming(`tcp:127.0.0.1:${to.qemuPort}`);
    await vm.setMigrationCapabilities(multifd);
    await vm.setMigrationParameters(channels);
    vm.setMaxBandwidth(SLOW);
    await vm.migrate(`tcp:127.0.0.1:${here.routePort}`);
    // Under way on every channel: the main channel and its 4 multifd channels, one WAN connection each.
    // Bytes sent alone do not say so: a channel dials the peer only once the main channel's peer has
    // offered, and until then QEMU's writes to it fill the sockets' buffers, counted as transferred.
    await waitUntil(
      () => `the migration to get under way on all 5 WAN connections (${to.link.stats().active} open); the gateways' last log lines:\n${[here, to].map(logTail).join('\n')}`,
      async () => to.link.stats().active === 5 && ((await vm.queryMigrate()).ram?.transferred ?? 0) >= 8 * 1024 * 1024,
    );
    return { dest, done: () => vm.setMigrationCapabilities({ multifd: false }) };
  }

  test('multifd: one channel’s WAN connection drops mid-migration', async () => {
    const before: [string | null, string | null] = [claimedSnapshot(a), claimedSnapshot(b)];
    const { dest, done } = await multifdUnderWay();
    // The last one opened is a channel.
    expect(await there().link.cutNewest()).toBe(1);
    const destination = await expectCleanFailure(dest);
    await done();
    outcomes.push({ fault: 'multifd: one channel’s WAN connection drops', source: 'failed, VM runs and verifies', destination, storeClaims: claims(before, true), restart: await restartSucceeds() });
  });

  test('multifd: the operator cancels the migration (migrate_cancel)', async () => {
    const before: [string | null, string | null] = [claimedSnapshot(a), claimedSnapshot(b)];
    const { dest, done } = await multifdUnderWay();
    // Every connection closes at the source, the channels' while they may be parked at a SYNC.
    await vm.qmp('migrate_cancel');
    const destination = await expectCleanFailure(dest, 'cancelled');
    await done();
    outcomes.push({ fault: 'multifd (4 channels): the operator cancels the migration', source: 'cancelled, VM runs and verifies', destination, storeClaims: claims(before, true), restart: await restartSucceeds() });
  });

  for (const role of ['sending', 'receiving'] as const) {
    test(`kill -9 of the ${role} gateway mid-migration, then restart`, async () => {
      const before: [string | null, string | null] = [claimedSnapshot(a), claimedSnapshot(b)];
      const victim = role === 'sending' ? here : there();
      const destination = await failingMigration(async () => {
        await victim.gateway.kill();
      });
      const storeClaims = claims(before);
      await startGateway(victim);
      outcomes.push({ fault: `kill -9 of the ${role} gateway mid-migration, restarted`, source: 'failed, VM runs and verifies', destination, storeClaims, restart: await restartSucceeds() });
    });
  }

  test('the operator cancels the migration (migrate_cancel)', async () => {
    const before: [string | null, string | null] = [claimedSnapshot(a), claimedSnapshot(b)];
    const destination = await failingMigration(
      async () => {
        // What libvirt's domjobabort and KubeVirt's cancelled migration send: the source closes its connection mid-stream.
        await vm.qmp('migrate_cancel');
      },
      8 * 1024 * 1024,
      'cancelled',
    );
    outcomes.push({ fault: 'the operator cancels the migration (`migrate_cancel`)', source: 'cancelled, VM runs and verifies', destination, storeClaims: claims(before, true), restart: await restartSucceeds() });
  });

  test('the destination QEMU dies mid-migration', async () => {
    const before: [string | null, string | null] = [claimedSnapshot(a), claimedSnapshot(b)];
    const destination = await failingMigration(async (dest) => {
      await dest.kill();
    });
    expect(destination).toMatch(/exited/);
    outcomes.push({ fault: 'destination QEMU killed mid-migration', source: 'failed, VM runs and verifies', destination, storeClaims: claims(before, true), restart: await restartSucceeds() });
  });

  test('retained pages corrupted in the receiving store', async () => {
    const to = there();
    const before: [string | null, string | null] = [claimedSnapshot(a), claimedSnapshot(b)];
    // Flip a byte in 8 present pages of the guest's data, behind their digests.
    const digests = fs.readFileSync(path.join(to.data, VM, 'digests'));
    const present: number[] = [];
    for (let i = 0; i < digests.length / 16; i++) if (digests.readBigUInt64LE(i * 16) !== 0n) present.push(i);
    const victims = Array.from({ length: 8 }, (_, k) => present[Math.floor(((k + 0.5) * present.length) / 8)]);
    const fd = fs.openSync(path.join(to.data, VM, 'pages'), 'r+');
    for (const page of victims) {
      const byte = Buffer.alloc(1);
      fs.readSync(fd, byte, 0, 1, page * PAGE + 777);
      byte[0] ^= 0x5a;
      fs.writeSync(fd, byte, 0, 1, page * PAGE + 777);
    }
    fs.closeSync(fd);
    const counts = [here.gateway.reports.length, to.gateway.reports.length];
    const dest = await destinationAt(to, 'corrupt');
    vm.setMaxBandwidth(FAST);
    await vm.migrate(`tcp:127.0.0.1:${here.routePort}`);
    const destination = await expectCleanFailure(dest);
    const [received] = await reportsAfter(to, counts[1]);
    expect(received).toMatchObject({ direction: 'receive', result: 'failed' });
    await reportsAfter(here, counts[0]);
    const storeClaims = claims(before);
    outcomes.push({ fault: 'retained pages corrupted in the receiving store', source: 'failed, VM runs and verifies', destination, storeClaims, restart: await restartSucceeds() });
  });

  (canMountTmpfs() ? test : test.skip)('the receiving store’s disk is full', async () => {
    const to = there();
    // A 16 MiB filesystem over the receiving store: the guest's 64 MiB of data do not fit.
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=16m', 'tmpfs', to.data]);
    try {
      const counts = [here.gateway.reports.length, to.gateway.reports.length];
      const dest = await destinationAt(to, 'diskfull');
      vm.setMaxBandwidth(FAST);
      await vm.migrate(`tcp:127.0.0.1:${here.routePort}`);
      const destination = await expectCleanFailure(dest);
      const [received] = await reportsAfter(to, counts[1]);
      expect(received).toMatchObject({ direction: 'receive', result: 'failed' });
      // The sending gateway reports once its store has rolled back, which may be after the receiving one
      // did: the next migration's report must not be taken for this one's.
      const [failedSend] = await reportsAfter(here, counts[0]);
      expect(failedSend).toMatchObject({ direction: 'send', result: 'failed' });
      // The disk is still full: the next migration goes on without retention there, and completes.
      const sent = await migrateOn();
      expect(sent.pagesReused).toBe(0);
      const restart = `completed and verified without retention (${sent.pagesSent} pages sent)`;
      outcomes.push({ fault: 'receiving store’s disk full (16 MiB tmpfs)', source: 'failed, VM runs and verifies', destination, storeClaims: 'sending store: previous snapshot', restart });
      expect(claimedSnapshot(there())).not.toBeNull();
    } finally {
      execFileSync('umount', ['-l', to.data]);
    }
    // Room again (the store under the mount reappears): the next migration retains and reuses.
    const next = await migrateOn();
    expect(next.result).toBe('completed');
    expectStoresSound(next.snapshotId);
  });

  /** Plays `stream` into the route of the site the guest runs at, to a real destination QEMU at the other. */
  async function playMalformed(stream: Buffer, label: string): Promise<{ destination: string; report: GatewayLegReport; source: string }> {
    const from = here;
    const to = there();
    const counts = [from.gateway.reports.length, to.gateway.reports.length];
    const dest = await destinationAt(to, label);
    const reset = await new Promise<boolean>((resolve) => {
      const socket = net.connect({ host: '127.0.0.1', port: from.routePort }, () => socket.end(stream));
      let failed = false;
      socket.on('error', () => (failed = true));
      socket.resume();
      socket.on('close', () => resolve(failed));
    });
    const [report] = await reportsAfter(from, counts[0]);
    // The receiving side's account of this leg comes in its own time; the next leg's must not be taken for it.
    const [received] = await reportsAfter(to, counts[1]);
    expect(received).toMatchObject({ direction: 'receive', result: 'failed' });
    const exited = await dest.waitForExit(30_000);
    if (!exited) expect((await dest.status()).status).not.toBe('running');
    const destination = exited ? `exited (code ${dest.exit?.code ?? dest.exit?.signal})` : 'still waiting, never ran';
    await dest.dispose();
    // The guest itself never noticed.
    expect((await vm.status()).status).toBe('running');
    return { destination, report, source: reset ? 'stand-in: connection reset' : 'stand-in: connection closed' };
  }

  test('a truncated stream', async () => {
    const before: [string | null, string | null] = [claimedSnapshot(a), claimedSnapshot(b)];
    const { destination, report, source } = await playMalformed(captured.subarray(0, Math.floor(captured.length * 0.6)), 'truncated');
    expect(report).toMatchObject({ direction: 'send', result: 'failed' });
    expect(source).toBe('stand-in: connection reset');
    outcomes.push({ fault: 'truncated stream (60% of a real one)', source, destination, storeClaims: claims(before, true), restart: await restartSucceeds() });
  });

  test('garbage after the stream header', async () => {
    const before: [string | null, string | null] = [claimedSnapshot(a), claimedSnapshot(b)];
    const garbage = Buffer.concat([captured.subarray(0, 8), randomBytes(4 * 1024 * 1024)]);
    const { destination, report, source } = await playMalformed(garbage, 'garbage');
    // The gateway cannot parse it and relays it verbatim; the destination QEMU refuses it: it reads the
    // garbage and the source's close, so it exits with an error rather than wait.
    expect(report).toMatchObject({ direction: 'send', result: 'failed' });
    expect(destination).toMatch(/^exited \(code [1-9]\d*\)$/);
    outcomes.push({ fault: 'garbage after the stream header (4 MiB random)', source: `${source}; gateway: failed`, destination, storeClaims: claims(before, true), restart: await restartSucceeds() });
  });
});
