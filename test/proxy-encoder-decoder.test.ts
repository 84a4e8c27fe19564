import * as fs from 'node:fs';
import * as path from 'node:path';
import { DIGEST_BYTES } from '../src/digest';
import { StreamDecoder } from '../src/proxy/decoder';
import { RebuildError } from '../src/proxy/rebuild-error';
import { StreamEncoder } from '../src/proxy/encoder';
import { PageStore } from '../src/store';
import { encodeFrame, FRAME_HEADER_BYTES, FrameParser, FrameType } from '../src/wire/frames';
import { dirty, guestMemory, migrationStream, PAGE } from '../src/lab/harness/migration-stream';
import { TestStores } from './test-stores';

let root = '';
const stores = new TestStores();
beforeEach(() => {
  root = stores.dir('bfmig-proxy-');
});

type Reference = 'none' | 'shared' | 'table';

/**
 * Runs one migration through an encoder and a decoder, as the two gateways would, feeding the
 * encoder in chunks of pseudo-random sizes. Returns the rebuilt stream and the WAN bytes.
 */
function transfer(stream: Buffer, sender: PageStore, receiver: PageStore, reference: Reference, seed = 1) {
  const frames: { type: FrameType; payload: Buffer }[] = [];
  const encoder = new StreamEncoder(
    {
      literal: (bytes) => frames.push({ type: FrameType.Literal, payload: Buffer.from(bytes) }),
      run: (payload) => frames.push({ type: FrameType.Run, payload }),
    },
    sender,
    () => {
      if (reference === 'shared') encoder.reference = sender.digests;
    },
  );
  const out: Buffer[] = [];
  const decoder = new StreamDecoder((b) => out.push(b), receiver);
  let x = seed;
  let tableTaken = false;
  for (let at = 0; at < stream.length; ) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    const size = 1 + (x % 70_000);
    encoder.push(stream.subarray(at, at + size));
    at += size;
    // The decoder keeps up with the encoder, as over a connection.
    for (const f of frames.splice(0)) (f.type === FrameType.Literal ? decoder.literal(f.payload) : decoder.run(f.payload));
    if (reference === 'table' && !tableTaken && encoder.layout) {
      // What the gateway does on a digest-table exchange: a copy of the receiver's table, now.
      encoder.reference = Uint8Array.from(receiver.digests);
      tableTaken = true;
    }
  }
  encoder.end();
  for (const f of frames.splice(0)) (f.type === FrameType.Literal ? decoder.literal(f.payload) : decoder.run(f.payload));
  decoder.end(stream.length, encoder.streamCheck);
  return { rebuilt: Buffer.concat(out), encoder, decoder };
}

/** WAN bytes of a migration: every frame's header and payload. */
function wanBytesOf(stream: Buffer, sender: PageStore, receiver: PageStore, reference: Reference): { wan: number; rebuilt: Buffer; reused: number; sent: number } {
  let wan = 0;
  const encoder = new StreamEncoder(
    {
      literal: (bytes) => {
        wan += FRAME_HEADER_BYTES + bytes.length;
        decoder.literal(Buffer.from(bytes));
      },
      run: (payload) => {
        wan += FRAME_HEADER_BYTES + payload.length;
        decoder.run(payload);
      },
    },
    sender,
    () => {
      if (reference === 'shared') encoder.reference = sender.digests;
    },
  );
  const out: Buffer[] = [];
  const decoder = new StreamDecoder((b) => out.push(b), receiver);
  for (let at = 0; at < stream.length; at += 65536) encoder.push(stream.subarray(at, at + 65536));
  encoder.end();
  decoder.end(stream.length, encoder.streamCheck);
  return { wan, rebuilt: Buffer.concat(out), reused: encoder.counts.pagesReused, sent: encoder.counts.pagesSent };
}

const LAYOUT: [string, number][] = [
  ['pc.ram', 1500],
  ['0000:00:02.0/vga.vram', 100],
];

describe('encoder → decoder', () => {
  test('first leg: nothing to reuse, the stream is rebuilt byte for byte and both stores hold every page', () => {
    const memory = guestMemory(LAYOUT, 1);
    const stream = migrationStream(memory, [[5, 6, 7, 1200]]);
    const a = stores.open(root, 'vm1');
    const b = stores.open(path.join(root, 'b'), 'vm1');
    const { rebuilt, encoder, decoder } = transfer(stream, a, b, 'none');
    expect(rebuilt.equals(stream)).toBe(true);
    expect(encoder.counts.pagesReused).toBe(0);
    expect(decoder.counts.pagesSent).toBe(encoder.counts.pagesSent);
    expect(decoder.counts.pagesZero).toBe(encoder.counts.pagesZero);
    expect(Buffer.from(a.digests).equals(Buffer.from(b.digests))).toBe(true);
    const page = Buffer.alloc(PAGE);
    b.readPages(1200, 1, page, 0);
    expect(page.equals(memory.pages[1200])).toBe(true);
  });

  test('back legs reuse the shared snapshot: idle costs bytes, changed pages cost themselves', () => {
    const memory = guestMemory(LAYOUT, 2);
    const a = stores.open(root, 'vm1');
    const b = stores.open(path.join(root, 'b'), 'vm1');
    const first = migrationStream(memory, [[10, 11]]);
    const leg1 = wanBytesOf(first, a, b, 'none');
    expect(leg1.rebuilt.equals(first)).toBe(true);
    a.commit('snap-1');
    b.commit('snap-1');

    // B → A, idle guest: every page is reused or a fill page.
    const idle = migrationStream(memory, []);
    const leg2 = wanBytesOf(idle, b, a, 'shared');
    expect(leg2.rebuilt.equals(idle)).toBe(true);
    expect(leg2.sent).toBe(0);
    expect(leg2.wan).toBeLessThan(first.length * 0.005);
    a.commit('snap-2');
    b.commit('snap-2');

    // A → B with 3% of the pages changed, some of them sent twice.
    const changed = dirty(memory, 0.03, 9);
    const third = migrationStream(memory, [changed.slice(0, 10)]);
    const leg3 = wanBytesOf(third, a, b, 'shared');
    expect(leg3.rebuilt.equals(third)).toBe(true);
    const nonZeroChanged = changed.filter((i) => !memory.pages[i].every((v) => v === 0)).length;
    // Changed pages go in full; a page sent again in the same migration is reused from the first copy.
    expect(leg3.sent).toBe(nonZeroChanged);
    expect(leg3.wan).toBeLessThan(1.05 * nonZeroChanged * PAGE + 0.001 * first.length + 4096);
  });

  test('a receiver whose snapshot the sender lacks is matched through its digest table', () => {
    const memory = guestMemory(LAYOUT, 3);
    const a = stores.open(root, 'vm1');
    const b = stores.open(path.join(root, 'b'), 'vm1');
    wanBytesOf(migrationStream(memory, []), a, b, 'none');
    a.commit('snap-ab');
    b.commit('snap-ab');
    dirty(memory, 0.02, 4);
    // C never saw this VM: it learns what A holds from A's digest table.
    const c = stores.open(path.join(root, 'c'), 'vm1');
    const stream = migrationStream(memory, []);
    const { rebuilt, encoder } = transfer(stream, c, a, 'table', 5);
    expect(rebuilt.equals(stream)).toBe(true);
    expect(encoder.counts.pagesReused).toBeGreaterThan(encoder.counts.pagesSent * 10);
  });

  test('a retained page that no longer matches fails the rebuild before it is passed on', () => {
    const memory = guestMemory(LAYOUT, 4, 0);
    const a = stores.open(root, 'vm1');
    const b = stores.open(path.join(root, 'b'), 'vm1');
    wanBytesOf(migrationStream(memory, []), a, b, 'none');
    a.commit('s');
    b.commit('s');
    // Corrupt page 700 of B's store on disk, behind its digest.
    const file = path.join(root, 'b', 'vm1', 'pages');
    const fd = fs.openSync(file, 'r+');
    fs.writeSync(fd, Buffer.from([0xff ^ memory.pages[700][5]]), 0, 1, 700 * PAGE + 5);
    fs.closeSync(fd);
    const stream = migrationStream(memory, []);
    const out: Buffer[] = [];
    const decoder = new StreamDecoder((bytes) => out.push(bytes), b);
    const encoder = new StreamEncoder(
      { literal: (bytes) => decoder.literal(Buffer.from(bytes)), run: (payload) => decoder.run(payload) },
      a,
      () => (encoder.reference = a.digests),
    );
    expect(() => {
      for (let at = 0; at < stream.length; at += 65536) encoder.push(stream.subarray(at, at + 65536));
      encoder.end();
    }).toThrow(RebuildError);
    // Nothing rebuilt from the corrupted run reached the destination.
    const rebuilt = Buffer.concat(out);
    expect(rebuilt.equals(stream.subarray(0, rebuilt.length))).toBe(true);
    expect(rebuilt.length).toBeLessThan(stream.indexOf(memory.pages[700]));
    b.abort();
    expect(b.snapshotId()).toBeNull();
    expect(b.digests.length).toBe((1500 + 100) * DIGEST_BYTES);
  });
});

describe('encoder → decoder on every hand-built fixture, split at every offset', () => {
  const { buildFixtures } = require('../src/lab/harness/fixtures') as typeof import('../src/lab/harness/fixtures');
  const parsable = buildFixtures().filter((f) => f.expect.outcome !== 'error');
  test.each(parsable.map((f) => [f.name, f] as const))('%s', (_name, f) => {
    for (let cut = 0; cut <= f.bytes.length; cut += cut < 64 || f.bytes.length - cut < 64 ? 1 : 7) {
      const out: Buffer[] = [];
      const decoder = new StreamDecoder((b) => out.push(Buffer.from(b)), null);
      const encoder = new StreamEncoder({ literal: (b) => decoder.literal(Buffer.from(b)), run: (p) => decoder.run(p) }, null);
      encoder.push(f.bytes.subarray(0, cut));
      encoder.push(f.bytes.subarray(cut));
      encoder.end();
      decoder.end(f.bytes.length, encoder.streamCheck);
      expect(Buffer.concat(out).equals(f.bytes)).toBe(true);
    }
  });
});

describe('chunks reused by the caller (pooled socket reads)', () => {
  /** Encodes stream through one reused read buffer, scribbled over after every push, as PooledReads reuses it. */
  function encodeReusingBuffer(stream: Buffer, transient: boolean, chunkBytes: number) {
    const frames: { type: FrameType; payload: Buffer }[] = [];
    const encoder = new StreamEncoder(
      {
        // The WAN socket has taken (copied) the bytes before the buffer is read into again.
        literal: (bytes) => frames.push({ type: FrameType.Literal, payload: Buffer.from(bytes) }),
        run: (payload) => frames.push({ type: FrameType.Run, payload }),
      },
      null,
      () => undefined,
      transient,
    );
    const readBuffer = Buffer.alloc(chunkBytes);
    for (let at = 0; at < stream.length; at += chunkBytes) {
      const n = stream.copy(readBuffer, 0, at, at + chunkBytes);
      encoder.push(readBuffer.subarray(0, n));
      readBuffer.fill(0xa5);
    }
    encoder.end();
    const out: Buffer[] = [];
    const decoder = new StreamDecoder((b) => out.push(Buffer.from(b)), null);
    for (const f of frames) (f.type === FrameType.Literal ? decoder.literal(f.payload) : decoder.run(f.payload));
    decoder.end(stream.length, encoder.streamCheck);
    return { rebuilt: Buffer.concat(out), parts: encoder.parts.result() };
  }

  const memory = guestMemory([['pc.ram', 300]], 5);
  const stream = migrationStream(memory, [dirty(memory, 0.1, 9)]);
  const whole = new StreamEncoder({ literal: () => undefined, run: () => undefined }, null);
  whole.push(stream);
  whole.end();
  const expectedParts = whole.parts.result();

  /** The device-state tail is kept whole, or (reads too small to keep a section header) not at all. */
  function expectPartsKept(parts: typeof expectedParts, chunkBytes: number): void {
    if (parts !== null) {
      expect(parts.head.equals(expectedParts!.head)).toBe(true);
      expect(parts.tail.equals(expectedParts!.tail)).toBe(true);
    } else {
      expect(chunkBytes).toBeLessThan(64);
    }
  }

  test.each([4096 + 3, 65536, 1000, 7])('with transientInput the encoder copies what it keeps: %i-byte reads', (chunkBytes) => {
    expect(expectedParts).not.toBeNull();
    const { rebuilt, parts } = encodeReusingBuffer(stream, true, chunkBytes);
    expect(rebuilt.equals(stream)).toBe(true);
    expectPartsKept(parts, chunkBytes);
  });

  /**
   * The receiving side: wire bytes read into one reused buffer, scribbled over after every read, framed
   * by a FrameParser (literal payloads streamed as views) into a decoder, as a pooled peer connection does.
   */
  function decodeReusingBuffer(chunkBytes: number, releasing: boolean) {
    const wire: Buffer[] = [];
    const encoder = new StreamEncoder(
      {
        literal: (bytes) => wire.push(encodeFrame(FrameType.Literal, Buffer.from(bytes))),
        run: (payload) => wire.push(encodeFrame(FrameType.Run, payload)),
      },
      null,
    );
    encoder.push(stream);
    encoder.end();
    const bytes = Buffer.concat(wire);
    const out: Buffer[] = [];
    const decoder = new StreamDecoder((b) => out.push(Buffer.from(b)), null);
    const frames = new FrameParser(
      (type, payload) => (type === FrameType.Literal ? decoder.literal(payload) : decoder.run(payload)),
      (type) => type === FrameType.Literal,
    );
    const readBuffer = Buffer.alloc(chunkBytes);
    for (let at = 0; at < bytes.length; at += chunkBytes) {
      const n = bytes.copy(readBuffer, 0, at, at + chunkBytes);
      frames.push(readBuffer.subarray(0, n));
      frames.ownRetained();
      if (releasing) decoder.releaseInput();
      readBuffer.fill(0xa5);
    }
    expect(frames.atBoundary).toBe(true);
    decoder.end(stream.length, encoder.streamCheck);
    return { rebuilt: Buffer.concat(out), parts: decoder.parts.result() };
  }

  test.each([4096 + 3, 65536, 1000, 7])('the decoder and frame parser copy what they keep: %i-byte reads', (chunkBytes) => {
    const { rebuilt, parts } = decodeReusingBuffer(chunkBytes, true);
    expect(rebuilt.equals(stream)).toBe(true);
    expectPartsKept(parts, chunkBytes);
  });

  test('without releaseInput, the kept device state is damaged by a reused buffer (the test can tell)', () => {
    // Reads this small split the first device section's header, so its start lies in an earlier read.
    const damaged = [7, 13, 61].some((chunkBytes) => {
      const { rebuilt, parts } = decodeReusingBuffer(chunkBytes, false);
      expect(rebuilt.equals(stream)).toBe(true);
      return parts !== null && !parts.tail.equals(expectedParts!.tail);
    });
    expect(damaged).toBe(true);
  });

  test('without transientInput, reusing the buffer corrupts the stream (the test can tell)', () => {
    expect(() => {
      const { rebuilt } = encodeReusingBuffer(stream, false, 4096 + 3);
      if (!rebuilt.equals(stream)) throw new Error('differs');
    }).toThrow();
  });
});
