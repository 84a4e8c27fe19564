import { ByteCursor } from './byte-cursor';
import { Limit, X86_PAGE_SIZE } from './constants';
import { StreamError, StreamErrorCode } from './errors';
import type { FallbackCode, StreamFallback } from './records';

/**
 * One multifd channel's byte stream (QEMU's `multifd` capability, migration/multifd.h, multifd.c,
 * multifd-nocomp.c), the same in QEMU 7.2 and 10.0 apart from the fields noted:
 *
 *   init packet (64 bytes, once): u32 magic 0x11223344 | u32 version 1 | 16-byte VM UUID | u8 channel id
 *                                 | 7 + 32 bytes reserved
 *   packet (header 320 bytes):    u32 magic | u32 version 1 | u32 flags | u32 pages_alloc
 *                                 | u32 normal_pages | u32 next_packet_size | u64 packet_num
 *                                 | u32 zero_pages (10.0; 7.2: reserved, always 0) | 4 + 24 bytes reserved
 *                                 | 256-byte RAM block name, NUL-terminated
 *                                 | slots × u64 offset: the normal pages', then the zero pages', then 0s
 *                                 | normal_pages × page: the normal pages' bytes
 *
 * Every packet has the same number of offset slots, whatever it carries: QEMU sends (and its receiver
 * reads) a fixed-size packet of MULTIFD_PACKET_SIZE / page size = 128 slots for 4 KiB pages. pages_alloc
 * says the same for a packet with pages, and is 0 in a 10.0 SYNC packet; next_packet_size is the page
 * bytes' length where there are pages, and may be stale in a 7.2 SYNC packet without any. Zero pages (10.0 with zero-page-detection=multifd, the default) have an offset and
 * no bytes: the destination zeroes them. In 7.2 zero pages go on the main channel instead. A SYNC packet
 * (flag bit 0) marks a synchronisation point: its pages (7.2 may send some with it) are the last of the
 * round. Compressed packets (zlib, zstd, qpl, uadk, qatzip: flag bits 1..5), device-state packets (bit
 * 6, VFIO, 10.0) and versions other than 1 are not parsed: the channel falls back to verbatim relay.
 */

export const MULTIFD_MAGIC = 0x11223344;
export const MULTIFD_VERSION = 1;
export const MULTIFD_INIT_BYTES = 64;
export const MULTIFD_HEADER_BYTES = 320;
/** Where the RAM block name lies in a packet header, and its field size. */
export const MULTIFD_BLOCK_NAME_AT = 64;
export const MULTIFD_BLOCK_NAME_BYTES = 256;

export const enum MultifdFlag {
  Sync = 1 << 0,
  /** Bits 1..5: the compression method; 0 is none. */
  CompressionMask = 0x1f << 1,
  /** A VFIO device-state packet (10.0): another header layout. */
  DeviceState = 1 << 6,
}

/** Offset slots per packet: MULTIFD_PACKET_SIZE (512 KiB) / the 4 KiB x86 page. */
export const MULTIFD_SLOTS = 128;

export const enum MultifdRecordKind {
  Init = 1,
  /** A packet's header and offsets: everything of it but the page bytes. */
  Packet,
  /** A normal page of the current packet, in packet order. */
  Page,
  /** A zero page of the current packet (offset only), after its normal pages. */
  ZeroPage,
  /** The current packet has been read whole. */
  PacketEnd,
  /** The parser stops understanding the channel here; everything from streamOffset on is opaque. */
  Fallback,
}

export interface MultifdInitRecord {
  kind: MultifdRecordKind.Init;
  version: number;
  uuid: Buffer;
  channel: number;
  streamOffset: number;
}

/** One object reused for every packet: read it during the callback (and until the packet's end). */
export interface MultifdPacketRecord {
  kind: MultifdRecordKind.Packet;
  flags: number;
  sync: boolean;
  pagesAlloc: number;
  normalPages: number;
  zeroPages: number;
  nextPacketSize: number;
  /** QEMU numbers the packets of all channels in one sequence, in the order they were queued. */
  packetNumber: number;
  /** '' when the packet carries no page (QEMU may leave a stale name there then). */
  block: string;
  /** Byte offsets within the block: normal pages first, then zero pages; valid up to pages. */
  offsets: Float64Array;
  streamOffset: number;
}

/**
 * A page of the current packet; one object reused for every page. For a normal page the bytes are
 * data[dataStart, dataStart + page size): a view of the caller's chunk when the page arrived whole in
 * it, else of parser scratch reused by the next page.
 */
export interface MultifdPageRecord {
  kind: MultifdRecordKind.Page | MultifdRecordKind.ZeroPage;
  /** Position in the packet's offsets. */
  index: number;
  offset: number;
  data: Buffer;
  dataStart: number;
  streamOffset: number;
}

export interface MultifdPacketEndRecord {
  kind: MultifdRecordKind.PacketEnd;
  sync: boolean;
  /** Just past the packet. */
  streamOffset: number;
}

export interface MultifdFallbackRecord extends StreamFallback {
  kind: MultifdRecordKind.Fallback;
}

export type MultifdRecord = MultifdInitRecord | MultifdPacketRecord | MultifdPageRecord | MultifdPacketEndRecord | MultifdFallbackRecord;
export type MultifdSink = (record: MultifdRecord) => void;

const enum State {
  Init,
  Header,
  Offsets,
  Pages,
  /** Past a fallback: nothing more is parsed. */
  Verbatim,
  Failed,
}

const MAX_OFFSET = 2 ** Limit.RamBytesLog2;
const NO_DATA = Buffer.alloc(0);

/**
 * An incremental parser of one multifd channel, fed chunks of any size, cut anywhere. It calls the sink
 * once per record, in stream order, and copies no page that arrived whole. Every length field is
 * bounded before anything is gathered for it; a field no QEMU sends throws a StreamError (the parser
 * then refuses further input); a packet it does not understand ends parsing with a Fallback record.
 *
 * pause(), called from the sink at a packet's end, stops parsing there: push() then returns with the
 * rest of its chunk unread, which resume() reads on. The multifd codecs pause at a SYNC packet's end
 * until every channel of the migration has reached the same synchronisation point.
 */
export class MultifdParser {
  fallenBack: StreamFallback | null = null;
  private state = State.Init;
  private error: StreamError | null = null;
  private paused = false;
  private readonly input = new ByteCursor(Math.max(X86_PAGE_SIZE, MULTIFD_SLOTS * 8));
  private recordStart = 0;
  private readonly packet: MultifdPacketRecord = {
    kind: MultifdRecordKind.Packet,
    flags: 0,
    sync: false,
    pagesAlloc: 0,
    normalPages: 0,
    zeroPages: 0,
    nextPacketSize: 0,
    packetNumber: 0,
    block: '',
    offsets: new Float64Array(MULTIFD_SLOTS),
    streamOffset: 0,
  };
  private readonly page: MultifdPageRecord = { kind: MultifdRecordKind.Page, index: 0, offset: 0, data: NO_DATA, dataStart: 0, streamOffset: 0 };
  private readonly packetEnd: MultifdPacketEndRecord = { kind: MultifdRecordKind.PacketEnd, sync: false, streamOffset: 0 };
  /** The next normal page of the current packet. */
  private nextPage = 0;

  constructor(private readonly sink: MultifdSink) {}

  /** Bytes consumed so far. */
  get offset(): number {
    return this.input.offset;
  }

  /** Between packets (or before the first): a channel may end here. */
  get atBoundary(): boolean {
    return (this.state === State.Header && this.input.carriedBytes === 0) || this.state === State.Verbatim;
  }

  get isPaused(): boolean {
    return this.paused;
  }

  /**
   * Stream offset up to which every byte has been handed over in a record: the start of a page still
   * being gathered, or of a packet whose header and offsets are (its Packet record comes once they are
   * all in), else where reading stands (after a fallback: everything).
   */
  get settledTo(): number {
    const input = this.input;
    if (this.state === State.Pages) return input.offset - input.carriedBytes;
    if (this.state === State.Offsets || (this.state === State.Header && input.carriedBytes > 0)) return this.recordStart;
    return input.offset;
  }

  /** The packet being read (valid from its Packet record to its PacketEnd). */
  get currentPacket(): MultifdPacketRecord {
    return this.packet;
  }

  /** When the next byte starts a normal page of the current packet: that page's index; else -1. */
  get nextPageIndex(): number {
    const open = this.state === State.Pages && this.input.carriedBytes === 0 && this.nextPage < this.packet.normalPages;
    return open ? this.nextPage : -1;
  }

  /** Reads the chunk; returns early, leaving the rest for resume(), if the sink pauses. */
  push(chunk: Buffer): void {
    if (this.error) throw this.error;
    if (this.paused) throw new Error('MultifdParser.push while paused: resume() first');
    this.input.feed(chunk);
    this.guarded();
  }

  /**
   * Copies what is left unread of the last chunk (a paused parser's rest, read on by resume()): for a
   * caller that reuses its chunk buffers once push() has returned.
   */
  ownInput(): void {
    this.input.ownUnread();
  }

  /** Called from the sink on a PacketEnd record: parsing stops after that packet. */
  pause(): void {
    this.paused = true;
  }

  /** Reads on in the chunk last pushed. */
  resume(): void {
    if (this.error) throw this.error;
    this.paused = false;
    this.guarded();
  }

  /** The channel has closed: it must have closed between packets. */
  end(): void {
    if (this.error) throw this.error;
    if (!this.atBoundary) this.fail(StreamErrorCode.Truncated, 'the channel ended inside a packet');
  }

  private guarded(): void {
    try {
      this.run();
    } catch (err) {
      if (err instanceof StreamError) {
        this.error = err;
        this.state = State.Failed;
      }
      throw err;
    }
  }

  private run(): void {
    let more = true;
    while (more && !this.paused) {
      switch (this.state) {
        case State.Init: more = this.readInit(); break;
        case State.Header: more = this.readHeader(); break;
        case State.Offsets: more = this.readOffsets(); break;
        case State.Pages: more = this.readPage(); break;
        case State.Verbatim: more = this.readVerbatim(); break;
        case State.Failed: more = false; break;
      }
    }
  }

  // Each state method consumes what it can and returns whether to go on.

  private readInit(): boolean {
    const input = this.input;
    if (!input.take(MULTIFD_INIT_BYTES)) return false;
    const magic = input.u32(0);
    if (magic !== MULTIFD_MAGIC) this.fail(StreamErrorCode.BadMagic, `magic 0x${magic.toString(16)} is not multifd's`);
    const version = input.u32(4);
    this.sink({ kind: MultifdRecordKind.Init, version, uuid: input.copy(8, 16), channel: input.u8(24), streamOffset: 0 });
    if (version !== MULTIFD_VERSION) {
      this.fallback('multifd-version', `multifd version ${version}`);
    } else {
      this.state = State.Header;
    }
    return true;
  }

  private readHeader(): boolean {
    const input = this.input;
    if (input.carriedBytes === 0) this.recordStart = input.offset;
    if (!input.take(MULTIFD_HEADER_BYTES)) return false;
    const magic = input.u32(0);
    if (magic !== MULTIFD_MAGIC) this.fail(StreamErrorCode.BadMagic, `packet magic 0x${magic.toString(16)}`);
    const version = input.u32(4);
    const flags = input.u32(8);
    if (version !== MULTIFD_VERSION) return this.fallback('multifd-version', `multifd packet version ${version}`);
    if ((flags & MultifdFlag.CompressionMask) !== 0) return this.fallback('multifd-compression', `compressed multifd packet (flags 0x${flags.toString(16)})`);
    if ((flags & ~MultifdFlag.Sync) !== 0) return this.fallback('multifd-flags', `multifd packet flags 0x${flags.toString(16)}`);
    const p = this.packet;
    p.flags = flags;
    p.sync = (flags & MultifdFlag.Sync) !== 0;
    p.pagesAlloc = input.u32(12);
    p.normalPages = input.u32(16);
    p.nextPacketSize = input.u32(20);
    p.packetNumber = input.u32(24) * 0x1_0000_0000 + input.u32(28);
    p.zeroPages = input.u32(32);
    // As QEMU's receiver checks them (multifd_ram_unfill_packet).
    if (p.pagesAlloc > MULTIFD_SLOTS) this.fail(StreamErrorCode.AbsurdLength, `packet of ${p.pagesAlloc} pages, more than ${MULTIFD_SLOTS}`);
    if (p.normalPages > p.pagesAlloc || p.zeroPages > p.pagesAlloc - p.normalPages) {
      this.fail(StreamErrorCode.Malformed, `packet of ${p.normalPages} normal and ${p.zeroPages} zero pages out of ${p.pagesAlloc}`);
    }
    if (p.normalPages > 0 && p.nextPacketSize !== p.normalPages * X86_PAGE_SIZE) {
      this.fail(StreamErrorCode.Malformed, `uncompressed packet of ${p.normalPages} pages says ${p.nextPacketSize} bytes follow`);
    }
    p.block = p.normalPages + p.zeroPages > 0 ? this.blockName() : '';
    p.streamOffset = this.recordStart;
    this.state = State.Offsets;
    return true;
  }

  /** The header's NUL-terminated block name (QEMU ends it at byte 255 whatever the sender put there). */
  private blockName(): string {
    const data = this.input.fieldData;
    const from = this.input.fieldIndex + MULTIFD_BLOCK_NAME_AT;
    let end = data.indexOf(0, from);
    if (end < 0 || end > from + MULTIFD_BLOCK_NAME_BYTES - 1) end = from + MULTIFD_BLOCK_NAME_BYTES - 1;
    return data.toString('latin1', from, end);
  }

  private readOffsets(): boolean {
    const input = this.input;
    const p = this.packet;
    if (!input.take(MULTIFD_SLOTS * 8)) return false;
    const pages = p.normalPages + p.zeroPages;
    for (let i = 0; i < pages; i++) {
      const high = input.u32(i * 8);
      const offset = high * 0x1_0000_0000 + input.u32(i * 8 + 4);
      if (offset >= MAX_OFFSET || offset % X86_PAGE_SIZE !== 0) {
        this.fail(StreamErrorCode.PageOutOfRange, `page offset 0x${offset.toString(16)} in a packet`);
      }
      p.offsets[i] = offset;
    }
    this.sink(p);
    this.nextPage = 0;
    this.state = State.Pages;
    return true;
  }

  /** The next normal page; once they are read, the zero pages and the packet's end. */
  private readPage(): boolean {
    const input = this.input;
    const p = this.packet;
    const page = this.page;
    if (this.nextPage < p.normalPages) {
      const at = input.carriedBytes === 0 ? input.offset : input.offset - input.carriedBytes;
      if (!input.take(X86_PAGE_SIZE)) return false;
      page.kind = MultifdRecordKind.Page;
      page.index = this.nextPage;
      page.offset = p.offsets[this.nextPage];
      page.data = input.fieldData;
      page.dataStart = input.fieldIndex;
      page.streamOffset = at;
      this.nextPage++;
      this.sink(page);
      return true;
    }
    page.kind = MultifdRecordKind.ZeroPage;
    page.data = NO_DATA;
    page.dataStart = 0;
    page.streamOffset = input.offset;
    for (let i = p.normalPages; i < p.normalPages + p.zeroPages; i++) {
      page.index = i;
      page.offset = p.offsets[i];
      this.sink(page);
    }
    this.packetEnd.sync = p.sync;
    this.packetEnd.streamOffset = input.offset;
    this.state = State.Header;
    this.sink(this.packetEnd);
    return true;
  }

  private readVerbatim(): boolean {
    this.input.moveTo(this.input.chunk.length);
    return false;
  }

  private fallback(code: FallbackCode, reason: string): boolean {
    this.fallenBack = { code, reason, streamOffset: this.recordStart };
    this.state = State.Verbatim;
    this.sink({ kind: MultifdRecordKind.Fallback, ...this.fallenBack });
    return true;
  }

  private fail(code: StreamErrorCode, detail: string): never {
    throw new StreamError(code, this.recordStart, detail);
  }
}
