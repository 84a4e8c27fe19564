import { newCounts } from '../src/proxy/transfer-counts';
import { LiveMigrations } from '../src/gateway/progress';
import type { ProgressTick } from '../src/gateway/session';

const PAGE = 4096;

/** A tick of a migration that began at t=0 and has read `pages` pages of a `pageCount`-page guest. */
function tick(pages: number, wanBytes: number, pageCount: number | null = 1000): ProgressTick {
  const counts = { ...newCounts(), streamBytes: pages * (PAGE + 8), pagesSent: pages };
  return { phase: 'streaming', startedAt: 0, streamBytes: counts.streamBytes, wanBytes, counts, layout: pageCount === null ? null : { pageCount, pageSize: PAGE }, storeIo: { readBytes: 0, writtenBytes: 0 } };
}

describe('LiveMigrations', () => {
  test('a migration that stops moving is reported stalled once, and moving again once bytes flow', () => {
    const live = new LiveMigrations({ logSeconds: 0, stallSeconds: 3 });
    const changes: Array<string | null> = [];
    changes.push(live.tick('vm1', 'send', tick(10, 100), 1000).change);
    // No byte moves from t=1 s: stalled once 3 s have passed without a change, and told only once.
    for (const t of [2000, 3000, 4000, 5000, 6000]) changes.push(live.tick('vm1', 'send', tick(10, 100), t).change);
    expect(changes).toEqual([null, null, null, 'stalled', null, null]);
    expect(live.status('vm1', 'send', 6000)?.stalled).toBe(true);
    // WAN bytes alone count as movement (the source may be paused by backpressure or a cap).
    expect(live.tick('vm1', 'send', tick(10, 200), 7000).change).toBe('moving');
    expect(live.status('vm1', 'send', 7000)?.stalled).toBe(false);
    expect(live.tick('vm1', 'send', tick(11, 200), 8000).change).toBeNull();
    // It ends stalled or not: the gateway clears the gauge with that.
    expect(live.finished('vm1', 'send')).toBe(false);
    expect(live.all()).toEqual([]);
  });

  test('a stall at the end is reported by finished()', () => {
    const live = new LiveMigrations({ logSeconds: 0, stallSeconds: 1 });
    live.tick('vm1', 'receive', tick(1, 1), 0);
    expect(live.tick('vm1', 'receive', tick(1, 1), 1000).change).toBe('stalled');
    expect(live.finished('vm1', 'receive')).toBe(true);
  });

  test('the progress line is due every logSeconds, never with 0', () => {
    const live = new LiveMigrations({ logSeconds: 2, stallSeconds: 100 });
    const due = [0, 1000, 2000, 3000, 4000, 5000].map((t, i) => live.tick('vm1', 'send', tick(i, i), t).logDue);
    expect(due).toEqual([false, false, true, false, true, false]);
    const never = new LiveMigrations({ logSeconds: 0, stallSeconds: 100 });
    expect([0, 1000, 100_000].map((t, i) => never.tick('vm1', 'send', tick(i, i), t).logDue)).toEqual([false, false, false]);
  });

  test('status: rates over the last tick, saving, and what is left of the first pass', () => {
    const live = new LiveMigrations({ logSeconds: 0, stallSeconds: 100 });
    live.tick('vm1', 'send', tick(100, 50_000), 1000);
    live.tick('vm1', 'send', tick(300, 150_000), 3000);
    const s = live.status('vm1', 'send', 3500);
    const bytesPerPass = 200 * (PAGE + 8);
    expect(s).toMatchObject({
      vm: 'vm1',
      direction: 'send',
      phase: 'streaming',
      startedAt: new Date(0).toISOString(),
      elapsedSeconds: 3.5,
      qemuBytes: 300 * (PAGE + 8),
      wanBytes: 150_000,
      pagesSent: 300,
      qemuBytesPerSecond: bytesPerPass / 2,
      wanBytesPerSecond: 50_000,
      ramBytes: 1000 * PAGE,
      remainingBytes: 700 * PAGE,
      stalled: false,
    });
    expect(s?.saving).toBeCloseTo(1 - 150_000 / (300 * (PAGE + 8)), 10);
    expect(s?.etaSeconds).toBeCloseTo((700 * PAGE) / (bytesPerPass / 2), 6);
    // Past the first pass nothing says how much the guest will dirty: no estimate.
    live.tick('vm1', 'send', tick(1200, 400_000), 4000);
    expect(live.status('vm1', 'send', 4000)).toMatchObject({ remainingBytes: null, etaSeconds: null, ramBytes: 1000 * PAGE });
    // Before the stream's setup declared the RAM: nothing known.
    live.tick('vm2', 'send', tick(0, 0, null), 4000);
    expect(live.status('vm2', 'send', 4000)).toMatchObject({ ramBytes: null, remainingBytes: null, etaSeconds: null, saving: null });
    expect(live.all(4000).map((m) => m.vm)).toEqual(['vm1', 'vm2']);
    // What the VM's store read and wrote so far, as the tick says it.
    live.tick('vm2', 'send', { ...tick(10, 100), storeIo: { readBytes: 3 * PAGE, writtenBytes: 10 * PAGE } }, 4500);
    expect(live.status('vm2', 'send', 4500)).toMatchObject({ storeReadBytes: 3 * PAGE, storeWrittenBytes: 10 * PAGE });
  });
});
