/**
 * The pool of page buffers at the gateway level: a gateway with deltas on touches a sending session's
 * and a receiving session's buffer when it starts, so that no migration (not even its first) pays for
 * them while its stream waits; migrations take them and give them back; a gateway with deltas off
 * takes no memory for them.
 */
import * as path from 'node:path';
import { migrateThroughPair, startPair, stopPair, type TestSite } from '../src/lab/harness/gateway-pair';
import { guestMemory, migrationStream } from '../src/lab/harness/migration-stream';
import { RECENT_PAGES } from '../src/proxy/recent-pages';
import { RESEMBLANCE_CACHE_PAGES } from '../src/proxy/resemblance-cache';
import { pageBuffers } from '../src/proxy/reused-buffers';
import { X86_PAGE_SIZE } from '../src/qemu/constants';
import { suiteTempDir } from './temp-dir';

/** A guest large enough for a whole resemblance cache (32 MiB of pages at least). */
const PAGES = RESEMBLANCE_CACHE_PAGES + 512;
const PAGE_BUFFER_BYTES = [RESEMBLANCE_CACHE_PAGES * X86_PAGE_SIZE, RECENT_PAGES * X86_PAGE_SIZE];

describe('page buffers of a gateway', () => {
  const tmp = suiteTempDir('bfmig-page-buffers-');
  let pair: [TestSite, TestSite] | undefined;

  afterEach(async () => {
    await stopPair(pair ?? []);
    pair = undefined;
  });

  test('deltas on: the buffers are idle and touched once the gateway has started, and back after a migration', async () => {
    pageBuffers.clear();
    pair = await startPair(path.join(tmp, 'on'));
    const total = PAGE_BUFFER_BYTES.reduce((a, b) => a + b, 0);
    // Both gateways share this process's pool: the first filled it, the second found it full.
    expect(pageBuffers.idleByteCount).toBe(total);
    const taken = PAGE_BUFFER_BYTES.map((bytes) => pageBuffers.take(bytes));
    // Touched: zeroed at start, so their pages are the process's already.
    for (const buffer of taken) expect(buffer.every((byte) => byte === 0)).toBe(true);
    for (const buffer of taken) pageBuffers.give(buffer);

    // Every other page a copy of the one before with a header: the sender keeps pages in its cache and
    // sends Deltas, the receiver keeps pages for their bases; both give their buffers back at the end.
    const memory = guestMemory([['pc.ram', PAGES]], 23, 0);
    for (let i = 1; i < PAGES; i += 2) {
      memory.pages[i - 1].copy(memory.pages[i]);
      memory.pages[i].writeUInt32LE(i, 0);
    }
    const stream = migrationStream(memory, []);
    const [a, b] = pair;
    const { received, sent, got } = await migrateThroughPair(a, b, stream);
    expect(sent.result).toBe('completed');
    expect(got.result).toBe('completed');
    expect(received.equals(stream)).toBe(true);
    expect(sent.counts.pagesDelta).toBeGreaterThan(0);
    expect(pageBuffers.idleByteCount).toBe(total);
  });

  test('deltas off: no page buffers are taken at start', async () => {
    pageBuffers.clear();
    pair = await startPair(path.join(tmp, 'off'), ['deltas: off\n', 'deltas: off\n']);
    expect(pageBuffers.idleByteCount).toBe(0);
  });
});
