/**
 * The PacketHeader form (proxy/packet-header.ts): a multifd packet's header and offsets coded against the
 * channel's previous header, rebuilt byte for byte, refused with a RebuildError when malformed.
 */
import { Rng } from '../src/lab/harness/fuzz';
import { multifdPacket, type MultifdFormat } from '../src/lab/harness/multifd-stream';
import { MAX_PACKET_HEADER_PAYLOAD, PACKET_HEADER_BYTES, PacketHeaders } from '../src/proxy/packet-header';
import { RebuildError } from '../src/proxy/rebuild-error';
import { MULTIFD_HEADER_BYTES, MULTIFD_SLOTS } from '../src/qemu/multifd';

const PAGE = 4096;

/** The header and offsets of a packet of the format listing `pages` (page numbers) and `zero` pages. */
function header(format: MultifdFormat, packetNumber: number, pages: number[], zero: number[] = [], sync = false): Buffer {
  const data = Buffer.alloc(PAGE, 7);
  return multifdPacket({ format, packetNumber, block: 'pc.ram', pages: pages.map((p) => ({ offset: p * PAGE, data })), zeroOffsets: zero.map((p) => p * PAGE), sync }).subarray(0, PACKET_HEADER_BYTES);
}

const range = (from: number, count: number): number[] => Array.from({ length: count }, (_, i) => from + i);

/** Sends `headers` through one channel's two sides: each payload's length (-1: it went raw), and that each rebuilt exactly. */
function roundTrip(headers: readonly Buffer[]): number[] {
  const sender = new PacketHeaders();
  const receiver = new PacketHeaders();
  const out = Buffer.alloc(MAX_PACKET_HEADER_PAYLOAD);
  return headers.map((bytes) => {
    const length = sender.encode(bytes, out);
    if (length < 0) return length;
    const rebuilt = Buffer.alloc(PACKET_HEADER_BYTES, 0xee);
    receiver.decode(Buffer.from(out.subarray(0, length)), rebuilt);
    expect(rebuilt.equals(bytes)).toBe(true);
    return length;
  });
}

describe('PacketHeader frames', () => {
  test.each<MultifdFormat>(['qemu-7.2', 'qemu-10.0'])('%s: a channel of consecutive packets rebuilds byte for byte, each header after the first in a few dozen bytes', (format) => {
    const zero = format === 'qemu-10.0';
    const headers = [
      header(format, 0, range(0, 128)),
      header(format, 4, range(512, 128)),
      // A back leg's: normal pages in stretches, zero pages among them (10.0 lists them).
      header(format, 8, [...range(1024, 40), ...range(1100, 30)], zero ? [...range(1064, 36), ...range(1130, 22)] : []),
      header(format, 12, range(2000, 3)),
      header(format, 16, [], [], true),
      header(format, 20, [5, 900, 17, 4_000_000]),
    ];
    const lengths = roundTrip(headers);
    expect(lengths.every((n) => n > 0)).toBe(true);
    // The first goes against a header of zeros: the words of its own, the block name among them.
    expect(lengths[0]).toBeLessThan(64);
    for (const n of lengths.slice(1)) expect(n).toBeLessThanOrEqual(48);
  });

  test('headers of any content rebuild byte for byte: random words, names and page numbers', () => {
    const rng = new Rng(41);
    const headers: Buffer[] = [];
    for (let k = 0; k < 200; k++) {
      const bytes = Buffer.alloc(PACKET_HEADER_BYTES);
      // Some words of the fixed part changed from the header before, or all of them at random.
      if (k > 0 && rng.below(2) === 0) headers[k - 1].copy(bytes, 0, 0, MULTIFD_HEADER_BYTES);
      for (let w = rng.below(MULTIFD_HEADER_BYTES / 4); w > 0; w--) bytes.writeUInt32BE(rng.below(2 ** 32), rng.below(MULTIFD_HEADER_BYTES / 4) * 4);
      const slots = rng.below(MULTIFD_SLOTS + 1);
      let page = rng.below(2 ** 30);
      for (let i = 0; i < slots; i++) {
        page = rng.below(4) === 0 ? rng.below(2) * 2 ** 39 + rng.below(2 ** 30) : page + 1;
        bytes.writeBigUInt64BE(BigInt(page) * BigInt(PAGE), MULTIFD_HEADER_BYTES + i * 8);
      }
      headers.push(bytes);
    }
    const lengths = roundTrip(headers);
    expect(lengths.filter((n) => n < 0)).toEqual([]);
  });

  test('a run of slots across a 4 GiB boundary of guest offsets rebuilds byte for byte (the low word wraps)', () => {
    const wrap = 2 ** 32 / PAGE;
    const headers = [header('qemu-10.0', 0, range(wrap - 3, 6)), header('qemu-10.0', 4, range(3 * wrap - 1, 2)), header('qemu-10.0', 8, [...range(wrap - 1, 1), ...range(7 * wrap - 2, 4)])];
    expect(roundTrip(headers).every((n) => n > 0)).toBe(true);
  });

  test('a header the form cannot say exactly goes raw, and both sides go on from the header before it', () => {
    const offPage = header('qemu-10.0', 4, range(100, 10));
    offPage.writeBigUInt64BE(BigInt(105 * PAGE + 8), MULTIFD_HEADER_BYTES + 5 * 8);
    const farPage = header('qemu-10.0', 8, range(100, 10));
    farPage.writeBigUInt64BE(2n ** 52n, MULTIFD_HEADER_BYTES + 9 * 8);
    const lengths = roundTrip([header('qemu-10.0', 0, range(0, 128)), offPage, farPage, header('qemu-10.0', 12, range(300, 128))]);
    expect(lengths[1]).toBe(-1);
    expect(lengths[2]).toBe(-1);
    expect(lengths[3]).toBeGreaterThan(0);
  });

  // A payload of two runs of 5 slots, pages 10.. and 40..; `runsAt`: where its words end and its runs begin.
  const twoRuns = header('qemu-10.0', 0, [...range(10, 5), ...range(40, 5)]);
  const good = ((): Buffer => {
    const out = Buffer.alloc(MAX_PACKET_HEADER_PAYLOAD);
    return Buffer.from(out.subarray(0, new PacketHeaders().encode(twoRuns, out)));
  })();
  const runsAt = 10 + 4 * [...good.subarray(0, 10)].reduce((n, b) => n + b.toString(2).replace(/0/g, '').length, 0);
  const withRuns = (runs: number[]): Buffer => Buffer.concat([good.subarray(0, runsAt), Buffer.from(runs)]);

  test('the payload of two runs is as the form says: 10 slots, then (zigzag shift, length) twice', () => {
    expect(good.subarray(runsAt)).toEqual(Buffer.from([10, 20, 5, 50, 5]));
    const rebuilt = Buffer.alloc(PACKET_HEADER_BYTES);
    new PacketHeaders().decode(good, rebuilt);
    expect(rebuilt.equals(twoRuns)).toBe(true);
  });

  test.each<[string, () => Buffer]>([
    ['shorter than its bitmap', () => good.subarray(0, 9)],
    ['that ends inside its words', () => good.subarray(0, runsAt - 2)],
    ['that ends inside a number', () => withRuns([0x8a])],
    ['with more slots than a packet has', () => withRuns([129, 1])],
    ['with a run of no slots', () => withRuns([10, 20, 0])],
    ['with a run past the slots counted', () => withRuns([10, 20, 5, 50, 6])],
    ['with a page before page 0', () => withRuns([10, 21, 5, 50, 5])],
    ['with a number past 2^49', () => withRuns([10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f])],
    ['with bytes past its runs', () => Buffer.concat([good, Buffer.from([0])])],
  ])('a payload %s is refused with a RebuildError', (_what, payload) => {
    expect(() => new PacketHeaders().decode(payload(), Buffer.alloc(PACKET_HEADER_BYTES))).toThrow(RebuildError);
  });
});
