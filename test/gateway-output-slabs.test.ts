import { RUN_SLAB_BYTES, RUN_SLABS } from '../src/gateway/channel-relay';
import { OutputSlabs } from '../src/gateway/output-slabs';
import { PACKET_HEADER_BYTES } from '../src/proxy/packet-header';
import { X86_PAGE_SIZE } from '../src/qemu/constants';
import { MULTIFD_SLOTS } from '../src/qemu/multifd';

describe('OutputSlabs', () => {
  const SLAB = 64 * 1024;

  test('small pieces are carved one after another from one slab, which starts over once all of them are written', () => {
    const slabs = new OutputSlabs(SLAB, 4);
    const pieces = Array.from({ length: 10 }, () => slabs.take(4096));
    for (const [i, piece] of pieces.entries()) {
      expect(piece.buffer).toBe(pieces[0].buffer);
      expect(piece.byteOffset).toBe(pieces[0].byteOffset + i * 4096);
      expect(slabs.releaser(piece)).toBeInstanceOf(Function);
    }
    for (const piece of pieces.slice(0, 9)) slabs.releaser(piece)?.();
    // One piece still unwritten: the next is carved after it, not over it.
    expect(slabs.take(4096).byteOffset).toBe(pieces[0].byteOffset + 10 * 4096);
  });

  test('a take larger than a slab, or with every slab out, gets a buffer of its own, which nothing releases', () => {
    const slabs = new OutputSlabs(SLAB, 2);
    const big = slabs.take(SLAB + 1);
    expect(big.length).toBe(SLAB + 1);
    expect(slabs.releaser(big)).toBeUndefined();
    const first = slabs.take(SLAB);
    const second = slabs.take(SLAB);
    expect(second.buffer).not.toBe(first.buffer);
    expect(slabs.exhausted).toBe(true);
    const own = slabs.take(100);
    expect(own.buffer).not.toBe(first.buffer);
    expect(own.buffer).not.toBe(second.buffer);
    expect(slabs.releaser(own)).toBeUndefined();
    // The first slab's piece is written: it is free again, and the next take uses it.
    slabs.releaser(first)?.();
    expect(slabs.exhausted).toBe(false);
    expect(slabs.take(100).buffer).toBe(first.buffer);
  });

  test('no piece handed out ever overlaps one not yet written (random sizes and release order)', () => {
    let seed = 12345;
    const random = (n: number): number => {
      seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
      return seed % n;
    };
    const slabs = new OutputSlabs(SLAB, 3);
    const live: Buffer[] = [];
    let carved = 0;
    let takes = 0;
    for (let step = 0; step < 20_000; step++) {
      if (live.length > 0 && random(3) === 0) {
        const [piece] = live.splice(random(live.length), 1);
        slabs.releaser(piece)?.();
        continue;
      }
      const piece = slabs.take(1 + random(random(16) === 0 ? SLAB : 9000));
      takes++;
      if (slabs.releaser(piece) === undefined) continue;
      carved++;
      for (const other of live) {
        if (other.buffer !== piece.buffer) continue;
        const apart = piece.byteOffset + piece.length <= other.byteOffset || other.byteOffset + other.length <= piece.byteOffset;
        expect(apart).toBe(true);
      }
      live.push(piece);
    }
    // The slabs were used, not bypassed.
    expect(carved).toBeGreaterThan(takes / 2);
  });

  test("a receiving channel's slabs hold as many whole packets as there are slabs: each header beside its pages", () => {
    // What a compressed back leg's channel rebuilds for each packet: its header from a PacketHeader frame,
    // then its 128 held pages as one Run. The destination socket writes them only later (none released).
    const packet = (slabs: OutputSlabs): Buffer[] => [slabs.take(PACKET_HEADER_BYTES), slabs.take(MULTIFD_SLOTS * X86_PAGE_SIZE)];
    const slabs = new OutputSlabs(RUN_SLAB_BYTES, RUN_SLABS);
    const pieces = Array.from({ length: RUN_SLABS }, () => packet(slabs)).flat();
    expect(pieces.every((piece) => slabs.releaser(piece) !== undefined)).toBe(true);
    expect(new Set(pieces.map((piece) => piece.buffer)).size).toBe(RUN_SLABS);
    // Slabs of a Run's size alone: each header takes a slab and its Run the next, so that the third packet
    // on gets buffers of its own.
    const tight = new OutputSlabs(MULTIFD_SLOTS * X86_PAGE_SIZE, RUN_SLABS);
    const tightPieces = Array.from({ length: RUN_SLABS }, () => packet(tight)).flat();
    expect(tightPieces.filter((piece) => tight.releaser(piece) === undefined)).toHaveLength(RUN_SLABS);
  });
});
