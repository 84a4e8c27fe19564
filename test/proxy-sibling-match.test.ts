/**
 * SiblingDelta frames between an encoder and a decoder: a page whose content a sibling's retained
 * snapshot holds crosses as a reference to it, and the receiver rebuilds it byte for byte, or fails the
 * migration when the reference is not one it can check.
 */
import * as path from 'node:path';
import { DIGEST_BYTES } from '../src/digest';
import { StreamDecoder } from '../src/proxy/decoder';
import { RebuildError } from '../src/proxy/rebuild-error';
import { StreamEncoder } from '../src/proxy/encoder';
import { DELTA_BASE_DIGEST_AT, DELTA_NEW_DIGEST_AT, SIBLING_DELTA_LEAD_BYTES } from '../src/proxy/page-delta';
import { SiblingMatch } from '../src/proxy/sibling-match';
import { PageStore } from '../src/store';
import { dirty, guestMemory, type GuestMemory, migrationStream, PAGE } from '../src/lab/harness/migration-stream';
import { TestStores } from './test-stores';

const LAYOUT: [string, number][] = [['pc.ram', 3000]];
const stores = new TestStores();
let root = '';
beforeEach(() => {
  root = stores.dir('bfmig-sibling-');
});

/** The sibling's snapshot: its stream retained by a store, committed. */
function retainedSibling(memory: GuestMemory): PageStore {
  const store = stores.open(path.join(root, 'sibling'), 'vm0');
  const encoder = new StreamEncoder({ literal: () => undefined, run: () => undefined }, store);
  encoder.push(migrationStream(memory, []));
  encoder.end();
  store.commit('snap-sibling');
  return store;
}

/** A first leg of vm1 with `sibling` confirmed on both sides; `tamper` changes SiblingDelta payloads on the way. */
/** What the sending session tells the encoder per chunk (see StreamEncoder): by default, store reads are free. */
interface Gates {
  deltaReadsFree: boolean;
  receiverReadsAhead: boolean;
}

function firstLeg(stream: Buffer, sibling: PageStore, tamper?: (payload: Buffer) => void, gates: Gates = { deltaReadsFree: true, receiverReadsAhead: false }) {
  const out: Buffer[] = [];
  const sender = stores.open(path.join(root, 'a'), 'vm1');
  const receiver = stores.open(path.join(root, 'b'), 'vm1');
  const decoder = new StreamDecoder((b) => out.push(Buffer.from(b)), receiver);
  decoder.siblings = [sibling];
  const encoder = new StreamEncoder(
    {
      literal: (bytes) => decoder.literal(Buffer.from(bytes)),
      run: (payload) => decoder.run(payload),
      delta: (payload) => decoder.delta(Buffer.from(payload)),
      siblingDelta: (payload) => {
        const copy = Buffer.from(payload);
        tamper?.(copy);
        decoder.siblingDelta(copy);
      },
    },
    sender,
    (layout) => {
      // The receiver holds nothing of vm1 yet.
      encoder.reference = new Uint8Array(layout.pageCount * DIGEST_BYTES);
      encoder.deltas = true;
      encoder.siblings = new SiblingMatch([sibling.digests.slice()]);
      Object.assign(encoder, gates);
    },
  );
  for (let at = 0; at < stream.length; at += 50_000) encoder.push(stream.subarray(at, at + 50_000));
  encoder.end();
  decoder.end(stream.length, encoder.streamCheck);
  return { rebuilt: Buffer.concat(out), encoder, decoder, receiver };
}

/** A guest of the sibling's image: its pages, 30% rewritten, and pages 2000..2099 holding what 100..199 hold in the sibling. */
function siblingGuest(image: GuestMemory): { memory: GuestMemory; sameIndex: number; moved: number } {
  const memory: GuestMemory = { blocks: image.blocks, pages: image.pages.map((p) => Buffer.from(p)) };
  dirty(memory, 0.3, 17);
  for (let i = 0; i < 100; i++) memory.pages[2000 + i] = Buffer.from(image.pages[100 + i]);
  const nonZero = (p: Buffer): boolean => p.some((x) => x !== 0);
  const sameIndex = memory.pages.filter((p, i) => nonZero(p) && p.equals(image.pages[i])).length;
  const moved = image.pages.slice(100, 200).filter((p, i) => nonZero(p) && !p.equals(image.pages[2000 + i])).length;
  return { memory, sameIndex, moved };
}

describe('SiblingDelta frames between an encoder and a decoder', () => {
  test("a sibling's pages, at the same index or moved, cross as references and are rebuilt byte for byte", () => {
    const image = guestMemory(LAYOUT, 31);
    const sibling = retainedSibling(image);
    const { memory, sameIndex, moved } = siblingGuest(image);
    expect(sameIndex).toBeGreaterThan(1000);
    expect(moved).toBeGreaterThan(50);
    const stream = migrationStream(memory, []);
    const leg = firstLeg(stream, sibling);
    expect(leg.rebuilt.equals(stream)).toBe(true);
    const { counts } = leg.encoder;
    // Every page held at the same index is found; a moved page whose content vm1 also holds at its old
    // place was sent earlier in this stream (content match within the VM); the hint table may pass over a few.
    expect(counts.pagesSibling).toBeGreaterThanOrEqual(sameIndex);
    expect(counts.pagesSibling + counts.pagesMatched).toBeGreaterThanOrEqual(sameIndex + 0.9 * moved);
    expect(counts.pagesSibling + counts.pagesMatched).toBeLessThanOrEqual(sameIndex + moved);
    expect(leg.decoder.counts.pagesSibling).toBe(counts.pagesSibling);
    expect(leg.decoder.counts.pagesMatched).toBe(counts.pagesMatched);
    expect(leg.decoder.counts.deltaBytes).toBe(counts.deltaBytes);
    // The receiving store now holds vm1's own copy of a moved page.
    const page = Buffer.alloc(PAGE);
    leg.receiver.readPages(2050, 1, page, 0);
    expect(page.equals(image.pages[150])).toBe(true);
  });

  test("while store reads are not free (the gateways set the pace), a sibling's pages still cross as references where the receiver reads bases ahead", () => {
    const image = guestMemory(LAYOUT, 33);
    const sibling = retainedSibling(image);
    const { memory, sameIndex, moved } = siblingGuest(image);
    const stream = migrationStream(memory, []);
    const paced = firstLeg(stream, sibling, undefined, { deltaReadsFree: false, receiverReadsAhead: true });
    expect(paced.rebuilt.equals(stream)).toBe(true);
    // Every page the sibling holds, at its index or moved, is a reference: to the sibling's page, or to an
    // equal page of the VM that crossed before it.
    const counts = paced.encoder.counts;
    expect(counts.pagesSibling + counts.pagesMatched).toBeGreaterThanOrEqual(sameIndex + 0.9 * moved);
    expect(counts.pagesSibling).toBeGreaterThan(0.5 * (sameIndex + moved));
    expect([paced.decoder.counts.pagesSibling, paced.decoder.counts.pagesMatched]).toEqual([counts.pagesSibling, counts.pagesMatched]);
    // Where the receiver does not read bases ahead (or the link is too fast), they go whole.
    root = stores.dir('bfmig-sibling-'); // vm1's stores anew
    const whole = firstLeg(stream, sibling, undefined, { deltaReadsFree: false, receiverReadsAhead: false });
    expect(whole.rebuilt.equals(stream)).toBe(true);
    expect(whole.encoder.counts.pagesSibling).toBe(0);
    expect(whole.encoder.counts.pagesSent).toBeGreaterThanOrEqual(sameIndex + moved);
  });

  test.each([
    ['names a sibling that was not confirmed', (p: Buffer) => void (p[0] = 1), /sibling 1, but 1 were confirmed/],
    ['names a page outside the sibling', (p: Buffer) => void p.writeUInt32BE(0xffffff, SIBLING_DELTA_LEAD_BYTES + 4), /outside the RAM layout/],
    ['names content the sibling does not hold there', (p: Buffer) => void (p[SIBLING_DELTA_LEAD_BYTES + DELTA_BASE_DIGEST_AT] ^= 1), /does not hold/],
    ['does not rebuild the page the sender read', (p: Buffer) => void (p[SIBLING_DELTA_LEAD_BYTES + DELTA_NEW_DIGEST_AT] ^= 1), /does not rebuild/],
  ])('a SiblingDelta that %s fails the migration', (_what, tamper, message) => {
    const image = guestMemory(LAYOUT, 32);
    const sibling = retainedSibling(image);
    const stream = migrationStream(siblingGuest(image).memory, []);
    let error: unknown = null;
    try {
      firstLeg(stream, sibling, tamper);
    } catch (err) {
      error = err;
    }
    expect(error).toBeInstanceOf(RebuildError);
    expect((error as Error).message).toMatch(message);
  });

  test('a SiblingDelta too short for a Delta payload fails the migration', () => {
    const sibling = retainedSibling(guestMemory(LAYOUT, 33));
    const decoder = new StreamDecoder(() => undefined, null);
    decoder.siblings = [sibling];
    expect(() => decoder.siblingDelta(Buffer.alloc(SIBLING_DELTA_LEAD_BYTES + 8))).toThrow(/Delta frame of 8 bytes/);
  });
});
