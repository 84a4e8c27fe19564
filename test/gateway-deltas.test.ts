/**
 * Delta frames between two real gateways on loopback: a page changed in a few bytes since the far site
 * last held it crosses as the bytes that changed, and the destination still gets the source's stream
 * byte for byte.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { migrateThroughPair, startPair, stopPair, type TestSite } from '../src/lab/harness/gateway-pair';
import { copiesWithHeaders, dirty, guestMemory, migrationStream, PAGE, patchPages } from '../src/lab/harness/migration-stream';

const migrate = migrateThroughPair;

/** Has a gateway pair started (startPair's arguments after the directory) before the enclosing describe's tests, stopped after. */
function pairForTests(...args: Parameters<typeof startPair> extends [string, ...infer Rest] ? Rest : never): () => [TestSite, TestSite] {
  let tmp = '';
  let pair: [TestSite, TestSite] | null = null;
  beforeAll(async () => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'bfmig-deltas-'));
    pair = await startPair(tmp, ...args);
  });
  afterAll(async () => {
    if (pair) await stopPair(pair);
    fs.rmSync(tmp, { recursive: true, force: true });
  });
  return () => pair as [TestSite, TestSite];
}

describe('page deltas through a gateway pair', () => {
  // `deltas: always`: on loopback the WAN never sets the pace, and whether the store reads count as
  // quick is the machine's doing (`auto`, the default).
  const pair = pairForTests(['deltas: always\n', 'deltas: always\n'], undefined, [{ vm: 'vm1' }, { vm: 'vm2' }]);

  test('there, back with small in-page changes, and back again with pages rewritten whole', async () => {
    const [a, b] = pair();
    const memory = guestMemory([['pc.ram', 4000]], 21);
    const first = migrationStream(memory, []);
    const leg1 = await migrate(a, b, first);
    expect(leg1.received.equals(first)).toBe(true);
    expect(leg1.sent.counts.pagesDelta).toBe(0); // nothing held at B yet

    // At B the guest changes 32 bytes in each of 20% of its pages.
    const changed = patchPages(memory, 0.2, 32, 3);
    const back = migrationStream(memory, []);
    const leg2 = await migrate(b, a, back);
    expect(leg2.received.equals(back)).toBe(true);
    expect(leg2.got.result).toBe('completed');
    expect(leg2.sent.counts.pagesDelta).toBeGreaterThan(0.9 * changed.length);
    expect(leg2.got.counts.pagesDelta).toBe(leg2.sent.counts.pagesDelta);
    // What crossed for the changed pages: about their changed bytes, far below the pages themselves.
    expect(leg2.sent.counts.deltaBytes).toBeLessThan(0.1 * leg2.sent.counts.pagesDelta * PAGE);
    expect(leg2.sent.wanBytesOut).toBeLessThan(0.1 * changed.length * PAGE + 0.02 * first.length);

    // At A the guest rewrites 10% of its pages whole: they go in full, the stream still exact.
    const rewritten = dirty(memory, 0.1, 4);
    const third = migrationStream(memory, []);
    const leg3 = await migrate(a, b, third);
    expect(leg3.received.equals(third)).toBe(true);
    expect(leg3.sent.counts.pagesSent).toBeGreaterThanOrEqual(rewritten.length - leg3.sent.counts.pagesDelta);
    expect(leg3.sent.counts.pagesDelta).toBeLessThan(0.01 * rewritten.length + 1);
    // Both gateways' log lines say how many pages crossed as deltas, and what they took.
    expect(a.logs.some((l) => l.msg === 'migration completed' && l.direction === 'receive' && l.pagesDelta === leg2.sent.counts.pagesDelta && l.deltaBytes === leg2.sent.counts.deltaBytes)).toBe(true);
    expect(b.logs.some((l) => l.msg === 'migration completed' && l.direction === 'send' && l.pagesDelta === leg2.sent.counts.pagesDelta)).toBe(true);
  });

  test('a first leg: pages alike in all but a header cross as deltas against the first of them, byte for byte', async () => {
    const [a, b] = pair();
    const memory = guestMemory([['pc.ram', 3000]], 22);
    // Three copies of each of pages 0..499 further on, as a heap holding file pages thrice.
    const copies = [...copiesWithHeaders(memory, 0, 1000, 500), ...copiesWithHeaders(memory, 0, 1500, 500), ...copiesWithHeaders(memory, 0, 2000, 500)];
    const stream = migrationStream(memory, []);
    const leg = await migrate(a, b, stream, 'vm2');
    expect(leg.received.equals(stream)).toBe(true);
    expect(leg.got.result).toBe('completed');
    expect(leg.sent.counts.pagesDelta).toBeGreaterThanOrEqual(0.95 * copies.length);
    expect(leg.got.counts.pagesDelta).toBe(leg.sent.counts.pagesDelta);
    // Each copy costs its header's ranges and the Delta's digests, not a page.
    expect(leg.sent.counts.deltaBytes).toBeLessThan(leg.sent.counts.pagesDelta * 80);
    expect(leg.sent.wanBytesOut).toBeLessThan(stream.length - 0.9 * copies.length * PAGE);
    // The receiving store holds every copy as the source sent it: the next leg back reuses them all.
    const back = await migrate(b, a, stream, 'vm2');
    expect(back.received.equals(stream)).toBe(true);
    expect(back.sent.counts.pagesReused).toBeGreaterThanOrEqual(copies.length);
  });
});

describe('with deltas: auto, over a 150 Mbit/s link (the WAN sets the pace, too fast for store reads to count as free)', () => {
  // Faster than the 130 Mbit/s below which store reads count as free, slower than the 2 Gbit/s past which
  // a match's work costs the sender more than the page's crossing. Where the gateways set the pace these
  // Deltas back off as compression does (CompressionPolicy.savingPays), and on a loaded test host they
  // may for a stretch of the leg: most pages alike are asked of them, not all.
  const pair = pairForTests(['', ''], { rateMbit: 150, delayMs: 1 }, [{ vm: 'vm1' }]);

  test('pages alike still cross as deltas: the receiver reads their bases ahead or has them in memory (bases-ahead)', async () => {
    const [a, b] = pair();
    const memory = guestMemory([['pc.ram', 12000]], 23);
    const copies = [...copiesWithHeaders(memory, 0, 4000, 2000), ...copiesWithHeaders(memory, 0, 8000, 2000)];
    const stream = migrationStream(memory, []);
    const leg = await migrate(a, b, stream, 'vm1');
    expect(leg.received.equals(stream)).toBe(true);
    expect(leg.got.result).toBe('completed');
    expect(leg.sent.counts.pagesDelta + leg.sent.counts.pagesMatched).toBeGreaterThanOrEqual(0.5 * copies.length);
    expect(leg.got.counts.pagesDelta).toBe(leg.sent.counts.pagesDelta);
  });
});
