import { RamFlag } from './constants';

/** A RAM record of the block before it carrying a whole page. */
const PAGE_CONTINUED = RamFlag.Page | RamFlag.Continue;
/** A RAM record of the block before it carrying one fill byte. */
const ZERO_CONTINUED = RamFlag.Zero | RamFlag.Continue;
/** The 64-bit word every RAM record begins with (the page's offset, its flags in the low bits). */
const RAM_WORD_BYTES = 8;

/**
 * Where the page data of the RAM records that follow one another from `at` in `bytes` begins, as far as
 * they lie whole in `bytes`: records of the block before them (CONTINUE) that carry a whole page (PAGE),
 * and between them records of a fill byte (ZERO), which is how a precopy iteration sends a block. Stops
 * at any other record, or at the end of `bytes`, or after offsets.length pages. Returns how many offsets
 * it wrote.
 *
 * A guess, made so that the pages of a read can be digested in one call: nothing here checks that a
 * record is one (the parser alone says what a record is), and a caller uses an offset only for a page
 * record the parser found there.
 */
export function pageDataAhead(bytes: Buffer, at: number, pageSize: number, offsets: Uint32Array): number {
  const mask = pageSize - 1;
  const end = bytes.length;
  const most = offsets.length;
  let count = 0;
  while (count < most && at + RAM_WORD_BYTES <= end) {
    const flags = bytes.readUInt32BE(at + 4) & mask;
    if (flags === PAGE_CONTINUED) {
      const data = at + RAM_WORD_BYTES;
      if (data + pageSize > end) break;
      offsets[count++] = data;
      at = data + pageSize;
    } else if (flags === ZERO_CONTINUED) {
      at += RAM_WORD_BYTES + 1;
    } else {
      break;
    }
  }
  return count;
}

/**
 * The page's byte offset within its block, read from the header word of the RAM record whose page data
 * pageDataAhead() found at `dataAt` in `bytes` (the word's high bits; its low bits are the flags).
 */
export function pageOffsetBefore(bytes: Buffer, dataAt: number, pageSize: number): number {
  const word = dataAt - RAM_WORD_BYTES;
  const low = bytes.readUInt32BE(word + 4);
  return bytes.readUInt32BE(word) * 2 ** 32 + (low - (low & (pageSize - 1)));
}
