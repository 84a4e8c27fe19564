import { LINK_SAMPLE_MIN_BYTES, LinkRates } from '../src/gateway/link-rates';
import { migrateThroughPair, startPair, stopPair, type TestSite } from '../src/lab/harness/gateway-pair';
import { guestMemory, migrationStream } from '../src/lab/harness/migration-stream';
import { suiteTempDir } from './temp-dir';
import type { MigrationReport } from '../src/gateway/session';
import { newCounts } from '../src/proxy/transfer-counts';

function report(vm: string, fields: Partial<MigrationReport>): MigrationReport {
  return {
    vm,
    direction: 'receive',
    result: 'completed',
    error: null,
    seconds: 2,
    streamBytes: 0,
    wanBytesOut: 0,
    wanBytesIn: 0,
    compressionSavedBytes: 0,
    counts: newCounts(),
    mode: 'none',
    snapshotId: null,
    verbatim: null,
    postcopy: false,
    ...fields,
  };
}

describe('LinkRates', () => {
  test("a VM's last sizeable completed migration, either way, gives its next one the rate it crossed the WAN at", () => {
    const rates = new LinkRates();
    expect(rates.floor('vm1')).toBe(0);
    // A first leg received: 200 MB in 2 s.
    rates.observe(report('vm1', { direction: 'receive', wanBytesIn: 200e6, seconds: 2 }));
    expect(rates.floor('vm1')).toBe(100e6);
    expect(rates.floor('vm2')).toBe(0);
    // A back leg of 1.3 MB says nothing of the link: the rate stays.
    rates.observe(report('vm1', { direction: 'send', wanBytesOut: 1.3e6, seconds: 0.5 }));
    expect(rates.floor('vm1')).toBe(100e6);
    // A failed migration neither.
    rates.observe(report('vm1', { direction: 'send', result: 'failed', wanBytesOut: 500e6, seconds: 1 }));
    expect(rates.floor('vm1')).toBe(100e6);
    // The next sizeable one replaces it, slower or not (the path may have changed).
    rates.observe(report('vm1', { direction: 'send', wanBytesOut: LINK_SAMPLE_MIN_BYTES, seconds: 4 }));
    expect(rates.floor('vm1')).toBe(LINK_SAMPLE_MIN_BYTES / 4);
  });

  test('remembers at most 10,000 VMs, forgetting the one not heard of longest', () => {
    const rates = new LinkRates();
    for (let i = 0; i <= 10_000; i++) rates.observe(report(`vm${i}`, { wanBytesIn: 32e6, seconds: 1 }));
    expect(rates.floor('vm0')).toBe(0);
    expect(rates.floor('vm1')).toBe(32e6);
    expect(rates.floor('vm10000')).toBe(32e6);
  });
});

describe('a gateway pair', () => {
  const tmp = suiteTempDir('bfmig-link-rates-');
  let pair: [TestSite, TestSite] | undefined;
  afterAll(async () => stopPair(pair ?? []));

  test("the back leg's sending session is given the rate the first leg crossed at; the first leg none", async () => {
    pair = await startPair(tmp);
    const [a, b] = pair;
    // 5,000 pages of pseudo-random memory: 20 MB, enough for a rate.
    const memory = guestMemory([['pc.ram', 5000]], 23, 0);
    const stream = migrationStream(memory, []);
    const first = await migrateThroughPair(a, b, stream);
    expect(first.received.equals(stream)).toBe(true);
    const offered = (site: TestSite) => site.logs.filter((l) => l.msg === 'peer offered').at(-1);
    expect(offered(a)?.linkFloorBytesPerS).toBeUndefined();
    const back = await migrateThroughPair(b, a, stream);
    expect(back.received.equals(stream)).toBe(true);
    // What b measured receiving the first leg: its WAN bytes over its seconds.
    expect(offered(b)?.linkFloorBytesPerS).toBe(Math.round(first.got.wanBytesIn / first.got.seconds));
  });
});
