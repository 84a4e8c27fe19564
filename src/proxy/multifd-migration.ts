import { X86_PAGE_SIZE } from '../qemu/constants';
import { StreamError, StreamErrorCode } from '../qemu/errors';
import { type MultifdPageRecord, MultifdRecordKind } from '../qemu/multifd';
import { type RamBlock, type RamPageRecord, RecordKind } from '../qemu/records';
import type { PageLayout, RetainedPages } from './retained';

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
 * QEMU before 9.0 breaks the at-most-once rule in one way (seen on 7.2's channels): the last page of a
 * packet may go again as the first page of the next packet, often on another channel, in the same
 * epoch (QEMU counts it once). Its two copies are applied in either order, by QEMU's destination as by
 * the gateways, so the sender must not name such a page in a Run, which the receiver might resolve after
 * it has stored the other copy: a page sent once already in the current epoch is never named in a Run
 * (`claim`), and until a channel has shown it comes from a QEMU of 9.0 or later (its SYNC packets carry
 * no pages, and say pages_alloc 0) neither is a packet's first or last page. Should a source break the
 * rules some other way, a Run's digest check fails the migration; no wrong byte reaches the destination.
 *
 * Not covered yet: the main channel's own pages (7.2 sends zero pages there; 10.0 too with
 * zero-page-detection=legacy) are kept by its StreamEncoder/StreamDecoder outside the barrier. Their
 * epoch is the count of MULTIFD_FLUSH records on the main channel (10.0), or of RAM EOS records when no
 * MULTIFD_FLUSH comes before the first EOS (7.2, and 10.0 on machine types before 8.0); until the main
 * channel joins the barrier, a page it sends and a channel sends again in another epoch may end in
 * either version in a store, and a Run naming it may fail its digest check.
 */
export interface MultifdChannelCodec {
  /** SYNC packets this channel has passed. */
  readonly syncs: number;
  /** Counts towards the barrier: neither fallen back nor ended. */
  readonly synchronising: boolean;
  readonly parked: boolean;
  /** The barrier lets it past its last SYNC: it reads on through its queued input. */
  unpark(): void;
}

export class MultifdMigration {
  /**
   * Sender only: the receiver's digest table, as StreamEncoder.reference (the gateway gives both the
   * same table); null for no reuse.
   */
  reference: Uint8Array | null = null;
  private readonly blocks = new Map<string, RamBlock>();
  /** Sender: per page, 1 + the epoch its reference was last updated in; 0 = not in this migration. */
  private referenceEpochs = new Uint32Array(0);
  private readonly channels: MultifdChannelCodec[] = [];
  private settling = false;

  constructor(
    /** The store the main channel's codec keeps (the same object), or null. */
    readonly store: RetainedPages | null,
    /**
     * Channels the migration has, when known: the barrier waits for this many to have joined. With 0
     * it counts those that have joined, so every channel must join before the first SYNC is read on any.
     */
    private readonly expectedChannels = 0,
  ) {}

  /** The main channel's block list (its codec's onLayout), needed before any packet with pages. */
  begin(layout: PageLayout): void {
    this.blocks.clear();
    let firstPage = 0;
    layout.layout.blocks.forEach(({ name, length }, index) => {
      const pages = Math.ceil(length / X86_PAGE_SIZE);
      this.blocks.set(name, { index, name, length, firstPage, pages });
      firstPage += pages;
    });
    this.referenceEpochs = new Uint32Array(firstPage);
  }

  /**
   * Sender: the page is being sent in epoch `epoch`; returns whether it may be named in a Run, which it
   * may not if it was sent already in this epoch.
   */
  claim(pageIndex: number, epoch: number): boolean {
    const first = this.referenceEpochs[pageIndex] <= epoch;
    this.referenceEpochs[pageIndex] = epoch + 1;
    return first;
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

  join(channel: MultifdChannelCodec): void {
    this.channels.push(channel);
  }

  /** Whether a channel that has just passed its `syncs`-th SYNC may read on. */
  mayPass(syncs: number): boolean {
    if (this.channels.length < this.expectedChannels) return false;
    return this.channels.every((c) => !c.synchronising || c.syncs >= syncs);
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
          if (channel.parked && this.mayPass(channel.syncs)) {
            channel.unpark();
            moved = true;
          }
        }
      }
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
