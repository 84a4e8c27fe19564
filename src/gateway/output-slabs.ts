/**
 * A few large buffers for rebuilt Run records, each reused once the socket has written it: fresh
 * megabyte buffers would pile up as garbage between collections and swell the process.
 */
export class OutputSlabs {
  private static readonly SLAB = 2 * 1024 * 1024;
  private static readonly COUNT = 4;
  private readonly free: Buffer[] = [];
  private readonly busy = new Set<ArrayBufferLike>();
  private made = 0;

  take(size: number): Buffer {
    if (size > OutputSlabs.SLAB) return Buffer.allocUnsafe(size);
    let slab = this.free.pop();
    if (!slab) {
      if (this.made >= OutputSlabs.COUNT) return Buffer.allocUnsafe(size);
      slab = Buffer.allocUnsafeSlow(OutputSlabs.SLAB);
      this.made++;
    }
    this.busy.add(slab.buffer);
    return slab.subarray(0, size);
  }

  /** Every slab is out: the next take() would allocate. */
  get exhausted(): boolean {
    return this.made >= OutputSlabs.COUNT && this.free.length === 0;
  }

  /** The slab a buffer from take() lives in, if any. */
  owner(bytes: Buffer): Buffer | null {
    return this.busy.has(bytes.buffer) ? Buffer.from(bytes.buffer, 0, OutputSlabs.SLAB) : null;
  }

  release(slab: Buffer): void {
    if (this.busy.delete(slab.buffer)) this.free.push(slab);
  }
}
