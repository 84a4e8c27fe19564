/**
 * A migration's end: each gateway makes its store's pages durable in the thread pool before the
 * synchronous commit, so that a file system slow to commit a large write phase does not stop the
 * gateway's main thread (every other migration through it, its metrics). Here the background sync is
 * made slow by hand: the event loop keeps its pace meanwhile and both stores still commit; a
 * background sync that fails changes nothing, the commit's own fsync deciding; and a migration of the
 * VM begun while a store still settles (its source saw the last one complete) waits for it.
 */
import * as path from 'node:path';
import { migrateThroughPair, refusals, startPair, stopPair, type TestSite, waitFor } from '../src/lab/harness/gateway-pair';
import { destinationStandIn, sourceChannel, sourceStandIn } from '../src/lab/harness/qemu-standins';
import { guestMemory, migrationStream } from '../src/lab/harness/migration-stream';
import { PageStore } from '../src/store';
import { slowSyncs } from './slow-syncs';
import { suiteTempDir } from './temp-dir';

const stream = migrationStream(guestMemory([['pc.ram', 2048]], 41), [[3, 5, 7]]);
const SLOW_MS = 600;

describe('the store committed after a sync in the background', () => {
  const tmp = suiteTempDir('bfmig-commit-bg-');
  let pair: [TestSite, TestSite] | undefined;

  afterEach(async () => {
    jest.restoreAllMocks();
    await stopPair(pair ?? []);
    pair = undefined;
  });

  test('a slow file system: the event loop keeps its pace while the pages are synced, then both stores commit', async () => {
    pair = await startPair(path.join(tmp, 'slow'));
    const syncs = slowSyncs(SLOW_MS);
    // The longest gap between ticks of a 20 ms timer while the migration runs and its stores settle.
    let last = Date.now();
    let longestGap = 0;
    const ticker = setInterval(() => {
      const now = Date.now();
      longestGap = Math.max(longestGap, now - last);
      last = now;
    }, 20);
    try {
      const [a, b] = pair;
      const { received, sent, got } = await migrateThroughPair(a, b, stream);
      expect(received.equals(stream)).toBe(true);
      expect([sent.result, got.result]).toEqual(['completed', 'completed']);
      expect(sent.snapshotId).not.toBeNull();
      expect(got.snapshotId).toBe(sent.snapshotId);
    } finally {
      clearInterval(ticker);
    }
    // Both gateways synced in the background, each for longer than any gap the event loop had.
    expect(syncs.begun).toBe(2);
    expect(longestGap).toBeLessThan(SLOW_MS);
    // What the stores claim on disk is the migration's snapshot.
    for (const [site, vm] of [[pair[0], 'vm1'], [pair[1], 'vm1']] as const) {
      const store = PageStore.open(site.data, vm);
      try {
        expect(store.snapshotId()).toBe(site.gateway.history[0].snapshotId);
      } finally {
        store.close();
      }
    }
  });

  test('a background sync that fails changes nothing: the commit fsyncs again, and decides', async () => {
    pair = await startPair(path.join(tmp, 'failing'));
    jest.spyOn(PageStore.prototype, 'syncInBackground').mockRejectedValue(Object.assign(new Error('EIO: i/o error, fsync'), { code: 'EIO' }));
    const [a, b] = pair;
    const { received, sent, got } = await migrateThroughPair(a, b, stream);
    expect(received.equals(stream)).toBe(true);
    expect([sent.result, got.result]).toEqual(['completed', 'completed']);
    expect(got.snapshotId).toBe(sent.snapshotId);
    expect(sent.snapshotId).not.toBeNull();
  });

  test('a migration begun while the last one’s stores still settle waits for them, back or on, instead of being refused', async () => {
    pair = await startPair(path.join(tmp, 'at-once'));
    const syncs = slowSyncs(SLOW_MS);
    const [a, b] = pair;
    const streams = [stream, migrationStream(guestMemory([['pc.ram', 2048]], 42), [[2, 4]]), migrationStream(guestMemory([['pc.ram', 2048]], 43), [])];
    /** A migration through `from`'s route to `to`'s destination; resolves with what the destination got. */
    async function leg(from: TestSite, to: TestSite, bytes: Buffer): Promise<Buffer> {
      const dest = await destinationStandIn(to.destPort);
      void sourceStandIn(from.routePort, bytes);
      return (await dest.received).bytes;
    }
    // A → B; the moment B has reported it (its store settled), A still settles its own: back B → A.
    const first = leg(a, b, streams[0]);
    await waitFor(() => b.gateway.history.length === 1);
    await waitFor(() => syncs.running === 1);
    expect(a.gateway.history).toHaveLength(0);
    const back = leg(b, a, streams[1]);
    // The moment A has reported receiving it, B settles its own send: on again, B → A.
    await waitFor(() => a.gateway.history.length === 2);
    await waitFor(() => syncs.running === 1);
    expect(b.gateway.history).toHaveLength(1);
    const again = leg(b, a, streams[2]);
    const received = await Promise.all([first, back, again]);
    await waitFor(() => a.gateway.history.length === 3 && b.gateway.history.length === 3);
    received.forEach((bytes, i) => expect(bytes.equals(streams[i])).toBe(true));
    for (const site of pair) {
      expect(site.gateway.history.map((r) => r.result)).toEqual(['completed', 'completed', 'completed']);
      expect(refusals(site)).toEqual([]);
    }
    expect(a.gateway.history.map((r) => r.direction)).toEqual(['send', 'receive', 'receive']);
  });

  test('a migration begun while one of its VM is still in progress is refused at once as busy', async () => {
    pair = await startPair(path.join(tmp, 'in-progress'));
    slowSyncs(SLOW_MS);
    const [a, b] = pair;
    const dest = await destinationStandIn(b.destPort);
    // The first source has sent half its stream: that migration is in progress.
    const first = await sourceChannel(a.routePort);
    await first.write(stream.subarray(0, stream.length >> 1));
    await waitFor(() => a.logs.some((l) => l.msg === 'peer offered'));
    const started = Date.now();
    expect(await sourceStandIn(a.routePort, stream)).toBe('reset');
    expect(Date.now() - started).toBeLessThan(SLOW_MS);
    expect(refusals(a).map((r) => [r.listener, r.reason])).toEqual([['source', 'busy']]);
    await first.write(stream.subarray(stream.length >> 1));
    first.socket.end();
    expect((await dest.received).bytes.equals(stream)).toBe(true);
    await waitFor(() => a.gateway.history.length === 1 && b.gateway.history.length === 1);
    expect([a.gateway.history[0].result, b.gateway.history[0].result]).toEqual(['completed', 'completed']);
  });

  test('a migration begun as soon as its source has sent the last one whole waits for that one to end (the far store still commits), then completes', async () => {
    pair = await startPair(path.join(tmp, 'sent-whole'));
    const syncs = slowSyncs(SLOW_MS);
    const [a, b] = pair;
    const second = migrationStream(guestMemory([['pc.ram', 2048]], 44), [[1, 6]]);
    const firstDest = await destinationStandIn(b.destPort);
    void sourceStandIn(a.routePort, stream);
    // B syncs its store before it answers Done: A's source has sent it all and A awaits that Done.
    await waitFor(() => syncs.begun === 1);
    expect(a.gateway.history).toHaveLength(0);
    expect((await firstDest.received).bytes.equals(stream)).toBe(true);
    const secondDest = await destinationStandIn(b.destPort);
    // Refused, the source would see its connection reset at once.
    expect(await sourceStandIn(a.routePort, second)).toBe('closed');
    expect((await secondDest.received).bytes.equals(second)).toBe(true);
    await waitFor(() => a.gateway.history.length === 2 && b.gateway.history.length === 2);
    for (const site of pair) {
      expect(site.gateway.history.map((r) => r.result)).toEqual(['completed', 'completed']);
      expect(refusals(site)).toEqual([]);
    }
  });
});
