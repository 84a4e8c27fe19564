/**
 * 16 concurrent migrations of different VMs through one gateway pair on loopback (in this process),
 * with synthetic QEMU 7.2 streams standing in for QEMU: every VM's memory differs from every other's.
 * A first pass A → B retains nothing; the back pass plays the same memory B → A and reuses it all.
 * Throughput is measured by bench/load.ts, not here.
 */
import { awaitReports, type LoadSite, runPass, startLoadPair, stopLoadPair, vmStream, type VmStream } from '../src/lab/harness/load-pair';
import { checkStores } from '../src/lab/harness/stores';
import type { Direction } from '../src/gateway/session';
import type { GatewayLegReport } from '../src/lab/harness/site-gateway';
import { guestMemory, migrationStream } from '../src/lab/harness/migration-stream';
import { suiteTempDir } from './temp-dir';

const VMS = Array.from({ length: 16 }, (_, i) => `vm${String(i + 1).padStart(2, '0')}`);

describe('16 concurrent migrations through one gateway pair', () => {
  let tmp = '';
  let a: LoadSite;
  let b: LoadSite;
  // Each VM its own memory (seed), of a size that differs per VM so that streams also differ in length.
  const memories = VMS.map((_, i) =>
    guestMemory(
      [
        ['pc.ram', 300 + 7 * i],
        ['vga', 16],
      ],
      1000 + i,
    ),
  );
  const streams: VmStream[] = VMS.map((vm, i) => vmStream(vm, migrationStream(memories[i], [])));
  const nonZeroPages = memories.map((m) => m.pages.filter((p) => !p.every((v) => v === 0)).length);

  beforeAll(async () => {
    tmp = suiteTempDir('bfmig-load-');
    [a, b] = await startLoadPair(tmp, VMS, 'in-process');
  });

  afterAll(async () => {
    await stopLoadPair([a, b]);
  });

  /** The report of `vm`'s migration in the given direction among a site's last `count` reports. */
  const reportOf = (site: LoadSite, vm: string, direction: Direction, count: number): GatewayLegReport | undefined =>
    site.gateway.reports.slice(-count).find((r) => r.vm === vm && r.direction === direction);

  /** Each VM's store at both sites verifies and claims the snapshot its last migration committed. */
  const expectStoresSound = (): void => {
    for (const site of [a, b]) {
      for (const check of checkStores(site.data, VMS)) {
        const last = [...site.gateway.reports].reverse().find((r) => r.vm === check.vm);
        expect({ site: site.name, vm: check.vm, badPages: check.badPages }).toEqual({ site: site.name, vm: check.vm, badPages: [] });
        expect(check.snapshotId).not.toBeNull();
        expect(check.snapshotId).toBe(last?.snapshotId);
      }
    }
    // Both sites claim the same snapshot of each VM, and no two VMs share one.
    const atA = checkStores(a.data, VMS).map((c) => c.snapshotId);
    expect(checkStores(b.data, VMS).map((c) => c.snapshotId)).toEqual(atA);
    expect(new Set(atA).size).toBe(VMS.length);
  };

  test('every VM has a stream of its own', () => {
    expect(new Set(streams.map((s) => s.sha256)).size).toBe(VMS.length);
  });

  /** All VMs at once from `from` to `to`: each destination gets its own bytes, both sides complete the same snapshot, stores sound. */
  async function passExpecting(from: LoadSite, to: LoadSite, finished: number, pages: (i: number) => { pagesSent: number; pagesReused: number }): Promise<void> {
    const result = await runPass(from, to, streams);
    for (const [i, outcome] of result.outcomes.entries()) {
      expect(outcome.vm).toBe(VMS[i]);
      expect(outcome.received).toEqual({ bytes: streams[i].stream.length, sha256: streams[i].sha256, reset: false });
      expect(outcome.intact).toBe(true);
    }
    await Promise.all([awaitReports(a, finished), awaitReports(b, finished)]);
    for (const [i, vm] of VMS.entries()) {
      const sent = reportOf(from, vm, 'send', VMS.length);
      const received = reportOf(to, vm, 'receive', VMS.length);
      expect(sent).toMatchObject({ result: 'completed', streamBytes: streams[i].stream.length, ...pages(i) });
      expect(received).toMatchObject({ result: 'completed', streamBytes: streams[i].stream.length });
      expect(received?.snapshotId).toBe(sent?.snapshotId);
    }
    expectStoresSound();
  }

  test('first pass A → B, all 16 at once: each destination gets exactly its own source bytes, all complete, nothing reused, stores sound', async () => {
    await passExpecting(a, b, VMS.length, (i) => ({ pagesSent: nonZeroPages[i], pagesReused: 0 }));
  }, 60_000);

  test('back pass B → A, all 16 at once: the same memory from the other site is all reused, each destination gets its own bytes, stores sound', async () => {
    await passExpecting(b, a, 2 * VMS.length, (i) => ({ pagesSent: 0, pagesReused: nonZeroPages[i] }));
  }, 60_000);
});
