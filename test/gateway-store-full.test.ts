/**
 * A full disk at a gateway's store, on a real filesystem that fills up: a tmpfs mounted over the
 * receiving site's data directory (needs root; the test says so and is skipped where mount is denied).
 * The migration whose store write fails ends cleanly; the next ones go on without retention while the
 * filesystem lacks room, and retention comes back once it has room.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { isNoSpace, StoreSpace } from '../src/gateway/store-space';
import { PageStore } from '../src/store';
import { startPair, type TestSite, waitFor } from '../src/lab/harness/gateway-pair';
import { destinationStandIn, sourceStandIn } from '../src/lab/harness/qemu-standins';
import { guestMemory, migrationStream } from '../src/lab/harness/migration-stream';
import { canMountTmpfs } from './mounts';
import { suiteTempDir } from './temp-dir';

describe('StoreSpace', () => {
  test('a no-space error is recognised through the store error that wraps it', () => {
    const fsError = Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC' });
    expect(isNoSpace(new Error('store vm1: writing pages 3..9 failed', { cause: fsError }))).toBe(true);
    expect(isNoSpace(Object.assign(new Error('quota'), { code: 'EDQUOT' }))).toBe(true);
    expect(isNoSpace(Object.assign(new Error('io'), { code: 'EIO' }))).toBe(false);
    expect(isNoSpace('ENOSPC')).toBe(false);
  });

  test('retention stays off for a VM until the filesystem has the room its store needs', () => {
    let free = 10 << 20;
    const space = new StoreSpace('/unused', () => free);
    expect(space.retains('vm1')).toBe(true);
    space.exhausted('vm1', 200 << 20);
    expect(space.retains('vm1')).toBe(false);
    expect(space.retains('vm2')).toBe(true);
    free = 199 << 20;
    expect(space.retains('vm1')).toBe(false);
    free = 200 << 20;
    expect(space.retains('vm1')).toBe(true);
    // Cleared: a later shortage must be reported again before retention stops.
    free = 0;
    expect(space.retains('vm1')).toBe(true);
  });
});

const MOUNT = canMountTmpfs();
if (!MOUNT) console.warn('gateway-store-full: skipped, this process may not mount a tmpfs (needs root)');

(MOUNT ? describe : describe.skip)('a full disk at the receiving gateway', () => {
  let tmp = '';
  let a: TestSite;
  let b: TestSite;
  let mounted = '';
  // 2,000 pages of which about 1,400 carry data: some 8 MiB in the store, on a 3 MiB filesystem.
  const memory = guestMemory(
    [
      ['pc.ram', 1960],
      ['vga', 40],
    ],
    5,
  );
  const stream = migrationStream(memory, []);

  beforeAll(async () => {
    tmp = suiteTempDir('bfmig-full-');
    mounted = path.join(tmp, 'site-b');
    fs.mkdirSync(mounted);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=3m', 'tmpfs', mounted]);
    [a, b] = await startPair(tmp);
  });

  afterAll(async () => {
    await a?.gateway.stop(1);
    await b?.gateway.stop(1);
    if (mounted) execFileSync('umount', ['-l', mounted]);
  });

  async function migrate(from: TestSite, to: TestSite): Promise<{ source: 'closed' | 'reset'; received: Buffer; reset: boolean }> {
    const dest = await destinationStandIn(to.destPort);
    const before = [from.gateway.history.length, to.gateway.history.length];
    const source = await sourceStandIn(from.routePort, stream);
    await waitFor(() => from.gateway.history.length > before[0] && to.gateway.history.length > before[1]);
    // A migration that fails before the destination is dialled leaves the stand-in without a connection.
    let timer: NodeJS.Timeout | undefined;
    const got = await Promise.race([dest.received, new Promise<null>((r) => (timer = setTimeout(() => r(null), 3000)))]);
    clearTimeout(timer);
    dest.close();
    return { source, received: got?.bytes ?? Buffer.alloc(0), reset: got?.reset ?? true };
  }

  const last = (site: TestSite) => site.gateway.history[site.gateway.history.length - 1];
  const metric = async (site: TestSite, name: string): Promise<number> => {
    // Summed over the series of vm1 (one per direction).
    const lines = (await site.metrics.registry.metrics()).split('\n').filter((l) => l.startsWith(`${name}{`) && l.includes('vm="vm1"'));
    return lines.reduce((n, l) => n + Number(l.split(' ').pop()), 0);
  };

  test('the migration whose store write fails ends cleanly: the source is reset, the destination never sees a whole stream', async () => {
    const run = await migrate(a, b);
    expect(run.source).toBe('reset');
    expect(run.received.length).toBeLessThan(stream.length);
    expect(run.received.equals(stream.subarray(0, run.received.length))).toBe(true);
    expect(last(b)).toMatchObject({ direction: 'receive', result: 'failed' });
    expect(last(b).error).toMatch(/no space left on device/i);
    expect(last(a)).toMatchObject({ direction: 'send', result: 'failed' });
    expect(await metric(b, 'bfmig_store_full_total')).toBeGreaterThanOrEqual(1);
    expect(b.logs.some((l) => l.msg === 'store ran out of space: retention off for this VM until the filesystem has room')).toBe(true);
  });

  test('while the disk stays full, migrations both ways complete byte-exact without retention at that site', async () => {
    const there = await migrate(a, b);
    expect(there).toMatchObject({ source: 'closed', reset: false });
    expect(there.received.equals(stream)).toBe(true);
    expect(last(b)).toMatchObject({ direction: 'receive', result: 'completed', snapshotId: null });
    expect(last(a)).toMatchObject({ direction: 'send', result: 'completed', mode: 'none' });
    expect(await metric(b, 'bfmig_migrations_unretained_total')).toBe(1);

    const back = await migrate(b, a);
    expect(back).toMatchObject({ source: 'closed', reset: false });
    expect(back.received.equals(stream)).toBe(true);
    expect(last(b)).toMatchObject({ direction: 'send', result: 'completed', mode: 'none', counts: expect.objectContaining({ pagesReused: 0 }) });
    expect(last(a)).toMatchObject({ direction: 'receive', result: 'completed' });
    expect(await metric(b, 'bfmig_migrations_unretained_total')).toBe(2);
  });

  test('once the filesystem has room, retention comes back: the next round trip reuses every page and both stores verify', async () => {
    execFileSync('mount', ['-o', 'remount,size=96m', mounted]);
    const there = await migrate(a, b);
    expect(there.received.equals(stream)).toBe(true);
    expect(last(b)).toMatchObject({ direction: 'receive', result: 'completed' });
    expect(last(b).snapshotId).toBe(last(a).snapshotId);

    const back = await migrate(b, a);
    expect(back.received.equals(stream)).toBe(true);
    const sent = last(b);
    expect(sent).toMatchObject({ direction: 'send', result: 'completed', mode: 'shared-snapshot' });
    expect(sent.counts.pagesSent).toBe(0);
    expect(sent.counts.pagesReused).toBeGreaterThan(1000);
    await b.gateway.stop(1);
    await a.gateway.stop(1);
    for (const site of [a, b]) {
      const store = PageStore.open(site.data, 'vm1');
      try {
        expect(store.verify()).toEqual([]);
        expect(store.snapshotId()).toBe(sent.snapshotId);
      } finally {
        store.close();
      }
    }
  });
});
