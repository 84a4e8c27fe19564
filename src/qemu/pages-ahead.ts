import { RamFlag, SectionType } from './constants';
import type { RamBlock } from './records';

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

/** Section bytes that open or close a RAM section between iterations: type, then the section id. */
const SECTION_HEAD_BYTES = 5;
/** Longest record head the walk may have to piece together across two reads: a word, a name's length and the name. */
const STITCH_BYTES = RAM_WORD_BYTES + 1 + 255;

const enum Walk {
  /** Lost: nothing is known of where records begin until resync(). */
  Lost,
  /** Among the RAM records of a section. */
  Records,
  /** After a section's EOS: its footer, then the next RAM section's head (PART, or END at completion). */
  BetweenSections,
}

/** What step() made of the bytes before it. */
const enum Step {
  Done,
  /** The record's head goes on in the next read. */
  Cut,
  /** Not a RAM record or section head that a precopy iteration sends: the walk is lost. */
  Unknown,
}

/**
 * Walks the RAM records of a stream read by read, ahead of the parser, to say where the pages of a read
 * lie before the parser gets to it: a sending gateway reads their held versions ahead a whole read
 * early (a Delta's base, the undo journal's old version), where a read asked for within the read being
 * parsed came too late and held the event loop (docs/design.md, "Reading a chunk ahead").
 *
 * It knows what a precopy iteration sends: RAM records (of the block before them, or naming their
 * block), a section's EOS, footer and the next section's head. Anything else loses it until resync(),
 * which the parser's position gives. Like pageDataAhead(), a guess: nothing here is checked, and a caller
 * uses what it says only as a hint (a read ahead, a digest for the record the parser finds there).
 */
export class RamRecordWalk {
  private state = Walk.Lost;
  /** Bytes of a record's body (page data, fill byte) still to pass over at the start of the next read. */
  private skip = 0;
  /** The head of a record cut by the end of the last read, completed from the next. */
  private readonly stitch = Buffer.alloc(STITCH_BYTES * 2);
  private stitched = 0;
  private block: RamBlock | null = null;
  /**
   * The page whose data the last read walked ends in (-1: none): where its data began there, and how
   * many of its bytes that read holds (0: all of them are in the next).
   */
  private cutPage = -1;
  private cutFrom = 0;
  private cutBefore = 0;
  /**
   * What walk() found of a page whose data began in the read walked before and ends in this one (whole in
   * neither): its page (-1: none), where its data began in that read and how many of its bytes that read
   * holds. The rest are this read's first bytes.
   */
  straddledPage = -1;
  straddledFrom = 0;
  straddledBefore = 0;
  /** What the last step() found: its head's length, its body's, and the page it carries (-1: none). */
  private headBytes = 0;
  private bodyBytes = 0;
  private page = -1;

  constructor(
    private readonly pageSize: number,
    /** The RAM block of a name, as the stream's block list gave it (null: none). */
    private readonly blockNamed: (name: string) => RamBlock | null,
  ) {}

  /** Whether the walk knows where the next read's records begin. */
  get synced(): boolean {
    return this.state !== Walk.Lost;
  }

  /** The walk knows nothing until the next resync() (a block list, a stream cut short). */
  lose(): void {
    this.state = Walk.Lost;
    this.skip = 0;
    this.cutPage = -1;
    this.stitched = 0;
    this.block = null;
  }

  /**
   * Starts again at byte `at` of `bytes`, where a RAM record of `block` begins (the record after the last
   * one the parser read), and walks the rest of `bytes`: the next walk() is of the read after it.
   */
  resync(bytes: Buffer, at: number, block: RamBlock): void {
    this.lose();
    this.state = Walk.Records;
    this.block = block;
    this.walkFrom(bytes, at, null, null, 0);
  }

  /**
   * Walks the read after the last one walked: writes where the page data of each page record lying whole
   * in it begins (dataAt) and its page (pages), at most dataAt.length of them, and returns how many.
   */
  walk(bytes: Buffer, dataAt: Uint32Array, pages: Uint32Array): number {
    this.straddledPage = -1;
    if (this.state === Walk.Lost) return 0;
    let at = 0;
    let count = 0;
    if (this.skip > 0) {
      const page = this.cutPage;
      this.cutPage = -1;
      if (this.skip > bytes.length) {
        this.skip -= bytes.length;
        return 0;
      }
      at = this.skip;
      this.skip = 0;
      if (page >= 0 && this.cutBefore === 0) {
        // Only its head was in the read before: its data is whole here.
        dataAt[0] = 0;
        pages[0] = page;
        count = 1;
      } else if (page >= 0) {
        this.straddledPage = page;
        this.straddledFrom = this.cutFrom;
        this.straddledBefore = this.cutBefore;
      }
    }
    if (this.stitched > 0) {
      // The cut head, completed from this read's first bytes (a copy of at most a few hundred bytes a read).
      const kept = this.stitched;
      const more = Math.min(bytes.length, STITCH_BYTES);
      bytes.copy(this.stitch, kept, 0, more);
      const step = this.step(this.stitch, 0, kept + more);
      if (step === Step.Unknown) {
        this.lose();
        return 0;
      }
      if (step === Step.Cut) {
        if (kept + more > STITCH_BYTES) this.lose(); // no head is that long
        else this.stitched = kept + more;
        return 0;
      }
      this.stitched = 0;
      // The head ends in this read, and the record's body follows it here.
      const body = this.headBytes - kept;
      at = body + this.bodyBytes;
      if (at > bytes.length) {
        this.cut(body, bytes.length);
        this.skip = at - bytes.length;
        return 0;
      }
      if (this.page >= 0 && dataAt.length > 0) {
        dataAt[0] = body;
        pages[0] = this.page;
        return this.walkFrom(bytes, at, dataAt, pages, 1);
      }
    }
    return this.walkFrom(bytes, at, dataAt, pages, count);
  }

  /** The record step() found last, whose body begins at `body`, goes on past `end`, the end of this read. */
  private cut(body: number, end: number): void {
    this.cutPage = this.page;
    this.cutFrom = body;
    this.cutBefore = end - body;
  }

  /** Walks records from `at` to the end of `bytes`, noting the whole pages when dataAt is given. */
  private walkFrom(bytes: Buffer, at: number, dataAt: Uint32Array | null, pages: Uint32Array | null, count: number): number {
    const end = bytes.length;
    while (at < end) {
      const step = this.step(bytes, at, end);
      if (step === Step.Unknown) {
        this.lose();
        break;
      }
      if (step === Step.Cut) {
        bytes.copy(this.stitch, 0, at, end);
        this.stitched = end - at;
        break;
      }
      const body = at + this.headBytes;
      at = body + this.bodyBytes;
      if (at > end) {
        this.cut(body, end);
        this.skip = at - end;
        break;
      }
      if (this.page >= 0 && dataAt !== null && pages !== null && count < dataAt.length) {
        dataAt[count] = body;
        pages[count++] = this.page;
      }
    }
    return count;
  }

  /** Reads the head of the record or section bytes at `at` (in bytes[at, end)). */
  private step(bytes: Buffer, at: number, end: number): Step {
    this.page = -1;
    this.bodyBytes = 0;
    if (this.state === Walk.BetweenSections) {
      if (end - at < SECTION_HEAD_BYTES) return Step.Cut;
      const type = bytes[at];
      if (type === SectionType.Part || type === SectionType.End) this.state = Walk.Records;
      else if (type !== SectionType.Footer) return Step.Unknown;
      this.headBytes = SECTION_HEAD_BYTES;
      return Step.Done;
    }
    if (end - at < RAM_WORD_BYTES) return Step.Cut;
    const high = bytes.readUInt32BE(at);
    const low = bytes.readUInt32BE(at + 4);
    const mask = this.pageSize - 1;
    const flags = low & mask;
    let head = RAM_WORD_BYTES;
    if (flags === RamFlag.Eos) {
      this.state = Walk.BetweenSections;
      this.headBytes = head;
      return Step.Done;
    }
    if (flags === RamFlag.MultifdFlush) {
      this.headBytes = head;
      return Step.Done;
    }
    const kind = flags & ~RamFlag.Continue;
    if (kind !== RamFlag.Page && kind !== RamFlag.Zero) return Step.Unknown;
    if ((flags & RamFlag.Continue) === 0) {
      if (end - at < head + 1) return Step.Cut;
      const nameBytes = bytes[at + head];
      if (end - at < head + 1 + nameBytes) return Step.Cut;
      this.block = this.blockNamed(bytes.toString('latin1', at + head + 1, at + head + 1 + nameBytes));
      head += 1 + nameBytes;
    }
    const block = this.block;
    if (block === null) return Step.Unknown;
    const offset = high * 2 ** 32 + (low - flags);
    if (offset >= block.length) return Step.Unknown;
    this.headBytes = head;
    if (kind === RamFlag.Zero) {
      this.bodyBytes = 1;
    } else {
      this.bodyBytes = this.pageSize;
      this.page = block.firstPage + offset / this.pageSize;
    }
    return Step.Done;
  }
}
