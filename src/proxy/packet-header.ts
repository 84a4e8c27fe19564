import { copyBytes } from '../common/copy';
import { X86_PAGE_SIZE } from '../qemu/constants';
import { MULTIFD_HEADER_BYTES, MULTIFD_SLOTS } from '../qemu/multifd';
import { RebuildError } from './rebuild-error';

/**
 * A multifd packet's header and offset slots (src/qemu/multifd.ts: 320 bytes, then 128 × u64), sent as a
 * PacketHeader frame (Feature.ChannelPacketHeaders) against the header its channel sent last that way:
 *
 *   10-byte bitmap, one bit per u32 word of the 320-byte fixed part (least significant first): 1 = it
 *                   differs from the previous header's word
 *   the differing words, 4 bytes each, in order
 *   varint n:       slots up to the last one that is not 0 (the rest are 0)
 *   runs over slots [0, n), each: varint zigzag(first page − the page after the run before; 0 at first)
 *                   | varint length ≥ 1; within a run each slot holds the page after the slot before's.
 *                   A slot's page is its value / 4 KiB: every value must be a multiple of 4 KiB.
 *
 * Why: a back leg's channels carry little but headers (1,344 bytes per packet) among their Runs. From one
 * packet to the next a header differs in a few words (page counts, packet number), and its offsets are
 * stretches of consecutive pages. zstd took them from 1,344 bytes to about 240, at 48 µs a batch on the
 * sending gateway (most of a 4-channel back leg's compression time at 1 Gbit/s); as frames of their own
 * they take a few dozen bytes and no compression at all (docs/benchmarks.md, "Thirtieth session").
 *
 * Both ends keep the previous header of the channel (PacketHeaders), all zeros before the first; a header
 * the form cannot say exactly (a slot off a page boundary, a page number past 2^40) goes as Literal bytes
 * and leaves the previous header as it was, on both sides alike.
 */

/** A packet's header and offset slots: what a PacketHeader frame stands for. */
export const PACKET_HEADER_BYTES = MULTIFD_HEADER_BYTES + MULTIFD_SLOTS * 8;
const FIXED_WORDS = MULTIFD_HEADER_BYTES / 4;
const BITMAP_BYTES = FIXED_WORDS / 8;
/** Pages up to this number are said exactly as varints in floating point (offsets below 2^52). */
const MAX_PAGE = 2 ** 40;
const PAGE_SHIFT = Math.log2(X86_PAGE_SIZE);
const PAGE_MASK = X86_PAGE_SIZE - 1;
/** Pages a slot's high word counts: 2^32 bytes of them. */
const PAGES_PER_HIGH_WORD = 2 ** 32 / X86_PAGE_SIZE;
/** A slot's high word below this: its page below MAX_PAGE. */
const HIGH_WORD_LIMIT = MAX_PAGE / PAGES_PER_HIGH_WORD;
/** Longest a payload may be: one it exceeds would be no smaller than the header raw. */
export const MAX_PACKET_HEADER_PAYLOAD = PACKET_HEADER_BYTES - 1;

/** Writes `value` (a whole number ≥ 0 below 2^53) as a LEB128 varint at out[at]: the end, or -1 past `limit`. */
function writeVarint(out: Buffer, at: number, limit: number, value: number): number {
  while (value >= 0x80) {
    if (at >= limit) return -1;
    out[at++] = (value % 0x80) | 0x80;
    value = Math.floor(value / 0x80);
  }
  if (at >= limit) return -1;
  out[at++] = value;
  return at;
}

/** A header's own copy, and a DataView of it: DataView reads a word about six times as fast as Buffer#readUInt32BE. */
class HeaderCopy {
  readonly bytes = Buffer.alloc(PACKET_HEADER_BYTES);
  readonly view = new DataView(this.bytes.buffer, this.bytes.byteOffset, PACKET_HEADER_BYTES);

  /**
   * The page a slot's u64 value stands for, or -1 when it is off a page boundary or past MAX_PAGE. In
   * 32-bit words: `%` of a double past 2^31 is a floating-point remainder.
   */
  slotPage(at: number): number {
    const high = this.view.getUint32(at);
    const low = this.view.getUint32(at + 4);
    // 2^32 is a multiple of the page size: the value is on a page boundary when its low word is.
    return (low & PAGE_MASK) === 0 && high < HIGH_WORD_LIMIT ? high * PAGES_PER_HIGH_WORD + (low >>> PAGE_SHIFT) : -1;
  }
}

/**
 * One channel's side of the PacketHeader form: the header it sent or rebuilt last that way (`previous`),
 * and the one it works on (`current`), which becomes the previous one once it is done. A header is read
 * from and written to copies of its own, in words, not through the caller's buffers a byte or a
 * Buffer#readUInt32BE at a time: that took 5.5 µs to encode a header and 2.3 µs to decode one, now about
 * 0.65 and 0.62 (docs/benchmarks.md, "Thirty-ninth session").
 */
export class PacketHeaders {
  private previous = new HeaderCopy();
  private current = new HeaderCopy();
  /** Where decode() is reading, and its payload: a cursor of the object, not a closure per call. */
  private at = 0;
  private payload: Buffer = this.previous.bytes;
  /** Bytes of header not sent: each header's length less its payload's. */
  savedBytes = 0;

  /**
   * The payload for `header` (its first PACKET_HEADER_BYTES), written at out[0 ..) (room for
   * MAX_PACKET_HEADER_PAYLOAD bytes): its length, or -1 when the form cannot say the header exactly in
   * fewer bytes than it has (then nothing changes: it goes raw).
   */
  encode(header: Buffer, out: Buffer): number {
    const current = this.current;
    copyBytes(header, 0, current.bytes, 0, PACKET_HEADER_BYTES);
    const words = current.view;
    const previous = this.previous.view;
    const limit = Math.min(out.length, MAX_PACKET_HEADER_PAYLOAD);
    out.fill(0, 0, BITMAP_BYTES);
    let at = BITMAP_BYTES;
    for (let w = 0; w < FIXED_WORDS; w++) {
      const word = words.getUint32(w * 4);
      if (word === previous.getUint32(w * 4)) continue;
      out[w >>> 3] |= 1 << (w & 7);
      out.writeUInt32BE(word, at);
      at += 4;
    }
    const slots = MULTIFD_HEADER_BYTES;
    let n = MULTIFD_SLOTS;
    while (n > 0 && words.getUint32(slots + (n - 1) * 8) === 0 && words.getUint32(slots + (n - 1) * 8 + 4) === 0) n--;
    at = writeVarint(out, at, limit, n);
    let expected = 0;
    // Each slot's page is read once: `page` is the slot at `end`, the first of the next run.
    let page = n > 0 ? current.slotPage(slots) : 0;
    for (let i = 0; i < n && at >= 0; ) {
      const first = page;
      if (first < 0) return -1;
      let end = i + 1;
      while (end < n && (page = current.slotPage(slots + end * 8)) === first + (end - i)) end++;
      const shift = first - expected;
      at = writeVarint(out, at, limit, shift < 0 ? -2 * shift - 1 : 2 * shift);
      if (at >= 0) at = writeVarint(out, at, limit, end - i);
      expected = first + (end - i);
      i = end;
    }
    if (at < 0) return -1;
    this.current = this.previous;
    this.previous = current;
    this.savedBytes += PACKET_HEADER_BYTES - at;
    return at;
  }

  /** Rebuilds the header `payload` stands for into out[0 .. PACKET_HEADER_BYTES). Throws RebuildError on a malformed payload. */
  decode(payload: Buffer, out: Buffer): void {
    if (payload.length < BITMAP_BYTES) throw new RebuildError(`a PacketHeader frame of ${payload.length} bytes`);
    const current = this.current;
    const bytes = current.bytes;
    const words = current.view;
    this.payload = payload;
    this.at = BITMAP_BYTES;
    // The previous fixed part, then the words that differ from it (a few: most bitmap bytes are 0).
    copyBytes(this.previous.bytes, 0, bytes, 0, MULTIFD_HEADER_BYTES);
    for (let b = 0; b < BITMAP_BYTES; b++) {
      const bits = payload[b];
      if (bits === 0) continue;
      for (let k = 0; k < 8; k++) {
        if ((bits & (1 << k)) === 0) continue;
        if (this.at + 4 > payload.length) throw new RebuildError('a PacketHeader frame ends inside its words');
        copyBytes(payload, this.at, bytes, (b * 8 + k) * 4, 4);
        this.at += 4;
      }
    }
    const n = this.readVarint();
    if (n > MULTIFD_SLOTS) throw new RebuildError(`a PacketHeader frame of ${n} offset slots, more than ${MULTIFD_SLOTS}`);
    const slots = MULTIFD_HEADER_BYTES;
    bytes.fill(0, slots, PACKET_HEADER_BYTES);
    let expected = 0;
    for (let i = 0; i < n; ) {
      const shift = this.readVarint();
      const length = this.readVarint();
      // Zigzag: even is a step forward, odd one back (halved in floating point: shifts reach 2^41).
      const half = Math.floor(shift / 2);
      const first = expected + (shift === 2 * half ? half : -half - 1);
      if (length < 1 || length > n - i || first < 0 || first + length > MAX_PAGE) {
        throw new RebuildError(`a PacketHeader frame's run of ${length} slots from page ${first} at slot ${i} of ${n}`);
      }
      // The run's values in 32-bit words, the low one stepping a page a slot (carried into the high one).
      let high = Math.floor(first / PAGES_PER_HIGH_WORD);
      let low = (first - high * PAGES_PER_HIGH_WORD) * X86_PAGE_SIZE;
      for (let at = slots + i * 8, end = at + length * 8; at < end; at += 8) {
        // The slots are zeros already: a page below 1 Mi needs its low word only.
        if (high !== 0) words.setUint32(at, high);
        words.setUint32(at + 4, low);
        low += X86_PAGE_SIZE;
        if (low === 0x1_0000_0000) {
          low = 0;
          high++;
        }
      }
      expected = first + length;
      i += length;
    }
    if (this.at !== payload.length) throw new RebuildError(`a PacketHeader frame with ${payload.length - this.at} bytes past its runs`);
    copyBytes(bytes, 0, out, 0, PACKET_HEADER_BYTES);
    this.current = this.previous;
    this.previous = current;
    this.savedBytes += PACKET_HEADER_BYTES - payload.length;
    this.payload = current.bytes;
  }

  private readVarint(): number {
    const payload = this.payload;
    let value = 0;
    let scale = 1;
    for (;;) {
      if (this.at >= payload.length) throw new RebuildError('a PacketHeader frame ends inside a number');
      const byte = payload[this.at++];
      value += (byte & 0x7f) * scale;
      if ((byte & 0x80) === 0) return value;
      scale *= 0x80;
      if (scale > 2 ** 49) throw new RebuildError('a PacketHeader frame with a number past 2^49');
    }
  }
}
