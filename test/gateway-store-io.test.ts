/**
 * What each migration cost its VM's store file, as the gateways' metrics say it
 * (bfmig_store_read_bytes_total, bfmig_store_written_bytes_total): a first leg writes every page it
 * carried at both sites and reads next to nothing; a back leg whose guest changed nothing writes
 * nothing, and its receiver reads every page it rebuilds from its store; the sender of a leg whose guest
 * changed a few pages reads their old versions and nothing else. Each migration's report and last log
 * line ('migration completed') say the same figures.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { migrateThroughPair, startPair, stopPair, type TestSite } from '../src/lab/harness/gateway-pair';
import { guestMemory, migrationStream, patchPages } from '../src/lab/harness/migration-stream';

const PAGE = 4096;
const PAGES = 3000;
const memory = guestMemory([['pc.ram', PAGES]], 29);
const stream = migrationStream(memory, []);
const nonZero = memory.pages.filter((p) => p.some((b) => b !== 0)).length;

/** The value of `metric` for vm1 in `direction` at `site`. */
async function sample(site: TestSite, metric: string, direction: 'send' | 'receive'): Promise<number> {
  const text = await site.metrics.text();
  const m = new RegExp(`^${metric}\\{vm="vm1",direction="${direction}"\\} (\\d+)$`, 'm').exec(text);
  if (m === null) throw new Error(`${metric}{vm="vm1",direction="${direction}"} not exported`);
  return Number(m[1]);
}

async function storeIo(site: TestSite, direction: 'send' | 'receive'): Promise<{ read: number; written: number }> {
  return { read: await sample(site, 'bfmig_store_read_bytes_total', direction), written: await sample(site, 'bfmig_store_written_bytes_total', direction) };
}

describe('store I/O per VM and direction', () => {
  let tmp = '';
  let a: TestSite;
  let b: TestSite;

  beforeAll(async () => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'bfmig-store-io-'));
    [a, b] = await startPair(tmp);
  });

  afterAll(async () => {
    await stopPair([a, b]);
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  test('a first leg writes the pages it carried at both sites; a back leg of an unchanged guest reads them at its receiver and writes nothing', async () => {
    // The guest's pages are pseudo-random: none is like another, so no page is read as a base.
    expect(nonZero).toBeGreaterThan(0.6 * PAGES);
    const sendBefore = await storeIo(a, 'send'); // a route's send counters exist from the start, at 0
    expect(sendBefore).toEqual({ read: 0, written: 0 });

    const first = await migrateThroughPair(a, b, stream);
    expect(first.received.equals(stream)).toBe(true);
    const firstSend = await storeIo(a, 'send');
    const firstReceive = await storeIo(b, 'receive');
    // Each migration's report and its last log line say the same of it.
    expect(first.sent.storeIo).toEqual({ readBytes: firstSend.read, writtenBytes: firstSend.written });
    expect(first.got.storeIo).toEqual({ readBytes: firstReceive.read, writtenBytes: firstReceive.written });
    const completed = b.logs.filter((l) => l.msg === 'migration completed' && l.direction === 'receive');
    expect(completed.at(-1)).toMatchObject({ storeReadBytes: firstReceive.read, storeWrittenBytes: firstReceive.written });
    // Every non-zero page at both sites (zero pages of a fresh store are holes, not written).
    for (const io of [firstSend, firstReceive]) {
      expect(io.written).toBeGreaterThanOrEqual(nonZero * PAGE);
      expect(io.written).toBeLessThanOrEqual(PAGES * PAGE);
      expect(io.read).toBeLessThan(0.05 * nonZero * PAGE);
    }

    const back = await migrateThroughPair(b, a, stream);
    expect(back.received.equals(stream)).toBe(true);
    expect(back.got.counts.pagesReused).toBe(nonZero);
    const backSend = await storeIo(b, 'send');
    const backReceive = await storeIo(a, 'receive');
    expect(back.got.storeIo).toEqual({ readBytes: backReceive.read, writtenBytes: backReceive.written });
    // The receiver rebuilt every held page from its store, and had nothing new to keep.
    expect(backReceive.read).toBeGreaterThanOrEqual(nonZero * PAGE);
    expect(backReceive.written).toBe(0);
    // The sender holds the same snapshot: it neither reads nor writes pages.
    expect(backSend).toEqual({ read: 0, written: 0 });
    // The first leg's counters stay what they were (counters only grow, per direction).
    expect(await storeIo(a, 'send')).toEqual(firstSend);
  });

  test('the sender of a leg whose guest changed a few scattered pages reads their old versions, not the rest of its store', async () => {
    // Both sites hold the snapshot of the test before. The guest changes 16 bytes of 2% of its pages.
    const changedMemory = { ...memory, pages: memory.pages.slice() };
    const changed = patchPages(changedMemory, 0.02, 16, 41);
    expect(changed.length).toBeGreaterThan(30);
    const changedStream = migrationStream(changedMemory, []);
    const sendBefore = await storeIo(a, 'send');

    const leg = await migrateThroughPair(a, b, changedStream);
    expect(leg.received.equals(changedStream)).toBe(true);
    // Each changed page crossed as the bytes that changed, against its old version read at the sender.
    expect(leg.sent.counts.pagesDelta).toBe(changed.length);
    const send = await storeIo(a, 'send');
    const read = send.read - sendBefore.read;
    // Every old version is read (the undo journal keeps it; the Delta is made against it), each once:
    // read as a series, they had the store's stream read-ahead read on through the pages held after them.
    expect(read).toBeGreaterThanOrEqual(changed.length * PAGE);
    expect(read).toBeLessThanOrEqual(2 * changed.length * PAGE);
    expect(send.written - sendBefore.written).toBeGreaterThanOrEqual(changed.length * PAGE);
  });
});
