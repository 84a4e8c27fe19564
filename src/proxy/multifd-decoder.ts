import { DIGEST_BYTES, DIGEST_WORDS, digestContiguous, digestOne, digestWords, isAbsentDigest, sameDigestWords, zeroPageDigest } from '../digest';
import { X86_PAGE_SIZE } from '../qemu/constants';
import { type MultifdPacketRecord, type MultifdPageRecord, MultifdRecordKind } from '../qemu/multifd';
import type { RamBlock, RamPageRecord } from '../qemu/records';
import { errorMessage } from '../common/errors';
import { Fifo } from '../common/fifo';
import { RebuildError } from './rebuild-error';
import { MultifdChannel } from './multifd-channel';
import { Claim, type MultifdMigration } from './multifd-migration';
import { applyPageDelta, DELTA_AHEAD_BYTES, DELTA_BASE_DIGEST_AT, DELTA_HEADER_BYTES, DELTA_NEW_DIGEST_AT, keepVersionPage, MAX_DELTA_BYTES, SIBLING_DELTA_LEAD_BYTES } from './page-delta';
import { PACKET_HEADER_BYTES, PacketHeaders } from './packet-header';
import { holdsVersion, sameDigest } from './retained';
import { BASES_WINDOW, ReadsAhead, runsWindow } from './reads-ahead';
import type { RecentPages } from './recent-pages';
import { decodeRun, MAX_RUN_HELD, runPlace } from './run';
import { copyBytes } from '../common/copy';

/** The frames a channel takes. */
type ChannelFrame = 'literal' | 'header' | 'run' | 'delta' | 'sibling' | 'keep' | 'check';

/** A frame that arrived while the channel was parked: a copy, replayed once it may go on. */
interface QueuedFrame {
  kind: ChannelFrame;
  payload: Buffer;
  /** A check's XXH3-64 (its length is in `checkBytes`). */
  check?: string;
  checkBytes?: number;
}

/**
 * Most bytes a channel holds back from its destination until a check covers them: a SYNC packet, which
 * before QEMU 9.0 may carry a packet's pages (128 of 4 KiB), and its header.
 */
export const MAX_HELD_SYNC_BYTES = 4 * 1024 * 1024;

const EMPTY = Buffer.alloc(0);

/**
 * The receiving gateway's codec for one multifd channel: turns MultifdEncoder's Literal bytes and Run
 * payloads back into the channel's exact bytes. API, beside the main channel's StreamDecoder:
 *
 *   const migration = new MultifdMigration(store, channelCount);   // one per migration
 *   mainDecoder = new StreamDecoder(out, store, (layout) => migration.begin(layout));
 *   const channel = new MultifdDecoder(channelOut, migration);      // per channel
 *   channel.literal(bytes) | channel.run(payload) | channel.check(streamBytes, streamCheck) …
 *   channel.end(streamBytes, streamCheck);
 *
 * A Run stands for the next `count` normal pages of the packet being rebuilt, whose header (with the
 * pages' offsets) came before it, as Literal bytes or a PacketHeader frame: it must start at the page the header lists next, in
 * the block the header names. Its pages are read from the store and checked against the sender's digest
 * before a byte of them goes to `out`. A Delta (Feature.ChannelDeltas) stands for the next normal page
 * alone: its version held here, patched, checked against both of the sender's digests. A PacketHeader
 * frame (Feature.ChannelPacketHeaders) stands for a packet's header and offsets, rebuilt from the
 * channel's previous one (proxy/packet-header.ts) and taken as Literal bytes are. The rebuilt
 * channel is parsed again as it goes out, which keeps
 * the store in step exactly as on the sending side. `parked` (see MultifdMigration): the channel waits
 * at a SYNC for the others; frames given meanwhile are copied and queued, so the caller should stop
 * reading this channel's frames until it clears. end() checks the channel's length and XXH3-64 (once
 * the channel has read on, if it is parked), as check() does after each SYNC packet (holdsSyncs).
 */
export class MultifdDecoder extends MultifdChannel {
  private readonly queued = new Fifo<QueuedFrame>();
  /** The channel's previous header that came as a PacketHeader frame (proxy/packet-header.ts). */
  private readonly headers = new PacketHeaders();
  /** Pages of the run being parsed again: read from the store already, nothing to keep. */
  private replaying = 0;
  private readonly digests = Buffer.allocUnsafe(MAX_RUN_HELD * DIGEST_BYTES);
  /** A Delta's base page, read from the store (or kept from the epoch's start). */
  private readonly basePage = Buffer.allocUnsafe(X86_PAGE_SIZE);
  /** The page being parsed again was rebuilt from a Delta: counted as one. */
  private replayingDelta = false;
  private readonly runDigest = Buffer.alloc(DIGEST_BYTES);
  /** Run frames seen ahead (aheadOfRun) and rebuilt, counted alike; their pages read ahead. */
  private runsSeen = 0;
  private runsRebuilt = 0;
  private runsAhead: ReadsAhead | null = null;
  /** Delta frames seen ahead (aheadOfDelta) and rebuilt, counted alike; their bases read ahead. */
  private deltasSeen = 0;
  private deltasRebuilt = 0;
  private deltasAhead: ReadsAhead | null = null;
  /** SiblingDelta frames seen ahead (aheadOfSibling) and rebuilt; their pages read ahead, a window per sibling. */
  private siblingsSeen = 0;
  private siblingsRebuilt = 0;
  private readonly siblingsAhead: (ReadsAhead | null)[] = [];
  /** The store's digest table as words, and an all-zero page's digest: where a Run's records lie (runSpan). */
  private spanTable: Uint32Array | null = null;
  private readonly zeroWords = digestWords(zeroPageDigest(X86_PAGE_SIZE));
  /** Pages [runAheadFirst, runAheadEnd) of the store: what the last Run seen ahead has read ahead. */
  private runAheadFirst = 0;
  private runAheadEnd = 0;
  /**
   * The sender checks the channel after every SYNC packet (its Hello said so): each SYNC packet, and what
   * follows it, is held back from the destination until such a check has passed. A destination QEMU
   * loads the device state only once every channel's last SYNC packet is in, so a byte damaged between
   * the gateways on a channel fails the migration before it can run.
   */
  holdsSyncs = false;
  /** Stream offsets where SYNC packets start that no check has covered yet. */
  private readonly syncsUnchecked = new Fifo<number>();
  /** Rebuilt bytes held back from the destination (copies), from the first unchecked SYNC packet on. */
  private heldOut: Buffer[] = [];
  private heldOutBytes = 0;

  constructor(
    /** Receives the rebuilt channel; it owns each buffer (Literal bytes: views of what literal() got). */
    private readonly out: (bytes: Buffer) => void,
    migration: MultifdMigration,
    /** Where a Run's pages are laid out; `out` then owns the buffer. */
    private readonly allocate: (size: number) => Buffer = (size) => Buffer.allocUnsafe(size),
  ) {
    super(migration);
  }

  get parked(): boolean {
    return this.parser.isPaused || this.queued.length > 0;
  }

  get checkDue(): boolean {
    return this.syncsUnchecked.length > 0 && this.queued.length === 0;
  }

  /** Parked at a SYNC, or holding a frame back (see waits()). */
  override mayReadOn(): boolean {
    if (this.parser.isPaused) return super.mayReadOn();
    const first = this.queued.peek();
    return first !== undefined && !this.waits(first.kind, first.payload);
  }

  /** Bytes rebuilt and handed on. */
  get streamBytes(): number {
    return this.counts.streamBytes;
  }

  get streamCheck(): string {
    return this.streamHash.digest();
  }

  literal(bytes: Buffer): void {
    this.frame('literal', bytes);
  }

  /**
   * The buffer of the Literal bytes last given is about to be read into again (pooled socket reads):
   * what a parser parked at a SYNC has not read of them is copied. Frames queued while parked are copies.
   */
  releaseInput(): void {
    this.parser.ownInput();
  }

  /** A PacketHeader frame (Feature.ChannelPacketHeaders): a packet's header and offsets, coded against the channel's previous one. */
  packetHeader(payload: Buffer): void {
    this.frame('header', payload);
  }

  /** Header bytes PacketHeader frames kept off the WAN. */
  get headerSavedBytes(): number {
    return this.headers.savedBytes;
  }

  run(payload: Buffer): void {
    this.frame('run', payload);
  }

  delta(payload: Buffer): void {
    this.frame('delta', payload);
  }

  /** A SiblingDelta frame (Feature.ChannelSiblings): the packet's next normal page, from a sibling's page. */
  siblingDelta(payload: Buffer): void {
    this.frame('sibling', payload);
  }

  /**
   * A KeepVersion frame (Feature.ChannelEarlierBases): the page it names is written next in this epoch,
   * and a Delta of the epoch on another channel may go against the version held now (taken in order).
   */
  keepVersion(payload: Buffer): void {
    this.frame('keep', payload);
  }

  /**
   * A check of the channel after a SYNC packet (the sender's Seal frame): taken in order, once the
   * frames before it have been rebuilt; what it covers goes on to the destination if it matches. A
   * channel parked at that SYNC has rebuilt it already: the check passes at once, and the destination
   * has the SYNC packet while the gateways' barrier still waits for another channel (QEMU's destination
   * closes a channel it is done with, whatever the gateways' codecs wait for).
   */
  check(streamBytes: number, streamCheck: string): void {
    if (this.queued.length > 0) {
      this.queued.push({ kind: 'check', payload: EMPTY, check: streamCheck, checkBytes: streamBytes });
      return;
    }
    this.checkRebuilt(streamBytes, streamCheck);
  }

  /**
   * The sender's channel ended: the rebuilt channel must be complete, of its length and XXH3-64; `ended`
   * is called once that check has passed (at once, or when a parked channel has read on).
   */
  end(streamBytes: number, streamCheck: string, ended: () => void = () => undefined): void {
    this.endWhenDrained(() => {
      this.parser.end();
      this.ended = true;
      this.checkRebuilt(streamBytes, streamCheck);
      ended();
    });
    this.migration.settle();
  }

  /** The channel rebuilt so far must be `streamBytes` long with XXH3-64 `streamCheck`: then nothing need be held back. */
  private checkRebuilt(streamBytes: number, streamCheck: string): void {
    if (streamBytes !== this.counts.streamBytes) throw new RebuildError(`rebuilt ${this.counts.streamBytes} bytes of a multifd channel, the source sent ${streamBytes}`);
    const rebuilt = this.streamHash.digest();
    if (rebuilt !== streamCheck) throw new RebuildError(`the rebuilt multifd channel's XXH3-64 is ${rebuilt}, the source's ${streamCheck}`);
    this.syncsUnchecked.clear();
    const held = this.heldOut;
    this.heldOut = [];
    this.heldOutBytes = 0;
    for (const bytes of held) this.out(bytes);
  }

  unpark(): void {
    this.parser.resume();
    for (let frame = this.queued.peek(); frame !== undefined && !this.parser.isPaused && !this.waits(frame.kind, frame.payload); frame = this.queued.peek()) {
      this.queued.shift();
      if (frame.kind === 'check') this.checkRebuilt(frame.checkBytes as number, frame.check as string);
      else this.apply(frame.kind, frame.payload);
    }
    this.afterUnpark();
  }

  /**
   * A Run or a Delta (each names the version of a page held here) waits until the main channel has passed
   * its epoch (see MultifdMigration), and a Delta against another page until that page's write in this
   * epoch, on whatever channel, has been rebuilt here (MultifdMigration.elsewhere); Literal bytes and a
   * sibling's page (a snapshot pinned for the whole migration) do not.
   */
  private waits(kind: ChannelFrame, payload: Buffer): boolean {
    if (kind !== 'run' && kind !== 'delta') return false;
    if (!this.migration.mainReached(this.syncs)) return true;
    return kind === 'delta' && this.baseToCome(payload);
  }

  /**
   * A Delta against another page whose write in this epoch has not been rebuilt here yet, and still may
   * be. Not for one rebuilding rejects anyway (not for the packet's next page, no such page), nor once
   * every other channel and the main channel have left the epoch (a hostile peer's: nothing can write
   * that base in it any more, and rebuilding fails at once rather than at the idle limit).
   */
  private baseToCome(payload: Buffer): boolean {
    if (payload.length < DELTA_HEADER_BYTES) return false;
    const page = payload.readUInt32BE(0);
    const base = payload.readUInt32BE(4);
    if (base === page || page !== this.nextPage() || !this.migration.hasPage(base) || this.migration.writtenIn(base, this.syncs)) return false;
    // A version held here has the digest it names already: one of an earlier epoch, or the same content.
    if (this.findBase(base, payload, false)) return false;
    // The main channel, ahead, wrote it already: the version of this epoch is kept once a channel's write of it, dropped, has come.
    const migration = this.migration;
    if (migration.writtenAfter(base, this.syncs)) return migration.overtaken?.epochOf(base) !== this.syncs && !migration.epochOverFor(this);
    return !migration.epochOverFor(this);
  }

  /** The page the packet being rebuilt lists next (-1: none). */
  private nextPage(): number {
    const next = this.parser.nextPageIndex;
    const packet = this.parser.currentPacket;
    const block = this.block;
    if (next < 0 || block === null || next >= packet.normalPages) return -1;
    return block.firstPage + packet.offsets[next] / X86_PAGE_SIZE;
  }

  private frame(kind: ChannelFrame, payload: Buffer): void {
    if (this.parked || this.waits(kind, payload)) {
      this.queued.push({ kind, payload: Buffer.from(payload) });
      return;
    }
    this.apply(kind, payload);
    this.migration.settle();
  }

  private apply(kind: ChannelFrame, payload: Buffer): void {
    if (kind === 'run') this.rebuildRun(payload);
    else if (kind === 'delta') this.rebuildDelta(payload);
    else if (kind === 'sibling') this.rebuildSibling(payload);
    else if (kind === 'keep') this.keepFrame(payload);
    else if (kind === 'header') this.rebuildHeader(payload);
    else this.rebuilt(payload);
  }

  /** The bytes a PacketHeader frame stands for, passed on as Literal bytes are (parsed again, checked like them). */
  private rebuildHeader(payload: Buffer): void {
    const bytes = this.allocate(PACKET_HEADER_BYTES);
    this.headers.decode(payload, bytes);
    this.rebuilt(bytes, true);
  }

  /**
   * Passes bytes of the channel on, parsing them (a parked parser reads the rest on resume()). `laidOut`:
   * a piece from `allocate`, which `out` takes once, as it is (Literal bytes are views of the caller's).
   */
  private rebuilt(bytes: Buffer, laidOut = false): void {
    const at = this.counts.streamBytes;
    this.counts.streamBytes += bytes.length;
    this.streamHash.update(bytes);
    this.retainer.newInput(bytes);
    this.parser.push(bytes);
    this.emit(bytes, at, laidOut);
  }

  /**
   * Hands rebuilt bytes (at channel offset `at`) to the destination, but for what lies past the start of
   * a SYNC packet no check has covered yet (holdsSyncs). Parsing came first, so a SYNC packet's header
   * in these bytes is known; a parser parked at a SYNC has one unchecked behind it, and holds all after.
   */
  private emit(bytes: Buffer, at: number, laidOut: boolean): void {
    // Holding already (held bytes are never empty: a SYNC packet starts before the end of what it cut).
    if (this.heldOut.length === 0) {
      const from = this.syncsUnchecked.peek();
      if (from === undefined || from >= at + bytes.length) return this.out(bytes);
      const cut = Math.max(0, from - at);
      if (cut > 0) {
        // The piece goes out with its head: the rest is held as a copy.
        this.out(bytes.subarray(0, cut));
        laidOut = false;
      }
      bytes = bytes.subarray(cut);
    }
    if (this.heldOutBytes + bytes.length > MAX_HELD_SYNC_BYTES) throw new RebuildError(`more than ${MAX_HELD_SYNC_BYTES} bytes of a multifd channel held back for a check that has not come`);
    // A piece of `allocate` is held as it is, and reaches `out` once the check has come: copied, it never
    // did, and the gateway's output slab it lay in was never free again (a rebuilt SYNC packet's header
    // took one a SYNC, every slab a channel had within four, and the Runs after them fresh buffers).
    this.heldOut.push(laidOut ? bytes : Buffer.from(bytes));
    this.heldOutBytes += bytes.length;
  }

  protected override onPacket(packet: MultifdPacketRecord): void {
    if (packet.sync && this.holdsSyncs) this.syncsUnchecked.push(packet.streamOffset);
  }

  /**
   * A Run frame has arrived and will be rebuilt after those before it: its pages are noted, to be read
   * ahead (ReadsAhead) once prefetchAhead() is called. On a back leg each channel's Runs name every N-th
   * packet of the guest, and the channels take turns: the store's own read-ahead follows no such order.
   * head[0 .. length): the payload's first bytes. Must see every Run frame, in order, as run() will. Only
   * a hint: the range read is the Run's first page on, as far as its records lie by the store (runSpan);
   * nothing is checked here that rebuilding does not check again.
   */
  aheadOfRun(head: Buffer, length: number): void {
    const frame = ++this.runsSeen;
    const store = this.migration.store;
    const place = runPlace(head, length);
    if (place === null || store === null || store.prefetchRanges === undefined || !store.rangeSlots) return;
    const block = this.migration.blockAt(place.blockIndex);
    if (block === null || place.firstOffset % X86_PAGE_SIZE !== 0 || place.firstOffset >= block.pages * X86_PAGE_SIZE) return;
    const first = block.firstPage + place.firstOffset / X86_PAGE_SIZE;
    const count = Math.min(place.count, MAX_RUN_HELD, block.firstPage + block.pages - first);
    if (count <= 0) return;
    // One held page more than its records: a Run is most often cut short by a changed page, whose Delta
    // takes that page's held version as its base (aheadOfDelta finds it in this range).
    const span = this.runSpan(store.digests, first, count + 1, Math.min(MAX_RUN_HELD, block.firstPage + block.pages - first));
    this.runsAhead ??= new ReadsAhead(runsWindow(this.migration.channelCount, store.rangeSlots), (starts, counts, n) => store.prefetchRanges?.(starts, counts, n));
    this.runsAhead.note(frame, first, span);
    this.runAheadFirst = first;
    this.runAheadEnd = first + span;
  }

  /**
   * Pages from `first` on (at most `limit`) that a Run of `count` records spans, as the store tells: a
   * Run's pages are held, and none is a zero page (QEMU sends those on the main channel before 9.0, and
   * lists them after the others since), so its records are the next `count` held pages other than zero
   * pages, as a rule. A page that changed since (now zero, or no longer zero) makes the span a page off,
   * which the store reads when it comes. Reading as far as a packet's worth, or as far as the sparsest
   * Run lately spanned, had a 4-channel back leg's receiver ask for 3.5 times the bytes its Runs read
   * (docs/benchmarks.md, "Thirty-second session"). At most `limit` pages are looked at.
   */
  private runSpan(digests: Uint8Array, first: number, count: number, limit: number): number {
    let table = this.spanTable;
    if (table === null || table.buffer !== digests.buffer || table.byteOffset !== digests.byteOffset || table.length * 4 !== digests.length) {
      table = this.spanTable = digestWords(digests);
    }
    const zero = this.zeroWords;
    const end = Math.min(first + limit, table.length / DIGEST_WORDS);
    let records = 0;
    for (let page = first, at = first * DIGEST_WORDS; page < end; page++, at += DIGEST_WORDS) {
      if (isAbsentDigest(table, at) || sameDigestWords(table, at, zero, 0)) continue;
      if (++records === count) return page - first + 1;
    }
    return end - first;
  }

  /**
   * A Delta frame has arrived and will be rebuilt after those before it: its base (the page's own
   * version, or another page's) is noted, to be read ahead by the store's pool of readers with the other
   * channels' (a window each, their share of what the pool holds). A base another channel wrote moments
   * ago is left to the recent pages in memory (recentPages()), where rebuilding finds it. head[0 ..
   * length): the payload's first bytes. Must see every Delta frame, in order, as delta() will. Only a
   * hint: rebuilding checks everything again.
   */
  aheadOfDelta(head: Buffer, length: number): void {
    const frame = ++this.deltasSeen;
    const store = this.migration.store;
    if (length < DELTA_AHEAD_BYTES || store === null || store.prefetchPages === undefined) return;
    const base = head.readUInt32BE(4);
    const own = base === head.readUInt32BE(0);
    if (!this.migration.hasPage(base) || (!own && this.migration.recentlyStored(base))) return;
    // A back leg's changed page most often follows a Run of its packet, whose range read ahead spans it
    // (as bfmig-plain's receiver finds the old versions its undo journal saves): a read of its own made
    // the device read the base twice, about 1,100 reads more a 4-channel back leg.
    if (own && base >= this.runAheadFirst && base < this.runAheadEnd) return;
    // Only the version the store holds now, as the main channel's decoder does. A base another channel
    // has yet to write (a first leg's Deltas against pages of the epoch) is read when it is rebuilt, or
    // found among the recent pages: read ahead, it was a read of the device for nothing, and it took a
    // slot from a base that needed one (docs/benchmarks.md, "Twenty-eighth session").
    if (!holdsVersion(store.digests, base, head, DELTA_BASE_DIGEST_AT)) return;
    const window = Math.max(8, Math.floor(BASES_WINDOW / Math.max(1, this.migration.channelCount)));
    this.deltasAhead ??= new ReadsAhead(window, (pages, _counts, count) => store.prefetchPages?.(pages, count));
    this.deltasAhead.note(frame, base);
  }

  /**
   * A SiblingDelta frame has arrived and will be rebuilt after those before it: the sibling's page it names
   * is noted, to be read ahead by that sibling's store (a window each channel, as for Deltas). Must see
   * every SiblingDelta frame, in order, as siblingDelta() will. Only a hint: rebuilding checks everything.
   */
  aheadOfSibling(head: Buffer, length: number): void {
    const frame = ++this.siblingsSeen;
    if (length < SIBLING_DELTA_LEAD_BYTES + DELTA_AHEAD_BYTES) return;
    const sibling = head[0];
    const from = this.migration.siblingPages[sibling];
    if (from === undefined || from.prefetchPages === undefined) return;
    // Only a version the sibling holds; rebuilding fails the migration otherwise, with no read.
    const base = head.readUInt32BE(SIBLING_DELTA_LEAD_BYTES + 4);
    if (!holdsVersion(from.digests, base, head, SIBLING_DELTA_LEAD_BYTES + DELTA_BASE_DIGEST_AT)) return;
    while (this.siblingsAhead.length <= sibling) this.siblingsAhead.push(null);
    const window = Math.max(8, Math.floor(BASES_WINDOW / Math.max(1, this.migration.channelCount)));
    const ahead = (this.siblingsAhead[sibling] ??= new ReadsAhead(window, (pages, _counts, count) => from.prefetchPages?.(pages, count)));
    ahead.note(frame, base);
  }

  /** Has the stores start reading what aheadOfRun(), aheadOfDelta() and aheadOfSibling() noted, a window ahead of the frames rebuilt. */
  prefetchAhead(): void {
    this.runsAhead?.advance(this.runsRebuilt);
    this.deltasAhead?.advance(this.deltasRebuilt);
    for (const ahead of this.siblingsAhead) ahead?.advance(this.siblingsRebuilt);
  }

  private rebuildRun(payload: Buffer): void {
    this.runsRebuilt++;
    this.prefetchAhead();
    const run = decodeRun(payload);
    const next = this.parser.nextPageIndex;
    const packet = this.parser.currentPacket;
    const block = this.block;
    if (next < 0 || block === null) throw new RebuildError('a Run where no page of a packet comes next');
    if (run.held !== run.count || run.count > packet.normalPages - next) {
      throw new RebuildError(`a Run of ${run.count} pages (${run.held} held) where the packet has ${packet.normalPages - next} pages left`);
    }
    if (run.blockIndex !== block.index || run.firstOffset !== packet.offsets[next]) {
      throw new RebuildError(`a Run at block ${run.blockIndex} offset ${run.firstOffset}, the packet's next page is at block ${block.index} offset ${packet.offsets[next]}`);
    }
    const store = this.migration.store;
    if (!store) throw new RebuildError('Run of held pages, but this gateway keeps no store');
    const bytes = this.allocate(run.count * X86_PAGE_SIZE);
    for (let k = 0; k < run.count; ) {
      const first = block.firstPage + packet.offsets[next + k] / X86_PAGE_SIZE;
      let end = k + 1;
      while (end < run.count && packet.offsets[next + end] === packet.offsets[next + end - 1] + X86_PAGE_SIZE) end++;
      if (first + (end - k) > block.firstPage + block.pages) throw new RebuildError(`Run pages beyond block ${block.name}`);
      try {
        store.readPages(first, end - k, bytes, k * X86_PAGE_SIZE);
      } catch (err) {
        throw new RebuildError(`pages ${first}..${first + end - k - 1} are not held: ${errorMessage(err)}`);
      }
      k = end;
    }
    this.useKeptVersions(bytes, next, run.count);
    digestContiguous(bytes, 0, run.count, X86_PAGE_SIZE, this.digests, 0);
    digestOne(this.digests, 0, run.count * DIGEST_BYTES, this.runDigest, 0);
    if (!sameDigest(this.runDigest, 0, run.digest, 0)) {
      throw new RebuildError(`retained pages of a multifd Run at block ${block.name} offset ${run.firstOffset} do not match the sender's digest`);
    }
    this.counts.pagesReused += run.count;
    this.replaying = run.count;
    try {
      this.rebuilt(bytes, true);
    } finally {
      this.replaying = 0;
    }
  }

  /**
   * A Delta for the packet's next normal page: its version held here (as the epoch began, should it have
   * been written in the epoch already), patched by the ranges, checked against the sender's digests of
   * the base and of the result before a byte of it goes to `out`.
   */
  private rebuildDelta(payload: Buffer): void {
    this.deltasRebuilt++;
    this.prefetchAhead();
    const pageIndex = this.nextPageFor('Delta', payload, 0);
    const base = payload.readUInt32BE(4);
    const store = this.migration.store;
    if (!store) throw new RebuildError('multifd Delta, but this gateway keeps no store');
    // Against another page: written in this epoch already (waits() held the frame back until it was), or
    // its version of an earlier epoch, which a KeepVersion frame had kept should it be written since.
    if (base !== pageIndex && !this.migration.hasPage(base)) throw new RebuildError(`a multifd Delta for page ${pageIndex} from page ${base}`);
    if (base !== pageIndex) {
      if (!this.findBase(base, payload, true)) throw new RebuildError(`multifd Delta from a version of page ${base} this store does not hold`);
    } else {
      const kept = this.keptVersion(base);
      if (kept !== null) kept.copy(this.basePage, 0);
      else {
        try {
          store.readPages(base, 1, this.basePage, 0, false);
        } catch (err) {
          throw new RebuildError(`page ${base} is not held: ${errorMessage(err)}`);
        }
      }
      digestOne(this.basePage, 0, X86_PAGE_SIZE, this.runDigest, 0);
      if (!sameDigest(this.runDigest, 0, payload, DELTA_BASE_DIGEST_AT)) throw new RebuildError(`multifd Delta from a version of page ${base} this store does not hold`);
    }
    this.patchBase('Delta', payload, 0, pageIndex);
    // Ranges make it a delta, against this page's held version or a page like it; none, a content match.
    if (base !== pageIndex && payload.length === DELTA_HEADER_BYTES) this.counts.pagesMatched++;
    else this.counts.pagesDelta++;
  }

  /**
   * A SiblingDelta for the packet's next normal page: the page of a sibling's pinned snapshot it names,
   * checked against the sibling's digest table and the sender's digest, patched by the ranges (a content
   * match has none) and checked against the sender's digest of the result before a byte of it goes to
   * `out`. A sibling page that does not match its digest is noted (damagedSiblings): the gateway checks
   * that store once the migration is over, as for the main channel's.
   */
  private rebuildSibling(payload: Buffer): void {
    this.siblingsRebuilt++;
    this.prefetchAhead();
    const at = SIBLING_DELTA_LEAD_BYTES;
    const pageIndex = this.nextPageFor('SiblingDelta', payload, at);
    const from = this.migration.siblingPages[payload[0]];
    if (from === undefined) throw new RebuildError(`multifd SiblingDelta from sibling ${payload[0]}, but ${this.migration.siblingPages.length} were confirmed`);
    const base = payload.readUInt32BE(at + 4);
    const where = `page ${base} of sibling ${from.vm}`;
    if (!holdsVersion(from.digests, base, payload, at + DELTA_BASE_DIGEST_AT)) {
      throw new RebuildError(`multifd SiblingDelta from ${where}, which this site does not hold at that version`);
    }
    try {
      from.readPages(base, 1, this.basePage, 0, false);
    } catch (err) {
      throw new RebuildError(`${where} is not readable: ${errorMessage(err)}`);
    }
    digestOne(this.basePage, 0, X86_PAGE_SIZE, this.runDigest, 0);
    if (!sameDigest(this.runDigest, 0, payload, at + DELTA_BASE_DIGEST_AT)) {
      // The sibling's store is not this migration's to write: its owner checks it once the migration is over.
      if (!this.migration.damagedSiblings.includes(from)) this.migration.damagedSiblings.push(from);
      throw new RebuildError(`retained ${where} does not match its digest`);
    }
    this.patchBase('SiblingDelta', payload, at, pageIndex);
    this.counts.pagesSibling++;
  }

  /**
   * Whether a version of `base` held here has the digest the Delta names (payload[DELTA_BASE_DIGEST_AT…]),
   * which is then in basePage: the channels' recent pages (MultifdMigration.recentPages), the version
   * kept as the epoch began (a KeepVersion frame, or a page QEMU < 9.0 repeated), the one the main
   * channel overwrote ahead of this channel, or the store's. With `read` false the store's is only
   * looked up by digest, not read: whether the Delta need wait for its base (baseToCome).
   */
  private findBase(base: number, payload: Buffer, read: boolean): boolean {
    const migration = this.migration;
    const recent = read ? migration.recentPages() : migration.recentCopies;
    const at = recent === null ? -1 : recent.find(base);
    if (at >= 0 && this.namedBase((recent as RecentPages).content, at, payload)) return true;
    const start = migration.epochStart?.version(base, this.syncs) ?? null;
    if (start !== null && this.namedBase(start, 0, payload)) return true;
    const overtaken = migration.writtenAfter(base, this.syncs) ? (migration.overtaken?.version(base) ?? null) : null;
    if (overtaken !== null && this.namedBase(overtaken, 0, payload)) return true;
    const store = migration.store;
    if (store === null || !holdsVersion(store.digests, base, payload, DELTA_BASE_DIGEST_AT)) return false;
    if (!read) return true;
    try {
      store.readPages(base, 1, this.basePage, 0, false);
    } catch (err) {
      throw new RebuildError(`page ${base} is not held: ${errorMessage(err)}`);
    }
    digestOne(this.basePage, 0, X86_PAGE_SIZE, this.runDigest, 0);
    return sameDigest(this.runDigest, 0, payload, DELTA_BASE_DIGEST_AT);
  }

  /** Copies the page at page[at…] into basePage: whether its digest is the base digest the Delta names. */
  private namedBase(page: Buffer, at: number, payload: Buffer): boolean {
    copyBytes(page, at, this.basePage, 0, X86_PAGE_SIZE);
    digestOne(this.basePage, 0, X86_PAGE_SIZE, this.runDigest, 0);
    return sameDigest(this.runDigest, 0, payload, DELTA_BASE_DIGEST_AT);
  }

  /** A KeepVersion frame, in order: the page's version held now is kept for this epoch's Deltas. */
  private keepFrame(payload: Buffer): void {
    this.migration.keepVersion(keepVersionPage(payload), this.syncs);
  }

  /**
   * The page a `what` frame (its Delta header at payload[at…]) must stand for: the packet's next normal
   * page, which the header names. Throws RebuildError where none comes next, or another is named.
   */
  private nextPageFor(what: string, payload: Buffer, at: number): number {
    const pageIndex = this.nextPage();
    if (pageIndex < 0) throw new RebuildError(`a ${what} where no page of a packet comes next`);
    if (payload.length < at + DELTA_HEADER_BYTES || payload.length > at + DELTA_HEADER_BYTES + MAX_DELTA_BYTES) throw new RebuildError(`multifd ${what} frame of ${payload.length} bytes`);
    const page = payload.readUInt32BE(at);
    if (page !== pageIndex) throw new RebuildError(`a multifd ${what} for page ${page}, the packet's next page is ${pageIndex}`);
    return pageIndex;
  }

  /**
   * Patches `basePage` (checked already) by the ranges of the Delta header at payload[at…], checks the
   * result against the sender's digest, and passes it on as the page's data.
   */
  private patchBase(what: string, payload: Buffer, at: number, pageIndex: number): void {
    const ranges = at + DELTA_HEADER_BYTES;
    const bytes = this.allocate(X86_PAGE_SIZE);
    try {
      applyPageDelta(this.basePage, 0, payload, ranges, payload.length - ranges, X86_PAGE_SIZE, bytes, 0);
    } catch (err) {
      throw new RebuildError(`multifd ${what} for page ${pageIndex}: ${errorMessage(err)}`);
    }
    digestOne(bytes, 0, X86_PAGE_SIZE, this.runDigest, 0);
    if (!sameDigest(this.runDigest, 0, payload, at + DELTA_NEW_DIGEST_AT)) throw new RebuildError(`multifd ${what} for page ${pageIndex} does not rebuild the sender's page`);
    this.counts.deltaBytes += payload.length;
    this.replayingDelta = true;
    try {
      this.rebuilt(bytes, true);
    } finally {
      this.replayingDelta = false;
    }
  }

  /**
   * The version of `pageIndex` a Run or a Delta against the page's own version names, where the store no
   * longer holds it: the main channel overwrote it in a later epoch already (MultifdMigration.
   * mainPageReceived kept the version it replaced), or, before QEMU 9.0, the other copy of a page QEMU
   * repeated was written in this epoch already (`epochStart` kept the version the epoch began with).
   * Null: the store's is the one. (A Delta against another page finds its base by digest: findBase.)
   */
  private keptVersion(pageIndex: number): Buffer | null {
    const migration = this.migration;
    if (migration.writtenAfter(pageIndex, this.syncs)) return migration.overtaken?.version(pageIndex) ?? null;
    if (!this.modernQemu && migration.writtenIn(pageIndex, this.syncs)) return migration.epochStart?.version(pageIndex, this.syncs) ?? null;
    return null;
  }

  /** A Run's pages, read from the store: where one's version was kept instead (keptVersion), that replaces it. */
  private useKeptVersions(bytes: Buffer, next: number, count: number): void {
    const overtaken = this.migration.overtaken;
    // Nothing kept: no page of a Run needs looking at (a QEMU of 9.0 on repeats none).
    if (this.modernQemu && (overtaken === null || overtaken.size === 0)) return;
    const block = this.block as RamBlock;
    const offsets = this.parser.currentPacket.offsets;
    for (let k = 0; k < count; k++) this.keptVersion(block.firstPage + offsets[next + k] / X86_PAGE_SIZE)?.copy(bytes, k * X86_PAGE_SIZE);
  }

  protected onPage(record: MultifdPageRecord, page: RamPageRecord): void {
    const claim = this.migration.claim(page.pageIndex, this.syncs);
    if (record.kind === MultifdRecordKind.ZeroPage) {
      this.counts.pagesZero++;
    } else if (this.replaying > 0) {
      this.replaying--;
      return;
    } else {
      // A page rebuilt from a Delta was counted as one; it is kept as a page sent whole is.
      if (!this.replayingDelta) this.counts.pagesSent++;
      // A packet's first or last page may be a copy of one QEMU < 9.0 repeated (see MultifdMigration).
      if (claim === Claim.First && this.mayRepeat(record)) this.migration.epochStart?.keep(page.pageIndex, this.syncs);
    }
    // A later version of the page was written already: this one is not kept (see MultifdMigration), but
    // a Delta of its epoch on another channel may still go against it (a page QEMU sends once in the
    // epoch: no Run of the epoch names the version the main channel overwrote).
    if (claim !== Claim.Stale) {
      this.retainer.retain(page, this.retainer.digestOf(page, this.pagesAfter(record)));
      this.migration.channelStored(page.pageIndex, record.kind === MultifdRecordKind.Page ? page.data : null, page.dataStart);
    } else if (record.kind === MultifdRecordKind.Page && !this.mayRepeat(record)) this.migration.overtaken?.replace(page.pageIndex, page.data, page.dataStart, this.syncs);
  }
}
