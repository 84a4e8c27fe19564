import {
  FILE_MAGIC,
  FILE_VERSION,
  FILE_VERSION_COMPAT,
  Limit,
  MAX_COMPRESSED_PAGE,
  RamFlag,
  SectionType,
  VmCommand,
  X86_PAGE_SIZE,
} from './constants';
import { encodeConfiguration, encodeSubsectionHeader } from './encode';
import { StreamError, StreamErrorCode } from './errors';
import {
  type BytesRecord,
  type ConfigSubsection,
  type RamBlock,
  type RamMarkerRecord,
  type RamPageRecord,
  RecordKind,
  type RecordSink,
  type StreamRecord,
  type SectionHeaderRecord,
} from './records';

/** What the parser is waiting for. */
const enum State {
  FileHeader,
  Top,
  ConfigHeader,
  ConfigName,
  ConfigNext,
  SubsectionHeader,
  SubsectionName,
  SubsectionBody,
  CapabilityCount,
  CapabilityLength,
  CapabilityName,
  SectionIdent,
  SectionIdstr,
  SectionId,
  RamWord,
  BlockListNameLength,
  BlockListEntry,
  RamBlockNameLength,
  RamBlockName,
  RamBody,
  RamBodyLength,
  RamPayload,
  AfterSection,
  Footer,
  DeviceData,
  DeviceLookahead,
  UnframedDeviceData,
  CommandHeader,
  CommandData,
  AfterEof,
  VmDescriptionLength,
  VmDescriptionData,
  Done,
  Verbatim,
  Failed,
}

/** How the stream is framed; null while the stream has not shown it yet. */
export interface Framing {
  /** A configuration section follows the header (QEMU ≥ 2.9 machine types). */
  configuration: boolean | null;
  /** Every section ends with a footer (QEMU ≥ 2.4 machine types). */
  footers: boolean | null;
  /** A vmdesc JSON trailer follows EOF. */
  vmDescription: boolean | null;
}

export interface ParserOptions {
  /** Target page size; 4096 for x86, the only target bfmig is tested with. */
  pageSize?: number;
}

/** Bytes of lookahead that decide whether `0x7e <id>` in device data is really its footer. */
const FOOTER_LOOKAHEAD = 5 + 1 + 4 + 1 + 255 + 8;
const TWO_32 = 0x1_0000_0000;
const MAX_RAM_BYTES = 2 ** Limit.RamBytesLog2;

/**
 * An incremental, byte-exact parser of a QEMU migration stream. Feed it chunks of any size with
 * push(); it calls the sink once per record, in stream order, and never copies a page that arrived
 * whole. Device state (non-RAM sections) is opaque; anything it does not understand ends parsing
 * with a Fallback record, after which every byte is relayed as Verbatim. Malformed input throws a
 * StreamError, after which the parser refuses further input.
 */
export class StreamParser {
  readonly framing: Framing = { configuration: null, footers: null, vmDescription: null };
  /** Set once the parser has fallen back to verbatim relay. */
  fallbackReason: string | null = null;

  private readonly pageSize: number;
  private readonly pageMask: number;
  private state = State.FileHeader;
  private error: StreamError | null = null;

  // Input: the current chunk, and a carry buffer that assembles records split across chunks.
  private chunk: Buffer = Buffer.alloc(0);
  private pos = 0;
  /** Absolute stream offset of chunk[0]. */
  private base = 0;
  private readonly carry: Buffer;
  private carryLength = 0;
  /** Where need() left the bytes it gathered. */
  private rb: Buffer = Buffer.alloc(0);
  private ro = 0;
  /** Absolute offset where the current record began. */
  private recordStart = 0;

  // Section bookkeeping.
  private readonly sections = new Map<number, SectionHeaderRecord>();
  private readonly sectionHeader: SectionHeaderRecord;
  private currentSection: SectionHeaderRecord | null = null;
  private ramSectionId = -1;
  private readonly footerPattern = Buffer.alloc(5);

  // Configuration being assembled.
  private configName = '';
  private configSubsections: ConfigSubsection[] = [];
  private subsectionName = '';
  private subsectionVersion = 0;
  private capabilities: string[] = [];
  private capabilityCount = 0;
  private ignoreShared = false;

  // RAM.
  private blocks: RamBlock[] = [];
  private readonly blocksByName = new Map<string, RamBlock>();
  private blockListRemaining = 0;
  private blockListFlags = 0;
  private blockListTotal = 0;
  private blockListStart = 0;
  private lastBlock: RamBlock | null = null;
  private wordFlags = 0;
  private wordOffset = 0;
  private payloadLength = 0;
  private readonly page: RamPageRecord;
  private readonly marker: RamMarkerRecord;
  private readonly bytes: BytesRecord;

  // Commands, vmdesc, unframed tail.
  private command = 0;
  private commandLength = 0;
  private vmDescriptionRemaining = 0;
  /** The last byte of unframed device data, held back until we know whether it is EOF. */
  private heldByte = -1;

  /** Stream offset just past the last record handed to the sink: every byte before it is accounted for. */
  recordsEnd = 0;

  constructor(
    private readonly sink: RecordSink,
    options: ParserOptions = {},
  ) {
    this.pageSize = options.pageSize ?? X86_PAGE_SIZE;
    this.pageMask = this.pageSize - 1;
    // Large enough for any record the parser assembles: a page, an XBZRLE delta (u16 length), the
    // footer lookahead.
    this.carry = Buffer.alloc(Math.max(this.pageSize, 0x10000) + 64);
    this.sectionHeader = {
      kind: RecordKind.SectionHeader,
      type: SectionType.Start,
      sectionId: 0,
      idstr: '',
      instanceId: 0,
      versionId: 0,
      streamOffset: 0,
    };
    const noBlock: RamBlock = { index: -1, name: '', length: 0, firstPage: 0, pages: 0 };
    this.page = {
      kind: RecordKind.RamPage,
      flags: 0,
      block: noBlock,
      offset: 0,
      pageIndex: 0,
      byteValue: 0,
      data: this.carry,
      dataStart: 0,
      dataLength: 0,
      streamOffset: 0,
    };
    this.marker = { kind: RecordKind.RamEos, flags: 0, offset: 0, streamOffset: 0 };
    this.bytes = { kind: RecordKind.SectionData, sectionId: 0, bytes: this.carry, streamOffset: 0 };
  }

  /** The RAM block list, once the MEM_SIZE record has been parsed. */
  get ramBlocks(): readonly RamBlock[] {
    return this.blocks;
  }

  /** Bytes consumed so far. */
  get offset(): number {
    return this.base + this.pos;
  }

  /** True once the stream has been read to its end marker (EOF, or the vmdesc after it). */
  get complete(): boolean {
    return this.state === State.Done || this.state === State.AfterEof;
  }

  /**
   * True once the stream has been read to a point nothing can follow: the end of the vmdesc trailer
   * (a stream whose end is only known when its input ends says so only after end()).
   */
  get ended(): boolean {
    return this.state === State.Done;
  }

  push(chunk: Buffer): void {
    if (this.error) throw this.error;
    try {
      this.feed(chunk);
    } catch (err) {
      if (err instanceof StreamError) {
        this.error = err;
        this.state = State.Failed;
      }
      throw err;
    }
  }

  /** The stream has ended: checks that it ended where a stream may end. */
  end(): void {
    if (this.error) throw this.error;
    try {
      this.finish();
    } catch (err) {
      if (err instanceof StreamError) {
        this.error = err;
        this.state = State.Failed;
      }
      throw err;
    }
  }

  // ---------------------------------------------------------------------------------------------

  private feed(chunk: Buffer): void {
    this.base += this.chunk.length;
    this.chunk = chunk;
    this.pos = 0;
    this.run();
  }

  /**
   * Parses bytes that were gathered as lookahead and turned out to belong to later records; they
   * stand at stream offset `at`, before the rest of the current chunk.
   */
  private refeed(bytes: Buffer, at: number): void {
    const chunk = this.chunk;
    const pos = this.pos;
    const base = this.base;
    this.chunk = bytes;
    this.pos = 0;
    this.base = at;
    this.run();
    this.chunk = chunk;
    this.pos = pos;
    this.base = base;
  }

  private fail(code: StreamErrorCode, detail: string, at = this.recordStart): never {
    throw new StreamError(code, at, detail);
  }

  /**
   * Makes n contiguous bytes available at rb[ro..], consuming them. Returns false (having kept what
   * there was) when the chunk runs out first; the state machine resumes at the same state.
   */
  private need(n: number): boolean {
    const available = this.chunk.length - this.pos;
    if (this.carryLength === 0 && available >= n) {
      this.rb = this.chunk;
      this.ro = this.pos;
      this.pos += n;
      return true;
    }
    const take = Math.min(n - this.carryLength, available);
    this.chunk.copy(this.carry, this.carryLength, this.pos, this.pos + take);
    this.carryLength += take;
    this.pos += take;
    if (this.carryLength < n) return false;
    this.rb = this.carry;
    this.ro = 0;
    this.carryLength = 0;
    return true;
  }

  /** The next byte without consuming it, or -1 when the chunk has none. */
  private peek(): number {
    return this.pos < this.chunk.length ? this.chunk[this.pos] : -1;
  }

  /** Notes where a record begins; a no-op while need() is still gathering that record. */
  private startRecord(): void {
    if (this.carryLength === 0) this.recordStart = this.base + this.pos;
  }

  private run(): void {
    for (;;) {
      switch (this.state) {
        case State.FileHeader: {
          if (!this.need(8)) return;
          const magic = this.rb.readUInt32BE(this.ro);
          const version = this.rb.readUInt32BE(this.ro + 4);
          if (magic !== FILE_MAGIC) {
            this.fail(StreamErrorCode.BadMagic, `magic 0x${magic.toString(16)} is not QEVM`, 0);
          }
          if (version === FILE_VERSION_COMPAT || version < FILE_VERSION) {
            this.fail(StreamErrorCode.BadVersion, `stream version ${version} is obsolete`, 4);
          }
          this.emit({ kind: RecordKind.FileHeader, version, streamOffset: 0 });
          if (version !== FILE_VERSION) {
            this.fallback(`stream version ${version} is newer than ${FILE_VERSION}`);
            break;
          }
          this.state = State.Top;
          break;
        }

        case State.Top: {
          if (this.pos >= this.chunk.length) return;
          this.startRecord();
          const type = this.chunk[this.pos];
          if (type === SectionType.Configuration && this.recordStart === 8) {
            this.state = State.ConfigHeader;
          } else if (type === SectionType.Start || type === SectionType.Full) {
            this.state = State.SectionIdent;
          } else if (type === SectionType.Part || type === SectionType.End) {
            this.state = State.SectionId;
          } else if (type === SectionType.Eof) {
            this.pos++;
            this.emit({ kind: RecordKind.Eof, streamOffset: this.recordStart });
            this.state = State.AfterEof;
          } else if (type === SectionType.Command) {
            this.state = State.CommandHeader;
          } else {
            this.fallback(`unknown section type 0x${type.toString(16)}`);
          }
          if (this.framing.configuration === null && this.state !== State.ConfigHeader) {
            this.framing.configuration = false;
          }
          break;
        }

        case State.ConfigHeader: {
          if (!this.need(5)) return;
          const length = this.rb.readUInt32BE(this.ro + 1);
          if (length > Limit.ConfigNameBytes) {
            this.fail(StreamErrorCode.AbsurdLength, `configuration name of ${length} bytes`);
          }
          this.payloadLength = length;
          this.state = State.ConfigName;
          break;
        }

        case State.ConfigName: {
          if (!this.need(this.payloadLength)) return;
          this.configName = this.rb.toString('latin1', this.ro, this.ro + this.payloadLength);
          this.configSubsections = [];
          this.framing.configuration = true;
          this.state = State.ConfigNext;
          break;
        }

        case State.ConfigNext: {
          const next = this.peek();
          if (next < 0) return;
          if (next === SectionType.Subsection) {
            this.state = State.SubsectionHeader;
            break;
          }
          this.emit({
            kind: RecordKind.Configuration,
            machineType: this.configName,
            subsections: this.configSubsections,
            streamOffset: this.recordStart,
          });
          this.state = State.Top;
          break;
        }

        case State.SubsectionHeader: {
          if (!this.need(2)) return;
          this.payloadLength = this.rb[this.ro + 1];
          this.state = State.SubsectionName;
          break;
        }

        case State.SubsectionName: {
          if (!this.need(this.payloadLength + 4)) return;
          this.subsectionName = this.rb.toString('latin1', this.ro, this.ro + this.payloadLength);
          this.subsectionVersion = this.rb.readUInt32BE(this.ro + this.payloadLength);
          if (this.subsectionVersion !== 1) {
            this.fallbackInConfiguration(`configuration subsection ${this.subsectionName} version ${this.subsectionVersion}`);
          } else if (this.subsectionName === 'configuration/capabilities') {
            this.state = State.CapabilityCount;
          } else if (
            this.subsectionName === 'configuration/target-page-bits' ||
            this.subsectionName === 'configuration/uuid'
          ) {
            this.state = State.SubsectionBody;
          } else {
            this.fallbackInConfiguration(`unknown configuration subsection ${JSON.stringify(this.subsectionName)}`);
          }
          break;
        }

        case State.SubsectionBody: {
          if (this.subsectionName === 'configuration/uuid') {
            if (!this.need(16)) return;
            this.configSubsections.push({
              name: 'configuration/uuid',
              version: this.subsectionVersion,
              uuid: Buffer.from(this.rb.subarray(this.ro, this.ro + 16)),
            });
          } else {
            if (!this.need(4)) return;
            const bits = this.rb.readUInt32BE(this.ro);
            this.configSubsections.push({
              name: 'configuration/target-page-bits',
              version: this.subsectionVersion,
              targetPageBits: bits,
            });
            if (2 ** bits !== this.pageSize) {
              this.configSubsections.pop();
              this.fallbackInConfiguration(`target page size 2^${bits} differs from ${this.pageSize}`, bits);
              break;
            }
          }
          this.state = State.ConfigNext;
          break;
        }

        case State.CapabilityCount: {
          if (!this.need(4)) return;
          this.capabilityCount = this.rb.readUInt32BE(this.ro);
          if (this.capabilityCount > Limit.ConfigCapabilities) {
            this.fail(StreamErrorCode.AbsurdLength, `${this.capabilityCount} capabilities`);
          }
          this.capabilities = [];
          this.state = this.capabilityCount > 0 ? State.CapabilityLength : State.ConfigNext;
          if (this.capabilityCount === 0) this.pushCapabilities();
          break;
        }

        case State.CapabilityLength: {
          if (!this.need(1)) return;
          this.payloadLength = this.rb[this.ro];
          this.state = State.CapabilityName;
          break;
        }

        case State.CapabilityName: {
          if (!this.need(this.payloadLength)) return;
          const capability = this.rb.toString('latin1', this.ro, this.ro + this.payloadLength);
          this.capabilities.push(capability);
          if (capability === 'x-ignore-shared') this.ignoreShared = true;
          if (this.capabilities.length < this.capabilityCount) {
            this.state = State.CapabilityLength;
          } else {
            this.pushCapabilities();
            this.state = State.ConfigNext;
          }
          break;
        }

        case State.SectionIdent: {
          // type, section id, idstr length
          if (!this.need(6)) return;
          const h = this.sectionHeader;
          h.type = this.rb[this.ro] as SectionType.Start | SectionType.Full;
          h.sectionId = this.rb.readUInt32BE(this.ro + 1);
          this.payloadLength = this.rb[this.ro + 5];
          h.streamOffset = this.recordStart;
          this.state = State.SectionIdstr;
          break;
        }

        case State.SectionIdstr: {
          if (!this.need(this.payloadLength + 8)) return;
          const h = this.sectionHeader;
          h.idstr = this.rb.toString('latin1', this.ro, this.ro + this.payloadLength);
          h.instanceId = this.rb.readUInt32BE(this.ro + this.payloadLength);
          h.versionId = this.rb.readUInt32BE(this.ro + this.payloadLength + 4);
          this.openSection();
          break;
        }

        case State.SectionId: {
          if (!this.need(5)) return;
          const type = this.rb[this.ro] as SectionType.Part | SectionType.End;
          const id = this.rb.readUInt32BE(this.ro + 1);
          const known = this.sections.get(id);
          if (!known || (known.type !== SectionType.Start && known.type !== SectionType.Part)) {
            this.fail(StreamErrorCode.Malformed, `section ${id} continues but was never started`);
          }
          const record: SectionHeaderRecord = { ...known, type, streamOffset: this.recordStart };
          this.sections.set(id, record);
          this.currentSection = record;
          this.emit(record);
          // Only RAM is ever started (any other live section falls back), so this is RAM data.
          this.state = State.RamWord;
          break;
        }

        case State.RamWord: {
          this.startRecord();
          if (!this.need(8)) return;
          const high = this.rb.readUInt32BE(this.ro);
          const low = this.rb.readUInt32BE(this.ro + 4);
          this.wordFlags = low & this.pageMask;
          this.wordOffset = high * TWO_32 + (low - this.wordFlags);
          this.dispatchRamWord(high);
          break;
        }

        case State.BlockListNameLength: {
          this.startRecord();
          if (!this.need(1)) return;
          this.payloadLength = this.rb[this.ro];
          this.state = State.BlockListEntry;
          break;
        }

        case State.BlockListEntry: {
          const extra = this.ignoreShared ? 8 : 0;
          if (!this.need(this.payloadLength + 8 + extra)) return;
          const name = this.rb.toString('latin1', this.ro, this.ro + this.payloadLength);
          const lengthHigh = this.rb.readUInt32BE(this.ro + this.payloadLength);
          const length = lengthHigh * TWO_32 + this.rb.readUInt32BE(this.ro + this.payloadLength + 4);
          if (lengthHigh >= 2 ** (Limit.RamBytesLog2 - 32) || length > this.blockListRemaining) {
            this.fail(StreamErrorCode.AbsurdLength, `RAM block ${JSON.stringify(name)} of ${length} bytes exceeds the ${this.blockListTotal} bytes announced`);
          }
          if (this.blocksByName.has(name)) {
            this.fail(StreamErrorCode.Malformed, `RAM block ${JSON.stringify(name)} listed twice`);
          }
          if (this.blocks.length >= Limit.RamBlocks) {
            this.fail(StreamErrorCode.AbsurdLength, `more than ${Limit.RamBlocks} RAM blocks`);
          }
          const previous = this.blocks[this.blocks.length - 1];
          const block: RamBlock = {
            index: this.blocks.length,
            name,
            length,
            firstPage: previous ? previous.firstPage + previous.pages : 0,
            pages: Math.ceil(length / this.pageSize),
            ...(extra ? { sharedAddr: this.rb.readBigUInt64BE(this.ro + this.payloadLength + 8) } : {}),
          };
          this.blocks.push(block);
          this.blocksByName.set(name, block);
          this.blockListRemaining -= length;
          if (this.blockListRemaining > 0) {
            this.state = State.BlockListNameLength;
          } else {
            this.emit({
              kind: RecordKind.RamBlockList,
              flags: this.blockListFlags,
              totalBytes: this.blockListTotal,
              blocks: this.blocks,
              streamOffset: this.blockListStart,
            });
            this.state = State.RamWord;
          }
          break;
        }

        case State.RamBlockNameLength: {
          if (!this.need(1)) return;
          this.payloadLength = this.rb[this.ro];
          this.state = State.RamBlockName;
          break;
        }

        case State.RamBlockName: {
          if (!this.need(this.payloadLength)) return;
          const name = this.rb.toString('latin1', this.ro, this.ro + this.payloadLength);
          const block = this.blocksByName.get(name);
          if (!block) this.fail(StreamErrorCode.UnknownBlock, `RAM block ${JSON.stringify(name)} is not in the block list`);
          this.lastBlock = block;
          this.enterRamBody(block);
          break;
        }

        case State.RamBody: {
          // Fixed-size part after the header: ZERO's fill byte, XBZRLE's encoding and length,
          // COMPRESS_PAGE's length; a plain page goes straight to its payload.
          const kind = this.page.kind;
          if (kind === RecordKind.RamZero) {
            if (!this.need(1)) return;
            this.page.byteValue = this.rb[this.ro];
            this.page.data = this.rb;
            this.page.dataStart = this.ro + 1;
            this.page.dataLength = 0;
            this.emitPage();
          } else if (kind === RecordKind.RamXbzrle) {
            if (!this.need(3)) return;
            this.page.byteValue = this.rb[this.ro];
            this.payloadLength = this.rb.readUInt16BE(this.ro + 1);
            if (this.payloadLength > this.pageSize) {
              this.fail(StreamErrorCode.AbsurdLength, `XBZRLE delta of ${this.payloadLength} bytes`);
            }
            this.state = State.RamPayload;
          } else {
            if (!this.need(4)) return;
            this.payloadLength = this.rb.readUInt32BE(this.ro);
            if (this.payloadLength > MAX_COMPRESSED_PAGE) {
              this.fail(StreamErrorCode.AbsurdLength, `compressed page of ${this.payloadLength} bytes`);
            }
            this.state = State.RamPayload;
          }
          break;
        }

        case State.RamPayload: {
          if (!this.need(this.payloadLength)) return;
          this.page.data = this.rb;
          this.page.dataStart = this.ro;
          this.page.dataLength = this.payloadLength;
          this.emitPage();
          break;
        }

        case State.AfterSection: {
          const next = this.peek();
          if (next < 0) return;
          if (next === SectionType.Footer) {
            this.startRecord();
            this.state = State.Footer;
          } else if (this.framing.footers === true) {
            this.startRecord();
            this.fail(StreamErrorCode.FooterMismatch, `section ${this.currentSection?.sectionId} has no footer`);
          } else {
            this.framing.footers = false;
            this.state = State.Top;
          }
          break;
        }

        case State.Footer: {
          if (!this.need(5)) return;
          const id = this.rb.readUInt32BE(this.ro + 1);
          const expected = this.currentSection?.sectionId;
          if (id !== expected) {
            this.fail(StreamErrorCode.FooterMismatch, `footer of section ${id} ends section ${expected}`);
          }
          this.framing.footers = true;
          this.emit({ kind: RecordKind.SectionFooter, sectionId: id, streamOffset: this.recordStart });
          this.state = State.Top;
          break;
        }

        case State.DeviceData:
          if (!this.scanDeviceData()) return;
          break;

        case State.DeviceLookahead: {
          // Gather enough bytes after a candidate footer to decide, then re-feed them.
          const wanted = FOOTER_LOOKAHEAD - this.carryLength;
          const take = Math.min(wanted, this.chunk.length - this.pos);
          this.chunk.copy(this.carry, this.carryLength, this.pos, this.pos + take);
          this.carryLength += take;
          this.pos += take;
          if (this.carryLength < FOOTER_LOOKAHEAD) return;
          this.resolveLookahead(false);
          break;
        }

        case State.UnframedDeviceData: {
          // Without footers, nothing marks where device state ends but EOF, the last byte.
          if (this.pos >= this.chunk.length) return;
          const from = this.pos;
          const to = this.chunk.length - 1;
          this.recordStart = this.base + from;
          if (this.heldByte >= 0) this.emitHeldByte(this.recordStart - 1);
          if (to > from) this.emitBytes(RecordKind.SectionData, this.chunk.subarray(from, to), this.base + from);
          this.heldByte = this.chunk[to];
          this.pos = this.chunk.length;
          return;
        }

        case State.CommandHeader: {
          if (!this.need(5)) return;
          this.command = this.rb.readUInt16BE(this.ro + 1);
          this.commandLength = this.rb.readUInt16BE(this.ro + 3);
          this.state = State.CommandData;
          break;
        }

        case State.CommandData: {
          if (!this.need(this.commandLength)) return;
          const data = Buffer.from(this.rb.subarray(this.ro, this.ro + this.commandLength));
          this.emit({ kind: RecordKind.Command, command: this.command, data, streamOffset: this.recordStart });
          if (this.command === VmCommand.OpenReturnPath || this.command === VmCommand.Ping) {
            this.state = State.Top;
          } else {
            this.fallback(`migration command ${this.command} (postcopy, packaged or COLO streams are relayed as they are)`);
          }
          break;
        }

        case State.AfterEof: {
          const next = this.peek();
          if (next < 0) return;
          this.startRecord();
          if (next === SectionType.VmDescription) {
            this.state = State.VmDescriptionLength;
          } else {
            this.framing.vmDescription = false;
            this.fallback(`byte 0x${next.toString(16)} after EOF`);
          }
          break;
        }

        case State.VmDescriptionLength: {
          if (!this.need(5)) return;
          this.vmDescriptionRemaining = this.rb.readUInt32BE(this.ro + 1);
          this.framing.vmDescription = true;
          this.emit({
            kind: RecordKind.VmDescriptionHeader,
            length: this.vmDescriptionRemaining,
            streamOffset: this.recordStart,
          });
          this.state = this.vmDescriptionRemaining > 0 ? State.VmDescriptionData : State.Done;
          break;
        }

        case State.VmDescriptionData: {
          if (this.pos >= this.chunk.length) return;
          const take = Math.min(this.vmDescriptionRemaining, this.chunk.length - this.pos);
          this.emitBytes(RecordKind.VmDescriptionData, this.chunk.subarray(this.pos, this.pos + take), this.base + this.pos);
          this.pos += take;
          this.vmDescriptionRemaining -= take;
          if (this.vmDescriptionRemaining === 0) this.state = State.Done;
          break;
        }

        case State.Done: {
          if (this.pos >= this.chunk.length) return;
          this.startRecord();
          this.fallback('bytes after the end of the stream');
          break;
        }

        case State.Verbatim: {
          if (this.pos >= this.chunk.length) return;
          this.emitBytes(RecordKind.Verbatim, this.chunk.subarray(this.pos), this.base + this.pos);
          this.pos = this.chunk.length;
          return;
        }

        case State.Failed:
          return;
      }
    }
  }

  private pushCapabilities(): void {
    this.configSubsections.push({
      name: 'configuration/capabilities',
      version: this.subsectionVersion,
      capabilities: this.capabilities,
    });
  }

  /** A START or FULL header has been read. */
  private openSection(): void {
    const h = this.sectionHeader;
    if (this.sections.has(h.sectionId)) {
      this.fail(StreamErrorCode.Malformed, `section ${h.sectionId} (${h.idstr}) started twice`);
    }
    if (this.sections.size >= Limit.Sections) {
      this.fail(StreamErrorCode.AbsurdLength, `more than ${Limit.Sections} sections`);
    }
    const record: SectionHeaderRecord = { ...h };
    this.sections.set(h.sectionId, record);
    this.currentSection = record;
    const isRam = h.idstr === 'ram';
    if (h.type === SectionType.Start && !isRam) {
      this.emit(record);
      this.fallback(`live section ${JSON.stringify(h.idstr)} is not understood`);
      return;
    }
    if (isRam && (h.type === SectionType.Full || this.ramSectionId >= 0)) {
      this.emit(record);
      this.fallback('a second or FULL ram section');
      return;
    }
    this.emit(record);
    if (isRam) {
      this.ramSectionId = h.sectionId;
      this.state = State.RamWord;
    } else if (this.framing.footers === true) {
      this.footerPattern[0] = SectionType.Footer;
      this.footerPattern.writeUInt32BE(h.sectionId, 1);
      this.state = State.DeviceData;
    } else {
      this.state = State.UnframedDeviceData;
    }
  }

  private dispatchRamWord(high: number): void {
    const flags = this.wordFlags;
    const kind = flags & ~RamFlag.Continue;
    switch (kind) {
      case RamFlag.MemSize: {
        if (this.blocks.length > 0) this.fail(StreamErrorCode.Malformed, 'a second RAM block list');
        if (high >= 2 ** (Limit.RamBytesLog2 - 32) || this.wordOffset > MAX_RAM_BYTES) {
          this.fail(StreamErrorCode.AbsurdLength, `RAM size of ${high * TWO_32} bytes or more`);
        }
        this.blockListFlags = flags;
        this.blockListStart = this.recordStart;
        this.blockListTotal = this.wordOffset;
        this.blockListRemaining = this.wordOffset;
        if (this.wordOffset === 0) {
          this.emit({ kind: RecordKind.RamBlockList, flags, totalBytes: 0, blocks: this.blocks, streamOffset: this.recordStart });
          this.state = State.RamWord;
        } else {
          this.state = State.BlockListNameLength;
        }
        return;
      }
      case RamFlag.Zero:
        this.beginPage(RecordKind.RamZero, flags);
        return;
      case RamFlag.Page:
        this.beginPage(RecordKind.RamPage, flags);
        return;
      case RamFlag.Xbzrle:
        this.beginPage(RecordKind.RamXbzrle, flags);
        return;
      case RamFlag.CompressPage:
        this.beginPage(RecordKind.RamCompressed, flags);
        return;
      case RamFlag.Eos:
        this.emitMarker(RecordKind.RamEos);
        this.state = State.AfterSection;
        return;
      case RamFlag.MultifdFlush:
        this.emitMarker(RecordKind.RamMultifdFlush);
        this.state = State.RamWord;
        return;
      default:
        if (kind & RamFlag.Hook) {
          this.emitMarker(RecordKind.RamHook);
          this.fallback('RDMA hook in the RAM section');
        } else {
          this.fallback(`unknown RAM flags 0x${flags.toString(16)}`, Buffer.from(this.rb.subarray(this.ro, this.ro + 8)));
        }
    }
  }

  private beginPage(kind: RamPageRecord['kind'], flags: number): void {
    if (this.blocks.length === 0) this.fail(StreamErrorCode.Malformed, 'RAM page before the RAM block list');
    const page = this.page;
    page.kind = kind;
    page.flags = flags;
    page.offset = this.wordOffset;
    page.streamOffset = this.recordStart;
    if (flags & RamFlag.Continue) {
      const block = this.lastBlock;
      if (!block) this.fail(StreamErrorCode.Malformed, 'CONTINUE with no previous RAM block');
      this.enterRamBody(block);
    } else {
      this.state = State.RamBlockNameLength;
    }
  }

  private enterRamBody(block: RamBlock): void {
    const page = this.page;
    if (page.offset >= block.length) {
      this.fail(StreamErrorCode.PageOutOfRange, `offset ${page.offset} is outside RAM block ${JSON.stringify(block.name)} of ${block.length} bytes`);
    }
    page.block = block;
    page.pageIndex = block.firstPage + page.offset / this.pageSize;
    if (page.kind === RecordKind.RamPage) {
      this.payloadLength = this.pageSize;
      page.byteValue = 0;
      this.state = State.RamPayload;
    } else {
      this.state = State.RamBody;
    }
  }

  private emitPage(): void {
    this.emit(this.page);
    this.state = State.RamWord;
  }

  private emitMarker(kind: RamMarkerRecord['kind']): void {
    const marker = this.marker;
    marker.kind = kind;
    marker.flags = this.wordFlags;
    marker.offset = this.wordOffset;
    marker.streamOffset = this.recordStart;
    this.emit(marker);
  }

  private emitBytes(kind: BytesRecord['kind'], bytes: Buffer, streamOffset: number): void {
    const record = this.bytes;
    record.kind = kind;
    record.sectionId = this.currentSection?.sectionId ?? 0;
    record.bytes = bytes;
    record.streamOffset = streamOffset;
    this.emit(record, streamOffset + bytes.length);
  }

  /** Hands a record to the sink; `end` is where its bytes end when that is not where parsing stands. */
  private emit(record: StreamRecord, end = this.base + this.pos): void {
    this.recordsEnd = end;
    this.sink(record);
  }

  private emitHeldByte(at: number): void {
    this.emitBytes(RecordKind.SectionData, Buffer.of(this.heldByte), at);
    this.heldByte = -1;
  }

  /**
   * Stops parsing: every byte from here on is relayed as Verbatim. `consumed` are the bytes of the
   * current record that were read but not emitted; they are relayed first.
   */
  private fallback(reason: string, consumed?: Buffer): void {
    this.fallbackReason = reason;
    this.emit({ kind: RecordKind.Fallback, reason, streamOffset: this.recordStart }, this.recordStart);
    if (consumed && consumed.length > 0) this.emitBytes(RecordKind.Verbatim, consumed, this.recordStart);
    if (this.carryLength > 0) {
      this.emitBytes(RecordKind.Verbatim, Buffer.from(this.carry.subarray(0, this.carryLength)), this.recordStart);
      this.carryLength = 0;
    }
    this.state = State.Verbatim;
  }

  /** Falls back half-way through the configuration, relaying what was read of it. */
  private fallbackInConfiguration(reason: string, targetPageBits?: number): void {
    const read = [
      encodeConfiguration(this.configName, this.configSubsections),
      encodeSubsectionHeader(this.subsectionName, this.subsectionVersion),
    ];
    if (targetPageBits !== undefined) {
      const bits = Buffer.alloc(4);
      bits.writeUInt32BE(targetPageBits);
      read.push(bits);
    }
    this.fallback(reason, Buffer.concat(read));
  }

  /**
   * Relays device data up to the next candidate footer of the current section. Returns false when
   * the chunk is used up.
   */
  private scanDeviceData(): boolean {
    const chunk = this.chunk;
    if (this.pos >= chunk.length) return false;
    const start = this.pos;
    let candidate = chunk.indexOf(this.footerPattern, start);
    if (candidate < 0) {
      // A footer may begin in the last four bytes and end in the next chunk.
      const tail = chunk.indexOf(SectionType.Footer, Math.max(start, chunk.length - 4));
      if (tail < 0) {
        this.emitBytes(RecordKind.SectionData, chunk.subarray(start), this.base + start);
        this.pos = chunk.length;
        return false;
      }
      candidate = tail;
    }
    if (candidate > start) this.emitBytes(RecordKind.SectionData, chunk.subarray(start, candidate), this.base + start);
    this.pos = candidate;
    this.recordStart = this.base + candidate;
    const verdict = this.footerVerdict(chunk, candidate, chunk.length, false);
    if (verdict === Verdict.Footer) {
      this.state = State.Footer;
    } else if (verdict === Verdict.Data) {
      this.emitBytes(RecordKind.SectionData, chunk.subarray(candidate, candidate + 1), this.recordStart);
      this.pos = candidate + 1;
    } else {
      this.state = State.DeviceLookahead;
    }
    return true;
  }

  /** The lookahead window in carry is complete (or the stream ended): decide and re-feed it. */
  private resolveLookahead(final: boolean): void {
    const window = Buffer.from(this.carry.subarray(0, this.carryLength));
    const windowStart = this.base + this.pos - this.carryLength;
    this.carryLength = 0;
    const verdict = this.footerVerdict(window, 0, window.length, final);
    this.recordStart = windowStart;
    let rest: Buffer;
    if (verdict === Verdict.Footer) {
      this.emit({ kind: RecordKind.SectionFooter, sectionId: this.currentSection?.sectionId ?? 0, streamOffset: windowStart }, windowStart + 5);
      this.state = State.Top;
      rest = window.subarray(5);
    } else {
      this.emitBytes(RecordKind.SectionData, window.subarray(0, 1), windowStart);
      this.state = State.DeviceData;
      rest = window.subarray(1);
    }
    if (rest.length > 0) this.refeed(rest, windowStart + window.length - rest.length);
    if (final) this.finish();
  }

  /**
   * Whether `0x7e <section id>` at buf[p] ends the current device section: it does when what follows
   * is a record that can follow a section (another section, EOF, a command). `final` says the stream
   * has ended at `end`.
   */
  private footerVerdict(buf: Buffer, p: number, end: number, final: boolean): Verdict {
    const more = final ? Verdict.Data : Verdict.NeedMore;
    if (end - p < 5) return more;
    if (buf.compare(this.footerPattern, 0, 5, p, p + 5) !== 0) return Verdict.Data;
    const q = p + 5;
    // A footer as the very last bytes leaves a truncated stream either way; call it a footer.
    if (q >= end) return final ? Verdict.Footer : Verdict.NeedMore;
    const type = buf[q];
    switch (type) {
      case SectionType.Eof:
        if (end - q < 2) return final ? Verdict.Footer : more;
        return buf[q + 1] === SectionType.VmDescription ? Verdict.Footer : Verdict.Data;
      case SectionType.Full:
      case SectionType.Start: {
        if (end - q < 6) return more;
        const id = buf.readUInt32BE(q + 1);
        const length = buf[q + 5];
        if (length === 0 || this.sections.has(id)) return Verdict.Data;
        if (end - q < 6 + length + 8) return more;
        for (let i = q + 6; i < q + 6 + length; i++) {
          const c = buf[i];
          if (c < 0x21 || c > 0x7e) return Verdict.Data;
        }
        return Verdict.Footer;
      }
      case SectionType.Part:
      case SectionType.End: {
        if (end - q < 5) return more;
        return this.sections.has(buf.readUInt32BE(q + 1)) ? Verdict.Footer : Verdict.Data;
      }
      case SectionType.Command: {
        if (end - q < 3) return more;
        const command = buf.readUInt16BE(q + 1);
        return command >= VmCommand.OpenReturnPath && command <= VmCommand.SwitchoverStart ? Verdict.Footer : Verdict.Data;
      }
      default:
        return Verdict.Data;
    }
  }

  private finish(): void {
    switch (this.state) {
      case State.Done:
      case State.Verbatim:
        return;
      case State.AfterEof:
        this.framing.vmDescription = false;
        this.state = State.Done;
        return;
      case State.DeviceLookahead:
        this.resolveLookahead(true);
        return;
      case State.UnframedDeviceData: {
        const at = this.base + this.pos - 1;
        if (this.heldByte !== SectionType.Eof) {
          this.fail(StreamErrorCode.Truncated, 'the stream ended inside device state (no EOF marker)', at + 1);
        }
        this.heldByte = -1;
        this.emit({ kind: RecordKind.Eof, streamOffset: at }, at + 1);
        this.state = State.Done;
        return;
      }
      default:
        this.fail(StreamErrorCode.Truncated, 'the stream ended before its EOF marker', this.base + this.pos);
    }
  }
}

const enum Verdict {
  Footer,
  Data,
  NeedMore,
}
