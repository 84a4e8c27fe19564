import { DIGEST_BYTES, digestContiguous, digestOne, StreamHash } from '../digest';
import { RamFlag, X86_PAGE_SIZE } from '../qemu/constants';
import { StreamParser } from '../qemu/parser';
import { type RamBlock, RecordKind, type StreamFallback, type StreamRecord } from '../qemu/records';
import { writeRamWord, writeShortString } from '../qemu/encode';
import { decodeRun, isHeld, MAX_RUN_HELD, type Run } from './run';
import { applyPageDelta, DELTA_AHEAD_BYTES, DELTA_BASE_DIGEST_AT, DELTA_HEADER_BYTES, DELTA_NEW_DIGEST_AT, keepVersionPage, MAX_DELTA_BYTES, SIBLING_DELTA_LEAD_BYTES } from './page-delta';
import { StreamParts } from './stream-parts';
import { RecentPages } from './recent-pages';
import { BASES_WINDOW, ReadsAhead } from './reads-ahead';
import { Claim, type MultifdMigration } from './multifd-migration';
import { newCounts, type TransferCounts } from './transfer-counts';
import { continuingFlags, layoutOf, type PageLayout, holdsVersion, PageRetainer, type RetainedPages, sameDigest, type SiblingPages } from './retained';
import { errorMessage } from '../common/errors';
import { RebuildError } from './rebuild-error';
import { copyBytes } from '../common/copy';

/**
 * Most device-state tail a receiver holds back until the stream is checked: real tails are well under a
 * megabyte (device sections and the vmdesc JSON); one beyond this fails the migration rather than
 * reach the destination unchecked.
 */
const MAX_HELD_TAIL = 64 * 1024 * 1024;

/** Delta bases read ahead from a store: lone pages, through its reader pool. */
function basesAhead(from: Pick<RetainedPages, 'prefetchPages'>): ReadsAhead {
  return new ReadsAhead(BASES_WINDOW, (pages, _counts, count) => from.prefetchPages?.(pages, count));
}

/**
 * The receiving gateway's codec: turns Literal bytes and Run payloads back into the exact stream the
 * source sent. Reused pages come from the store and are checked against the digest the sender sent
 * before a byte of them is passed on. The rebuilt stream is parsed again as it goes out, which keeps
 * the store in step exactly as on the sending side.
 */
export class StreamDecoder {
  readonly counts: TransferCounts = newCounts();
  layout: PageLayout | null = null;
  /** The siblings' snapshots this receiver confirmed in its Offer, in its order: what SiblingDelta frames name. */
  siblings: readonly SiblingPages[] = [];
  /** Siblings a page of which did not match its digest: their stores are suspect (the gateway verifies them). */
  readonly damagedSiblings: SiblingPages[] = [];

  private readonly parser: StreamParser;
  private readonly retainer: PageRetainer;
  /** The stream's head and device-state tail, kept for rebuilding a whole stream from the store. */
  readonly parts = new StreamParts();
  /** The run whose rebuilt records are passing through the parser: its held pages are in the store already. */
  private replaying: Run | null = null;
  private replayFirst = 0;
  /** Which record of the run the parser reads next. */
  private replayNext = 0;
  /** The page a Delta's rebuilt data is completing in the parser (-1: none), and whether it did. */
  private deltaPage = -1;
  private deltaDone = false;
  private readonly pages = Buffer.allocUnsafe(MAX_RUN_HELD * X86_PAGE_SIZE);
  private readonly digests = Buffer.allocUnsafe(MAX_RUN_HELD * DIGEST_BYTES);
  private readonly runDigest = Buffer.alloc(DIGEST_BYTES);
  /** Bases of the Deltas seen ahead (aheadOfDelta), for this VM's store and each sibling's (in siblings' order). */
  private ownAhead: ReadsAhead | null = null;
  private readonly siblingsAhead: ReadsAhead[] = [];
  /** Delta and SiblingDelta frames seen ahead, and rebuilt (or being rebuilt): the same frames, numbered alike. */
  private deltasSeen = 0;
  private deltasRebuilt = 0;
  /**
   * The pages stored last, kept from the first Delta against another page on (most such Deltas name one
   * of them): before that, copying every page stored would cost a receiver that gets none (a guest whose
   * pages resemble nothing, a fast link) a microsecond a page.
   */
  private recent: RecentPages | null = null;
  /**
   * The migration's multifd channels, when it may have some (set from onLayout): the main channel's
   * pages and epochs take part in their ordering (see MultifdMigration).
   */
  multifd: MultifdMigration | null = null;
  /** Of the stream rebuilt so far. */
  private readonly streamHash = new StreamHash();
  /**
   * Rebuilt bytes of the device-state tail (every device section, EOF, the vmdesc trailer) not yet given
   * to `out`: without its EOF marker a destination QEMU cannot finish loading, so it never runs a stream
   * that was damaged between the gateways. Copies, let go only once a Seal or End check covers them.
   */
  private held: Buffer[] = [];
  private heldBytes = 0;
  /** The tail has begun: every byte rebuilt from here on is held until a check covers it. */
  private holding = false;
  /** Stream bytes covered by the last Seal or End check that passed. */
  private verifiedTo = 0;
  /** A Seal covered the stream's very end: nothing more may follow. */
  private sealed = false;
  /** A Seal covered a postcopy package: the destination runs the guest, nothing more is held. */
  private packageReleased = false;

  constructor(
    /** Receives the rebuilt stream; it owns each buffer. */
    private readonly out: (bytes: Buffer) => void,
    store: RetainedPages | null,
    private readonly onLayout: (layout: PageLayout) => void = () => undefined,
    /** Where rebuilt Run records are laid out; `out` then owns the buffer. */
    private readonly allocate: (size: number) => Buffer = (size) => Buffer.allocUnsafe(size),
  ) {
    this.retainer = new PageRetainer(store);
    this.parser = new StreamParser((record) => this.onRecord(record));
  }

  /** Whether sections end with footers (null until the stream shows it). */
  get footers(): boolean | null {
    return this.parser.framing.footers;
  }

  /** Where and why the stream stopped being parsed (null: it was parsed whole). */
  get fallback(): StreamFallback | null {
    return this.parser.fallenBack;
  }

  /** The stream switched to postcopy. */
  get postcopy(): boolean {
    return this.parts.postcopyStarted;
  }

  /**
   * A checked postcopy package has been handed on: the destination runs (or is about to run) the
   * guest, and the source can no longer take it back.
   */
  get guestRunsAtDestination(): boolean {
    return this.packageReleased;
  }

  /** The destination has been handed every byte rebuilt so far, and a check covered all of them. */
  get delivered(): boolean {
    return this.heldBytes === 0 && this.verifiedTo === this.counts.streamBytes;
  }

  literal(bytes: Buffer): void {
    if (this.sealed) throw new RebuildError('stream bytes after the sealed end of the stream');
    const at = this.counts.streamBytes;
    this.counts.streamBytes += bytes.length;
    this.streamHash.update(bytes);
    this.parts.feed(bytes);
    // Parsed before it goes out, so that the tail is known before any byte of it could leave.
    this.retainer.newInput(bytes);
    this.parser.push(bytes);
    this.emit(bytes, at);
  }

  /**
   * The bytes given to literal() so far are views of buffers their owner is about to read into again:
   * whatever is kept of them past this call must be a copy.
   */
  releaseInput(): void {
    this.parts.release();
  }

  run(payload: Buffer): void {
    const run = decodeRun(payload);
    if ((run.firstFlags & ~RamFlag.Continue) !== (continuingFlags(isHeld(run.bitmap, 0)) & ~RamFlag.Continue)) {
      throw new RebuildError(`Run starts with flags 0x${run.firstFlags.toString(16)} for a ${isHeld(run.bitmap, 0) ? 'held' : 'fill'} page`);
    }
    const blocks = this.parser.ramBlocks;
    const block = blocks[run.blockIndex];
    if (!block) throw new RebuildError(`Run names RAM block ${run.blockIndex} of ${blocks.length}`);
    if (run.firstOffset % X86_PAGE_SIZE !== 0 || run.firstOffset + run.count * X86_PAGE_SIZE > block.pages * X86_PAGE_SIZE) {
      throw new RebuildError(`Run of ${run.count} pages at ${run.firstOffset} overruns block ${block.name}`);
    }
    const first = block.firstPage + run.firstOffset / X86_PAGE_SIZE;
    if (run.held > 0) this.readHeld(run, first);
    const bytes = this.records(run, block);
    const at = this.counts.streamBytes;
    this.counts.streamBytes += bytes.length;
    this.streamHash.update(bytes);
    this.counts.pagesReused += run.held;
    this.parts.feed(bytes);
    this.replaying = run;
    this.replayFirst = first;
    this.replayNext = 0;
    try {
      this.retainer.newInput(bytes);
      this.parser.push(bytes);
    } finally {
      this.replaying = null;
    }
    this.emit(bytes, at);
  }

  /**
   * A Delta: the data of the page whose header came last as Literal bytes, rebuilt by patching the
   * version this store holds. The version patched and the page rebuilt are both checked against the
   * sender's digests before a byte goes on.
   */
  delta(payload: Buffer): void {
    this.rebuilding();
    const store = this.retainer.store;
    if (!store) throw new RebuildError('Delta frame, but this gateway keeps no store');
    this.patch(payload, store, null);
    // Ranges make it a delta, against this page's held version or a page like it; none, a content match.
    if (payload.length > DELTA_HEADER_BYTES || payload.readUInt32BE(4) === payload.readUInt32BE(0)) this.counts.pagesDelta++;
    else this.counts.pagesMatched++;
  }

  /**
   * A Delta frame (`sibling` < 0) or SiblingDelta frame (from sibling `sibling`) has arrived and will be
   * rebuilt soon, after those before it: its base page is noted, to be read ahead (ReadsAhead) once
   * prefetchAhead() is called. head[0 .. length): the payload's first bytes, the Delta payload starting
   * at `at` (a SiblingDelta's after its lead byte). Must see every such frame, in order, as delta() and
   * siblingDelta() will. Only a hint: nothing is checked here that rebuilding does not check again.
   */
  aheadOfDelta(head: Buffer, at: number, length: number, sibling: number): void {
    const frame = ++this.deltasSeen;
    if (length - at < DELTA_AHEAD_BYTES || this.layout === null) return;
    const from: SiblingPages | RetainedPages | null | undefined = sibling < 0 ? this.retainer.store : this.siblings[sibling];
    if (from === null || from === undefined || from.prefetchPages === undefined) return;
    const base = head.readUInt32BE(at + 4);
    // A page's own version is read in stream order, with the Runs around it: the store reads that ahead.
    if (sibling < 0 && (base === head.readUInt32BE(at) || (this.recent !== null && this.recent.find(base) >= 0))) return;
    // Only a version the store holds; rebuilding fails the migration otherwise, with no read.
    if (!holdsVersion(from.digests, base, head, at + DELTA_BASE_DIGEST_AT)) return;
    let ahead: ReadsAhead;
    if (sibling < 0) {
      ahead = this.ownAhead ??= basesAhead(from);
    } else {
      while (this.siblingsAhead.length <= sibling) this.siblingsAhead.push(basesAhead(this.siblings[this.siblingsAhead.length] ?? {}));
      ahead = this.siblingsAhead[sibling];
    }
    ahead.note(frame, base);
  }

  /** Has each store start reading the bases aheadOfDelta() noted, a window ahead of the frames rebuilt. */
  prefetchAhead(): void {
    this.ownAhead?.advance(this.deltasRebuilt);
    for (const ahead of this.siblingsAhead) ahead.advance(this.deltasRebuilt);
  }

  /** A Delta or SiblingDelta is being rebuilt: the reads ahead move on past it. */
  private rebuilding(): void {
    this.deltasRebuilt++;
    this.prefetchAhead();
  }

  /** A SiblingDelta: as a Delta, from a page of a sibling's snapshot this receiver confirmed. */
  siblingDelta(payload: Buffer): void {
    this.rebuilding();
    if (payload.length < SIBLING_DELTA_LEAD_BYTES) throw new RebuildError('empty SiblingDelta frame');
    const sibling = this.siblings[payload[0]];
    if (sibling === undefined) throw new RebuildError(`SiblingDelta from sibling ${payload[0]}, but ${this.siblings.length} were confirmed`);
    this.patch(payload.subarray(SIBLING_DELTA_LEAD_BYTES), sibling, sibling.vm);
    this.counts.pagesSibling++;
  }

  /**
   * A KeepVersion frame (Feature.ChannelEarlierBases): the main channel's next record writes the page it
   * names, and a multifd channel's Delta of this epoch may go against the version held now.
   */
  keepVersion(payload: Buffer): void {
    if (this.multifd === null) throw new RebuildError('a KeepVersion frame in a migration without multifd channels');
    this.multifd.keepVersionOnMain(keepVersionPage(payload));
  }

  /** Rebuilds a page from a Delta payload over a page of `from` (this VM's store, or sibling `sibling`'s) and passes it on. */
  private patch(payload: Buffer, from: SiblingPages | RetainedPages, sibling: string | null): void {
    if (this.sealed) throw new RebuildError('stream bytes after the sealed end of the stream');
    if (payload.length < DELTA_HEADER_BYTES || payload.length > DELTA_HEADER_BYTES + MAX_DELTA_BYTES) throw new RebuildError(`Delta frame of ${payload.length} bytes`);
    const page = payload.readUInt32BE(0);
    const base = payload.readUInt32BE(4);
    const where = sibling === null ? `page ${base}` : `page ${base} of sibling ${sibling}`;
    if (this.layout === null || page >= this.layout.pageCount || (base + 1) * DIGEST_BYTES > from.digests.length) throw new RebuildError(`Delta for page ${page} from ${where}, outside the RAM layout`);
    if (!sameDigest(from.digests, base * DIGEST_BYTES, payload, DELTA_BASE_DIGEST_AT)) throw new RebuildError(`Delta from a version of ${where} this store does not hold`);
    // A page stored moments ago is still in memory; one whose copy there is stale is read from the store.
    let baseBytes: Buffer = this.pages;
    let baseAt = 0;
    if (sibling === null && base !== page) (this.recent ??= new RecentPages(this.layout.pageCount, X86_PAGE_SIZE)).used();
    const recent = from === this.retainer.store ? this.recent : null;
    if (recent !== null) {
      baseAt = recent.find(base);
      if (baseAt >= 0) digestOne(recent.content, baseAt, X86_PAGE_SIZE, this.digests, 0);
      if (baseAt >= 0 && sameDigest(this.digests, 0, payload, DELTA_BASE_DIGEST_AT)) baseBytes = recent.content;
      else baseAt = 0;
    }
    // The page's own version comes in stream order (worth reading ahead); another page is a lone read.
    if (baseBytes === this.pages) this.readBase(from, base, where, base === page && sibling === null);
    if (!sameDigest(this.digests, 0, payload, DELTA_BASE_DIGEST_AT)) {
      const own = this.retainer.store;
      if (from === own) {
        if (own.dropCorrupt) own.dropCorrupt(base);
        else own.markAbsent(base);
      } else {
        // A sibling's store is not this migration's to write: its owner checks it once the migration is over.
        this.damagedSiblings.push(from as SiblingPages);
      }
      throw new RebuildError(`retained ${where} does not match its digest`);
    }
    const bytes = this.allocate(X86_PAGE_SIZE);
    try {
      applyPageDelta(baseBytes, baseAt, payload, DELTA_HEADER_BYTES, payload.length - DELTA_HEADER_BYTES, X86_PAGE_SIZE, bytes, 0);
    } catch (err) {
      throw new RebuildError(`Delta for page ${page}: ${errorMessage(err)}`);
    }
    digestOne(bytes, 0, X86_PAGE_SIZE, this.digests, 0);
    if (!sameDigest(this.digests, 0, payload, DELTA_NEW_DIGEST_AT)) throw new RebuildError(`Delta for page ${page} does not rebuild the sender's page`);
    const at = this.counts.streamBytes;
    this.counts.streamBytes += bytes.length;
    this.streamHash.update(bytes);
    this.parts.feed(bytes);
    this.deltaPage = page;
    this.deltaDone = false;
    try {
      this.retainer.newInput(bytes);
      this.parser.push(bytes);
      // The rebuilt data must be exactly the rest of that page's record.
      if (!this.deltaDone || this.parser.recordsEnd !== this.counts.streamBytes) throw new RebuildError(`Delta for page ${page} does not complete that page's record`);
    } finally {
      this.deltaPage = -1;
    }
    this.counts.deltaBytes += payload.length + (sibling === null ? 0 : SIBLING_DELTA_LEAD_BYTES);
    this.emit(bytes, at);
  }

  /** Reads page `base` of `from` into this.pages and its digest into this.digests. */
  private readBase(from: SiblingPages | RetainedPages, base: number, where: string, inStream: boolean): void {
    try {
      from.readPages(base, 1, this.pages, 0, inStream);
    } catch (err) {
      throw new RebuildError(`${where} is not held: ${errorMessage(err)}`);
    }
    digestOne(this.pages, 0, X86_PAGE_SIZE, this.digests, 0);
  }

  /** Passes rebuilt bytes (at stream offset `at`) on, holding back everything from the tail's start. */
  private emit(bytes: Buffer, at: number): void {
    if (this.packageReleased) {
      this.out(bytes);
      return;
    }
    if (!this.holding) {
      const tail = this.parts.tailStart;
      if (tail < 0 || tail >= at + bytes.length) {
        this.out(bytes);
        return;
      }
      // The tail starts in these bytes (or started in earlier ones, whose last bytes were a partial
      // section header: a destination cannot act on those).
      const cut = Math.max(0, tail - at);
      if (cut > 0) this.out(bytes.subarray(0, cut));
      bytes = bytes.subarray(cut);
      this.holding = true;
    }
    if (this.heldBytes + bytes.length > MAX_HELD_TAIL) {
      throw new RebuildError(`the device state exceeds ${MAX_HELD_TAIL} bytes, more than a gateway holds back until the stream is checked`);
    }
    this.held.push(Buffer.from(bytes));
    this.heldBytes += bytes.length;
  }

  /** Hands every held byte to the destination: a check has just covered them. */
  private releaseHeld(): void {
    const held = this.held;
    this.held = [];
    this.heldBytes = 0;
    for (const bytes of held) this.out(bytes);
  }

  /**
   * The sender has sent every byte it read so far and checks them: its source has reached the end of
   * its stream (or gone quiet in the device state) without closing, as QEMU does while its return path
   * waits for the destination's verdict. What is held goes to the destination only if they match.
   */
  seal(streamBytes: number, streamCheck: string): void {
    if (this.sealed) throw new RebuildError('a Seal after the sealed end of the stream');
    this.check(streamBytes, streamCheck);
    this.verifiedTo = streamBytes;
    this.sealed = this.parser.ended;
    // Postcopy: once the package is checked and delivered the destination runs the guest and asks for
    // the pages it lacks; the rest of the stream goes on as it is rebuilt (Run pages still checked
    // against their digests, everything by the End check), since the guest cannot wait for the end.
    if (this.parts.postcopyStarted) this.packageReleased = true;
    this.releaseHeld();
  }

  /**
   * The sender's stream ended: the rebuilt stream must be complete, of the sender's length and XXH3-64.
   * Literal bytes and the fill pages of Runs carry no digest of their own; the stream hash catches any
   * of them damaged on the way.
   */
  end(streamBytes: number, streamCheck: string): void {
    this.parser.end();
    this.check(streamBytes, streamCheck);
    this.multifd?.endMain();
    this.verifiedTo = streamBytes;
    this.holding = false;
    this.releaseHeld();
  }

  /** The migration is over, whichever way: the recent pages go back to the pool for the next one. */
  release(): void {
    this.recent?.release();
    this.recent = null;
    this.multifd?.release();
  }

  private check(streamBytes: number, streamCheck: string): void {
    if (streamBytes !== this.counts.streamBytes) {
      throw new RebuildError(`rebuilt ${this.counts.streamBytes} bytes, the source sent ${streamBytes}`);
    }
    const rebuilt = this.streamHash.digest();
    if (streamCheck !== rebuilt) {
      throw new RebuildError(`the rebuilt stream's XXH3-64 is ${rebuilt}, the source's ${streamCheck}: bytes were damaged between the gateways`);
    }
  }

  /** Reads the run's held pages into `pages`, in order, and checks them against the sender's digest. */
  private readHeld(run: Run, first: number): void {
    const store = this.retainer.store;
    if (!store) throw new RebuildError('Run of held pages, but this gateway keeps no store');
    let filled = 0;
    for (let k = 0; k < run.count; ) {
      if (!isHeld(run.bitmap, k)) {
        k++;
        continue;
      }
      let end = k + 1;
      while (end < run.count && isHeld(run.bitmap, end)) end++;
      try {
        store.readPages(first + k, end - k, this.pages, filled * X86_PAGE_SIZE);
      } catch (err) {
        throw new RebuildError(`pages ${first + k}..${first + end - 1} are not held: ${errorMessage(err)}`);
      }
      filled += end - k;
      k = end;
    }
    digestContiguous(this.pages, 0, filled, X86_PAGE_SIZE, this.digests, 0);
    digestOne(this.digests, 0, filled * DIGEST_BYTES, this.runDigest, 0);
    if (!sameDigest(this.runDigest, 0, run.digest, 0)) {
      this.dropCorrupted(run, first, store);
      throw new RebuildError(`retained pages in ${first}..${first + run.count - 1} do not match the sender's digest`);
    }
  }

  /**
   * After a failed check: every held page whose content no longer matches the store's own digest is
   * corrupt. It stops being held, so no later migration is offered it.
   */
  private dropCorrupted(run: Run, first: number, store: RetainedPages): void {
    let h = 0;
    for (let k = 0; k < run.count; k++) {
      if (!isHeld(run.bitmap, k)) continue;
      if (!sameDigest(this.digests, h * DIGEST_BYTES, store.digests, (first + k) * DIGEST_BYTES)) {
        if (store.dropCorrupt) store.dropCorrupt(first + k);
        else store.markAbsent(first + k);
      }
      h++;
    }
  }

  /** Lays out the run's records: header word, the block name on a named first record, then the body. */
  private records(run: Run, block: RamBlock): Buffer {
    const named = (run.firstFlags & RamFlag.Continue) === 0;
    const out = this.allocate(run.count * 9 + run.held * (X86_PAGE_SIZE - 1) + (named ? 1 + block.name.length : 0));
    let at = 0;
    let held = 0;
    for (let k = 0; k < run.count; k++) {
      const page = isHeld(run.bitmap, k);
      at = writeRamWord(out, at, run.firstOffset + k * X86_PAGE_SIZE, k === 0 ? run.firstFlags : continuingFlags(page));
      if (k === 0 && named) {
        at = writeShortString(out, at, block.name);
      }
      if (page) {
        copyBytes(this.pages, held * X86_PAGE_SIZE, out, at, X86_PAGE_SIZE);
        at += X86_PAGE_SIZE;
        held++;
      } else {
        out[at++] = run.fill;
      }
    }
    return out;
  }

  private onRecord(record: StreamRecord): void {
    switch (record.kind) {
      case RecordKind.RamBlockList:
        this.layout = layoutOf(record.blocks);
        this.retainer.store?.begin(this.layout);
        this.release();
        this.onLayout(this.layout);
        return;
      case RecordKind.RamPage: {
        const kept = this.kept(record.pageIndex);
        if (this.replaying) {
          this.checkReplayed(record.pageIndex);
          return;
        }
        if (this.deltaPage >= 0) {
          if (record.pageIndex !== this.deltaPage || this.deltaDone) throw new RebuildError(`Delta for page ${this.deltaPage} rebuilt page ${record.pageIndex}`);
          this.deltaDone = true;
        } else {
          this.counts.pagesSent++;
        }
        if (kept) {
          this.retainer.retain(record, this.retainer.digestOf(record));
          this.recent?.add(record.pageIndex, record.data, record.dataStart);
        }
        return;
      }
      case RecordKind.RamZero:
        if (this.replaying) this.checkReplayed(record.pageIndex);
        this.counts.pagesZero++;
        if (this.kept(record.pageIndex)) {
          this.retainer.retain(record, this.retainer.digestOf(record));
          this.recent?.forget(record.pageIndex);
        }
        return;
      case RecordKind.RamXbzrle:
      case RecordKind.RamCompressed:
        this.counts.pagesOther++;
        if (this.kept(record.pageIndex)) {
          this.retainer.retain(record, false);
          this.recent?.forget(record.pageIndex);
        }
        return;
      default:
        this.parts.record(record);
        this.multifd?.mainRecord(record.kind);
        return;
    }
  }

  /** Whether the main channel's page is kept: not when a multifd channel wrote a later version already. */
  private kept(pageIndex: number): boolean {
    return this.multifd === null || this.multifd.mainPageReceived(pageIndex) !== Claim.Stale;
  }

  /** A CONTINUE first record is read in the parser's current block: it must be the run's. */
  private checkReplayed(pageIndex: number): void {
    const expected = this.replayFirst + this.replayNext++;
    if (pageIndex !== expected) throw new RebuildError(`Run rebuilt page ${pageIndex}, not ${expected}`);
  }
}
