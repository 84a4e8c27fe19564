/**
 * The data path allocates nothing per page: a back leg's held pages cross as Runs, and neither codec may
 * leave garbage behind for each of them, or the collector runs every few thousand pages. Before the
 * codecs' page copies went through copyBytes and the multifd barrier's checks stopped allocating a
 * closure per call, the two codecs here allocated 379 bytes a page (14 since), and in a real back leg
 * of a 256 MiB guest a receiving gateway ran 24-26 scavenges, a sending one 14-15, with the recommended
 * 1 MiB semi-spaces (6-9 since; docs/benchmarks.md, "Thirty-seventh session").
 *
 * Measured with V8's sampling heap profiler over the back leg alone, counting what the collector took
 * too: the encoder and decoder as the gateways set them up (stores on disk, a MultifdMigration each).
 */
import { Session } from 'node:inspector';
import * as path from 'node:path';
import { StreamDecoder } from '../src/proxy/decoder';
import { StreamEncoder } from '../src/proxy/encoder';
import { MultifdMigration } from '../src/proxy/multifd-migration';
import type { PageStore } from '../src/store';
import { guestMemory, migrationStream } from '../src/lab/harness/migration-stream';
import { TestStores } from './test-stores';

const stores = new TestStores();
afterEach(() => stores.closeAll());

/** What a gateway reads from its source at a time. */
const CHUNK = 256 * 1024;

interface SampledNode {
  selfSize: number;
  children: SampledNode[];
}

function sampledBytes(node: SampledNode): number {
  return node.selfSize + node.children.reduce((sum, child) => sum + sampledBytes(child), 0);
}

function post<T>(session: Session, method: string, params?: object): Promise<T> {
  return new Promise((resolve, reject) => session.post(method, params, (err, result) => (err ? reject(err) : resolve(result as T))));
}

/**
 * One migration from `sender`'s store to `receiver`'s, through an encoder and a decoder set up as the
 * gateways set theirs (the sender's own digest table is the reference when both stores hold the same
 * snapshot). Returns the rebuilt stream.
 */
function migrate(stream: Buffer, sender: PageStore, receiver: PageStore, sharedSnapshot: boolean): Buffer {
  const out: Buffer[] = [];
  const decoder = new StreamDecoder((b) => out.push(b), receiver, (layout) => {
    const multifd = new MultifdMigration(receiver);
    multifd.begin(layout);
    decoder.multifd = multifd;
  });
  const encoder = new StreamEncoder(
    {
      literal: (bytes) => decoder.literal(bytes),
      run: (payload) => decoder.run(payload),
      delta: (payload) => decoder.delta(payload),
    },
    sender,
    (layout) => {
      encoder.reference = sharedSnapshot ? sender.digests : new Uint8Array(layout.pageCount * 16);
      encoder.deltas = true;
      const multifd = new MultifdMigration(sender);
      multifd.begin(layout);
      encoder.multifd = multifd;
    },
  );
  for (let at = 0; at < stream.length; at += CHUNK) {
    encoder.push(stream.subarray(at, at + CHUNK));
    decoder.releaseInput();
  }
  encoder.end();
  decoder.end(stream.length, encoder.streamCheck);
  return Buffer.concat(out);
}

/**
 * Bytes the sampling profiler saw allocated (collected or not) in a back leg of a guest of `pages` pages
 * whose every page both stores hold, after a first leg and a back leg that warm the codecs.
 */
async function backLegAllocations(session: Session, pages: number): Promise<number> {
  const root = stores.dir('bfmig-allocations-');
  const a = stores.open(path.join(root, 'a'), 'vm');
  const b = stores.open(path.join(root, 'b'), 'vm');
  const memory = guestMemory([['pc.ram', pages - 64], ['0000:00:02.0/vga.vram', 64]], 11, 0.1);
  const stream = migrationStream(memory, []);
  expect(migrate(stream, a, b, false).equals(stream)).toBe(true);
  a.commit('snap-1');
  b.commit('snap-1');
  expect(migrate(stream, b, a, true).equals(stream)).toBe(true);
  a.commit('snap-2');
  b.commit('snap-2');
  await post(session, 'HeapProfiler.startSampling', { samplingInterval: 512, includeObjectsCollectedByMajorGC: true, includeObjectsCollectedByMinorGC: true });
  const rebuilt = migrate(stream, a, b, true);
  const { profile } = await post<{ profile: { head: SampledNode } }>(session, 'HeapProfiler.stopSampling');
  expect(rebuilt.equals(stream)).toBe(true);
  stores.closeAll();
  return sampledBytes(profile.head);
}

test('a back leg of held pages costs the encoder and the decoder no allocation per page', async () => {
  const session = new Session();
  session.connect();
  try {
    await post(session, 'HeapProfiler.enable');
    // Two guests, 32 MiB and 160 MiB: what a leg allocates once (its setup, the codecs' first calls)
    // cancels out, what it allocates per page does not.
    const small = await backLegAllocations(session, 8192);
    const large = await backLegAllocations(session, 40960);
    const perPage = (large - small) / (40960 - 8192);
    // Per chunk read (64 pages) there are views and frames, a few hundred bytes; per page, nothing: 1-5
    // bytes a page measured alone, up to 24 while the rest of the suite loads both cores (code the JIT
    // has not optimized yet boxes numbers). An allocation per page costs far more: 379 bytes before the
    // codecs' copies stopped allocating a view each.
    expect(perPage).toBeLessThan(48);
    // The profiler saw the legs at all.
    expect(small).toBeGreaterThan(0);
  } finally {
    session.disconnect();
  }
});
