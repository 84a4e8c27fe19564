import { ByteCursor } from './byte-cursor';
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
import { DeviceFooterScanner, FOOTER_LOOKAHEAD, FooterVerdict } from './device-footer';
import { encodeConfiguration, encodeSubsectionHeader } from './encode';
import { StreamError, StreamErrorCode } from './errors';
import {
  type BytesRecord,
  type FallbackCode,
  type StreamFallback,
  type ConfigSubsection,
  type RamBlock,
  type RamMarkerRecord,
  type RamPageRecord,
  RecordKind,
  type RecordSink,
  type StreamRecord,
  type SectionHeaderRecord,
} from './records';

/** What the parser reads next; each state has one method in run()'s switch. */
const enum State {
  FileHeader,
  /** The type byte of the next top-level record. */
  NextRecord,
  ConfigHeader,
  ConfigName,
  /** A configuration subsection, or the end of the configuration. */
  ConfigNext,
  SubsectionHeader,
  SubsectionName,
  SubsectionBody,
  CapabilityCount,
  CapabilityLength,
  CapabilityName,
  /** START or FULL: type, section id, idstr length. */
  SectionStartHeader,
  /** START or FULL: idstr, instance and version. */
  SectionStartName,
  /** PART or END: type and section id. */
  SectionPartHeader,
  /** A RAM record's 64-bit header word: offset and flags. */
  RamWord,
  BlockListNameLength,
  BlockListEntry,
  RamBlockNameLength,
  RamBlockName,
  /** The fixed-size fields between a RAM record's header and its payload. */
  RamBody,
  RamPayload,
  /** A RAM section's EOS has been read: its footer, or (QEMU 2.0 framing) the next record. */
  AfterRamSection,
  Footer,
  /** Opaque device data, up to a candidate footer. */
  DeviceData,
  /** Bytes after a candidate footer, gathered until they decide it. */
  DeviceLookahead,
  /** Device data without footers: only the stream's last byte (EOF) ends it. */
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

/** Reads on past one main-channel command, given its data; see StreamParser.commands. */
type CommandReader = (this: StreamParser, data: Buffer) => void;

const TWO_32 = 0x1_0000_0000;
/** MAX_VM_CMD_PACKAGED_SIZE in QEMU's savevm.h: the largest postcopy package a source sends. */
const MAX_PACKAGE_BYTES = 1 << 24;
const MAX_RAM_BYTES = 2 ** Limit.RamBytesLog2;

/**
 * An incremental, byte-exact parser of a QEMU migration stream. Feed it chunks of any size with
 * push(); it calls the sink once per record, in stream order, and never copies a page that arrived
 * whole. Device state (non-RAM sections) is opaque; anything it does not understand ends parsing
 * with a Fallback record, after which every byte is relayed as Verbatim. Malformed input throws a
 * StreamError, after which the parser refuses further input.
 */
export class StreamParser {
  /**
   * The main-channel commands the parser reads on past, each with the method that takes its data;
   * any other command ends parsing with a Fallback (the stream is relayed as it is). Following a
   * new command is one method and one row here.
   */
  private static readonly commands: ReadonlyMap<number, CommandReader> = new Map([
    [VmCommand.OpenReturnPath, StreamParser.prototype.readOnAfterCommand],
    [VmCommand.Ping, StreamParser.prototype.readOnAfterCommand],
    [VmCommand.PostcopyAdvise, StreamParser.prototype.readPostcopyAdvise],
    [VmCommand.PostcopyListen, StreamParser.prototype.readPackagedOnlyCommand],
    [VmCommand.PostcopyRun, StreamParser.prototype.readPackagedOnlyCommand],
    // Pages the destination drops because they changed since precopy sent them; postcopy sends each
    // of them again, and the store keeps the version sent last, as the destination does.
    [VmCommand.PostcopyRamDiscard, StreamParser.prototype.readOnAfterCommand],
    [VmCommand.Packaged, StreamParser.prototype.readPackaged],
    // Postcopy recovery asks these of the destination on a resumed stream; they carry no RAM.
    [VmCommand.PostcopyResume, StreamParser.prototype.readOnAfterCommand],
    [VmCommand.RecvBitmap, StreamParser.prototype.readOnAfterCommand],
    [VmCommand.SwitchoverStart, StreamParser.prototype.readOnAfterCommand],
  ]);

  readonly framing: Framing = { configuration: null, footers: null, vmDescription: null };
  /** Set once the parser has fallen back to verbatim relay. */
  fallenBack: StreamFallback | null = null;

  /** Why the parser fell back, said for a person (null while it has not). */
  get fallbackReason(): string | null {
    return this.fallenBack?.reason ?? null;
  }

  private readonly pageSize: number;
  private readonly pageMask: number;
  private state = State.FileHeader;
  private error: StreamError | null = null;

  private readonly input: ByteCursor;
  /** Absolute offset where the current record began. */
  private recordStart = 0;

  // Section bookkeeping.
  private readonly sections = new Map<number, SectionHeaderRecord>();
  private readonly sectionHeader: SectionHeaderRecord;
  private currentSection: SectionHeaderRecord | null = null;
  private ramSectionId = -1;
  private readonly footerScanner = new DeviceFooterScanner(this.sections);

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
  /** Length of the variable-size field the current state takes (a name, a payload). */
  private payloadLength = 0;
  private readonly page: RamPageRecord;
  private readonly marker: RamMarkerRecord;
  private readonly bytes: BytesRecord;

  // Commands, vmdesc, unframed tail.
  private command = 0;
  private commandLength = 0;
  /** Stream offset just past the postcopy package being read (-1: none is). */
  private packageEnd = -1;
  /** A postcopy package has been read: the destination runs the guest while RAM still arrives. */
  private postcopy = false;
  /** POSTCOPY_ADVISE with page sizes: postcopy-ram is on (a postcopy-preempt channel may follow). */
  private advised = false;
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
    // Large enough for any field the parser assembles: a page, an XBZRLE delta (u16 length), a
    // command's data (u16 length), the footer lookahead.
    this.input = new ByteCursor(Math.max(this.pageSize, 0x10000) + 64);
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
    const noData = Buffer.alloc(0);
    this.page = {
      kind: RecordKind.RamPage,
      flags: 0,
      block: noBlock,
      offset: 0,
      pageIndex: 0,
      byteValue: 0,
      data: noData,
      dataStart: 0,
      dataLength: 0,
      streamOffset: 0,
    };
    this.marker = { kind: RecordKind.RamEos, flags: 0, offset: 0, streamOffset: 0 };
    this.bytes = { kind: RecordKind.SectionData, sectionId: 0, bytes: noData, streamOffset: 0 };
  }

  /** The RAM block list, once the MEM_SIZE record has been parsed. */
  get ramBlocks(): readonly RamBlock[] {
    return this.blocks;
  }

  /** The source advised postcopy with postcopy-ram on (POSTCOPY_ADVISE carrying its page sizes). */
  get postcopyAdvised(): boolean {
    return this.advised;
  }

  /** Bytes consumed so far. */
  get offset(): number {
    return this.input.offset;
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
      this.input.feed(chunk);
      this.run();
    } catch (err) {
      this.noteFailure(err);
      throw err;
    }
  }

  /** The stream has ended: checks that it ended where a stream may end. */
  end(): void {
    if (this.error) throw this.error;
    try {
      this.finish();
    } catch (err) {
      this.noteFailure(err);
      throw err;
    }
  }

  // ---------------------------------------------------------------------------------------------

  private noteFailure(err: unknown): void {
    if (err instanceof StreamError) {
      this.error = err;
      this.state = State.Failed;
    }
  }

  /** Runs the state methods until one finds the input used up. */
  private run(): void {
    let more = true;
    while (more) {
      switch (this.state) {
        case State.FileHeader: more = this.readFileHeader(); break;
        case State.NextRecord: more = this.readNextRecord(); break;
        case State.ConfigHeader: more = this.readConfigHeader(); break;
        case State.ConfigName: more = this.readConfigName(); break;
        case State.ConfigNext: more = this.readConfigNext(); break;
        case State.SubsectionHeader: more = this.readNameLength(2, State.SubsectionName); break;
        case State.SubsectionName: more = this.readSubsectionName(); break;
        case State.SubsectionBody: more = this.readSubsectionBody(); break;
        case State.CapabilityCount: more = this.readCapabilityCount(); break;
        case State.CapabilityLength: more = this.readNameLength(1, State.CapabilityName); break;
        case State.CapabilityName: more = this.readCapabilityName(); break;
        case State.SectionStartHeader: more = this.readSectionStartHeader(); break;
        case State.SectionStartName: more = this.readSectionStartName(); break;
        case State.SectionPartHeader: more = this.readSectionPartHeader(); break;
        case State.RamWord: more = this.readRamWord(); break;
        case State.BlockListNameLength: more = this.readBlockListNameLength(); break;
        case State.BlockListEntry: more = this.readBlockListEntry(); break;
        case State.RamBlockNameLength: more = this.readNameLength(1, State.RamBlockName); break;
        case State.RamBlockName: more = this.readRamBlockName(); break;
        case State.RamBody: more = this.readRamBody(); break;
        case State.RamPayload: more = this.readRamPayload(); break;
        case State.AfterRamSection: more = this.readAfterRamSection(); break;
        case State.Footer: more = this.readFooter(); break;
        case State.DeviceData: more = this.readDeviceData(); break;
        case State.DeviceLookahead: more = this.readDeviceLookahead(); break;
        case State.UnframedDeviceData: more = this.readUnframedDeviceData(); break;
        case State.CommandHeader: more = this.readCommandHeader(); break;
        case State.CommandData: more = this.readCommandData(); break;
        case State.AfterEof: more = this.readAfterEof(); break;
        case State.VmDescriptionLength: more = this.readVmDescriptionLength(); break;
        case State.VmDescriptionData: more = this.readVmDescriptionData(); break;
        case State.Done: more = this.readAfterEnd(); break;
        case State.Verbatim: more = this.readVerbatim(); break;
        case State.Failed: more = false; break;
      }
    }
  }

  // Each state method below consumes what it can of the input and returns whether to go on: false
  // once the chunk is used up (the method runs again, in the same state, on the next chunk).

  private readFileHeader(): boolean {
    const input = this.input;
    if (!input.take(8)) return false;
    const magic = input.u32(0);
    const version = input.u32(4);
    if (magic !== FILE_MAGIC) {
      this.fail(StreamErrorCode.BadMagic, `magic 0x${magic.toString(16)} is not QEVM`, 0);
    }
    if (version === FILE_VERSION_COMPAT || version < FILE_VERSION) {
      this.fail(StreamErrorCode.BadVersion, `stream version ${version} is obsolete`, 4);
    }
    this.emit({ kind: RecordKind.FileHeader, version, streamOffset: 0 });
    if (version !== FILE_VERSION) {
      this.fallback('stream-version', `stream version ${version} is newer than ${FILE_VERSION}`);
    } else {
      this.state = State.NextRecord;
    }
    return true;
  }

  /** Looks at the next record's type byte; the state it picks reads the record from that byte. */
  private readNextRecord(): boolean {
    if (this.packageEnd >= 0 && this.input.offset >= this.packageEnd) this.endPackage();
    const type = this.input.peek();
    if (type < 0) return false;
    this.startRecord();
    if (type === SectionType.Configuration && this.recordStart === 8) {
      this.state = State.ConfigHeader;
    } else if (type === SectionType.Start || type === SectionType.Full) {
      this.state = State.SectionStartHeader;
    } else if (type === SectionType.Part || type === SectionType.End) {
      this.state = State.SectionPartHeader;
    } else if (type === SectionType.Eof) {
      if (this.packageEnd >= 0) this.fail(StreamErrorCode.Malformed, 'EOF inside a postcopy package');
      this.input.moveTo(this.input.position + 1);
      this.emit({ kind: RecordKind.Eof, streamOffset: this.recordStart });
      // Postcopy ends at EOF: its device state went in the package, and no vmdesc follows.
      this.state = this.postcopy ? State.Done : State.AfterEof;
      if (this.postcopy) this.framing.vmDescription = false;
    } else if (type === SectionType.Command) {
      this.state = State.CommandHeader;
    } else {
      this.fallback('section-type', `unknown section type 0x${type.toString(16)}`);
    }
    if (this.framing.configuration === null && this.state !== State.ConfigHeader) {
      this.framing.configuration = false;
    }
    return true;
  }

  /**
   * The states that read a field ending in a name's length byte (SubsectionHeader, CapabilityLength,
   * BlockListNameLength, RamBlockNameLength): takes the field; `next` reads the name.
   */
  private readNameLength(fieldBytes: number, next: State): boolean {
    if (!this.input.take(fieldBytes)) return false;
    this.payloadLength = this.input.u8(fieldBytes - 1);
    this.state = next;
    return true;
  }

  // Configuration section.

  private readConfigHeader(): boolean {
    if (!this.input.take(5)) return false;
    const length = this.input.u32(1);
    if (length > Limit.ConfigNameBytes) {
      this.fail(StreamErrorCode.AbsurdLength, `configuration name of ${length} bytes`);
    }
    this.payloadLength = length;
    this.state = State.ConfigName;
    return true;
  }

  private readConfigName(): boolean {
    if (!this.input.take(this.payloadLength)) return false;
    this.configName = this.input.latin1(0, this.payloadLength);
    this.configSubsections = [];
    this.framing.configuration = true;
    this.state = State.ConfigNext;
    return true;
  }

  private readConfigNext(): boolean {
    const next = this.input.peek();
    if (next < 0) return false;
    if (next === SectionType.Subsection) {
      this.state = State.SubsectionHeader;
      return true;
    }
    this.emit({
      kind: RecordKind.Configuration,
      machineType: this.configName,
      subsections: this.configSubsections,
      streamOffset: this.recordStart,
    });
    this.state = State.NextRecord;
    return true;
  }

  private readSubsectionName(): boolean {
    if (!this.input.take(this.payloadLength + 4)) return false;
    this.subsectionName = this.input.latin1(0, this.payloadLength);
    this.subsectionVersion = this.input.u32(this.payloadLength);
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
    return true;
  }

  private readSubsectionBody(): boolean {
    const input = this.input;
    if (this.subsectionName === 'configuration/uuid') {
      if (!input.take(16)) return false;
      this.configSubsections.push({ name: 'configuration/uuid', version: this.subsectionVersion, uuid: input.copy(0, 16) });
    } else {
      if (!input.take(4)) return false;
      const bits = input.u32(0);
      if (2 ** bits !== this.pageSize) {
        this.fallbackInConfiguration(`target page size 2^${bits} differs from ${this.pageSize}`, bits);
        return true;
      }
      this.configSubsections.push({ name: 'configuration/target-page-bits', version: this.subsectionVersion, targetPageBits: bits });
    }
    this.state = State.ConfigNext;
    return true;
  }

  private readCapabilityCount(): boolean {
    if (!this.input.take(4)) return false;
    this.capabilityCount = this.input.u32(0);
    if (this.capabilityCount > Limit.ConfigCapabilities) {
      this.fail(StreamErrorCode.AbsurdLength, `${this.capabilityCount} capabilities`);
    }
    this.capabilities = [];
    if (this.capabilityCount > 0) {
      this.state = State.CapabilityLength;
    } else {
      this.pushCapabilities();
      this.state = State.ConfigNext;
    }
    return true;
  }

  private readCapabilityName(): boolean {
    if (!this.input.take(this.payloadLength)) return false;
    const capability = this.input.latin1(0, this.payloadLength);
    this.capabilities.push(capability);
    if (capability === 'x-ignore-shared') this.ignoreShared = true;
    if (this.capabilities.length < this.capabilityCount) {
      this.state = State.CapabilityLength;
    } else {
      this.pushCapabilities();
      this.state = State.ConfigNext;
    }
    return true;
  }

  private pushCapabilities(): void {
    this.configSubsections.push({
      name: 'configuration/capabilities',
      version: this.subsectionVersion,
      capabilities: this.capabilities,
    });
  }

  // Section headers.

  private readSectionStartHeader(): boolean {
    const input = this.input;
    if (!input.take(6)) return false;
    const h = this.sectionHeader;
    h.type = input.u8(0) as SectionType.Start | SectionType.Full;
    h.sectionId = input.u32(1);
    this.payloadLength = input.u8(5);
    h.streamOffset = this.recordStart;
    this.state = State.SectionStartName;
    return true;
  }

  private readSectionStartName(): boolean {
    const input = this.input;
    if (!input.take(this.payloadLength + 8)) return false;
    const h = this.sectionHeader;
    h.idstr = input.latin1(0, this.payloadLength);
    h.instanceId = input.u32(this.payloadLength);
    h.versionId = input.u32(this.payloadLength + 4);
    this.openSection();
    return true;
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
    this.emit(record);
    if (h.type === SectionType.Start && !isRam) {
      this.fallback('live-section', `live section ${JSON.stringify(h.idstr)} is not understood`);
    } else if (isRam && (h.type === SectionType.Full || this.ramSectionId >= 0)) {
      this.fallback('ram-section', 'a second or FULL ram section');
    } else if (isRam) {
      this.ramSectionId = h.sectionId;
      this.state = State.RamWord;
    } else if (this.framing.footers === true) {
      this.footerScanner.expect(h.sectionId);
      this.state = State.DeviceData;
    } else {
      this.state = State.UnframedDeviceData;
    }
  }

  private readSectionPartHeader(): boolean {
    if (!this.input.take(5)) return false;
    const type = this.input.u8(0) as SectionType.Part | SectionType.End;
    const id = this.input.u32(1);
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
    return true;
  }

  // RAM section.

  private readRamWord(): boolean {
    this.startRecord();
    const input = this.input;
    if (!input.take(8)) return false;
    const high = input.u32(0);
    const low = input.u32(4);
    this.wordFlags = low & this.pageMask;
    this.wordOffset = high * TWO_32 + (low - this.wordFlags);
    this.dispatchRamWord(high);
    return true;
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
        this.state = State.AfterRamSection;
        return;
      case RamFlag.MultifdFlush:
        this.emitMarker(RecordKind.RamMultifdFlush);
        this.state = State.RamWord;
        return;
      default:
        if (kind & RamFlag.Hook) {
          this.emitMarker(RecordKind.RamHook);
          this.fallback('rdma', 'RDMA hook in the RAM section');
        } else {
          this.fallback('ram-flags', `unknown RAM flags 0x${flags.toString(16)}`, this.input.copy(0, 8));
        }
    }
  }

  /** Each entry of the list is a record of its own where an error points. */
  private readBlockListNameLength(): boolean {
    this.startRecord();
    return this.readNameLength(1, State.BlockListEntry);
  }

  private readBlockListEntry(): boolean {
    const input = this.input;
    const nameLength = this.payloadLength;
    const extra = this.ignoreShared ? 8 : 0;
    if (!input.take(nameLength + 8 + extra)) return false;
    const name = input.latin1(0, nameLength);
    const lengthHigh = input.u32(nameLength);
    const length = lengthHigh * TWO_32 + input.u32(nameLength + 4);
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
      ...(extra ? { sharedAddr: input.u64(nameLength + 8) } : {}),
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
    return true;
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

  private readRamBlockName(): boolean {
    if (!this.input.take(this.payloadLength)) return false;
    const name = this.input.latin1(0, this.payloadLength);
    const block = this.blocksByName.get(name);
    if (!block) this.fail(StreamErrorCode.UnknownBlock, `RAM block ${JSON.stringify(name)} is not in the block list`);
    this.lastBlock = block;
    this.enterRamBody(block);
    return true;
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

  /**
   * The fixed-size part after the header: ZERO's fill byte, XBZRLE's encoding and length,
   * COMPRESS_PAGE's length (a plain page goes straight to its payload).
   */
  private readRamBody(): boolean {
    const input = this.input;
    const page = this.page;
    if (page.kind === RecordKind.RamZero) {
      if (!input.take(1)) return false;
      page.byteValue = input.u8(0);
      page.data = input.fieldData;
      page.dataStart = input.fieldIndex + 1;
      page.dataLength = 0;
      this.emitPage();
    } else if (page.kind === RecordKind.RamXbzrle) {
      if (!input.take(3)) return false;
      page.byteValue = input.u8(0);
      this.payloadLength = input.u16(1);
      if (this.payloadLength > this.pageSize) {
        this.fail(StreamErrorCode.AbsurdLength, `XBZRLE delta of ${this.payloadLength} bytes`);
      }
      this.state = State.RamPayload;
    } else {
      if (!input.take(4)) return false;
      this.payloadLength = input.u32(0);
      if (this.payloadLength > MAX_COMPRESSED_PAGE) {
        this.fail(StreamErrorCode.AbsurdLength, `compressed page of ${this.payloadLength} bytes`);
      }
      this.state = State.RamPayload;
    }
    return true;
  }

  private readRamPayload(): boolean {
    const input = this.input;
    if (!input.take(this.payloadLength)) return false;
    const page = this.page;
    page.data = input.fieldData;
    page.dataStart = input.fieldIndex;
    page.dataLength = this.payloadLength;
    this.emitPage();
    return true;
  }

  private emitPage(): void {
    this.emit(this.page);
    this.state = State.RamWord;
  }

  private readAfterRamSection(): boolean {
    const next = this.input.peek();
    if (next < 0) return false;
    if (next === SectionType.Footer) {
      this.startRecord();
      this.state = State.Footer;
    } else if (this.framing.footers === true) {
      this.startRecord();
      this.fail(StreamErrorCode.FooterMismatch, `section ${this.currentSection?.sectionId} has no footer`);
    } else {
      this.framing.footers = false;
      this.state = State.NextRecord;
    }
    return true;
  }

  private readFooter(): boolean {
    if (!this.input.take(5)) return false;
    const id = this.input.u32(1);
    const expected = this.currentSection?.sectionId;
    if (id !== expected) {
      this.fail(StreamErrorCode.FooterMismatch, `footer of section ${id} ends section ${expected}`);
    }
    this.framing.footers = true;
    this.emit({ kind: RecordKind.SectionFooter, sectionId: id, streamOffset: this.recordStart });
    this.state = State.NextRecord;
    return true;
  }

  // Device sections (opaque data).

  /** Relays device data up to the next candidate footer of the current section and judges it. */
  private readDeviceData(): boolean {
    const input = this.input;
    const chunk = input.chunk;
    const start = input.position;
    if (start >= chunk.length) return false;
    const candidate = this.footerScanner.nextCandidate(chunk, start);
    if (candidate < 0) {
      this.emitBytes(RecordKind.SectionData, chunk.subarray(start), input.offsetOf(start));
      input.moveTo(chunk.length);
      return false;
    }
    if (candidate > start) this.emitBytes(RecordKind.SectionData, chunk.subarray(start, candidate), input.offsetOf(start));
    input.moveTo(candidate);
    this.recordStart = input.offsetOf(candidate);
    const verdict = this.footerScanner.verdict(chunk, candidate, chunk.length, false);
    if (verdict === FooterVerdict.Footer) {
      this.state = State.Footer;
    } else if (verdict === FooterVerdict.Data) {
      this.emitBytes(RecordKind.SectionData, chunk.subarray(candidate, candidate + 1), this.recordStart);
      input.moveTo(candidate + 1);
    } else {
      this.state = State.DeviceLookahead;
    }
    return true;
  }

  /** Gathers enough bytes after a candidate footer to decide it (it began near a chunk's end). */
  private readDeviceLookahead(): boolean {
    if (!this.input.gather(FOOTER_LOOKAHEAD)) return false;
    this.resolveLookahead(false);
    return true;
  }

  /** The lookahead window is complete (or the stream ended): decide, then parse the window again. */
  private resolveLookahead(final: boolean): void {
    const input = this.input;
    const windowStart = input.offset - input.carriedBytes;
    const window = input.takeCarried();
    const verdict = this.footerScanner.verdict(window, 0, window.length, final);
    this.recordStart = windowStart;
    let rest: Buffer;
    if (verdict === FooterVerdict.Footer) {
      this.emit({ kind: RecordKind.SectionFooter, sectionId: this.currentSection?.sectionId ?? 0, streamOffset: windowStart }, windowStart + 5);
      this.state = State.NextRecord;
      rest = window.subarray(5);
    } else {
      this.emitBytes(RecordKind.SectionData, window.subarray(0, 1), windowStart);
      this.state = State.DeviceData;
      rest = window.subarray(1);
    }
    if (rest.length > 0) input.interpose(rest, windowStart + window.length - rest.length, () => this.run());
    if (final) this.finish();
  }

  /** Without footers, nothing marks where device state ends but EOF, the last byte. */
  private readUnframedDeviceData(): boolean {
    const input = this.input;
    const chunk = input.chunk;
    const from = input.position;
    if (from >= chunk.length) return false;
    const to = chunk.length - 1;
    this.recordStart = input.offsetOf(from);
    if (this.heldByte >= 0) this.emitHeldByte(this.recordStart - 1);
    if (to > from) this.emitBytes(RecordKind.SectionData, chunk.subarray(from, to), this.recordStart);
    this.heldByte = chunk[to];
    input.moveTo(chunk.length);
    return false;
  }

  private emitHeldByte(at: number): void {
    this.emitBytes(RecordKind.SectionData, Buffer.of(this.heldByte), at);
    this.heldByte = -1;
  }

  // Commands.

  private readCommandHeader(): boolean {
    if (!this.input.take(5)) return false;
    this.command = this.input.u16(1);
    this.commandLength = this.input.u16(3);
    this.state = State.CommandData;
    return true;
  }

  private readCommandData(): boolean {
    if (!this.input.take(this.commandLength)) return false;
    const data = this.input.copy(0, this.commandLength);
    this.emit({ kind: RecordKind.Command, command: this.command, data, streamOffset: this.recordStart });
    const reader = StreamParser.commands.get(this.command);
    if (reader) {
      reader.call(this, data);
    } else {
      this.fallback('command', `migration command ${this.command} (COLO, or one this version of bfmig does not know)`);
    }
    return true;
  }

  /**
   * OPEN_RETURN_PATH, PING, SWITCHOVER_START, …: they ask something of the destination or tell it
   * something; the stream goes on.
   */
  private readOnAfterCommand(): void {
    this.state = State.NextRecord;
  }

  /** POSTCOPY_ADVISE: 16 bytes (host and target page sizes) with postcopy-ram, none without. */
  private readPostcopyAdvise(data: Buffer): void {
    if (data.length !== 0 && data.length !== 16) {
      this.fallback('command', `POSTCOPY_ADVISE of ${data.length} bytes`);
      return;
    }
    if (data.length === 16) this.advised = true;
    this.state = State.NextRecord;
  }

  /** POSTCOPY_LISTEN, POSTCOPY_RUN: QEMU sends them only inside a package. */
  private readPackagedOnlyCommand(): void {
    if (this.packageEnd < 0) {
      this.fallback('command', `migration command ${this.command} outside a postcopy package`);
      return;
    }
    this.state = State.NextRecord;
  }

  /**
   * PACKAGED: a u32 length, then that many bytes of a stream within the stream (LISTEN, the device
   * sections, PING, RUN) that the destination loads whole before it runs the guest. Its records are
   * parsed like any others; PackageEnd marks where it ends.
   */
  private readPackaged(data: Buffer): void {
    if (data.length !== 4) {
      this.fallback('command', `PACKAGED command of ${data.length} bytes`);
      return;
    }
    const length = data.readUInt32BE(0);
    if (this.packageEnd >= 0 || this.postcopy) {
      this.fallback('command', 'a second postcopy package');
    } else if (length > MAX_PACKAGE_BYTES) {
      this.fallback('command', `a postcopy package of ${length} bytes (QEMU sends at most ${MAX_PACKAGE_BYTES})`);
    } else if (this.framing.footers !== true) {
      // Without footers a device section's end is known only from what follows it: here the end of
      // the package, which the unframed reader cannot see.
      this.fallback('command', 'a postcopy package in a stream without section footers');
    } else {
      this.packageEnd = this.input.offset + length;
      this.state = State.NextRecord;
    }
  }

  /** The package's last record has been read: the stream goes on with postcopy RAM. */
  private endPackage(): void {
    if (this.input.offset !== this.packageEnd) {
      this.fail(StreamErrorCode.Malformed, `a record runs ${this.input.offset - this.packageEnd} bytes past the end of its postcopy package`, this.packageEnd);
    }
    this.emit({ kind: RecordKind.PackageEnd, streamOffset: this.packageEnd }, this.packageEnd);
    this.packageEnd = -1;
    this.postcopy = true;
  }

  // The end of the stream.

  private readAfterEof(): boolean {
    const next = this.input.peek();
    if (next < 0) return false;
    this.startRecord();
    if (next === SectionType.VmDescription) {
      this.state = State.VmDescriptionLength;
    } else {
      this.framing.vmDescription = false;
      this.fallback('after-end', `byte 0x${next.toString(16)} after EOF`);
    }
    return true;
  }

  private readVmDescriptionLength(): boolean {
    if (!this.input.take(5)) return false;
    this.vmDescriptionRemaining = this.input.u32(1);
    this.framing.vmDescription = true;
    this.emit({
      kind: RecordKind.VmDescriptionHeader,
      length: this.vmDescriptionRemaining,
      streamOffset: this.recordStart,
    });
    this.state = this.vmDescriptionRemaining > 0 ? State.VmDescriptionData : State.Done;
    return true;
  }

  private readVmDescriptionData(): boolean {
    const input = this.input;
    const from = input.position;
    if (input.available === 0) return false;
    const take = Math.min(this.vmDescriptionRemaining, input.available);
    this.emitBytes(RecordKind.VmDescriptionData, input.chunk.subarray(from, from + take), input.offsetOf(from));
    input.moveTo(from + take);
    this.vmDescriptionRemaining -= take;
    if (this.vmDescriptionRemaining === 0) this.state = State.Done;
    return true;
  }

  private readAfterEnd(): boolean {
    if (this.input.available === 0) return false;
    this.startRecord();
    this.fallback('after-end', 'bytes after the end of the stream');
    return true;
  }

  private readVerbatim(): boolean {
    const input = this.input;
    const from = input.position;
    if (input.available === 0) return false;
    this.emitBytes(RecordKind.Verbatim, input.chunk.subarray(from), input.offsetOf(from));
    input.moveTo(input.chunk.length);
    return false;
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
        const at = this.input.offset - 1;
        if (this.heldByte !== SectionType.Eof) {
          this.fail(StreamErrorCode.Truncated, 'the stream ended inside device state (no EOF marker)', at + 1);
        }
        this.heldByte = -1;
        this.emit({ kind: RecordKind.Eof, streamOffset: at }, at + 1);
        this.state = State.Done;
        return;
      }
      default:
        this.fail(StreamErrorCode.Truncated, 'the stream ended before its EOF marker', this.input.offset);
    }
  }

  // Records and failures.

  private fail(code: StreamErrorCode, detail: string, at = this.recordStart): never {
    throw new StreamError(code, at, detail);
  }

  /** Notes where a record begins; a no-op while the cursor is still gathering that record. */
  private startRecord(): void {
    if (this.input.carriedBytes === 0) this.recordStart = this.input.offset;
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
  private emit(record: StreamRecord, end = this.input.offset): void {
    this.recordsEnd = end;
    this.sink(record);
  }

  /**
   * Stops parsing: every byte from here on is relayed as Verbatim. `consumed` are the bytes of the
   * current record that were read but not emitted; they are relayed first.
   */
  private fallback(code: FallbackCode, reason: string, consumed?: Buffer): void {
    this.fallenBack = { code, reason, streamOffset: this.recordStart };
    this.emit({ kind: RecordKind.Fallback, ...this.fallenBack }, this.recordStart);
    if (consumed && consumed.length > 0) this.emitBytes(RecordKind.Verbatim, consumed, this.recordStart);
    if (this.input.carriedBytes > 0) this.emitBytes(RecordKind.Verbatim, this.input.takeCarried(), this.recordStart);
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
    this.fallback('configuration', reason, Buffer.concat(read));
  }
}
