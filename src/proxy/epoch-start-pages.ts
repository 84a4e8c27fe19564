import { DIGEST_BYTES } from '../digest';
import { X86_PAGE_SIZE } from '../qemu/constants';
import { type RetainedPages, sameDigest } from './retained';

/** Pages kept for one epoch at most (32 MiB); past it a Run naming another one fails its digest check. */
const MAX_KEPT = 8192;
const ABSENT = new Uint8Array(DIGEST_BYTES);

/**
 * The receiving side's copies of pages as they were when the current multifd epoch began, kept just
 * before a page QEMU before 9.0 may have sent twice in the epoch is first overwritten (see
 * MultifdMigration): the sender may have named the page's other copy in a Run, by the version the
 * receiver held, and that Run may be rebuilt only after this copy was written. Copies of an earlier
 * epoch are let go when a later one keeps its first page; their buffers are reused.
 */
export class EpochStartPages {
  private epoch = -1;
  private readonly kept = new Map<number, Buffer>();
  private readonly spare: Buffer[] = [];

  constructor(private readonly store: RetainedPages) {}

  /** Keeps the version of `pageIndex` the store holds (none if it holds none), before its first write in `epoch`. */
  keep(pageIndex: number, epoch: number): void {
    if (epoch !== this.epoch) this.begin(epoch);
    if (this.kept.size >= MAX_KEPT || this.kept.has(pageIndex)) return;
    if (sameDigest(this.store.digests, pageIndex * DIGEST_BYTES, ABSENT, 0)) return;
    const page = this.spare.pop() ?? Buffer.allocUnsafe(X86_PAGE_SIZE);
    this.store.readPages(pageIndex, 1, page, 0);
    this.kept.set(pageIndex, page);
  }

  /** The version `pageIndex` had when `epoch` began, if it was kept. */
  version(pageIndex: number, epoch: number): Buffer | null {
    return epoch === this.epoch ? (this.kept.get(pageIndex) ?? null) : null;
  }

  private begin(epoch: number): void {
    for (const page of this.kept.values()) this.spare.push(page);
    this.kept.clear();
    this.epoch = epoch;
  }
}
