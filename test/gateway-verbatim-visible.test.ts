/**
 * A stream bfmig cannot parse to the end is relayed as it is, and never silently: both gateways log a
 * warning with the reason and stream offset as it happens, count it in bfmig_streams_relayed_verbatim_total{reason},
 * and `bfmig snapshots list|show` says so for the VM's last migration, also when its store holds
 * nothing (the store is kept for that). A stream parsed whole (postcopy included) says none of this.
 */
import { runSnapshots } from '../src/cli/snapshots';
import { VmCommand } from '../src/qemu/constants';
import { StreamParser } from '../src/qemu/parser';
import { RecordKind } from '../src/qemu/records';
import { startPair, stopPair, type TestSite, waitFor } from '../src/lab/harness/gateway-pair';
import { destinationStandIn, sourceStandIn } from '../src/lab/harness/qemu-standins';
import { guestMemory, migrationStream } from '../src/lab/harness/migration-stream';
import { suiteTempDir } from './temp-dir';

const memory = guestMemory([['pc.ram', 400]], 17);

/** The stream with its PACKAGED command turned into ENABLE_COLO (no data): COLO is relayed verbatim. */
function coloStream(): { stream: Buffer; at: number } {
  const stream = migrationStream(memory, [[3, 4]], { postcopyAt: 0 });
  let at = -1;
  new StreamParser((r) => {
    if (r.kind === RecordKind.Command && r.command === VmCommand.Packaged) at = r.streamOffset;
  }).push(stream);
  const colo = Buffer.from(stream);
  colo.writeUInt16BE(VmCommand.EnableColo, at + 1);
  colo.writeUInt16BE(0, at + 3);
  // The 4 bytes of PACKAGED's length stay: after ENABLE_COLO they are opaque like everything else.
  return { stream: colo, at };
}

async function migrate(from: TestSite, to: TestSite, stream: Buffer): Promise<Buffer> {
  const dest = await destinationStandIn(to.destPort);
  const before = [from.gateway.history.length, to.gateway.history.length];
  expect(await sourceStandIn(from.routePort, stream)).toBe('closed');
  await waitFor(() => from.gateway.history.length > before[0] && to.gateway.history.length > before[1]);
  const { bytes } = await dest.received;
  dest.close();
  return bytes;
}

function snapshotsText(site: TestSite, action: 'list' | 'show'): string {
  let out = '';
  expect(runSnapshots(action, site.data, action === 'show' ? 'vm1' : undefined, false, (s) => (out += s))).toBe(0);
  return out;
}

describe('a stream relayed verbatim through a gateway pair', () => {
  let a: TestSite;
  let b: TestSite;
  beforeAll(async () => {
    [a, b] = await startPair(suiteTempDir('bfmig-verbatim-'));
  });
  afterAll(() => stopPair([a, b]));

  test('arrives whole, and each gateway logs, counts and notes where and why it stopped parsing', async () => {
    const { stream, at } = coloStream();
    expect((await migrate(a, b, stream)).equals(stream)).toBe(true);
    for (const [site, direction] of [
      [a, 'send'],
      [b, 'receive'],
    ] as const) {
      const report = site.gateway.history[site.gateway.history.length - 1];
      expect(report).toMatchObject({ result: 'completed', snapshotId: null, verbatim: { code: 'command', streamOffset: at } });
      const warnings = site.logs.filter((l) => l.msg?.toString().startsWith('stream relayed verbatim'));
      expect(warnings).toHaveLength(1);
      expect(warnings[0]).toMatchObject({ level: 40, vm: 'vm1', direction, reason: 'command', streamOffset: at });
      // Said as it happened, not only when the migration ended.
      expect(site.logs.indexOf(warnings[0])).toBeLessThan(site.logs.findIndex((l) => l.msg === 'migration completed'));
      expect(await site.metrics.text()).toContain(`bfmig_streams_relayed_verbatim_total{vm="vm1",direction="${direction}",reason="command"} 1`);
      // The store holds nothing (a first migration that claims no snapshot), yet it stays to say why.
      const list = snapshotsText(site, 'list');
      expect(list).toContain('(none claimed)');
      expect(list).toContain(`relayed verbatim from byte ${at} (migration command 8`);
      const show = JSON.parse(snapshotsText(site, 'show')) as { lastMigration: unknown };
      expect(show.lastMigration).toMatchObject({ direction, result: 'completed', verbatim: { code: 'command', streamOffset: at }, postcopy: false });
    }
  });

  test('a stream parsed whole afterwards (here switched to postcopy) clears the note and claims its snapshot', async () => {
    const stream = migrationStream(memory, [[3, 4]], { postcopyAt: 0, switchoverStart: true });
    expect((await migrate(a, b, stream)).equals(stream)).toBe(true);
    for (const site of [a, b]) {
      const report = site.gateway.history[site.gateway.history.length - 1];
      expect(report).toMatchObject({ result: 'completed', verbatim: null, postcopy: true });
      expect(report.snapshotId).not.toBeNull();
      const list = snapshotsText(site, 'list');
      expect(list).toContain(report.snapshotId as string);
      expect(list).not.toContain('relayed verbatim');
      expect(list).toContain(': completed (postcopy)');
    }
    // Only the first migration was counted.
    expect(await a.metrics.text()).toContain('bfmig_streams_relayed_verbatim_total{vm="vm1",direction="send",reason="command"} 1');
  });
});
