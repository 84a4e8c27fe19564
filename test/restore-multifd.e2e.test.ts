/**
 * `bfmig restore` of a snapshot retained from a multifd migration (issue 15): a self-verifying guest
 * migrates with 4 multifd channels through a gateway pair, then each site's retained snapshot is
 * restored into a fresh QEMU of the same release, on one channel, and the guest must verify its memory
 * there. Pages crossed on the channels (10.0 sends its zero pages there too, 7.2 on the main channel),
 * so a store missing any of them, or keeping a stale version, would fail the guest's check.
 */
import { restoreSnapshot } from '../src/cli/restore';
import { disposeAllVms, QemuVm } from '../src/lab/vm/qemu-vm';
import { ensureGuestBuilt } from '../src/lab/vm/guest-image';
import { freePort } from '../src/lab/vm/ports';
import { type QemuRelease, qemuBinary, qemuInstalled } from '../src/lab/vm/qemu-releases';
import { startPair, stopPair, type TestSite } from '../src/lab/harness/gateway-pair';
import { claimedSnapshot } from '../src/lab/harness/stores';
import { suiteTempDir } from './temp-dir';

const SKIP = process.env.BFMIG_SKIP_E2E === '1';
const VERIFIED = /WORKLOAD VERIFY OK round=\d+ pages=\d+/;
const MEM_MIB = 128;
const MULTIFD = { capabilities: { multifd: true }, parameters: { 'multifd-channels': 4 } };

/** Waits until `site` has reported `count` migrations: its store is closed and settled then. */
async function reported(site: TestSite, count: number): Promise<void> {
  for (let i = 0; i < 400 && site.gateway.history.length < count; i++) await new Promise((r) => setTimeout(r, 50));
  expect(site.gateway.history[count - 1]).toMatchObject({ result: 'completed', verbatim: null });
}

const releases: readonly { release: QemuRelease; machine: string }[] = [
  { release: '10.0', machine: 'pc-i440fx-10.0' },
  { release: '7.2', machine: 'pc-i440fx-7.2' },
];

(SKIP ? describe.skip : describe).each(releases.filter((r) => qemuInstalled(r.release)))('restore of a multifd migration’s snapshot, QEMU $release', ({ release, machine }) => {
  const options = { machine, memMiB: MEM_MIB, qemuBinary: qemuBinary(release), workload: { mib: 16, seed: 9, rewritePct: 0, intervalMs: 300 } };
  let sites: [TestSite, TestSite] | null = null;
  let running: TestSite[] = [];

  beforeAll(async () => {
    ensureGuestBuilt();
    const [a, b] = await startPair(suiteTempDir('bfmig-restore-multifd-'));
    sites = [a, b];
    running = [a, b];
    const source = new QemuVm({ ...options, name: 'source' });
    await source.start();
    await source.waitForSerial(VERIFIED, 180_000);
    const dest = new QemuVm({ ...options, name: 'at-b', incoming: 'defer' });
    await dest.start();
    await dest.setMigrationCapabilities(MULTIFD.capabilities);
    await dest.setMigrationParameters(MULTIFD.parameters);
    await dest.migrateIncoming(`tcp:127.0.0.1:${b.destPort}`);
    await source.setMigrationCapabilities(MULTIFD.capabilities);
    await source.setMigrationParameters(MULTIFD.parameters);
    await source.migrate(`tcp:127.0.0.1:${a.routePort}`);
    const info = await source.waitForMigration({ timeoutMs: 180_000 });
    expect(info.status).toBe('completed');
    // Most pages crossed on the channels (10.0: all but the main channel's few).
    expect(info.ram?.['multifd-bytes']).toBeGreaterThan(8 * 2 ** 20);
    await dest.waitForStatus('running', 60_000);
    await reported(a, 1);
    await reported(b, 1);
    // The migration itself delivered a whole guest: a restore that fails below is the store's fault.
    await dest.waitForSerial(VERIFIED, 60_000);
    await disposeAllVms();
    // Restore reads the stores as `bfmig restore` would at a site whose gateway holds none open.
    await stopPair(running.splice(0));
  }, 600_000);

  afterAll(async () => {
    await disposeAllVms();
    await stopPair(running);
  });

  test.each([
    ['sending', 0],
    ['receiving', 1],
  ])('the %s site’s snapshot restores into a fresh QEMU on one channel, and the guest verifies', async (_side, index) => {
    const [a, b] = sites as [TestSite, TestSite];
    const site = index === 0 ? a : b;
    // Both stores claim the migration's snapshot: the channels kept every page they carried.
    const snapshot = claimedSnapshot(site.data, 'vm1');
    expect(snapshot).not.toBeNull();
    expect(claimedSnapshot((index === 0 ? b : a).data, 'vm1')).toBe(snapshot);
    const port = await freePort();
    const vm = new QemuVm({ ...options, name: `restored-${index}`, incoming: `tcp:127.0.0.1:${port}` });
    await vm.start();
    const result = await restoreSnapshot(site.data, 'vm1', { host: '127.0.0.1', port });
    expect(result.snapshotId).toBe(snapshot);
    expect(result.pages).toBeGreaterThanOrEqual((MEM_MIB * 2 ** 20) / 4096);
    expect((await vm.queryMigrate()).status).toBe('completed');
    await vm.waitForStatus('running', 10_000);
    await vm.waitForSerial(VERIFIED, 60_000);
    await vm.dispose();
  }, 180_000);
});
