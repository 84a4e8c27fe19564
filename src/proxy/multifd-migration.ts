import { X86_PAGE_SIZE } from '../qemu/constants';
import { StreamError, StreamErrorCode } from '../qemu/errors';
import { type MultifdPageRecord, MultifdRecordKind } from '../qemu/multifd';
import { type RamBlock, type RamPageRecord, RecordKind, type StreamFallback } from '../qemu/records';
import { RebuildError } from './rebuild-error';
import { EARLIER_BASES_PER_EPOCH, EpochStartPages } from './epoch-start-pages';
import { OvertakenPages } from './overtaken-pages';
import { RecentPages } from './recent-pages';
import type { PageLayout, ReceiverTable, RetainedPages, SiblingPages } from './retained';
import type { SiblingMatch } from './sibling-match';
import { addCounts, newCounts, type TransferCounts } from './transfer-counts';

/**
 * What the multifd channel codecs of one migration share, on one gateway: the RAM block list (from the
 * main channel), the store, and the synchronisation barrier between the channels.
 *
 * Ordering. A page of the guest can travel twice in one migration, on different channels (it was
 * dirtied again after it was sent), and both the store and the sender's picture of the receiver's store
 * (`reference`) must end with the version sent last. Channels are read independently, so arrival order
 * says nothing. What QEMU guarantees (migration/ram.c, multifd.c, multifd-nocomp.c in 7.2 and 10.0):
 * - within one pass over the dirty bitmap a page is sent at most once: its dirty bit is cleared as it is
 *   queued, and set again only by a bitmap sync, which happens between passes;
 * - between two passes (10.0: when the page search wraps, multifd_ram_flush_and_sync; 7.2: at the end
 *   of every RAM section, multifd_send_sync_main) the source sends one SYNC packet on every channel,
 *   after every page queued before it, and queues no page until each channel has sent its SYNC;
 * - the destination applies a SYNC packet's own pages (7.2 may send some with it), then its receive
 *   thread waits until every channel has reached the same SYNC (multifd_recv_sync_main).
 * So the k-th SYNC packet on each channel marks the same instant; between two consecutive SYNCs (an
 * "epoch") every page occurs at most once over all channels, and a version sent in a later epoch is the
 * newer one. Packet numbers are shared by all channels but say only the order packets were queued in,
 * and add nothing the epochs do not give.
 *
 * The codecs therefore do as QEMU's receive threads do: a channel that has passed its k-th SYNC goes no
 * further until every channel has passed its k-th SYNC (it is "parked", its input queued). Then all
 * work of epoch k on all channels, on both gateways, happens before any of epoch k + 1, whatever order
 * the channels are read in, and within an epoch the channels touch disjoint pages: the store keeps each
 * page's final version, and a Run's pages read at the receiver are the ones the sender named. A channel
 * that has fallen back or ended holds nobody up.
 *
 * QEMU before 9.0 breaks the at-most-once rule in one way (seen on 7.2's channels, in most packets):
 * multifd_queue_page hands a full packet to a channel thread, then checks whether the packet still
 * names the page's block; when the thread has emptied it by then, the page is queued again, so a
 * packet's last page may go again as the first page of the next packet, often on another channel, in
 * the same epoch (QEMU counts it once). Its two copies are applied in either order, by QEMU's
 * destination as by the gateways, and may differ (the guest wrote the page in between: it is dirty
 * again, and a later epoch sends its final version). The sender names the copy it reads first in a Run
 * by the version the receiver held, as any page; the copy it reads second only if the first was named
 * (`namedInRun`: both are then that version, and neither is written). A Run may thus reach the receiver
 * after the other copy has overwritten the page there: so before the receiver first writes a packet's
 * first or last page in an epoch (until a channel has shown it comes from a QEMU of 9.0 or later: its
 * SYNC packets carry no pages, and say pages_alloc 0) it keeps the version it held (`epochStart`), and a
 * Run naming a page written already in its epoch is rebuilt from that version. Should a source break
 * the rules some other way, a Run's digest check fails the migration; no wrong byte reaches the
 * destination.
 *
 * The main channel's own pages (7.2 sends zero pages there; 10.0 too with zero-page-detection=legacy)
 * take part as well: their epoch is the count of MULTIFD_FLUSH records on the main channel (10.0), or of
 * RAM EOS records when no MULTIFD_FLUSH comes before the first EOS (7.2, and 10.0 on machine types
 * before 8.0); the k-th of them follows the k-th SYNC on every channel. The main channel cannot wait at
 * the barrier: QEMU may keep its MULTIFD_FLUSH in a buffer until the channels have taken more pages,
 * so a channel waiting for it would deadlock the source. Instead every page write, on any channel, is
 * stamped with its epoch (`claim`) and a write older than the page's last one is dropped, so the store
 * keeps the final version in whatever order the channels are read. A Run may name a page only once the
 * main channel has passed the Run's epoch (`mainReached`; the receiving side holds a Run back until its
 * main channel has too), so the older writes of that page have been made on both gateways alike, and
 * the main channel names a page of its own only when no channel is behind it.
 *
 * Bases of an earlier epoch. Where QEMU syncs the channels after every RAM section (7.2; later
 * versions on machine types of 8.0 and before) an epoch is a few megabytes, and a page rarely resembles
 * one sent in the same epoch. A channel's page may also go as a Delta against another page's version of
 * an earlier epoch (`earlierBases`, Feature.ChannelEarlierBases): the main channel and the barrier have
 * passed that version's epoch on both gateways, so the receiver holds it, unless a write of the base in
 * this epoch, on another channel or the main channel, is rebuilt there before the Delta. The sender
 * marks each such base for the epoch (`wentAgainstEarlier`), and every later write of it in that epoch
 * is preceded on its connection by a KeepVersion frame, ahead of any byte that completes the write there
 * (see MultifdEncoder.keepBeforeWrite; on the main channel, before its record), on which the receiver
 * keeps the version held then (`epochStart`); the receiver
 * rebuilds the Delta from whichever version it holds has the base digest the Delta names. At most
 * EARLIER_BASES_PER_EPOCH bases an epoch, so what the receiver keeps is bounded.
 *
 * The stamps are kept from the first channel's join on (a migration without channels needs none): if
 * the main channel has passed its second epoch marker by then (QEMU sends the first before any page), its
 * unstamped writes may be overwritten by older ones, and the migration claims no snapshot
 * (`retainedAll`). A channel that joins after the others have passed a later SYNC still leaves the final
 * versions in the store, but a Run naming a page one of them also carries may fail its digest check
 * (never rebuild a wrong byte): the gateway has every channel join before the first SYNC is read where
 * it can (they are read only once the main channel has given its block list, which QEMU sends after
 * opening them all).
 */
export interface MultifdChannelCodec {
  /** What the channel carried, counted as the main channel's codec counts. */
  readonly counts: Readonly<TransferCounts>;
  /** Where and why the channel stopped being parsed (null: it was parsed whole). */
  readonly fallback: StreamFallback | null;
  /** SYNC packets this channel has passed. */
  readonly syncs: number;
  /** Counts towards the barrier: neither fallen back nor ended. */
  readonly synchronising: boolean;
  readonly parked: boolean;
  /** Ended, having been parsed whole: every page it carried was kept. */
  readonly retainedAll: boolean;
  /** Parked, and what it waits for has come: the barrier may unpark it. */
  mayReadOn(): boolean;
  /** The barrier lets it past its last SYNC: it reads on through its queued input. */
  unpark(): void;
}

/**
 * The main channel's encoder, as a multifd channel's uses it (StreamEncoder): pages elsewhere in the VM
 * that a channel's page may go against, found, and kept, as for the main channel's own pages.
 */
export interface PagesElsewhere {
  /** Whether the main channel's Deltas are paid whatever they cost now (StreamEncoder.deltaReadsFree). */
  readonly deltaReadsFree: boolean;
  /** The resemblance key to look for the page by and keep it by, 0 for none now. */
  elsewhereKey(record: RamPageRecord): number;
  /** A Delta payload against another page the receiver holds that `usable` accepts, or null. */
  deltaElsewhere(record: RamPageRecord, words: Uint32Array, digest: Uint8Array, digestWords: Uint32Array, key: number, usable: (base: number) => boolean): Buffer | null;
  /** The page went (the receiver holds it now): indexed and kept for later pages. */
  keepForLater(record: RamPageRecord, digestWords: Uint32Array, key: number): void;
  /** A source chunk came: the content index takes in its next slice. */
  advanceContentIndex(): void;
}

/** What `claim` says of a page write. */
export enum Claim {
  /** The page was written in a later epoch already: this version is older, and is dropped. */
  Stale,
  /** Written already in this epoch (QEMU before 9.0 sends some twice): kept, never named in a Run. */
  Again,
  /** The page's first write in this epoch. */
  First,
}

export class MultifdMigration {
  /**
   * Sender only: the receiver's digest table, the main channel's encoder's own (StreamEncoder.receiverTable);
   * null for no reuse.
   */
  receiverTable: ReceiverTable | null = null;
  /**
   * Sender only: the receiver takes Delta frames on the channels (Feature.ChannelDeltas): a changed page
   * may go as the ranges that differ from the version both sides hold (MultifdEncoder).
   */
  channelDeltas = false;
  /**
   * The sending side checks each channel after every SYNC packet (Feature.ChannelChecks): the receiver
   * holds each SYNC packet back from its destination until the check after it has passed.
   */
  channelChecks = false;
  /**
   * Sender only: the receiver takes PacketHeader frames on the channels (Feature.ChannelPacketHeaders):
   * each packet's header and offsets go coded against the channel's previous header (proxy/packet-header.ts).
   */
  packetHeaders = false;
  /**
   * Sender only: the siblings the receiver confirmed, where it takes SiblingDelta frames on the channels
   * (Feature.ChannelSiblings): a page whose content a sibling's snapshot holds goes as a reference to it.
   * Unlike a Run or a Delta this names nothing of the migrating VM's store, only a snapshot pinned for
   * the whole migration, so no channel's order matters to it: any normal page may go so, on any channel.
   * Null: none. The main channel's encoder shares it (StreamEncoder.siblings).
   */
  siblings: SiblingMatch | null = null;
  /**
   * Sender only: whether such references pay now, as the main channel's encoder judges (StreamEncoder.
   * siblingsPay, which the sending session updates per chunk): the receiver reads them ahead and the
   * link is slow enough that a page crossing costs more than the receiver's read of it.
   */
  siblingsPay: () => boolean = () => true;
  /**
   * Sender only: where the receiver takes Deltas against other pages on the channels (Feature.
   * ChannelMatches), the main channel's encoder, which finds them (a page of the same content, or one
   * like it, sent lately). A channel sends one only against a page written in the channel's epoch
   * already, and not where QEMU < 9.0 may send that page again in it (a packet's first or last page,
   * repeatable): QEMU sends every other page at most once an epoch, so no channel writes that base again
   * before the barrier, and the receiver holds such a Delta back until the base's write, on whatever
   * channel, has been rebuilt (MultifdDecoder).
   */
  elsewhere: PagesElsewhere | null = null;
  /**
   * Sender only: with `elsewhere`, the receiver also takes Deltas against a page's version of an earlier
   * epoch on the channels, and KeepVersion frames (Feature.ChannelEarlierBases; see above).
   */
  earlierBases = false;
  /**
   * Receiver only: the siblings' pinned stores, in the Offer's order (what SiblingDelta frames name),
   * and where a channel notes one whose page did not match its digest: the main channel's decoder's own
   * lists (StreamDecoder.siblings, damagedSiblings), so that the gateway checks that store afterwards
   * whichever channel found it damaged.
   */
  siblingPages: readonly SiblingPages[] = [];
  damagedSiblings: SiblingPages[] = [];
  /**
   * Sender only: runs `step` after `ms`, and after the input that came meanwhile has been read (the
   * gateway's timer, which fails the migration if `step` throws). With it a channel past a SYNC waits
   * up to MAIN_WAIT_MS for the main channel's marker of the epoch where QEMU sends it right after the
   * SYNC packets (`mainFollowsSyncs`): pages read before it has been parsed cannot be named in a Run.
   * Without it (tests) channels never wait for it.
   */
  wakeAfter: ((ms: number, step: () => void) => void) | null = null;
  /** Receiver only: pages as they were when the current epoch began, where a repeated page overwrote them. */
  readonly epochStart: EpochStartPages | null;
  /** Receiver only: pages as they were before the main channel overwrote them ahead of a channel (mainPageReceived). */
  readonly overtaken: OvertakenPages | null;
  /** Receiver only: the pages the channels stored last, made at the first Delta against another page (recentPages()). */
  private channelsRecent: RecentPages | null = null;
  private readonly blocks = new Map<string, RamBlock>();
  /** The same blocks by index (a Run names its block so). */
  private readonly blockList: RamBlock[] = [];
  /** Per page, 1 + the epoch it was last written in; 0 = not in this migration. Empty until a channel joins. */
  private writeEpochs = new Uint32Array(0);
  /** Sender only, per page: its first write in its last epoch was named in a Run. */
  private namedInRuns = new Uint8Array(0);
  /** Sender only, per page: 1 + the last epoch it came where QEMU < 9.0 may send it twice (made at the first). */
  private repeatEpochs: Uint32Array | null = null;
  /** Sender only, per page: 1 + the last epoch a channel's Delta went against its version of an earlier epoch (made at the first). */
  private earlierBaseEpochs: Uint32Array | null = null;
  /** Sender only: the epoch of the last such Delta, and the bases marked in it. */
  private earlierEpoch = -1;
  private earlierInEpoch = 0;
  private pageCount = 0;
  /** The first channel joined too late for the stamps to order every write (see above). */
  private joinedLate = false;
  private readonly channels: MultifdChannelCodec[] = [];
  private settling = false;
  /** The main channel's epoch: its MULTIFD_FLUSH (or RAM EOS) records so far. */
  private mainEpoch = 0;
  /** Which of its records the main channel's epoch counts (the first of either decides). */
  private mainMarker: RecordKind.RamMultifdFlush | RecordKind.RamEos | null = null;
  private mainEnded = false;

  constructor(
    /** The store the main channel's codec keeps (the same object), or null. */
    readonly store: RetainedPages | null,
    /**
     * Channels the migration has, when known: the barrier waits for this many to have joined. With 0
     * it counts those that have joined, so every channel must join before the first SYNC is read on any.
     */
    private expectedChannels = 0,
  ) {
    this.epochStart = store === null ? null : new EpochStartPages(store);
    this.overtaken = store === null ? null : new OvertakenPages(store);
  }

  /** At least `count` channels will join (the sending gateway says how many it has): the barrier waits for them. */
  expectChannels(count: number): void {
    this.expectedChannels = Math.max(this.expectedChannels, count);
  }

  /** The main channel's block list (its codec's onLayout), needed before any packet with pages. */
  begin(layout: PageLayout): void {
    this.blocks.clear();
    this.blockList.length = 0;
    let firstPage = 0;
    layout.layout.blocks.forEach(({ name, length }, index) => {
      const pages = Math.ceil(length / X86_PAGE_SIZE);
      const block = { index, name, length, firstPage, pages };
      this.blocks.set(name, block);
      this.blockList.push(block);
      firstPage += pages;
    });
    this.pageCount = firstPage;
    this.stamp(this.channels.length > 0 ? firstPage : 0);
  }

  private stamp(pages: number): void {
    this.writeEpochs = new Uint32Array(pages);
    this.namedInRuns = new Uint8Array(pages);
    this.repeatEpochs = null;
    this.earlierBaseEpochs = null;
  }

  /** A page is being written in epoch `epoch`: whether to keep it, and whether it may be named in a Run. */
  claim(pageIndex: number, epoch: number): Claim {
    if (this.writeEpochs.length === 0) return Claim.First;
    const last = this.writeEpochs[pageIndex];
    if (last > epoch + 1) return Claim.Stale;
    this.writeEpochs[pageIndex] = epoch + 1;
    if (last === epoch + 1) return Claim.Again;
    this.namedInRuns[pageIndex] = 0;
    return Claim.First;
  }

  /** Whether `pageIndex` is a page of the block list. */
  hasPage(pageIndex: number): boolean {
    return Number.isInteger(pageIndex) && pageIndex >= 0 && pageIndex < this.pageCount;
  }

  /** Whether the page has been written in an epoch later than `epoch` already (only the main channel can have: see mainPageReceived). */
  writtenAfter(pageIndex: number, epoch: number): boolean {
    return this.writeEpochs.length > 0 && this.writeEpochs[pageIndex] > epoch + 1;
  }

  /** Whether the page has been written (or rebuilt from a Run) in epoch `epoch` already. */
  writtenIn(pageIndex: number, epoch: number): boolean {
    return this.writeEpochs.length > 0 && this.writeEpochs[pageIndex] === epoch + 1;
  }

  /** Sender: the page came in epoch `epoch` where QEMU < 9.0 may send it again in that epoch (a packet's first or last). */
  noteRepeatable(pageIndex: number, epoch: number): void {
    (this.repeatEpochs ??= new Uint32Array(this.pageCount))[pageIndex] = epoch + 1;
  }

  /** Sender: whether the page came in epoch `epoch` where it may come again in it: no Delta may go against it. */
  repeatable(pageIndex: number, epoch: number): boolean {
    return this.repeatEpochs !== null && this.repeatEpochs[pageIndex] === epoch + 1;
  }

  /**
   * Sender: whether a channel's page of epoch `epoch` may go as a Delta against `base`'s version of an
   * earlier epoch (see above): written in none of this epoch or later, nor where QEMU < 9.0 may have
   * sent it twice in its epoch (the two copies may differ, and be applied in either order); the main
   * channel past the epoch (its older writes made on both sides); and the epoch's bases not used up.
   */
  mayGoAgainstEarlier(base: number, epoch: number): boolean {
    if (!this.earlierBases || this.writeEpochs.length === 0 || !this.mainReached(epoch)) return false;
    const last = this.writeEpochs[base];
    if (last > epoch || (last > 0 && this.repeatEpochs !== null && this.repeatEpochs[base] === last)) return false;
    if (this.earlierBaseEpochs !== null && this.earlierBaseEpochs[base] === epoch + 1) return true;
    return this.earlierEpoch !== epoch || this.earlierInEpoch < EARLIER_BASES_PER_EPOCH;
  }

  /**
   * Sender: a channel's Delta of epoch `epoch` went against `base`'s version of an earlier epoch: every
   * write of the base later in the epoch is preceded by a KeepVersion frame (keepsBeforeWrite).
   */
  wentAgainstEarlier(base: number, epoch: number): void {
    const epochs = (this.earlierBaseEpochs ??= new Uint32Array(this.pageCount));
    if (epochs[base] === epoch + 1) return;
    if (this.earlierEpoch !== epoch) {
      this.earlierEpoch = epoch;
      this.earlierInEpoch = 0;
    }
    this.earlierInEpoch++;
    epochs[base] = epoch + 1;
  }

  /** Sender: whether a write of the page in `epoch` must have the receiver keep the version it holds first. */
  keepsBeforeWrite(pageIndex: number, epoch: number): boolean {
    return this.earlierBaseEpochs !== null && this.earlierBaseEpochs[pageIndex] === epoch + 1;
  }

  /** Sender: keepsBeforeWrite() for a page of the main channel's, in its epoch. */
  mainWriteKeeps(pageIndex: number): boolean {
    return this.keepsBeforeWrite(pageIndex, this.mainEpoch);
  }

  /**
   * Receiver: a channel's KeepVersion frame, in its epoch `epoch`: the page is about to be written in
   * it, and a Delta of the epoch on another channel may go against the version held now.
   */
  keepVersion(pageIndex: number, epoch: number): void {
    if (!this.hasPage(pageIndex)) throw new RebuildError(`a KeepVersion for page ${pageIndex}, outside the block list`);
    if (this.epochStart === null) throw new RebuildError('a KeepVersion, but this gateway keeps no store');
    this.epochStart.keep(pageIndex, epoch, this.channelsRecent, true);
  }

  /**
   * Receiver: the main channel's KeepVersion frame. Kept only where a channel still reads the main
   * channel's epoch and none is behind it: a channel behind it has the version kept as overtaken when
   * the main channel writes the page (mainPageReceived), and once every channel is past the epoch no
   * Delta of it is still to come.
   */
  keepVersionOnMain(pageIndex: number): void {
    const epoch = this.mainEpoch;
    if (this.channelBehindMain() || !this.channels.some((c) => c.synchronising && c.syncs === epoch)) return;
    this.keepVersion(pageIndex, epoch);
  }

  /** Sender: the page's write in its epoch is named in a Run. */
  nameInRun(pageIndex: number): void {
    if (this.namedInRuns.length > 0) this.namedInRuns[pageIndex] = 1;
  }

  /** Sender: the page's first write in its last epoch was named in a Run. */
  namedInRun(pageIndex: number): boolean {
    return this.namedInRuns.length > 0 && this.namedInRuns[pageIndex] === 1;
  }

  /** A RAM marker record of the main channel: EOS or MULTIFD_FLUSH may end an epoch. */
  mainRecord(kind: RecordKind): void {
    if (kind !== RecordKind.RamMultifdFlush && kind !== RecordKind.RamEos) return;
    this.mainMarker ??= kind;
    if (kind !== this.mainMarker) return;
    this.mainEpoch++;
    this.settle();
  }

  /** A page of the main channel's: as claim(), and First only when no channel is behind the main channel. */
  mainPage(pageIndex: number): Claim {
    const claim = this.claim(pageIndex, this.mainEpoch);
    return claim === Claim.First && !this.mayPass(this.mainEpoch) ? Claim.Again : claim;
  }

  /**
   * The receiving side's mainPage(): the main channel does not wait at the barrier, and a receiving
   * gateway may read it a whole epoch ahead of a channel (its connection carries little, a channel's
   * carries the pages); QEMU's own destination applies it only once every channel has synced. So a page
   * it writes may be one a channel behind it still names in a Run or a Delta, by the version the sending
   * gateway, reading them in the source's order, saw the receiver hold: that version is kept first
   * (`overtaken`), for such a frame to be rebuilt from.
   */
  mainPageReceived(pageIndex: number): Claim {
    const before = this.writeEpochs.length > 0 ? this.writeEpochs[pageIndex] - 1 : -1;
    const claim = this.mainPage(pageIndex);
    if (claim !== Claim.Stale && this.overtaken !== null && this.channelBehindMain()) this.overtaken.keep(pageIndex, before);
    return claim;
  }

  /**
   * Whether every channel but `channel` and the main channel have left `channel`'s epoch: nothing but
   * `channel` itself can write a page in that epoch any more.
   */
  epochOverFor(channel: MultifdChannelCodec): boolean {
    if (this.channels.length < this.expectedChannels || !this.mainReached(channel.syncs + 1)) return false;
    return this.channels.every((c) => c === channel || !c.synchronising || c.syncs > channel.syncs);
  }

  /** Some channel still reads an epoch the main channel has left. Asked for every main-channel page: a loop, no closure. */
  private channelBehindMain(): boolean {
    const channels = this.channels;
    for (let i = 0; i < channels.length; i++) if (channels[i].synchronising && channels[i].syncs < this.mainEpoch) return true;
    return false;
  }

  /**
   * Receiver: the pages the channels stored last, in memory, the bases most of their Deltas against
   * other pages name (written moments ago, on whatever channel), kept from now on (RecentPages.used()).
   */
  recentPages(): RecentPages {
    const recent = (this.channelsRecent ??= new RecentPages(this.pageCount, X86_PAGE_SIZE));
    recent.used();
    return recent;
  }

  /** Receiver: the channels' recent pages if they are kept already (a look at them, not a use: see recentPages()). */
  get recentCopies(): RecentPages | null {
    return this.channelsRecent;
  }

  /** Receiver: whether the channels' recent pages hold a version of the page (a hint; not a use of them, as recentPages() is). */
  recentlyStored(pageIndex: number): boolean {
    return this.channelsRecent !== null && this.channelsRecent.find(pageIndex) >= 0;
  }

  /** Receiver: a channel stored page `pageIndex`, data[start…] for a normal page (null: a zero page). */
  channelStored(pageIndex: number, data: Buffer | null, start: number): void {
    const recent = this.channelsRecent;
    if (recent === null) return;
    if (data === null) recent.forget(pageIndex);
    else recent.add(pageIndex, data, start);
  }

  /** The migration is over, whichever way: the recent pages go back to the pool for the next one. */
  release(): void {
    this.channelsRecent?.release();
    this.channelsRecent = null;
  }

  /** The main channel's stream has ended: nobody waits for it any more. */
  endMain(): void {
    this.mainEnded = true;
    this.settle();
  }

  /**
   * The main channel's epochs are counted by RAM EOS records (QEMU 7.2; 10.0 on machine types before
   * 8.0): QEMU writes and flushes the EOS right after every channel's SYNC packet and before any page of
   * the next epoch, so it is on its way when a channel passes its SYNC. (A MULTIFD_FLUSH may stay in
   * QEMU's buffer until the channels take more pages: a channel must not wait for that one.)
   */
  get mainFollowsSyncs(): boolean {
    return this.mainMarker === RecordKind.RamEos && !this.mainEnded;
  }

  /** Whether the main channel has passed into epoch `epoch`: only then may a Run of that epoch be named or rebuilt. */
  mainReached(epoch: number): boolean {
    return this.mainEnded || this.mainEpoch >= epoch;
  }

  /** The multifd channels that have joined or are expected, whichever are more. */
  get channelCount(): number {
    return Math.max(this.channels.length, this.expectedChannels);
  }

  /** No multifd channel has joined, nor is one expected: the main channel carries every page so far. */
  get mainOnly(): boolean {
    return this.channels.length === 0 && this.expectedChannels === 0;
  }

  get started(): boolean {
    return this.blocks.size > 0;
  }

  /** The block a packet names; throws as QEMU's destination would fail on it. */
  block(name: string, streamOffset: number): RamBlock {
    if (!this.started) throw new Error('multifd pages before the main channel gave the RAM block list (MultifdMigration.begin)');
    const block = this.blocks.get(name);
    if (!block) throw new StreamError(StreamErrorCode.UnknownBlock, streamOffset, `multifd packet names RAM block "${name}"`);
    return block;
  }

  /** The block of that index, or null. */
  blockAt(index: number): RamBlock | null {
    return this.blockList[index] ?? null;
  }

  join(channel: MultifdChannelCodec): void {
    if (this.writeEpochs.length === 0) {
      if (this.mainEpoch >= 2) this.joinedLate = true;
      this.stamp(this.pageCount);
    }
    this.channels.push(channel);
  }

  /** What the channels carried so far, all added up. */
  channelCounts(): TransferCounts {
    const total = newCounts();
    for (const channel of this.channels) addCounts(total, channel.counts);
    return total;
  }

  /** Where the first channel that stopped being parsed did, and why (null: every one was parsed whole so far). */
  channelFallback(): StreamFallback | null {
    for (const channel of this.channels) if (channel.fallback !== null) return channel.fallback;
    return null;
  }

  /** Every channel has ended having been parsed whole, so the store holds every page they carried. */
  get retainedAll(): boolean {
    return !this.joinedLate && this.channels.every((c) => c.retainedAll);
  }

  /** Whether a channel that has just passed its `syncs`-th SYNC may read on. */
  mayPass(syncs: number): boolean {
    if (this.channels.length < this.expectedChannels) return false;
    // Asked for every main-channel page: a loop, not a closure allocated per call.
    const channels = this.channels;
    for (let i = 0; i < channels.length; i++) if (channels[i].synchronising && channels[i].syncs < syncs) return false;
    return true;
  }

  /**
   * Lets every parked channel the barrier now allows read on, until none can. Codecs call it once their
   * own parsing has returned (never from inside it), so no parser is re-entered.
   */
  settle(): void {
    if (this.settling) return;
    this.settling = true;
    try {
      let moved = true;
      while (moved) {
        moved = false;
        for (const channel of this.channels) {
          if (channel.parked && channel.mayReadOn()) {
            channel.unpark();
            moved = true;
          }
        }
      }
      // No frame of the epochs the main channel overtook is still to come.
      if (this.overtaken !== null && this.overtaken.size > 0 && !this.channelBehindMain()) this.overtaken.clear();
    } finally {
      this.settling = false;
    }
  }
}

/**
 * Presents a multifd page as the main channel's RAM record, so that PageRetainer keeps it (one object,
 * reused for every page).
 */
export class MultifdPageView {
  readonly record: RamPageRecord = {
    kind: RecordKind.RamPage,
    flags: 0,
    block: { index: -1, name: '', length: 0, firstPage: 0, pages: 0 },
    offset: 0,
    pageIndex: 0,
    byteValue: 0,
    data: Buffer.alloc(0),
    dataStart: 0,
    dataLength: X86_PAGE_SIZE,
    streamOffset: 0,
  };

  /** Points the record at the page; throws if the page lies outside the block. */
  set(page: MultifdPageRecord, block: RamBlock): RamPageRecord {
    if (page.offset >= block.pages * X86_PAGE_SIZE) {
      throw new StreamError(StreamErrorCode.PageOutOfRange, page.streamOffset, `multifd page at 0x${page.offset.toString(16)} beyond block ${block.name}`);
    }
    const r = this.record;
    r.kind = page.kind === MultifdRecordKind.Page ? RecordKind.RamPage : RecordKind.RamZero;
    r.block = block;
    r.offset = page.offset;
    r.pageIndex = block.firstPage + page.offset / X86_PAGE_SIZE;
    r.data = page.data;
    r.dataStart = page.dataStart;
    r.streamOffset = page.streamOffset;
    return r;
  }
}
