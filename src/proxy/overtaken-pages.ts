import { DIGEST_BYTES } from '../digest';
import { X86_PAGE_SIZE } from '../qemu/constants';
import { type RetainedPages, sameDigest } from './retained';

/** Pages kept at most (16 MiB); past it a frame naming another one fails its digest check. */
const MAX_KEPT = 4096;
const ABSENT = new Uint8Array(DIGEST_BYTES);

/**
 * The receiving side's copies of pages the main channel overwrote in a later epoch while a multifd
 * channel was still rebuilding an earlier one (see MultifdMigration.mainPageReceived): that channel's
 * Runs and Deltas may name the version the main channel replaced, as the sending gateway, which read
 * them in the source's order, saw it; or, from QEMU 9.0 on, the version a channel wrote in that epoch,
 * dropped as older, which a Delta of that epoch may go against. Let go, buffers kept for reuse, once no
 * channel is behind.
 */
export class OvertakenPages {
  private readonly kept = new Map<number, Buffer>();
  /** Per page kept, the epoch its version was written in (-1: before the migration). */
  private readonly epochs = new Map<number, number>();
  private readonly spare: Buffer[] = [];

  constructor(private readonly store: RetainedPages) {}

  get size(): number {
    return this.kept.size;
  }

  /**
   * Keeps the version of `pageIndex` the store holds (none if it holds none), written in `epoch`, before
   * the main channel overwrites it; the first one only.
   */
  keep(pageIndex: number, epoch: number): void {
    if (this.kept.size >= MAX_KEPT || this.kept.has(pageIndex)) return;
    if (sameDigest(this.store.digests, pageIndex * DIGEST_BYTES, ABSENT, 0)) return;
    const page = this.spare.pop() ?? Buffer.allocUnsafe(X86_PAGE_SIZE);
    this.store.readPages(pageIndex, 1, page, 0);
    this.kept.set(pageIndex, page);
    this.epochs.set(pageIndex, epoch);
  }

  /**
   * Keeps data[start…] as the version of `pageIndex` the frames of the overtaken epochs name from now on:
   * a channel's write of it in `epoch`, dropped as older than the main channel's.
   */
  replace(pageIndex: number, data: Uint8Array, start: number, epoch: number): void {
    let page = this.kept.get(pageIndex);
    if (page === undefined) {
      if (this.kept.size >= MAX_KEPT) return;
      page = this.spare.pop() ?? Buffer.allocUnsafe(X86_PAGE_SIZE);
      this.kept.set(pageIndex, page);
    }
    page.set(data.subarray(start, start + X86_PAGE_SIZE));
    this.epochs.set(pageIndex, epoch);
  }

  /** The epoch the version of `pageIndex` kept was written in (-1: before the migration), null if none is kept. */
  epochOf(pageIndex: number): number | null {
    return this.epochs.get(pageIndex) ?? null;
  }

  /** The version `pageIndex` had before the main channel overwrote it, if it was kept. */
  version(pageIndex: number): Buffer | null {
    return this.kept.get(pageIndex) ?? null;
  }

  clear(): void {
    for (const page of this.kept.values()) this.spare.push(page);
    this.kept.clear();
    this.epochs.clear();
  }
}
