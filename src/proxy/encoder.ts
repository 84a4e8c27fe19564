import { DIGEST_BYTES, digestOne, StreamHash } from '../digest';
import { X86_PAGE_SIZE } from '../qemu/constants';
import { StreamParser } from '../qemu/parser';
import { type RamPageRecord, RecordKind, type StreamFallback, type StreamRecord } from '../qemu/records';
import { encodeRun, MAX_RUN_HELD, MAX_RUN_RECORDS } from './run';
import { StreamParts } from './stream-parts';
import { continuingFlags, layoutOf, type PageLayout, PageRetainer, type RetainedPages, sameDigest } from './retained';

/** Where the encoder's output goes: in stream order, Literal bytes and Run payloads. */
export interface EncoderSink {
  literal(bytes: Buffer): void;
  run(payload: Buffer): void;
}

export interface TransferCounts {
  /** QEMU stream bytes. */
  streamBytes: number;
  /** Normal pages sent in full. */
  pagesSent: number;
  /** Normal pages the receiver rebuilt from its store. */
  pagesReused: number;
  /** QEMU zero (fill) pages. */
  pagesZero: number;
  /** XBZRLE and compressed pages, passed on as they are. */
  pagesOther: number;
}

export const newCounts = (): TransferCounts => ({ streamBytes: 0, pagesSent: 0, pagesReused: 0, pagesZero: 0, pagesOther: 0 });

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
  reference: Uint8Array | null = null;
  readonly counts: TransferCounts = newCounts();
  layout: PageLayout | null = null;
  /** Of the stream pushed so far, for the End message. */
  private readonly streamHash = new StreamHash();
  /** The stream hash covers [0, hashedTo); heldFrom ≤ hashedTo ≤ literalFrom. */
  private hashedTo = 0;

  private readonly parser: StreamParser;
  private readonly retainer: PageRetainer;
  /** The stream's head and device-state tail, kept for rebuilding a whole stream from the store. */
  readonly parts: StreamParts;
  /** Input not yet sent: views of the pushed chunks, from stream offset `literalFrom` on. */
  private held: Buffer[] = [];
  private heldFrom = 0;
  private literalFrom = 0;
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
    return this.literalFrom;
  }

  get streamCheck(): string {
    this.hashConsumedHead();
    return this.streamHash.digest();
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
    if (this.parser.ended) return this.literalFrom === this.pushedEnd ? this.pushedEnd : -1;
    return this.packageEnd >= 0 && this.literalFrom >= this.packageEnd ? this.packageEnd : -1;
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

  /** Throws StreamError on malformed input. */
  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.counts.streamBytes += chunk.length;
    this.held.push(chunk);
    this.pushedEnd += chunk.length;
    this.parts.feed(chunk);
    this.parser.push(chunk);
    // Bytes of records the parser has finished can go; a record still being read may yet join a run.
    this.sendLiteral(Math.max(this.literalFrom, this.parser.recordsEnd));
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
    if (this.held.length === 0) return;
    // What has gone of the first chunk is dropped here: hash it first.
    this.hashConsumedHead();
    const from = this.literalFrom;
    const copy = Buffer.allocUnsafe(this.pushedEnd - from);
    let at = 0;
    let chunkStart = this.heldFrom;
    for (const chunk of this.held) {
      const start = Math.max(0, from - chunkStart);
      at += chunk.copy(copy, at, start);
      chunkStart += chunk.length;
    }
    this.held = [copy];
    this.heldFrom = from;
  }

  end(): void {
    this.parser.end();
    this.closeRun();
    this.sendLiteral(this.pushedEnd);
  }

  /** Sends the input in [literalFrom, to) as Literal bytes and lets go of it. */
  private sendLiteral(to: number): void {
    this.consume(to, true);
  }

  /** Drops input a run stands for, up to stream offset `to`. */
  private skipTo(to: number): void {
    this.consume(to, false);
  }

  /**
   * Lets go of the input in [literalFrom, to), sending it as Literal bytes or not (a run stands for it).
   * The stream hash follows what has been let go of, so that it covers exactly the stream a Seal at
   * `sentBytes` covers: a chunk is hashed whole once it has all gone (one call per chunk, not one per
   * record), the rest of the first one only when a check is asked for.
   */
  private consume(to: number, send: boolean): void {
    while (this.literalFrom < to) {
      const chunk = this.held[0];
      const start = this.literalFrom - this.heldFrom;
      const end = Math.min(chunk.length, to - this.heldFrom);
      if (send) this.sink.literal(chunk.subarray(start, end));
      this.literalFrom = this.heldFrom + end;
      if (end === chunk.length) {
        this.streamHash.update(this.hashedTo > this.heldFrom ? chunk.subarray(this.hashedTo - this.heldFrom) : chunk);
        this.held.shift();
        this.heldFrom += chunk.length;
        this.hashedTo = this.heldFrom;
      }
    }
  }

  /** Hashes what has gone of the first held chunk (everything before it is hashed already). */
  private hashConsumedHead(): void {
    if (this.literalFrom <= this.hashedTo) return;
    this.streamHash.update(this.held[0].subarray(this.hashedTo - this.heldFrom, this.literalFrom - this.heldFrom));
    this.hashedTo = this.literalFrom;
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
    }
  }

  private onPage(record: RamPageRecord): void {
    const retainer = this.retainer;
    const known = retainer.digestOf(record);
    const at = record.pageIndex * DIGEST_BYTES;
    const reference = this.reference;
    const storeTable = retainer.store?.digests;
    if (record.kind === RecordKind.RamZero) {
      this.counts.pagesZero++;
      this.addToRun(false, record);
    } else if (record.kind === RecordKind.RamPage && reference !== null && sameDigest(reference, at, retainer.digest, 0)) {
      this.counts.pagesReused++;
      this.addToRun(true, record);
    } else {
      this.closeRun();
      if (record.kind === RecordKind.RamPage) this.counts.pagesSent++;
      else this.counts.pagesOther++;
    }
    // The receiver now holds this version of the page (or, for encoded pages, nothing we can name).
    if (reference !== null && reference !== storeTable) {
      if (known) reference.set(retainer.digest, at);
      else reference.fill(0, at, at + DIGEST_BYTES);
    }
    retainer.retain(record, known);
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
