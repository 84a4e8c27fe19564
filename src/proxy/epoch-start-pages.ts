import { DIGEST_BYTES, digestOne } from '../digest';
import { X86_PAGE_SIZE } from '../qemu/constants';
import { RebuildError } from './rebuild-error';
import type { RecentPages } from './recent-pages';
import { type RetainedPages, sameDigest } from './retained';
import { copyBytes } from '../common/copy';

/** Pages kept for one epoch at most where QEMU < 9.0 repeats them (32 MiB); past it a Run naming another one fails its digest check. */
const MAX_KEPT = 8192;
/**
 * Pages a sender may use as the bases of Deltas against an earlier epoch's version, in one epoch: each may
 * have a receiver keep one page (KeepVersion frames), on top of MAX_KEPT. MultifdMigration holds its
 * channels to it.
 */
export const EARLIER_BASES_PER_EPOCH = 2048;
const ABSENT = new Uint8Array(DIGEST_BYTES);

/**
 * The receiving side's copies of pages as they were when the current multifd epoch began, kept just
 * before the page's first write in the epoch (see MultifdMigration):
 * - where QEMU before 9.0 may have sent the page twice in the epoch: the sender may have named the page's
 *   other copy in a Run, by the version the receiver held, and that Run may be rebuilt only after this
 *   copy was written;
 * - where the sender asks for it (a KeepVersion frame): a Delta of this epoch, on another channel, may go
 *   against the version the epoch began with, and be rebuilt only after this write.
 * Copies of an earlier epoch are let go when a later one keeps its first page; their buffers are reused.
 */
export class EpochStartPages {
  private epoch = -1;
  private readonly kept = new Map<number, Buffer>();
  private readonly spare: Buffer[] = [];
  /** Pages kept at a sender's request in the current epoch (each page once, however often it was asked). */
  private asked = 0;
  private readonly digest = Buffer.alloc(DIGEST_BYTES);

  constructor(private readonly store: RetainedPages) {}

  /**
   * Keeps the version of `pageIndex` the store holds (none if it holds none), before its first write in
   * `epoch`: from `recent` where that holds it (checked against the store's digest), else read. `asked`:
   * a sender's KeepVersion, which must be kept (RebuildError past what a sender may ask).
   */
  keep(pageIndex: number, epoch: number, recent: RecentPages | null = null, asked = false): void {
    if (epoch !== this.epoch) this.begin(epoch);
    // Asked again (QEMU < 9.0 may write the page twice in the epoch), or kept already: the first stands.
    if (this.kept.has(pageIndex)) return;
    if (asked && this.asked === EARLIER_BASES_PER_EPOCH) throw new RebuildError(`the sender asked to keep more than ${EARLIER_BASES_PER_EPOCH} pages' versions in one epoch`);
    if (!asked && this.kept.size - this.asked >= MAX_KEPT) return;
    const at = pageIndex * DIGEST_BYTES;
    if (sameDigest(this.store.digests, at, ABSENT, 0)) return;
    const page = this.spare.pop() ?? Buffer.allocUnsafe(X86_PAGE_SIZE);
    const copy = recent === null ? -1 : recent.find(pageIndex);
    if (copy >= 0) {
      copyBytes((recent as RecentPages).content, copy, page, 0, X86_PAGE_SIZE);
      digestOne(page, 0, X86_PAGE_SIZE, this.digest, 0);
    }
    if (copy < 0 || !sameDigest(this.digest, 0, this.store.digests, at)) this.store.readPages(pageIndex, 1, page, 0);
    this.kept.set(pageIndex, page);
    if (asked) this.asked++;
  }

  /** The version `pageIndex` had when `epoch` began, if it was kept. */
  version(pageIndex: number, epoch: number): Buffer | null {
    return epoch === this.epoch ? (this.kept.get(pageIndex) ?? null) : null;
  }

  private begin(epoch: number): void {
    for (const page of this.kept.values()) this.spare.push(page);
    this.kept.clear();
    this.asked = 0;
    this.epoch = epoch;
  }
}
