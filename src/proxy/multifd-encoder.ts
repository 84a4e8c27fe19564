import { DIGEST_BYTES, DIGEST_WORDS, digestOne, isAbsentDigest, sameDigestWords } from '../digest';
import { X86_PAGE_SIZE } from '../qemu/constants';
import { type MultifdPacketEndRecord, type MultifdPacketRecord, type MultifdPageRecord, MultifdRecordKind } from '../qemu/multifd';
import type { RamBlock, RamPageRecord } from '../qemu/records';
import type { EncoderSink } from './encoder';
import { Fifo } from '../common/fifo';
import { HeldInput } from './held-input';
import { MAX_PACKET_HEADER_PAYLOAD, PACKET_HEADER_BYTES, PacketHeaders } from './packet-header';
import { MultifdChannel } from './multifd-channel';
import { Claim, type MultifdMigration, type PagesElsewhere } from './multifd-migration';
import { DELTA_HEADER_BYTES, DeltaSlab, encodePageDelta, keepVersionPayload, MAX_DELTA_BYTES, SIBLING_DELTA_LEAD_BYTES, writeDeltaHeader } from './page-delta';
import { sameDigest } from './retained';
import { encodeRun, MAX_RUN_HELD } from './run';

/**
 * The sending gateway's codec for one multifd channel (src/qemu/multifd.ts has the format). Its API, for
 * the gateway that accepts the channels:
 *
 *   const migration = new MultifdMigration(store, channelCount);   // one per migration, beside the
 *   mainEncoder = new StreamEncoder(sink, store, (layout) => {      // main channel's StreamEncoder
 *     migration.begin(layout); ...; migration.receiverTable = mainEncoder.receiverTable; });
 *   const channel = new MultifdEncoder(channelSink, migration);     // per channel, as it is accepted
 *   channel.push(chunk) … channel.end(() => …);                     // then End: sentBytes, streamCheck
 *
 * The channel's bytes go to its sink as Literal bytes (views of the pushed chunks, which must not change
 * afterwards) and Run payloads: each stretch of consecutive normal pages of one packet that the
 * receiver holds (by `migration.receiverTable`) becomes one Run (proxy/run.ts: block index, first page's
 * offset, count, one digest over the pages' digests, every bitmap bit set); MultifdDecoder rebuilds them
 * from the pages' offsets in the packet header it has already received. Zero pages carry no bytes and
 * stay in the header. Every page is written to the store as it passes, like the main channel's. Where
 * the receiver takes them (`migration.packetHeaders`), each packet's header and offsets go as a
 * PacketHeader frame (proxy/packet-header.ts) instead of their 1,344 Literal bytes.
 *
 * Where the receiver takes them (`migration.channelDeltas`), a changed page goes as a Delta against the
 * version of it both sides hold (proxy/page-delta.ts; its base is the page itself) when the ranges that
 * changed are few. Such a Delta says what a Run says of its pages, that the receiver holds this version
 * there, so it is sent under the rule that lets a Run name a page (mayNameClaimed), and, before QEMU 9.0,
 * never for a packet's first or last page: those may be a page sent twice in the epoch, whose other copy
 * could overwrite the base at the receiver first (see MultifdMigration). The base is read from this
 * site's store only where the store's undo journal reads it anyway before it writes the new version
 * (`readsBeforeWrite`: the page's first change in the migration), so a Delta costs this side no read of
 * its own; the receiver reads it, and checks both digests, as for a Delta on the main channel.
 *
 * Where the receiver takes them too (`migration.siblings`), a page whose content the snapshot of a
 * sibling VM holds (at the same place, or anywhere in it) goes as a SiblingDelta naming that page, as
 * on the main channel: the sibling's snapshot is pinned at both sites for the whole migration, so the
 * reference holds whatever the channels' order, for any normal page. And where it takes Deltas against
 * other pages (`migration.elsewhere`, QEMU 9.0 on), a page that repeats or resembles another page sent
 * in the epoch already, on any channel, goes as a Delta against it (sendElsewhere).
 *
 * Channel bytes may be pushed only once `migration.begin()` has had the main channel's block list
 * (QEMU sends the list before any page). `parked` says the channel waits at a SYNC for the others
 * (see MultifdMigration): what is pushed meanwhile is queued, so the caller should stop reading the
 * socket until it clears. A compressed packet or an unknown version makes the rest of the channel go
 * out as Literal bytes (`fallback`).
 */
/** The longest a channel waits for the main channel's marker of an epoch (see passes()). */
const MAIN_WAIT_MS = 50;

export class MultifdEncoder extends MultifdChannel {
  /** Pushed and not yet sent (as Literal bytes or a Run). */
  private readonly held = new HeldInput(this.streamHash);
  private readonly sendPiece = (bytes: Buffer): void => this.sink.literal(bytes);
  /** Pushed while parked: not yet given to the parser. */
  private readonly queued = new Fifo<Buffer>();
  /** The epoch whose main-channel marker the channel has waited for, and whether that wait is over. */
  private mainWaitEpoch = -1;
  private mainWaitOver = false;
  // The open run: consecutive held normal pages of the current packet.
  private runCount = 0;
  private runFirstOffset = 0;
  private readonly runDigests = Buffer.alloc(MAX_RUN_HELD * DIGEST_BYTES);
  private readonly runDigest = Buffer.alloc(DIGEST_BYTES);
  /** Every page of a run is held: all bits set, but none past the run's last page (decodeRun checks). */
  private readonly runBitmap = Buffer.alloc(MAX_RUN_HELD / 8, 0xff);
  /** Delta payloads (page-delta.ts), laid out in slabs; a base page read from the store, and its digest. */
  private readonly deltaOut = new DeltaSlab();
  private readonly basePage = Buffer.alloc(X86_PAGE_SIZE);
  private readonly baseDigest = Buffer.alloc(DIGEST_BYTES);
  /**
   * Whether saving WAN bytes pays on this channel now (the relay sets it per chunk from the channel's
   * compression policy): pages elsewhere in the VM are looked for, and this channel's kept for later,
   * only then, as the main channel's Deltas against pages alike wait for it. On a link faster than the
   * gateways (loopback) the lookups and copies cost a 4-channel first leg a fifth of its rate.
   */
  savingPays = true;
  /**
   * The page sendElsewhere() is on; a base it may go against is another page written in this epoch, and
   * not one QEMU may write again in it (mayRepeat), or, where the receiver takes them, another page's
   * version of an earlier epoch (MultifdMigration.mayGoAgainstEarlier).
   */
  private pageNow = -1;
  private readonly usableBase = (base: number): boolean => {
    const migration = this.migration;
    if (base === this.pageNow) return false;
    if (migration.writtenIn(base, this.syncs)) return !migration.repeatable(base, this.syncs);
    return migration.mayGoAgainstEarlier(base, this.syncs);
  };
  /** Where the receiver takes them (`migration.packetHeaders`): the channel's previous header, and the next one gathered. */
  private readonly headers = new PacketHeaders();
  private readonly headerBytes = Buffer.allocUnsafe(PACKET_HEADER_BYTES);
  private headerFill = 0;
  private readonly gatherHeader = (bytes: Buffer): void => {
    this.headerFill += bytes.copy(this.headerBytes, this.headerFill);
  };
  /** Deltas sent against another page's version of an earlier epoch, and KeepVersion frames sent (see MultifdMigration). */
  earlierBaseDeltas = 0;
  versionsKept = 0;

  constructor(
    private readonly sink: EncoderSink,
    migration: MultifdMigration,
  ) {
    super(migration);
  }

  get parked(): boolean {
    return this.parser.isPaused;
  }

  /** Channel bytes gone to the sink, as Literal bytes or the Runs standing for them. */
  get sentBytes(): number {
    return this.held.from;
  }

  /** Bytes pushed: the channel's length once end() has called back. */
  get streamBytes(): number {
    return this.counts.streamBytes;
  }

  /** XXH3-64 of the channel's bytes sent (sentBytes of them); all of them once end() has called back. */
  get streamCheck(): string {
    return this.held.digest();
  }

  /** Throws StreamError on malformed input. */
  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.counts.streamBytes += chunk.length;
    this.migration.elsewhere?.advanceContentIndex();
    this.held.push(chunk);
    if (this.parked) {
      // A copy: the caller may read into the chunk's buffer again (see releaseInput).
      this.queued.push(Buffer.from(chunk));
      return;
    }
    this.parse(chunk);
    this.migration.settle();
  }

  /**
   * The chunk last pushed is about to be read into again (pooled socket reads): what the codec keeps of
   * it, it copies. The bytes not let go of yet (a page being read, a packet header before its pages) and
   * what a parser parked at a SYNC has not read; a chunk queued while parked is a copy already.
   */
  releaseInput(): void {
    this.held.own(this.counts.streamBytes);
    this.parser.ownInput();
  }

  /**
   * The channel closed. Once everything pushed has been sent (at once, or when a parked channel has
   * read on), `ended` is called: the End check (sentBytes, streamCheck) may go.
   */
  end(ended: () => void = () => undefined): void {
    this.endWhenDrained(() => {
      this.parser.end();
      this.ended = true;
      this.send(this.counts.streamBytes);
      ended();
    });
    this.migration.settle();
  }

  unpark(): void {
    this.parser.resume();
    this.afterParse();
    while (!this.parked && this.queued.length > 0) this.parse(this.queued.shift() as Buffer);
    this.afterUnpark();
  }

  private parse(chunk: Buffer): void {
    this.retainer.newInput(chunk);
    this.parser.push(chunk);
    this.afterParse();
  }

  /** Sends what the parser has settled; an open run stays open, its pages already skipped. */
  private afterParse(): void {
    if (this.runCount === 0) this.send(this.parser.settledTo);
  }

  /**
   * Past its SYNC the channel also waits, a little, for the main channel's marker of the new epoch
   * when QEMU sends it right behind the SYNC packets (see MultifdMigration.wakeAfter): every page read
   * before it would cross whole.
   */
  protected override passes(): boolean {
    const migration = this.migration;
    if (!super.passes()) return false;
    if (migration.mainReached(this.syncs) || !migration.mainFollowsSyncs || migration.wakeAfter === null) return true;
    if (this.mainWaitEpoch !== this.syncs) {
      const epoch = this.syncs;
      this.mainWaitEpoch = epoch;
      this.mainWaitOver = false;
      migration.wakeAfter(MAIN_WAIT_MS, () => {
        if (this.mainWaitEpoch === epoch) this.mainWaitOver = true;
        migration.settle();
      });
    }
    return this.mainWaitOver;
  }

  /**
   * After a SYNC packet, where the receiver takes them (MultifdMigration.channelChecks): everything up
   * to its end goes, then the channel's check to there. The receiver holds the SYNC packet back from its
   * destination until that check has passed, and a destination QEMU loads the device state only once
   * every channel's last SYNC packet is in: bytes damaged between the gateways on any channel never run.
   */
  protected override onPacketEnd(end: MultifdPacketEndRecord): void {
    this.closeRun();
    if (!end.sync || !this.migration.channelChecks || this.sink.check === undefined) return;
    this.send(end.streamOffset);
    this.sink.check(end.streamOffset, this.held.digest());
  }

  /**
   * A packet of zero pages only: they are written at the receiver as soon as its header is in there.
   * (Every other packet's are looked at with its last normal page: see keepBeforeWrite.)
   */
  protected override onPacket(packet: MultifdPacketRecord): void {
    if (packet.normalPages === 0 && this.migration.earlierBases) this.keepBeforeWrites(packet, 0, packet.zeroPages);
    if (this.migration.packetHeaders && this.sink.packetHeader !== undefined) this.sendHeader(packet.streamOffset, this.sink.packetHeader);
  }

  /**
   * Sends the packet's header and offsets (at stream offset `at`, all pushed: the parser has read them) as
   * a PacketHeader frame, after what comes before them; as Literal bytes where that form cannot say them.
   */
  private sendHeader(at: number, frame: (payload: Buffer) => void): void {
    this.send(at);
    // Never so (the parser settles a packet's start only once its offsets are in), but a header partly
    // gone as Literal bytes would have to follow as such.
    if (this.held.from !== at) return;
    this.headerFill = 0;
    this.held.release(at + PACKET_HEADER_BYTES, this.gatherHeader);
    const out = this.deltaOut.reserve(MAX_PACKET_HEADER_PAYLOAD);
    const length = this.headers.encode(this.headerBytes, out);
    if (length < 0) this.sink.literal(Buffer.from(this.headerBytes));
    else frame.call(this.sink, this.deltaOut.take(length));
  }

  /** Header bytes PacketHeader frames kept off the WAN. */
  get headerSavedBytes(): number {
    return this.headers.savedBytes;
  }

  /**
   * Before a page's write can reach the receiver: a KeepVersion frame where a Delta of this epoch went
   * against the page's earlier version (MultifdMigration.keepsBeforeWrite). A normal page is written
   * there once its data is in, which has not been sent yet; the packet's zero pages once its last normal
   * page is in, which the frame for that page may bring: they are looked at with it. The base may have
   * been marked between two of this channel's chunks, after its packet began, so each page is looked at
   * when it comes, not when the packet does.
   */
  private keepBeforeWrite(record: MultifdPageRecord, page: RamPageRecord): void {
    const packet = this.parser.currentPacket;
    if (record.kind !== MultifdRecordKind.Page) return;
    if (this.migration.keepsBeforeWrite(page.pageIndex, this.syncs)) this.sendKeepVersion(page.pageIndex);
    if (record.index === packet.normalPages - 1) this.keepBeforeWrites(packet, packet.normalPages, packet.zeroPages);
  }

  /** keepBeforeWrite() for the packet's pages from its `from`-th offset on, `count` of them. */
  private keepBeforeWrites(packet: MultifdPacketRecord, from: number, count: number): void {
    const block = this.block;
    if (block === null) return;
    for (let i = from; i < from + count; i++) {
      const pageIndex = block.firstPage + packet.offsets[i] / X86_PAGE_SIZE;
      if (this.migration.keepsBeforeWrite(pageIndex, this.syncs)) this.sendKeepVersion(pageIndex);
    }
  }

  /**
   * A KeepVersion frame for the page. The packets before this one go first, so that the receiver keeps
   * the version in this epoch: its SYNC is past there too.
   */
  private sendKeepVersion(pageIndex: number): void {
    if (this.sink.keepVersion === undefined) return;
    this.send(this.parser.currentPacket.streamOffset);
    this.sink.keepVersion(keepVersionPayload(this.deltaOut, pageIndex));
    this.versionsKept++;
  }

  /**
   * Whether a page claimed as `claim` may be named in a Run (see MultifdMigration): the main channel is
   * past the epoch, and it is the page's first write in the epoch, or the second copy of a page QEMU
   * < 9.0 repeated whose first copy was named.
   */
  private mayNameClaimed(claim: Claim, pageIndex: number): boolean {
    if (!this.migration.mainReached(this.syncs)) return false;
    return claim === Claim.First || (claim === Claim.Again && this.migration.namedInRun(pageIndex));
  }

  protected onPage(record: MultifdPageRecord, page: RamPageRecord): void {
    if (this.migration.earlierBases) this.keepBeforeWrite(record, page);
    const normal = record.kind === MultifdRecordKind.Page;
    const retainer = this.retainer;
    retainer.digestOf(page, this.pagesAfter(record));
    if (normal && this.block !== null) retainer.prefetchChangedAhead(this.parser.currentPacket.offsets, record.index + 1, this.block.firstPage);
    const word = page.pageIndex * DIGEST_WORDS;
    const reference = this.migration.receiverTable?.bytes ?? null;
    const words = this.migration.receiverTable?.words ?? null;
    const claim = this.migration.claim(page.pageIndex, this.syncs);
    const held = normal && words !== null && sameDigestWords(words, word, retainer.digestWords, 0);
    const named = held && this.mayNameClaimed(claim, page.pageIndex);
    // Pages elsewhere in the VM, written in this epoch already, that this page may go against; and this
    // page, kept for later ones: not one QEMU may send again in the epoch.
    const repeats = this.mayRepeat(record);
    if (repeats) this.migration.noteRepeatable(page.pageIndex, this.syncs);
    const elsewhere = normal && !named && claim === Claim.First && !repeats ? this.elsewhereNow() : null;
    const key = elsewhere === null ? 0 : elsewhere.elsewhereKey(page);
    if (!normal) {
      this.counts.pagesZero++;
    } else if (named) {
      this.counts.pagesReused++;
      this.migration.nameInRun(page.pageIndex);
      this.addToRun(page.streamOffset, page.offset);
    } else if (this.sendSibling(page)) {
      this.counts.pagesSibling++;
    } else if (!held && words !== null && reference !== null && claim === Claim.First && this.sendDelta(record, page, reference, words)) {
      this.counts.pagesDelta++;
    } else if (elsewhere !== null && words !== null && this.sendElsewhere(elsewhere, page, words, key)) {
      // counted as a match or a delta
    } else {
      this.closeRun();
      this.counts.pagesSent++;
      if (held) this.counts.pagesUnordered++;
    }
    // A later version of the page was written already: this one is not kept (see MultifdMigration).
    if (claim === Claim.Stale) return;
    // The receiver now holds this version of the page.
    if (words !== null && reference !== this.migration.store?.digests) words.set(retainer.digestWords, word);
    retainer.retain(page, true);
    elsewhere?.keepForLater(page, retainer.digestWords, key);
  }

  /**
   * The main channel's encoder, where a page may go against another page and be kept for later ones now:
   * while saving pays on this channel or the main channel's Deltas are paid whatever they cost (`deltas:
   * always`, or a slow link that sets the pace).
   */
  private elsewhereNow(): PagesElsewhere | null {
    const elsewhere = this.migration.elsewhere;
    if (elsewhere === null || this.sink.delta === undefined) return null;
    return this.savingPays || elsewhere.deltaReadsFree ? elsewhere : null;
  }

  /**
   * Sends the page as a Delta against another page the receiver holds, of the same content or like it
   * (found by the main channel's encoder, `elsewhere`), that has been written in this epoch already, on
   * any channel: no channel writes it again before the barrier, and the receiver holds the Delta back
   * until that write has been rebuilt there. Whether it did.
   */
  private sendElsewhere(elsewhere: PagesElsewhere, page: RamPageRecord, words: Uint32Array, key: number): boolean {
    this.pageNow = page.pageIndex;
    const payload = elsewhere.deltaElsewhere(page, words, this.retainer.digest, this.retainer.digestWords, key, this.usableBase);
    if (payload === null) return false;
    const base = payload.readUInt32BE(4);
    if (!this.migration.writtenIn(base, this.syncs)) {
      this.migration.wentAgainstEarlier(base, this.syncs);
      this.earlierBaseDeltas++;
    }
    this.emit(page, payload, this.sink.delta as (payload: Buffer) => void);
    if (payload.length === DELTA_HEADER_BYTES) this.counts.pagesMatched++;
    else this.counts.pagesDelta++;
    return true;
  }

  /**
   * Sends the page as a reference to a sibling's page of the same content (a SiblingDelta without ranges),
   * where the receiver takes them on the channels and a sibling holds it: whether it did. A page held at
   * its own place but not nameable in a Run (its claim, or the main channel not past the epoch) may go
   * so too: the sibling's snapshot does not change during the migration. Before the page's own version
   * is tried as a Delta's base: a reference is smaller, and this side reads nothing for it.
   */
  private sendSibling(page: RamPageRecord): boolean {
    const siblings = this.migration.siblings;
    if (siblings === null || this.sink.siblingDelta === undefined || !this.migration.siblingsPay()) return false;
    if (!siblings.find(page.pageIndex, this.retainer.digestWords, 0)) return false;
    const digest = this.retainer.digest;
    const out = this.deltaOut.reserve(SIBLING_DELTA_LEAD_BYTES + DELTA_HEADER_BYTES);
    out[0] = siblings.sibling;
    writeDeltaHeader(out, SIBLING_DELTA_LEAD_BYTES, page.pageIndex, siblings.page, digest, 0, digest);
    this.emit(page, this.deltaOut.take(SIBLING_DELTA_LEAD_BYTES + DELTA_HEADER_BYTES), this.sink.siblingDelta);
    return true;
  }

  /**
   * Sends the page as a Delta against the version of it the receiver holds, if it may (see above) and
   * the ranges that changed fit MAX_DELTA_BYTES: whether it did. The page's new digest is the retainer's.
   */
  private sendDelta(record: MultifdPageRecord, page: RamPageRecord, reference: Uint8Array, words: Uint32Array): boolean {
    const migration = this.migration;
    const store = migration.store;
    const index = page.pageIndex;
    if (!migration.channelDeltas || store === null || this.sink.delta === undefined || !this.mayNameClaimed(Claim.First, index)) return false;
    if (this.mayRepeat(record)) return false;
    if (isAbsentDigest(words, index * DIGEST_WORDS) || store.readsBeforeWrite?.(index) !== true) return false;
    const at = index * DIGEST_BYTES;
    if (!sameDigest(reference, at, store.digests, at)) return false;
    try {
      // A lone page, as the journal would have read it: a channel's changed pages are no series worth
      // reading ahead (read as one, two 4-channel back legs at 1 Gbit/s took 0.60 and 0.61 s; read alone,
      // five took 0.50-0.60 s, median 0.55, as many as without Deltas).
      store.readPages(index, 1, this.basePage, 0, false);
    } catch {
      return false; // not readable here: the page goes whole
    }
    digestOne(this.basePage, 0, X86_PAGE_SIZE, this.baseDigest, 0);
    if (!sameDigest(this.baseDigest, 0, reference, at)) return false;
    const out = this.deltaOut.reserve(DELTA_HEADER_BYTES + MAX_DELTA_BYTES);
    const length = encodePageDelta(this.basePage, 0, page.data, page.dataStart, X86_PAGE_SIZE, out, DELTA_HEADER_BYTES, MAX_DELTA_BYTES);
    if (length < 0) return false;
    writeDeltaHeader(out, 0, index, index, this.baseDigest, 0, this.retainer.digest);
    this.emit(page, this.deltaOut.take(DELTA_HEADER_BYTES + length), this.sink.delta);
    return true;
  }

  /** Sends a Delta or SiblingDelta `payload` in the place of the page's data. */
  private emit(page: RamPageRecord, payload: Buffer, frame: (payload: Buffer) => void): void {
    this.closeRun();
    // The packet's header and the pages before this one go first; the frame stands for this page's data.
    this.send(page.streamOffset);
    frame.call(this.sink, payload);
    this.skip(page.streamOffset + X86_PAGE_SIZE);
    this.counts.deltaBytes += payload.length;
  }

  private addToRun(streamOffset: number, offset: number): void {
    if (this.runCount === MAX_RUN_HELD) this.closeRun();
    if (this.runCount === 0) {
      this.send(streamOffset); // the packet's header and any pages sent in full go first
      this.runFirstOffset = offset;
    }
    this.retainer.digest.copy(this.runDigests, this.runCount * DIGEST_BYTES);
    this.runCount++;
    this.skip(streamOffset + X86_PAGE_SIZE);
  }

  private closeRun(): void {
    const count = this.runCount;
    if (count === 0) return;
    digestOne(this.runDigests, 0, count * DIGEST_BYTES, this.runDigest, 0);
    const last = (count - 1) >>> 3;
    if (count % 8 !== 0) this.runBitmap[last] = (1 << count % 8) - 1;
    this.sink.run(encodeRun(0, 0, (this.block as RamBlock).index, count, this.runFirstOffset, this.runDigest, this.runBitmap));
    this.runBitmap[last] = 0xff;
    this.runCount = 0;
  }

  /** Sends the input up to stream offset `to` as Literal bytes. */
  private send(to: number): void {
    this.held.release(to, this.sendPiece);
  }

  /** Drops the input up to `to`: a Run stands for it. */
  private skip(to: number): void {
    this.held.release(to, null);
  }
}
