import { DIGEST_BYTES, DIGEST_WORDS, digestOne, isAbsentDigest, sameDigestWords, StreamHash } from '../digest';
import { X86_PAGE_SIZE } from '../qemu/constants';
import { StreamParser } from '../qemu/parser';
import { RamRecordWalk } from '../qemu/pages-ahead';
import { type RamBlock, type RamPageRecord, RecordKind, type StreamFallback, type StreamRecord } from '../qemu/records';
import { encodeRun, MAX_RUN_HELD, MAX_RUN_RECORDS } from './run';
import { DELTA_HEADER_BYTES, DeltaSlab, encodePageDelta, keepVersionPayload, MAX_DELTA_BYTES, SIBLING_DELTA_LEAD_BYTES, writeDeltaHeader } from './page-delta';
import { ContentIndex } from './content-index';
import { resemblanceKey, ResemblanceCache, ResemblanceWorth } from './resemblance-cache';
import type { SiblingMatch } from './sibling-match';
import { HeldInput } from './held-input';
import { Claim, type MultifdMigration } from './multifd-migration';
import { newCounts, type TransferCounts } from './transfer-counts';
import { StreamParts } from './stream-parts';
import { continuingFlags, layoutOf, type PageLayout, PageRetainer, ReceiverTable, type RetainedPages, sameDigest } from './retained';

/**
 * Where an encoder's output goes, in stream order: the main channel's StreamEncoder's, and a multifd
 * channel's (channelEncoder: MultifdEncoder, or Literal bytes alone when relayed verbatim). The optional
 * frames are needed only where the receiver takes them.
 */
export interface EncoderSink {
  literal(bytes: Buffer): void;
  run(payload: Buffer): void;
  /** A Delta payload (`page-delta.ts`): once the encoder's `deltas` is on (a channel's: MultifdMigration.channelDeltas). */
  delta?(payload: Buffer): void;
  /** A SiblingDelta payload (`page-delta.ts`): once the encoder has `siblings` (a channel's: MultifdMigration.siblings). */
  siblingDelta?(payload: Buffer): void;
  /** A KeepVersion payload (`page-delta.ts`): once a multifd migration has `earlierBases`. */
  keepVersion?(payload: Buffer): void;
  /** A PacketHeader payload (`packet-header.ts`): once a multifd migration has `packetHeaders`. */
  packetHeader?(payload: Buffer): void;
  /**
   * A multifd channel's check after a SYNC packet: its length so far and their XXH3-64, every byte before
   * sent (MultifdMigration.channelChecks).
   */
  check?(streamBytes: number, streamCheck: string): void;
}


/** A page crosses 100 Mbit/s in 330 µs: a store read slower than this costs more than the bytes a delta saves. */
export const DELTA_READ_BUDGET_US = 250;

/** Bits set in the low 16 bits of x. */
function bitCount16(x: number): number {
  x -= (x >>> 1) & 0x5555;
  x = (x & 0x3333) + ((x >>> 2) & 0x3333);
  x = (x + (x >>> 4)) & 0x0f0f;
  return (x + (x >>> 8)) & 0x1f;
}

/** rangesFromOwnVersion(): the page differs from the base in more than MAX_DELTA_BYTES. */
const NO_DELTA = -1;
/** rangesFromOwnVersion(): this store does not hold the receiver's version of the base, or reading it costs too much now. */
const NOT_READ = -2;

/**
 * Tries of a kind of delta that missed (the page differed too much) in a row: each doubles the
 * candidates passed over before the next try, up to 255, so pseudo-random rewrites cost a few tries,
 * not one a page; a hit starts over.
 */
class MissBackoff {
  private skip = 0;
  private misses = 0;

  /** Whether to try the next candidate (else it is passed over). */
  tryNow(): boolean {
    if (this.skip === 0) return true;
    this.skip--;
    return false;
  }

  miss(): void {
    this.misses = Math.min(this.misses + 1, 8);
    this.skip = (1 << this.misses) - 1;
  }

  hit(): void {
    this.misses = 0;
  }
}

/**
 * Pages of the reference the content index takes in at a time, once begun: a slice costs about a
 * millisecond (the whole index of a 256 MiB guest took 20 ms at a back leg's first changed page, and
 * would take a good part of a second for 8 GiB, all in one source chunk). A 256 MiB guest's index is
 * whole 16 chunks (4 MiB of stream) after its first look.
 */
const CONTENT_INDEX_SLICE = 4096;
/**
 * What building the content index costs the gateway a guest page, in µs: 0.035–0.11 measured here (a
 * fresh index, and a cold one at the top: 7 ms for a 256 MiB guest).
 */
const CONTENT_INDEX_US_PER_PAGE = 0.1;

/** The digest of a page the receiver does not hold, as words. */
const ABSENT = new Uint32Array(DIGEST_WORDS);


/**
 * The sending gateway's codec: parses the source's stream and replaces every run of pages the
 * receiver already holds (by the receiver's digest table, `reference`) and of fill pages with a Run
 * frame. Everything else goes out as Literal bytes: views of the chunks pushed, never copies, so a
 * pushed chunk must not be changed afterwards. It also keeps the local store in step with the stream.
 */
export class StreamEncoder {
  /**
   * The receiver's digest table (16 bytes per page; all zero = not held), or null for no reuse. When
   * the local store holds the same snapshot this is the store's own table. Updated as pages are sent,
   * so it always says what the receiver holds at this point of the stream.
   */
  get reference(): Uint8Array | null {
    return this.receiverTable?.bytes ?? null;
  }

  set reference(table: Uint8Array | null) {
    this.receiverTable = table === null ? null : new ReceiverTable(table);
  }

  /** The reference, with its words: what the migration's multifd channels are given too. */
  receiverTable: ReceiverTable | null = null;
  /**
   * Send a changed page as a delta against the version the receiver holds, where this site's store
   * holds that same version (the receiver said it takes Delta frames).
   */
  deltas = false;
  /**
   * The migration's multifd channels, when it may have some (set from onLayout): the main channel's
   * pages and epochs take part in their ordering (see MultifdMigration).
   */
  multifd: MultifdMigration | null = null;
  /**
   * The siblings' snapshots the receiver confirmed it holds: a page whose content one holds goes as a
   * SiblingDelta (with `deltas` on), unless the receiver holds it in this VM's own store.
   */
  siblings: SiblingMatch | null = null;
  private readonly deltaOut = new DeltaSlab();
  private readonly basePage = Buffer.alloc(X86_PAGE_SIZE);
  private readonly baseDigest = Buffer.alloc(DIGEST_BYTES);
  /** Deltas against a page's own version: random content makes every try a loss. */
  private readonly ownVersionTries = new MissBackoff();
  /**
   * Whether a delta's store reads may be paid whatever they cost: the WAN sets the pace now (the session
   * says so per chunk), or the operator said `deltas: always`. Otherwise a delta is tried only while
   * the store reads it took here stay cheaper than sending a page whole at 100 Mbit/s, and a content
   * match (a read at the receiver only) not at all.
   */
  deltaReadsFree = true;
  /**
   * The receiver reads the bases of the Deltas it gets ahead, in parallel or from memory
   * (Feature.BasesAhead), and the link is one where bytes still cost more than this side's work on a page
   * (the session says so per chunk): matches, deltas against pages like one sent lately and references
   * to a sibling's pages pay whatever sets the pace. Each costs this side a lookup (and for a page alike
   * a copy into the resemblance cache) and a frame of a few dozen bytes in the page's place, and the
   * receiver a read ahead or from memory: about what the page's bytes cost both gateways' sockets. A delta
   * against a page's own version still reads this side's store, and waits for deltaReadsFree.
   */
  receiverReadsAhead = false;
  /**
   * The last 16 delta reads, a bit each: set for one slower than DELTA_READ_BUDGET_US. Reads are slow
   * while more than half of them were: a few that waited milliseconds (behind a queued store write, say)
   * must not close the gate, which then reads one page in 64 and so would forget them slowly.
   */
  private slowReads = 0;
  private deltaProbe = 0;
  private contentIndex: ContentIndex | null = null;
  /**
   * What a page costs to cross the WAN whole, in µs: the session sets it per chunk from the WAN's rate.
   * 0: not known, and the content index is built at the first page that could look in it.
   */
  pageWanUs = 0;
  /** WAN time (µs) of the pages that could have looked in the content index before it was begun. */
  private indexRentUs = 0;
  /** Pages sent lately, by a sample of their content: bases for deltas of pages like them elsewhere. */
  private resemblance: ResemblanceCache | null = null;
  /** Whether the page onPage() is on may be looked for and kept by its resemblance (sendDelta computes its key then). */
  private pageResembles = false;
  /** The resemblance key of the page onPage() is on (0: none, or not looked for). */
  private pageKey = 0;
  /** Deltas against a page like it: a cheap miss (no read), but a miss all the same. */
  private readonly resemblanceTries = new MissBackoff();
  /** The ranges' length of the Delta resemblingElsewhere() laid out last. */
  private resembledLength = 0;
  /** Whether the resemblance cache pays for itself (the session tells it the WAN's rate). */
  readonly resemblanceWorth = new ResemblanceWorth();
  /** The reference the content index was built over. */
  private indexed: Uint32Array | null = null;
  readonly counts: TransferCounts = newCounts();
  layout: PageLayout | null = null;

  private readonly parser: StreamParser;
  private readonly retainer: PageRetainer;
  /** The stream's head and device-state tail, kept for rebuilding a whole stream from the store. */
  readonly parts: StreamParts;
  /** Input not yet sent: views of the pushed chunks, from stream offset `held.from` on; hashed as it goes. */
  private readonly held = new HeldInput(new StreamHash());
  private readonly sendPiece = (bytes: Buffer): void => this.sink.literal(bytes);
  private pushedEnd = 0;
  /** Stream offset just past the postcopy package (-1 until one has been read). */
  private packageEnd = -1;
  // The open run: consecutive held and fill pages of one block.
  private runOpen = false;
  /** Fill byte of the run's fill pages; -1 until one joins. */
  private runFill = -1;
  private runFlags = 0;
  private runBlock = -1;
  private runStart = 0;
  private runNext = 0;
  private runCount = 0;
  private runHeld = 0;
  private readonly runBitmap = Buffer.alloc(MAX_RUN_RECORDS / 8);
  private readonly runDigests = Buffer.alloc(MAX_RUN_HELD * DIGEST_BYTES);
  private readonly runDigest = Buffer.alloc(DIGEST_BYTES);
  /** Where the pages of reads not pushed yet lie (lookAhead()); walked up to stream offset walkedEnd. */
  private readonly walk = new RamRecordWalk(X86_PAGE_SIZE, (name) => this.blockNamed(name));
  private walkedEnd = 0;
  /** The read lookAhead() walked last (null: none yet). */
  private lookedAt: Buffer | null = null;
  /** Where the last RAM page or fill record read ended (stream offset; -1: none yet), and its block. */
  private lastRamEnd = -1;
  private lastRamBlock: RamBlock | null = null;

  constructor(
    private readonly sink: EncoderSink,
    store: RetainedPages | null,
    /** Called once the RAM block list is known, after the store has begun; may set `reference`. */
    private readonly onLayout: (layout: PageLayout) => void = () => undefined,
    /**
     * Pushed chunks are reused by the caller once push() returns (pooled socket reads): what the
     * encoder keeps of them past the call, it copies. Literal bytes handed to the sink are views
     * still; the sink must have sent or copied them before the caller reuses the chunk.
     */
    private readonly transientInput = false,
  ) {
    this.parts = new StreamParts();
    this.retainer = new PageRetainer(store);
    this.parser = new StreamParser((record) => this.onRecord(record));
  }

  /**
   * Stream bytes gone to the sink (as Literal bytes or as the Runs standing for them), and the XXH3-64
   * (hex) of those bytes: a Seal or the End frame carries both, and the receiver checks its rebuild
   * against them.
   */
  get sentBytes(): number {
    return this.held.from;
  }

  get streamCheck(): string {
    return this.held.digest();
  }

  /**
   * The stream offset a check must cover now (-1: none is due), with every byte before it sent: the
   * receiver can check the stream to there, and must, before the source can go on:
   * - it has been read to a point nothing can follow, and every byte of it has gone to the sink (the
   *   source does not close while QEMU's return path waits for the destination's verdict);
   * - or a postcopy package (the device state the destination loads before it runs the guest) has gone
   *   to the sink whole: the receiver holds it until a check covers it, and the source will not pause
   *   for it, since it goes on sending pages at once.
   */
  get sealPoint(): number {
    if (this.runOpen) return -1;
    if (this.parser.ended) return this.held.from === this.pushedEnd ? this.pushedEnd : -1;
    return this.packageEnd >= 0 && this.held.from >= this.packageEnd ? this.packageEnd : -1;
  }

  /**
   * Sends every byte pushed so far, where no later record can still turn any of them into a Run: in the
   * device-state tail, or once the stream is relayed verbatim. Returns whether it could. For a source
   * that goes quiet without closing (QEMU's return path waits for the destination, and in the QEMU 2.0
   * framing nothing marks the stream's end), so that the receiver can check the stream so far.
   */
  flush(): boolean {
    // After a postcopy package RAM records follow again: one cut short here could not join a run later.
    const inTail = this.parts.tailStart >= 0 && !this.parts.postcopyStarted;
    if (!inTail && this.parser.fallenBack === null) return false;
    this.closeRun();
    this.sendLiteral(this.pushedEnd);
    return true;
  }

  /** Where and why the stream stopped being parsed (null: it was parsed whole). */
  get fallback(): StreamFallback | null {
    return this.parser.fallenBack;
  }

  /** The stream switched to postcopy. */
  get postcopy(): boolean {
    return this.parts.postcopyStarted;
  }

  /** The source advised postcopy with postcopy-ram on: a postcopy-preempt channel may come. */
  get postcopyAdvised(): boolean {
    return this.parser.postcopyAdvised;
  }

  /** Whether sections end with footers (null until the stream shows it). */
  get footers(): boolean | null {
    return this.parser.framing.footers;
  }

  /**
   * Whether reads are worth walking ahead (lookAhead()): the store reads a changed page's held version
   * before writing the new one, and can read it ahead. The caller may then hold a read back until the
   * next has come, so that the store reads the held read's changed pages while the one before is pushed.
   */
  get readsAhead(): boolean {
    return this.retainer.prefetchesChanged() && this.parser.fallenBack === null && (this.multifd === null || this.multifd.mainOnly);
  }

  /**
   * `next` is the read to be pushed after the one the caller holds and has not pushed yet (`held`; null: none):
   * where its page records lie is walked from those before it (or from the parser's position, once it has
   * pushed them), its pages are digested now for push() to take, and the store reads ahead the held
   * versions of those that changed. Only a hint: push() checks every digest it takes against the record
   * the parser finds. Once per read; a read the walk cannot place is passed over.
   */
  lookAhead(next: Buffer, held: Buffer | null): void {
    if (!this.readsAhead) return;
    // Each read is walked once: one whose walk was lost in it would be lost there again.
    if (next === this.lookedAt) return;
    const start = this.pushedEnd + (held?.length ?? 0);
    if (this.walkedEnd !== start) this.walk.lose(); // a read pushed without being walked
    if (!this.walk.synced) return;
    // The held read, walked just before: a page that it and `next` both hold part of is read ahead too.
    const before = held !== null && held === this.lookedAt ? held : null;
    this.lookedAt = next;
    this.walkedEnd = start + next.length;
    this.retainer.lookAhead(next, this.walk, before);
  }

  /** The RAM block of that name in the stream's block list, or null. */
  private blockNamed(name: string): RamBlock | null {
    const blocks = this.parser.ramBlocks;
    for (let i = 0; i < blocks.length; i++) if (blocks[i].name === name) return blocks[i];
    return null;
  }

  /**
   * After a push: a walk lost (by records it does not know, or by reads pushed without it) starts again
   * where the last RAM record the parser read ended, if that was in this read, and walks the rest of it.
   */
  private walkOnFrom(chunk: Buffer): void {
    if (this.walk.synced && this.walkedEnd >= this.pushedEnd) return;
    const chunkStart = this.pushedEnd - chunk.length;
    const block = this.lastRamBlock;
    if (block === null || this.lastRamEnd < chunkStart || !this.readsAhead) {
      this.walk.lose();
      return;
    }
    this.walk.resync(chunk, this.lastRamEnd - chunkStart, block);
    this.walkedEnd = this.pushedEnd;
  }

  /** Throws StreamError on malformed input. */
  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.advanceContentIndex();
    this.counts.streamBytes += chunk.length;
    this.held.push(chunk);
    this.pushedEnd += chunk.length;
    this.parts.feed(chunk);
    this.retainer.newInput(chunk);
    this.parser.push(chunk);
    this.walkOnFrom(chunk);
    // Bytes of records the parser has finished can go; a record still being read may yet join a run.
    this.sendLiteral(Math.max(this.held.from, this.parser.recordsEnd));
    // Once the destination runs the guest (postcopy), a page it asked for must not wait in an open run
    // for pages that may never come: every run ends with the chunk it arrived in.
    if (this.packageEnd >= 0 && this.parser.recordsEnd >= this.packageEnd) this.closeRun();
    if (this.transientInput) {
      this.ownHeld();
      this.parts.release();
    }
  }

  /** Replaces the views still held (the record being read, at most a page or so) by one copy. */
  private ownHeld(): void {
    if (this.held.chunks.length === 0) return;
    this.held.own(this.pushedEnd);
  }

  end(): void {
    this.parser.end();
    this.closeRun();
    this.sendLiteral(this.pushedEnd);
    this.multifd?.endMain();
  }

  /** The migration is over, whichever way: the resemblance cache's pages go back to the pool for the next one. */
  release(): void {
    this.resemblance?.release();
    this.resemblance = null;
  }

  /** Sends the input in [held.from, to) as Literal bytes and lets go of it. */
  private sendLiteral(to: number): void {
    this.consume(to, true);
  }

  /** Drops input a run stands for, up to stream offset `to`. */
  private skipTo(to: number): void {
    this.consume(to, false);
  }

  /**
   * Lets go of the input in [held.from, to), sending it as Literal bytes or not (a run stands for it);
   * the stream hash follows (HeldInput).
   */
  private consume(to: number, send: boolean): void {
    this.held.release(to, send ? this.sendPiece : null);
  }

  private onRecord(record: StreamRecord): void {
    switch (record.kind) {
      case RecordKind.RamPage:
      case RecordKind.RamZero:
      case RecordKind.RamXbzrle:
      case RecordKind.RamCompressed:
        this.onPage(record);
        return;
      case RecordKind.RamBlockList:
        this.closeRun();
        // The receiver must have the block list before anything onLayout sends (a table request).
        this.sendLiteral(this.parser.recordsEnd);
        this.layout = layoutOf(record.blocks);
        this.walk.lose();
        this.lastRamBlock = null;
        this.retainer.store?.begin(this.layout);
        this.onLayout(this.layout);
        return;
      case RecordKind.PackageEnd:
        this.closeRun();
        this.packageEnd = record.streamOffset;
        this.parts.record(record);
        return;
      default:
        this.closeRun();
        this.parts.record(record);
        this.multifd?.mainRecord(record.kind);
    }
  }

  private onPage(record: RamPageRecord): void {
    // The record ends where the parser stands (it calls us as soon as the record is read).
    this.lastRamEnd = this.parser.offset;
    this.lastRamBlock = record.block;
    if (this.multifd?.mainWriteKeeps(record.pageIndex)) this.keepVersion(record);
    const retainer = this.retainer;
    const known = retainer.digestOf(record);
    retainer.prefetchChangedAheadInStream(record);
    const word = record.pageIndex * DIGEST_WORDS;
    const reference = this.receiverTable?.bytes ?? null;
    const words = this.receiverTable?.words ?? null;
    const storeTable = retainer.store?.digests;
    // Only a page no multifd channel may still write an older version of is named by reference.
    const claim = this.multifd === null ? Claim.First : this.multifd.mainPage(record.pageIndex);
    const nameable = record.kind === RecordKind.RamPage && words !== null && claim === Claim.First;
    const held = nameable && sameDigestWords(words, word, retainer.digestWords, 0);
    // Resemblance is looked for in the main channel's pages while no multifd channel may write a base
    // meanwhile (the channels look for their own: elsewhereKey()), and only while the receiver's reads pay.
    this.pageResembles = nameable && !held && this.deltas && (this.multifd === null || this.multifd.mainOnly);
    this.pageKey = 0;
    if (record.kind === RecordKind.RamZero) {
      this.counts.pagesZero++;
      this.addToRun(false, record);
    } else if (held) {
      this.counts.pagesReused++;
      this.addToRun(true, record);
    } else if (nameable && this.deltas && this.sendDelta(record, reference as Uint8Array, words)) {
      // sent as a delta
    } else {
      this.closeRun();
      if (record.kind !== RecordKind.RamPage) this.counts.pagesOther++;
      else {
        this.counts.pagesSent++;
        if (claim !== Claim.First && words !== null && sameDigestWords(words, word, retainer.digestWords, 0)) this.counts.pagesUnordered++;
      }
    }
    // A multifd channel wrote a later version of the page already: this one is not kept.
    if (claim === Claim.Stale) return;
    retainer.retain(record, known);
    // A held page changes nothing the receiver holds: its reference entry and its content index slot stand
    // (a back leg is mostly held pages, and a slot costs a few cache misses to look at).
    if (held) return;
    // The receiver now holds this version of the page (or, for encoded pages, nothing we can name).
    if (words !== null && reference !== storeTable) words.set(known ? retainer.digestWords : ABSENT, word);
    if (known) this.keepForLater(record, retainer.digestWords, this.pageKey);
  }

  /**
   * A KeepVersion frame before the record: a multifd channel's Delta of this epoch went against the
   * page's earlier version (MultifdMigration.keepsBeforeWrite). What comes before the record goes first,
   * so the receiver counts the main channel's epoch as here.
   */
  private keepVersion(record: RamPageRecord): void {
    if (this.sink.keepVersion === undefined) return;
    this.closeRun();
    this.sendLiteral(record.streamOffset);
    this.sink.keepVersion(keepVersionPayload(this.deltaOut, record.pageIndex));
  }

  /** A source chunk came (on the main channel or a multifd channel): the content index, once begun, takes in its next slice. */
  advanceContentIndex(): void {
    if (this.contentIndex !== null && !this.contentIndex.filled) this.contentIndex.fill(CONTENT_INDEX_SLICE);
  }

  /**
   * The resemblance key to look for a page like this one by, and to keep it by for later pages (0: none
   * now): only while the receiver's reads pay (a delta against another page costs the receiver a read,
   * and keeping the pages sent in the cache a copy of each) and the cache pays for itself
   * (ResemblanceWorth). For the main channel's pages, and a multifd channel's (MultifdEncoder).
   */
  elsewhereKey(record: RamPageRecord): number {
    if (!this.receiverReadsPay) return 0;
    const worth = this.resemblanceWorth;
    if (!worth.on) {
      worth.passedOver();
      return 0;
    }
    return resemblanceKey(record.data, record.dataStart);
  }

  /**
   * A page sent (whole, or by a Delta or a reference) that the receiver now holds: indexed by content,
   * and kept by its resemblance key `key` (0: not kept), for later pages to be sent against it. For the
   * main channel's pages, and a multifd channel's (MultifdEncoder).
   */
  keepForLater(record: RamPageRecord, digestWords: Uint32Array, key: number): void {
    // Indexed only while pages are looked up in it: an add costs a cache miss or two, and a page left
    // out costs at most a match later (a hint table: a slot is believed only when the reference agrees).
    if (record.kind === RecordKind.RamPage && this.contentIndex !== null && this.receiverReadsPay) this.contentIndex.add(record.pageIndex, digestWords, 0);
    if (key !== 0 && this.layout !== null) {
      this.resemblance ??= new ResemblanceCache(this.layout.pageCount, X86_PAGE_SIZE);
      this.resemblance.add(key, record.pageIndex, record.data, record.dataStart, digestWords, 0);
      this.resemblanceWorth.pageKept();
    }
  }

  /**
   * Sends the page as a Delta, the first of these that serves: the ranges that changed from the version
   * of this page the receiver holds (when this site's store holds that same version); a reference to
   * another page the receiver holds with the same content, or to a sibling's; the ranges that differ
   * from a page sent lately that the receiver still holds and that resembles it (resemblance-cache.ts),
   * when the ranges are few. False when the page must go whole.
   */
  private sendDelta(record: RamPageRecord, reference: Uint8Array, words: Uint32Array): boolean {
    const page = record.pageIndex;
    const digest = this.retainer.digest;
    const digestWords = this.retainer.digestWords;
    // The page's own version first (a multifd channel's pages, too, try it before a match): a back leg's
    // changed pages go against it, and so neither rent the content index (a match would save them a few
    // dozen bytes, for a read elsewhere at the receiver) nor fill the resemblance cache with pages whose
    // own version is their base.
    if (this.retainer.store !== null && !isAbsentDigest(words, page * DIGEST_WORDS) && this.ownVersionTries.tryNow()) {
      const length = this.rangesFromOwnVersion(record, reference);
      if (length >= 0) {
        this.ownVersionTries.hit();
        this.emitDelta(page, page, this.baseDigest, 0, length, -1);
        this.counts.pagesDelta++;
        return true;
      }
      if (length === NO_DELTA) this.ownVersionTries.miss();
    }
    // Kept for later pages like it (keepForLater) whether it goes whole, matched or against a page alike.
    if (this.pageResembles) this.pageKey = this.elsewhereKey(record);
    // A match, in this VM or in a sibling, costs the receiver a store read of the page it copies, which
    // this side cannot time: paid only while reads are free or the receiver reads ahead. On a fast link a
    // busy receiver's reads, one after another, cost more than the page's WAN time.
    const match = this.matchElsewhere(words, digestWords, null);
    if (match >= 0) {
      this.emitDelta(page, match, digest, 0, 0, -1);
      this.counts.pagesMatched++;
      return true;
    }
    const siblings = this.siblings;
    if (siblings !== null && this.siblingsPay && siblings.find(page, digestWords, 0)) {
      this.emitDelta(page, siblings.page, digest, 0, 0, siblings.sibling);
      this.counts.pagesSibling++;
      return true;
    }
    // A page like one sent lately: the receiver reads the base as for a match, this side has it in memory.
    const entry = this.resemblingElsewhere(record, words, this.pageKey, null);
    if (entry < 0) return false;
    const cache = this.resemblance as ResemblanceCache;
    this.emitDelta(page, cache.pageOf(entry), cache.digests, entry * DIGEST_BYTES, this.resembledLength, -1);
    this.counts.pagesDelta++;
    return true;
  }

  /**
   * Another page the receiver holds (by `words`) with the content of `digestWords`, that `usable` accepts
   * (null: any): from the content index, only while the receiver's reads pay. -1 for none.
   */
  private matchElsewhere(words: Uint32Array, digestWords: Uint32Array, usable: ((base: number) => boolean) | null): number {
    if (!this.receiverReadsPay) return -1;
    const index = this.contentIndexOf(words);
    const match = index === null ? -1 : index.find(digestWords, 0);
    return match >= 0 && (usable === null || usable(match)) ? match : -1;
  }

  /**
   * A page sent lately, like the record's page (resemblance key `key`), that the receiver (by `words`)
   * still holds and `usable` accepts (null: any), whose ranges differing from it are few: lays them out
   * in deltaOut (their length in resembledLength) and returns its resemblance-cache entry; -1 for none.
   */
  private resemblingElsewhere(record: RamPageRecord, words: Uint32Array, key: number, usable: ((base: number) => boolean) | null): number {
    const cache = this.resemblance;
    if (!this.receiverReadsPay || key === 0 || cache === null) return -1;
    const entry = cache.find(key);
    if (entry < 0) return -1;
    const base = cache.pageOf(entry);
    // The receiver must still hold, at `base`, the very content kept here.
    if (!sameDigestWords(words, base * DIGEST_WORDS, cache.digestWords, entry * DIGEST_WORDS)) return -1;
    if (usable !== null && !usable(base)) return -1;
    if (!this.resemblanceTries.tryNow()) return -1;
    const out = this.deltaOut.reserve(DELTA_HEADER_BYTES + MAX_DELTA_BYTES);
    const length = encodePageDelta(cache.content(), entry * X86_PAGE_SIZE, record.data, record.dataStart, X86_PAGE_SIZE, out, DELTA_HEADER_BYTES, MAX_DELTA_BYTES);
    if (length < 0) {
      this.resemblanceTries.miss();
      return -1;
    }
    this.resemblanceTries.hit();
    this.resemblanceWorth.delta(X86_PAGE_SIZE - DELTA_HEADER_BYTES - length);
    this.resembledLength = length;
    return entry;
  }

  /**
   * For a multifd channel's page that goes neither in a Run nor against its own version (MultifdEncoder):
   * a Delta payload against another page the receiver holds (by `words`) that `usable` accepts, with the
   * same content or content like it (resemblance key `key`), found as for the main channel's pages; null
   * for none. `digest`, `digestWords`: the page's digest. A payload without ranges is a content match.
   */
  deltaElsewhere(record: RamPageRecord, words: Uint32Array, digest: Uint8Array, digestWords: Uint32Array, key: number, usable: (base: number) => boolean): Buffer | null {
    const match = this.matchElsewhere(words, digestWords, usable);
    if (match >= 0) return this.layOutDelta(record.pageIndex, match, digest, 0, 0, -1, digest);
    const entry = this.resemblingElsewhere(record, words, key, usable);
    if (entry < 0) return null;
    const cache = this.resemblance as ResemblanceCache;
    return this.layOutDelta(record.pageIndex, cache.pageOf(entry), cache.digests, entry * DIGEST_BYTES, this.resembledLength, -1, digest);
  }

  /** Whether a Delta that only the receiver reads a base for is worth its read there. */
  private get receiverReadsPay(): boolean {
    return this.deltaReadsFree || this.receiverReadsAhead;
  }

  /** Whether a reference to a sibling's page is worth the receiver's read of it (the multifd channels ask too). */
  get siblingsPay(): boolean {
    return this.receiverReadsPay;
  }

  /**
   * Lays out in `deltaOut` the ranges by which the record's page differs from the version the receiver
   * holds, read from this site's store into `basePage` (its digest in `baseDigest`). Returns their
   * length; NO_DELTA when they are too many, NOT_READ when this store does not hold the receiver's
   * version or a read now would cost too much.
   */
  private rangesFromOwnVersion(record: RamPageRecord, reference: Uint8Array): number {
    const store = this.retainer.store;
    if (store === null) return NOT_READ;
    const base = record.pageIndex;
    const baseAt = base * DIGEST_BYTES;
    if (reference !== store.digests && !sameDigest(reference, baseAt, store.digests, baseAt)) return NOT_READ;
    // A read the store makes anyway before it writes the page's new version (its undo journal saving the
    // old one takes it from this read) costs nothing a page sent whole would not: made whatever it takes.
    const shared = store.readsBeforeWrite?.(base) === true;
    // Slow reads (a busy disk, a page still in the store's write queue) are tried again now and then.
    if (!this.deltaReadsFree && !shared && bitCount16(this.slowReads) > 8 && (++this.deltaProbe & 63) !== 0) return NOT_READ;
    const readAt = performance.now();
    try {
      // The journal's read is of a lone page, read ahead with the changed pages near it
      // (prefetchChangedAheadInStream): as a series it started the store's stream read-ahead, which then
      // read everything held after it. Any other (of a page this migration wrote already) stays a series.
      store.readPages(base, 1, this.basePage, 0, !shared);
    } catch {
      return NOT_READ; // not readable here: the page goes whole
    }
    if (!shared) {
      const slow = (performance.now() - readAt) * 1000 > DELTA_READ_BUDGET_US;
      this.slowReads = ((this.slowReads << 1) | (slow ? 1 : 0)) & 0xffff;
    }
    digestOne(this.basePage, 0, X86_PAGE_SIZE, this.baseDigest, 0);
    if (!sameDigest(this.baseDigest, 0, reference, baseAt)) return NOT_READ;
    const out = this.deltaOut.reserve(DELTA_HEADER_BYTES + MAX_DELTA_BYTES);
    const length = encodePageDelta(this.basePage, 0, record.data, record.dataStart, X86_PAGE_SIZE, out, DELTA_HEADER_BYTES, MAX_DELTA_BYTES);
    return length < 0 ? NO_DELTA : length;
  }

  /**
   * Completes the Delta laid out in `deltaOut` (its ranges already there, `length` bytes) and returns its
   * payload, now the caller's: page `page` (of digest `newDigest`) from `base` (of digest
   * baseDigest[baseAt…]), in `sibling`'s snapshot (its place in the Offer's list) as a SiblingDelta when
   * that is not -1 (then with no ranges).
   */
  private layOutDelta(page: number, base: number, baseDigest: Uint8Array, baseAt: number, length: number, sibling: number, newDigest: Uint8Array): Buffer {
    const lead = sibling >= 0 ? SIBLING_DELTA_LEAD_BYTES : 0;
    const out = this.deltaOut.reserve(lead + DELTA_HEADER_BYTES + length);
    if (lead > 0) out[0] = sibling;
    writeDeltaHeader(out, lead, page, base, baseDigest, baseAt, newDigest);
    return this.deltaOut.take(lead + DELTA_HEADER_BYTES + length);
  }

  /** Lays out the Delta (as layOutDelta) of the record being read and sends it in its place. */
  private emitDelta(page: number, base: number, baseDigest: Uint8Array, baseAt: number, length: number, sibling: number): void {
    const lead = sibling >= 0 ? SIBLING_DELTA_LEAD_BYTES : 0;
    const payload = this.layOutDelta(page, base, baseDigest, baseAt, length, sibling, this.retainer.digest);
    this.closeRun();
    // The record's header goes as it is; the Delta stands for its page data, the record's last bytes.
    this.sendLiteral(this.parser.offset - X86_PAGE_SIZE);
    const send = lead > 0 ? this.sink.siblingDelta : this.sink.delta;
    if (!send) throw new Error('StreamEncoder: deltas are on but the sink takes no Delta frames');
    send.call(this.sink, payload);
    this.skipTo(this.parser.offset);
    this.counts.deltaBytes += payload.length;
  }

  /**
   * The content index over what `reference` says the receiver holds, filled CONTENT_INDEX_SLICE pages a
   * time once begun (here and at each chunk pushed); null while it would not pay yet.
   *
   * Building it costs the gateway CONTENT_INDEX_US_PER_PAGE a guest page, and pays only if pages turn up
   * that the receiver holds elsewhere: a back leg may change a few dozen pages, none of them moved. So it
   * is begun once the pages that could have looked in it have cost, crossing the WAN whole, what building
   * it costs (rent, then buy): a leg that needed it loses the matches of those pages (200 of them for a
   * 256 MiB guest at 1 Gbit/s, 20 at 100 Mbit/s), one that did not spends at most that much on it.
   */
  private contentIndexOf(reference: Uint32Array): ContentIndex | null {
    if (this.contentIndex === null) {
      const cost = (reference.length / DIGEST_WORDS) * CONTENT_INDEX_US_PER_PAGE;
      if (this.pageWanUs > 0 && this.indexRentUs < cost) {
        this.indexRentUs += this.pageWanUs;
        return null;
      }
    }
    if (this.contentIndex === null || this.indexed !== reference) {
      this.contentIndex = new ContentIndex(reference.length / DIGEST_WORDS, reference);
      this.contentIndex.fill(CONTENT_INDEX_SLICE);
      this.indexed = reference;
    }
    return this.contentIndex;
  }

  private addToRun(held: boolean, record: RamPageRecord): void {
    const joins =
      this.runOpen &&
      record.block.index === this.runBlock &&
      record.offset === this.runNext &&
      record.flags === continuingFlags(held) &&
      this.runCount < MAX_RUN_RECORDS &&
      (held ? this.runHeld < MAX_RUN_HELD : this.runFill < 0 || this.runFill === record.byteValue);
    if (!joins) {
      this.closeRun();
      this.sendLiteral(record.streamOffset); // what comes before the run goes first
      this.runOpen = true;
      this.runFill = -1;
      this.runFlags = record.flags;
      this.runBlock = record.block.index;
      this.runStart = record.offset;
      this.runCount = 0;
      this.runHeld = 0;
      this.runBitmap.fill(0);
    }
    if (held) {
      this.retainer.digest.copy(this.runDigests, this.runHeld * DIGEST_BYTES);
      this.runHeld++;
      this.runBitmap[this.runCount >>> 3] |= 1 << (this.runCount & 7);
    } else {
      this.runFill = record.byteValue;
    }
    this.runCount++;
    this.runNext = record.offset + X86_PAGE_SIZE;
    // The record ends where the parser stands: it calls us as soon as the record is read.
    this.skipTo(this.parser.offset);
  }

  private closeRun(): void {
    if (!this.runOpen) return;
    digestOne(this.runDigests, 0, this.runHeld * DIGEST_BYTES, this.runDigest, 0);
    this.sink.run(encodeRun(Math.max(this.runFill, 0), this.runFlags, this.runBlock, this.runCount, this.runStart, this.runDigest, this.runBitmap));
    this.runOpen = false;
  }
}
