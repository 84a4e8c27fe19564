/**
 * A few large buffers for rebuilt Run records, each reused once the socket has written it: fresh
 * megabyte buffers would pile up as garbage between collections and swell the process, and each is new
 * memory to the kernel, faulted in page by page as the pages are copied into it (on a host that takes
 * freed memory back, that cost a multifd back leg's receiver most of its time).
 */
export class OutputSlabs {
  private readonly free: Buffer[] = [];
  private readonly busy = new Set<ArrayBufferLike>();
  private made = 0;

  constructor(
    /** Bytes of a slab: a larger take() gets a buffer of its own. */
    private readonly slabBytes = 2 * 1024 * 1024,
    /** Slabs at most: with every one out, take() allocates. */
    private readonly count = 4,
  ) {}

  take(size: number): Buffer {
    if (size > this.slabBytes) return Buffer.allocUnsafe(size);
    let slab = this.free.pop();
    if (!slab) {
      if (this.made >= this.count) return Buffer.allocUnsafe(size);
      slab = Buffer.allocUnsafeSlow(this.slabBytes);
      this.made++;
    }
    this.busy.add(slab.buffer);
    return slab.subarray(0, size);
  }

  /** Every slab is out: the next take() would allocate. */
  get exhausted(): boolean {
    return this.made >= this.count && this.free.length === 0;
  }

  /** The slab a buffer from take() lives in, if any. */
  owner(bytes: Buffer): Buffer | null {
    return this.busy.has(bytes.buffer) ? Buffer.from(bytes.buffer, 0, this.slabBytes) : null;
  }

  release(slab: Buffer): void {
    if (this.busy.delete(slab.buffer)) this.free.push(slab);
  }
}
