import { StreamHash } from '../digest';
import { type MultifdPacketEndRecord, type MultifdPacketRecord, type MultifdPageRecord, MultifdParser, type MultifdRecord, MultifdRecordKind } from '../qemu/multifd';
import type { RamBlock, RamPageRecord, StreamFallback } from '../qemu/records';
import { newCounts, type TransferCounts } from './transfer-counts';
import { type MultifdChannelCodec, type MultifdMigration, MultifdPageView } from './multifd-migration';
import { PageRetainer } from './retained';

/**
 * What MultifdEncoder and MultifdDecoder share: the channel's parser, its place in the migration's SYNC
 * barrier (see MultifdMigration), the block the current packet names, and the channel's XXH3-64.
 */
export abstract class MultifdChannel implements MultifdChannelCodec {
  readonly counts: TransferCounts = newCounts();
  syncs = 0;
  protected ended = false;
  /**
   * The channel's SYNC packets say pages_alloc 0: QEMU 9.0 or later, which sends no page twice in an
   * epoch (see MultifdMigration).
   */
  protected modernQemu = false;
  protected readonly parser: MultifdParser;
  protected readonly retainer: PageRetainer;
  protected readonly streamHash = new StreamHash();
  private readonly view = new MultifdPageView();
  /** The block the current packet names (null: it carries no page). */
  protected block: RamBlock | null = null;
  /** Called when the barrier lets the parked channel read on (its reader resumes reading). */
  onReadOn: (() => void) | null = null;
  /** The channel's end, come while it was parked: run once it has read all it was given. */
  private pendingEnd: (() => void) | null = null;

  constructor(protected readonly migration: MultifdMigration) {
    this.retainer = new PageRetainer(migration.store);
    this.parser = new MultifdParser((record) => this.onRecord(record));
    migration.join(this);
  }

  abstract get parked(): boolean;
  abstract unpark(): void;

  get synchronising(): boolean {
    return !this.ended && this.parser.fallenBack === null;
  }

  get retainedAll(): boolean {
    return this.ended && this.parser.fallenBack === null;
  }

  /** Parked at a SYNC: the others have all passed it. */
  mayReadOn(): boolean {
    return this.parser.isPaused && this.passes();
  }

  /** Whether the channel, past its last SYNC, may read on. */
  protected passes(): boolean {
    return this.migration.mayPass(this.syncs);
  }

  /** Where and why the channel stopped being parsed (null: it was parsed whole). */
  get fallback(): StreamFallback | null {
    return this.parser.fallenBack;
  }

  /**
   * Runs `finish` (the channel's end) now, or, if the channel is parked (it may well be: its last SYNC
   * can come before another channel's), once it has read on through everything queued. Errors of a
   * deferred end surface from the call that let the channel read on (another channel's).
   */
  protected endWhenDrained(finish: () => void): void {
    if (this.parked) this.pendingEnd = finish;
    else finish();
  }

  /** Subclasses call it at the end of unpark(). */
  protected afterUnpark(): void {
    if (this.parked) return;
    const finish = this.pendingEnd;
    this.pendingEnd = null;
    if (finish !== null) finish();
    else this.onReadOn?.();
  }

  /** A page of the current packet, `page` presenting it as a main-channel RAM record. */
  protected abstract onPage(record: MultifdPageRecord, page: RamPageRecord): void;

  /** Normal pages of the current packet. */
  private packetNormalPages = 0;

  /** How many of the packet's pages follow the record's back to back (PageRetainer.digestOf). */
  protected pagesAfter(record: MultifdPageRecord): number {
    return record.kind === MultifdRecordKind.Page ? this.packetNormalPages - 1 - record.index : -1;
  }

  /**
   * Whether the record's page may be one QEMU sends twice in its epoch: before 9.0, a packet's first or
   * last normal page (see MultifdMigration). No frame may name such a page's version of the epoch.
   */
  protected mayRepeat(record: MultifdPageRecord): boolean {
    return !this.modernQemu && record.kind === MultifdRecordKind.Page && (record.index === 0 || this.pagesAfter(record) === 0);
  }

  protected onPacket(_packet: MultifdPacketRecord): void {}
  protected onPacketEnd(_end: MultifdPacketEndRecord): void {}

  private onRecord(record: MultifdRecord): void {
    switch (record.kind) {
      case MultifdRecordKind.Packet:
        if (record.sync && record.normalPages === 0) this.modernQemu = record.pagesAlloc === 0;
        this.block = record.normalPages + record.zeroPages > 0 ? this.migration.block(record.block, record.streamOffset) : null;
        this.packetNormalPages = record.normalPages;
        this.onPacket(record);
        return;
      case MultifdRecordKind.Page:
      case MultifdRecordKind.ZeroPage:
        this.onPage(record, this.view.set(record, this.block as RamBlock));
        return;
      case MultifdRecordKind.PacketEnd:
        this.onPacketEnd(record);
        if (record.sync) {
          this.syncs++;
          if (!this.passes()) this.parser.pause();
        }
        return;
      case MultifdRecordKind.Init:
      case MultifdRecordKind.Fallback:
        return;
    }
  }
}
