import type { StreamHash } from '../digest';
import { Fifo } from '../common/fifo';

/**
 * What an encoder has been pushed and not yet let go of: views of the pushed chunks (no copies), the
 * first of which starts at stream offset `chunkStart` and is let go of up to `from`. Bytes are let go
 * of in stream order, sent as Literal bytes or standing for a Run that replaces them.
 *
 * The stream's hash follows what has been let go of, so that digest() covers exactly the bytes a check
 * at `from` covers (a Seal, a channel's check after a SYNC packet, the End): a chunk is hashed whole
 * once it has all gone (one call per chunk, not one per record), the rest of the first one only when a
 * digest is asked for or the chunk is copied.
 */
export class HeldInput {
  readonly chunks = new Fifo<Buffer>();
  /** Stream offset of chunks[0][0]. */
  chunkStart = 0;
  /** Stream offset of the first byte not let go of. */
  from = 0;
  /** The hash covers [0, hashedTo); chunkStart ≤ hashedTo ≤ from. */
  private hashedTo = 0;

  constructor(
    /** Hashes the stream's bytes as they are let go of. */
    private readonly hash: StreamHash,
  ) {}

  push(chunk: Buffer): void {
    this.chunks.push(chunk);
  }

  /**
   * Replaces the views still held, [from, end), by one copy: for an encoder whose caller reuses its
   * chunk buffers once a push has returned (what it holds then is a record being read, a page or so).
   * What was let go of is hashed, then dropped with them.
   */
  own(end: number): void {
    const chunks = this.chunks;
    if (chunks.length === 0) return;
    this.hashLetGo();
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

  /** Lets go of [from, to): each piece to `send`, unless it is null (a Run stands for them). */
  release(to: number, send: ((bytes: Buffer) => void) | null): void {
    while (this.from < to) {
      const chunk = this.chunks.peek() as Buffer;
      const start = this.from - this.chunkStart;
      const end = Math.min(chunk.length, to - this.chunkStart);
      if (send) send(chunk.subarray(start, end));
      this.from = this.chunkStart + end;
      if (end === chunk.length) {
        this.hash.update(this.hashedTo > this.chunkStart ? chunk.subarray(this.hashedTo - this.chunkStart) : chunk);
        this.hashedTo = this.chunkStart + chunk.length;
        this.chunks.shift();
        this.chunkStart += chunk.length;
      }
    }
  }

  /** XXH3-64 (hex) of the stream's bytes let go of: [0, from). */
  digest(): string {
    this.hashLetGo();
    return this.hash.digest();
  }

  /** Hashes what has gone of the first chunk (everything before it is hashed already). */
  private hashLetGo(): void {
    if (this.from <= this.hashedTo) return;
    this.hash.update(this.chunks.at(0).subarray(this.hashedTo - this.chunkStart, this.from - this.chunkStart));
    this.hashedTo = this.from;
  }
}
