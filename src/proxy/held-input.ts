/**
 * What an encoder has been pushed and not yet let go of: views of the pushed chunks (no copies), the
 * first of which starts at stream offset `chunkStart` and is let go of up to `from`. Bytes are let go
 * of in stream order, sent as Literal bytes or standing for a Run that replaces them.
 */
export class HeldInput {
  chunks: Buffer[] = [];
  /** Stream offset of chunks[0][0]. */
  chunkStart = 0;
  /** Stream offset of the first byte not let go of. */
  from = 0;

  push(chunk: Buffer): void {
    this.chunks.push(chunk);
  }

  /**
   * Lets go of [from, to): each piece to `send`, unless it is null (a Run stands for them); each chunk
   * let go of whole to `dropped`, with its stream offset, as it is forgotten.
   */
  release(to: number, send: ((bytes: Buffer) => void) | null, dropped: ((chunk: Buffer, start: number) => void) | null): void {
    while (this.from < to) {
      const chunk = this.chunks[0];
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
