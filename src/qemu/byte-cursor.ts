import { copyBytes } from '../common/copy';

const EMPTY = Buffer.alloc(0);

/**
 * The parser's input: the chunk being read, where reading stands in it, and a carry buffer that
 * assembles a field split across chunks. The parser gets chunks of any size, cut anywhere, so every
 * fixed-size field is read through take(): it yields the field's bytes contiguous, as a view of the
 * chunk when the field lies whole in it (no copy), else in the carry once the missing bytes arrive.
 * All integers are big-endian, as on the wire.
 */
export class ByteCursor {
  private current: Buffer = EMPTY;
  private pos = 0;
  /** Absolute stream offset of current[0]. */
  private base = 0;
  private readonly carry: Buffer;
  private carried = 0;
  /** Where take() left the field it gathered: its bytes are fieldBuffer[fieldStart..]. */
  private fieldBuffer: Buffer = EMPTY;
  private fieldStart = 0;

  /** `capacity`: the largest field (or lookahead window) the parser will ever take. */
  constructor(capacity: number) {
    this.carry = Buffer.alloc(capacity);
  }

  /** Reading moves on to the next chunk; it follows the previous one in the stream. */
  feed(chunk: Buffer): void {
    this.base += this.current.length;
    this.current = chunk;
    this.pos = 0;
  }

  /**
   * Reads `bytes`, which stand at stream offset `at` ahead of the rest of the current chunk, through
   * `read`; then reading resumes in the current chunk where it stood.
   */
  interpose(bytes: Buffer, at: number, read: () => void): void {
    const chunk = this.current;
    const pos = this.pos;
    const base = this.base;
    this.current = bytes;
    this.pos = 0;
    this.base = at;
    read();
    this.current = chunk;
    this.pos = pos;
    this.base = base;
  }

  /** Absolute stream offset of the next unread byte. */
  get offset(): number {
    return this.base + this.pos;
  }

  /** The chunk being read; `position` is where reading stands in it. */
  get chunk(): Buffer {
    return this.current;
  }

  get position(): number {
    return this.pos;
  }

  /** Stream offset of chunk[index]. */
  offsetOf(index: number): number {
    return this.base + index;
  }

  /** Bytes of the current chunk not read yet. */
  get available(): number {
    return this.current.length - this.pos;
  }

  /** Bytes of a field begun in an earlier chunk, held until the rest arrives. */
  get carriedBytes(): number {
    return this.carried;
  }

  /**
   * Makes the unread rest of the current chunk a copy of its own (the cursor reads on in it as before):
   * for a reader whose caller reuses its chunk buffers once a push has returned, and which may stop
   * mid-chunk (a paused parser). Fields already taken are not kept: they were read during the push.
   */
  ownUnread(): void {
    const rest = this.pos < this.current.length ? Buffer.from(this.current.subarray(this.pos)) : EMPTY;
    this.base += this.pos;
    this.current = rest;
    this.pos = 0;
  }

  /** Consumes the current chunk up to `index`; the bytes are handed on as views by the caller. */
  moveTo(index: number): void {
    this.pos = index;
  }

  /** The next byte without consuming it, or -1 when the chunk has none. */
  peek(): number {
    return this.pos < this.current.length ? this.current[this.pos] : -1;
  }

  /**
   * Consumes an n-byte field and makes it readable through u8() … latin1(), or returns false (having
   * kept the part there was) when the chunk runs out first; call again with the same n on the next
   * chunk.
   */
  take(n: number): boolean {
    const available = this.current.length - this.pos;
    if (this.carried === 0 && available >= n) {
      this.fieldBuffer = this.current;
      this.fieldStart = this.pos;
      this.pos += n;
      return true;
    }
    if (!this.gather(n)) return false;
    this.fieldBuffer = this.carry;
    this.fieldStart = 0;
    this.carried = 0;
    return true;
  }

  /**
   * Copies bytes into the carry until it holds n (or the chunk ends); returns whether it does. A
   * window gathered this way is handed over by takeCarried().
   */
  gather(n: number): boolean {
    const take = Math.min(n - this.carried, this.current.length - this.pos);
    copyBytes(this.current, this.pos, this.carry, this.carried, take);
    this.carried += take;
    this.pos += take;
    return this.carried >= n;
  }

  /** A copy of the bytes gathered but not taken as a field; the carry is emptied. */
  takeCarried(): Buffer {
    const bytes = Buffer.from(this.carry.subarray(0, this.carried));
    this.carried = 0;
    return bytes;
  }

  // The field last take()n, at `at` bytes into it.

  /** The buffer holding the field: the chunk, or the carry (reused by the next take()). */
  get fieldData(): Buffer {
    return this.fieldBuffer;
  }

  /** Index of the field's first byte in fieldData. */
  get fieldIndex(): number {
    return this.fieldStart;
  }

  u8(at: number): number {
    return this.fieldBuffer[this.fieldStart + at];
  }

  u16(at: number): number {
    return this.fieldBuffer.readUInt16BE(this.fieldStart + at);
  }

  u32(at: number): number {
    return this.fieldBuffer.readUInt32BE(this.fieldStart + at);
  }

  u64(at: number): bigint {
    return this.fieldBuffer.readBigUInt64BE(this.fieldStart + at);
  }

  latin1(at: number, length: number): string {
    const from = this.fieldStart + at;
    return this.fieldBuffer.toString('latin1', from, from + length);
  }

  /** A copy of `length` bytes of the field, safe to keep after the next take(). */
  copy(at: number, length: number): Buffer {
    const from = this.fieldStart + at;
    return Buffer.from(this.fieldBuffer.subarray(from, from + length));
  }
}
