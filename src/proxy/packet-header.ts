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

/** One channel's side of the PacketHeader form: the header it sent or rebuilt last that way. */
export class PacketHeaders {
  private readonly previous = Buffer.alloc(PACKET_HEADER_BYTES);
  /** Where decode() is reading, and its payload: a cursor of the object, not a closure per call. */
  private at = 0;
  private payload: Buffer = this.previous;
  /** Bytes of header not sent: each header's length less its payload's. */
  savedBytes = 0;

  /**
   * The payload for `header` (its first PACKET_HEADER_BYTES), written at out[0 ..) (room for
   * MAX_PACKET_HEADER_PAYLOAD bytes): its length, or -1 when the form cannot say the header exactly in
   * fewer bytes than it has (then nothing changes: it goes raw).
   */
  encode(header: Buffer, out: Buffer): number {
    const previous = this.previous;
    const limit = Math.min(out.length, MAX_PACKET_HEADER_PAYLOAD);
    out.fill(0, 0, BITMAP_BYTES);
    let at = BITMAP_BYTES;
    for (let w = 0; w < FIXED_WORDS; w++) {
      const word = header.readUInt32BE(w * 4);
      if (word === previous.readUInt32BE(w * 4)) continue;
      out[w >>> 3] |= 1 << (w & 7);
      out.writeUInt32BE(word, at);
      at += 4;
    }
    const slots = MULTIFD_HEADER_BYTES;
    let n = MULTIFD_SLOTS;
    while (n > 0 && header.readUInt32BE(slots + (n - 1) * 8) === 0 && header.readUInt32BE(slots + (n - 1) * 8 + 4) === 0) n--;
    at = writeVarint(out, at, limit, n);
    let expected = 0;
    for (let i = 0; i < n && at >= 0; ) {
      const first = this.slotPage(header, slots + i * 8);
      if (first < 0) return -1;
      let end = i + 1;
      while (end < n && this.slotPage(header, slots + end * 8) === first + (end - i)) end++;
      const shift = first - expected;
      at = writeVarint(out, at, limit, shift < 0 ? -2 * shift - 1 : 2 * shift);
      if (at >= 0) at = writeVarint(out, at, limit, end - i);
      expected = first + (end - i);
      i = end;
    }
    if (at < 0) return -1;
    header.copy(previous, 0, 0, PACKET_HEADER_BYTES);
    this.savedBytes += PACKET_HEADER_BYTES - at;
    return at;
  }

  /** The page a slot's u64 value stands for, or -1 when it is off a page boundary or past MAX_PAGE. */
  private slotPage(header: Buffer, at: number): number {
    const value = header.readUInt32BE(at) * 0x1_0000_0000 + header.readUInt32BE(at + 4);
    return value % X86_PAGE_SIZE === 0 && value / X86_PAGE_SIZE < MAX_PAGE ? value / X86_PAGE_SIZE : -1;
  }

  /** Rebuilds the header `payload` stands for into out[0 .. PACKET_HEADER_BYTES). Throws RebuildError on a malformed payload. */
  decode(payload: Buffer, out: Buffer): void {
    const previous = this.previous;
    if (payload.length < BITMAP_BYTES) throw new RebuildError(`a PacketHeader frame of ${payload.length} bytes`);
    this.payload = payload;
    this.at = BITMAP_BYTES;
    // The previous fixed part, then the words that differ from it (a few: most bitmap bytes are 0).
    previous.copy(out, 0, 0, MULTIFD_HEADER_BYTES);
    for (let b = 0; b < BITMAP_BYTES; b++) {
      const bits = payload[b];
      if (bits === 0) continue;
      for (let k = 0; k < 8; k++) {
        if ((bits & (1 << k)) === 0) continue;
        if (this.at + 4 > payload.length) throw new RebuildError('a PacketHeader frame ends inside its words');
        payload.copy(out, (b * 8 + k) * 4, this.at, this.at + 4);
        this.at += 4;
      }
    }
    const n = this.readVarint();
    if (n > MULTIFD_SLOTS) throw new RebuildError(`a PacketHeader frame of ${n} offset slots, more than ${MULTIFD_SLOTS}`);
    const slots = MULTIFD_HEADER_BYTES;
    out.fill(0, slots, PACKET_HEADER_BYTES);
    let expected = 0;
    for (let i = 0; i < n; ) {
      const shift = this.readVarint();
      const length = this.readVarint();
      const first = expected + (shift % 2 === 0 ? shift / 2 : -(shift + 1) / 2);
      if (length < 1 || length > n - i || first < 0 || first + length > MAX_PAGE) {
        throw new RebuildError(`a PacketHeader frame's run of ${length} slots from page ${first} at slot ${i} of ${n}`);
      }
      for (let k = 0; k < length; k++) {
        // The slots are zeros already: a value below 2^32 (a page below 1 Mi) needs its low word only.
        const value = (first + k) * X86_PAGE_SIZE;
        const at = slots + (i + k) * 8;
        if (value >= 0x1_0000_0000) out.writeUInt32BE(Math.floor(value / 0x1_0000_0000), at);
        out.writeUInt32BE(value % 0x1_0000_0000, at + 4);
      }
      expected = first + length;
      i += length;
    }
    if (this.at !== payload.length) throw new RebuildError(`a PacketHeader frame with ${payload.length - this.at} bytes past its runs`);
    out.copy(previous, 0, 0, PACKET_HEADER_BYTES);
    this.savedBytes += PACKET_HEADER_BYTES - payload.length;
    this.payload = previous;
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
