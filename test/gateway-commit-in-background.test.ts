/**
 * A migration's end: each gateway makes its store's pages durable in the thread pool before the
 * synchronous commit, so that a file system slow to commit a large write phase does not stop the
 * gateway's main thread (every other migration through it, its metrics). Here the background sync is
 * made slow by hand: the event loop keeps its pace meanwhile and both stores still commit; and a
 * background sync that fails changes nothing, the commit's own fsync deciding.
 */
import * as path from 'node:path';
import { migrateThroughPair, startPair, stopPair, type TestSite } from '../src/lab/harness/gateway-pair';
import { guestMemory, migrationStream } from '../src/lab/harness/migration-stream';
import { PageStore } from '../src/store';
import { suiteTempDir } from './temp-dir';

const stream = migrationStream(guestMemory([['pc.ram', 2048]], 41), [[3, 5, 7]]);
const SLOW_MS = 600;

describe('the store committed after a sync in the background', () => {
  const tmp = suiteTempDir('bfmig-commit-bg-');
  let pair: [TestSite, TestSite] | undefined;
  const realSync = PageStore.prototype.syncInBackground;

  afterEach(async () => {
    jest.restoreAllMocks();
    await stopPair(pair ?? []);
    pair = undefined;
  });

  test('a slow file system: the event loop keeps its pace while the pages are synced, then both stores commit', async () => {
    pair = await startPair(path.join(tmp, 'slow'));
    let slowSyncs = 0;
    jest.spyOn(PageStore.prototype, 'syncInBackground').mockImplementation(async function (this: PageStore) {
      slowSyncs++;
      await new Promise((resolve) => setTimeout(resolve, SLOW_MS));
      await realSync.call(this);
    });
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
    expect(slowSyncs).toBe(2);
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
});
