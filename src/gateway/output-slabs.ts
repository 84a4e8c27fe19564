/**
 * A few large buffers the rebuilt stream is laid out in (Run records, pages rebuilt from Deltas), each
 * reused once the socket has written every piece taken from it: fresh megabyte buffers would pile up as
 * garbage between collections and swell the process, and each is new memory to the kernel, faulted in
 * page by page as the pages are copied into it (on a host that takes freed memory back, that cost a
 * multifd back leg's receiver most of its time).
 *
 * Pieces are carved one after another from the slab in use: a 4 KiB page rebuilt from a Delta took a
 * slab of its own before, so four of them in one read from the peer exhausted the slabs and paused the
 * session until the event loop had turned.
 */
interface Slab {
  bytes: Buffer;
  /** Pieces taken from it that the socket has not written yet. */
  pieces: number;
}

export class OutputSlabs {
  private readonly free: Slab[] = [];
  /** Every slab made, by its memory (a piece's `buffer`). */
  private readonly slabs = new Map<ArrayBufferLike, Slab>();
  /** The slab pieces are carved from, and where its next piece begins. */
  private current: Slab | null = null;
  private used = 0;

  constructor(
    /** Bytes of a slab: a larger take() gets a buffer of its own. */
    private readonly slabBytes = 2 * 1024 * 1024,
    /** Slabs at most: with every one out, take() allocates. */
    private readonly count = 4,
  ) {}

  take(size: number): Buffer {
    if (size > this.slabBytes) return Buffer.allocUnsafe(size);
    if (this.current === null || this.used + size > this.slabBytes) {
      const next = this.nextSlab();
      if (next === null) return Buffer.allocUnsafe(size);
      this.retireCurrent();
      this.current = next;
      this.used = 0;
    }
    const slab = this.current;
    slab.pieces++;
    const piece = slab.bytes.subarray(this.used, this.used + size);
    this.used += size;
    return piece;
  }

  /** A free slab, a new one while fewer than `count` were made, or null. */
  private nextSlab(): Slab | null {
    const slab = this.free.pop();
    if (slab) return slab;
    if (this.slabs.size >= this.count) return null;
    const made: Slab = { bytes: Buffer.allocUnsafeSlow(this.slabBytes), pieces: 0 };
    this.slabs.set(made.bytes.buffer, made);
    return made;
  }

  /** The slab in use is left for another: free already if nothing taken from it is still unwritten. */
  private retireCurrent(): void {
    const slab = this.current;
    this.current = null;
    if (slab !== null && slab.pieces === 0) this.free.push(slab);
  }

  /** Every slab is out and the one in use has less than a quarter left: the next take() may allocate. */
  get exhausted(): boolean {
    return this.free.length === 0 && this.slabs.size >= this.count && (this.current === null || this.slabBytes - this.used < this.slabBytes / 4);
  }

  /** For a piece from take(): what gives it back once the socket has written it (undefined for a buffer of its own). */
  releaser(piece: Buffer): (() => void) | undefined {
    const slab = this.slabs.get(piece.buffer);
    return slab === undefined ? undefined : () => this.release(slab);
  }

  private release(slab: Slab): void {
    if (slab.pieces === 0) return;
    slab.pieces--;
    if (slab.pieces > 0) return;
    if (slab === this.current) this.used = 0;
    else this.free.push(slab);
  }
}
