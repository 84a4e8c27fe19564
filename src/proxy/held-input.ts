import { Fifo } from '../common/fifo';

/**
 * What an encoder has been pushed and not yet let go of: views of the pushed chunks (no copies), the
 * first of which starts at stream offset `chunkStart` and is let go of up to `from`. Bytes are let go
 * of in stream order, sent as Literal bytes or standing for a Run that replaces them.
 */
export class HeldInput {
  readonly chunks = new Fifo<Buffer>();
  /** Stream offset of chunks[0][0]. */
  chunkStart = 0;
  /** Stream offset of the first byte not let go of. */
  from = 0;

  push(chunk: Buffer): void {
    this.chunks.push(chunk);
  }

  /**
   * Replaces the views still held, [from, end), by one copy: for an encoder whose caller reuses its
   * chunk buffers once a push has returned (what it holds then is a record being read, a page or so).
   * What was let go of is dropped with them: a caller that hashes it must do so first.
   */
  own(end: number): void {
    const chunks = this.chunks;
    if (chunks.length === 0) return;
    const copy = Buffer.allocUnsafe(end - this.from);
    let at = 0;
    let chunkStart = this.chunkStart;
    for (let i = 0; i < chunks.length; i++) {
      const chunk = chunks.at(i);
      at += chunk.copy(copy, at, Math.max(0, this.from - chunkStart));
      chunkStart += chunk.length;
    }
    chunks.clear();
    chunks.push(copy);
    this.chunkStart = this.from;
  }

  /**
   * Lets go of [from, to): each piece to `send`, unless it is null (a Run stands for them); each chunk
   * let go of whole to `dropped`, with its stream offset, as it is forgotten.
   */
  release(to: number, send: ((bytes: Buffer) => void) | null, dropped: ((chunk: Buffer, start: number) => void) | null): void {
    while (this.from < to) {
      const chunk = this.chunks.peek() as Buffer;
      const start = this.from - this.chunkStart;
      const end = Math.min(chunk.length, to - this.chunkStart);
      if (send) send(chunk.subarray(start, end));
      this.from = this.chunkStart + end;
      if (end === chunk.length) {
        if (dropped) dropped(chunk, this.chunkStart);
        this.chunks.shift();
        this.chunkStart += chunk.length;
      }
    }
  }
}
