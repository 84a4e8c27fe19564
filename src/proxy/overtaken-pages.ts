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
 * them in the source's order, saw it. Let go, buffers kept for reuse, once no channel is behind.
 */
export class OvertakenPages {
  private readonly kept = new Map<number, Buffer>();
  private readonly spare: Buffer[] = [];

  constructor(private readonly store: RetainedPages) {}

  get size(): number {
    return this.kept.size;
  }

  /** Keeps the version of `pageIndex` the store holds (none if it holds none), before the main channel overwrites it; the first one only. */
  keep(pageIndex: number): void {
    if (this.kept.size >= MAX_KEPT || this.kept.has(pageIndex)) return;
    if (sameDigest(this.store.digests, pageIndex * DIGEST_BYTES, ABSENT, 0)) return;
    const page = this.spare.pop() ?? Buffer.allocUnsafe(X86_PAGE_SIZE);
    this.store.readPages(pageIndex, 1, page, 0);
    this.kept.set(pageIndex, page);
  }

  /** The version `pageIndex` had before the main channel overwrote it, if it was kept. */
  version(pageIndex: number): Buffer | null {
    return this.kept.get(pageIndex) ?? null;
  }

  clear(): void {
    for (const page of this.kept.values()) this.spare.push(page);
    this.kept.clear();
  }
}
