import { DIGEST_BYTES } from '../digest';

/**
 * A Run frame's payload: consecutive RAM records of one block, each either a page the receiver
 * holds (rebuilt from its store) or a fill page (QEMU's zero record, rebuilt from the fill byte).
 *
 *   u8 fill | u16 first record's flags | u16 block index | u32 count | u64 first offset
 *   | 16-byte XXH3-128 over the concatenated digests of the held pages, in order
 *   | bitmap, one bit per record (least significant first): 1 = held page, 0 = fill page
 *
 * Records after the first carry their kind | CONTINUE, at offsets first + k × page size.
 */
export interface Run {
  fill: number;
  firstFlags: number;
  blockIndex: number;
  count: number;
  firstOffset: number;
  digest: Buffer;
  bitmap: Buffer;
  /** How many records are held pages. */
  held: number;
}

const FIXED = 1 + 2 + 2 + 4 + 8 + DIGEST_BYTES;
/** A Run payload's first bytes, up to its first offset: where its records are (runPlace). */
export const RUN_LEAD_BYTES = 1 + 2 + 2 + 4 + 8;

/**
 * Where a Run's records are, read from its first RUN_LEAD_BYTES (head[0 .. length)) without checking the
 * rest: for a receiver that reads its pages ahead, nothing more than a hint. Null when too short.
 */
export function runPlace(head: Buffer, length: number): { blockIndex: number; count: number; firstOffset: number } | null {
  if (length < RUN_LEAD_BYTES) return null;
  return { blockIndex: head.readUInt16BE(3), count: head.readUInt32BE(5), firstOffset: head.readUInt32BE(9) * 0x1_0000_0000 + head.readUInt32BE(13) };
}
/** Most held pages in one Run: the receiver reads and checks them all before passing any on. */
export const MAX_RUN_HELD = 256;
/** Most records in one Run. */
export const MAX_RUN_RECORDS = 4096;

export function encodeRun(fill: number, firstFlags: number, blockIndex: number, count: number, firstOffset: number, digest: Uint8Array, bitmap: Uint8Array): Buffer {
  const mapBytes = (count + 7) >>> 3;
  const out = Buffer.allocUnsafe(FIXED + mapBytes);
  out[0] = fill;
  out.writeUInt16BE(firstFlags, 1);
  out.writeUInt16BE(blockIndex, 3);
  out.writeUInt32BE(count, 5);
  out.writeUInt32BE(Math.floor(firstOffset / 0x1_0000_0000), 9);
  out.writeUInt32BE(firstOffset % 0x1_0000_0000, 13);
  out.set(digest.subarray(0, DIGEST_BYTES), 17);
  out.set(bitmap.subarray(0, mapBytes), FIXED);
  return out;
}

export class RunError extends Error {
  override readonly name = 'RunError';
}

const POPCOUNT = Uint8Array.from({ length: 256 }, (_, b) => {
  let n = 0;
  for (let v = b; v; v &= v - 1) n++;
  return n;
});

export function decodeRun(payload: Buffer): Run {
  if (payload.length < FIXED + 1) throw new RunError(`Run frame of ${payload.length} bytes`);
  const count = payload.readUInt32BE(5);
  if (count === 0 || count > MAX_RUN_RECORDS) throw new RunError(`Run of ${count} records (1..${MAX_RUN_RECORDS})`);
  const mapBytes = (count + 7) >>> 3;
  if (payload.length !== FIXED + mapBytes) throw new RunError(`Run frame of ${payload.length} bytes for ${count} records`);
  const high = payload.readUInt32BE(9);
  if (high >= 1 << 18) throw new RunError('Run offset beyond 1 PiB');
  const bitmap = payload.subarray(FIXED);
  if (count % 8 !== 0 && bitmap[mapBytes - 1] >>> count % 8 !== 0) throw new RunError('Run bitmap has bits past its records');
  let held = 0;
  for (let i = 0; i < mapBytes; i++) held += POPCOUNT[bitmap[i]];
  if (held > MAX_RUN_HELD) throw new RunError(`Run of ${held} held pages (at most ${MAX_RUN_HELD})`);
  return {
    fill: payload[0],
    firstFlags: payload.readUInt16BE(1),
    blockIndex: payload.readUInt16BE(3),
    count,
    firstOffset: high * 0x1_0000_0000 + payload.readUInt32BE(13),
    digest: payload.subarray(17, 17 + DIGEST_BYTES),
    bitmap,
    held,
  };
}

export function isHeld(bitmap: Uint8Array, k: number): boolean {
  return (bitmap[k >>> 3] & (1 << (k & 7))) !== 0;
}
