import type { SectionType } from './constants';

/** What kind of thing the parser found; each record carries the fields needed to re-emit it. */
export const enum RecordKind {
  /** Magic and version. */
  FileHeader = 1,
  /** Machine type and validated settings (current framing only). */
  Configuration,
  /** START, FULL, PART or END section header. */
  SectionHeader,
  /** A piece of a non-RAM section's opaque data, relayed as it arrives. */
  SectionData,
  /** End-of-section marker (current framing only). */
  SectionFooter,
  /** The MEM_SIZE record: the RAM block list. */
  RamBlockList,
  /** A whole page in clear. */
  RamPage,
  /** A page filled with one byte value. */
  RamZero,
  /** An XBZRLE-encoded page delta. */
  RamXbzrle,
  /** A zlib-compressed page. */
  RamCompressed,
  /** End of a RAM section's data. */
  RamEos,
  /** Multifd sync point. */
  RamMultifdFlush,
  /** RDMA hook; the parser relays the rest of the stream verbatim after it. */
  RamHook,
  /** A QEMU_VM_COMMAND packet. */
  Command,
  /**
   * The end of a PACKAGED command's nested stream (postcopy: the device state, LISTEN, RUN): the
   * destination loads it whole, then runs the guest while the rest of RAM still arrives.
   */
  PackageEnd,
  /** End of device state. */
  Eof,
  /** Start of the vmdesc JSON trailer (its length). */
  VmDescriptionHeader,
  /** A piece of the vmdesc JSON. */
  VmDescriptionData,
  /** The parser stops understanding here; everything after is Verbatim. */
  Fallback,
  /** Bytes relayed unparsed after a Fallback. */
  Verbatim,
}

export interface RamBlock {
  /** Position in the MEM_SIZE list. */
  readonly index: number;
  readonly name: string;
  /** used_length in bytes. */
  readonly length: number;
  /** Index of this block's first page in a numbering of all pages of all blocks. */
  readonly firstPage: number;
  readonly pages: number;
  /** Guest-physical address, present when the x-ignore-shared capability is on. */
  readonly sharedAddr?: bigint;
}

export interface FileHeaderRecord {
  kind: RecordKind.FileHeader;
  version: number;
  streamOffset: number;
}

export type ConfigSubsection =
  | { name: 'configuration/target-page-bits'; version: number; targetPageBits: number }
  | { name: 'configuration/capabilities'; version: number; capabilities: string[] }
  | { name: 'configuration/uuid'; version: number; uuid: Buffer };

export interface ConfigurationRecord {
  kind: RecordKind.Configuration;
  machineType: string;
  subsections: ConfigSubsection[];
  streamOffset: number;
}

export interface SectionHeaderRecord {
  kind: RecordKind.SectionHeader;
  type: SectionType.Start | SectionType.Full | SectionType.Part | SectionType.End;
  sectionId: number;
  /** Name, instance and version: carried by START and FULL, looked up for PART and END. */
  idstr: string;
  instanceId: number;
  versionId: number;
  streamOffset: number;
}

export interface SectionFooterRecord {
  kind: RecordKind.SectionFooter;
  sectionId: number;
  streamOffset: number;
}

/** Opaque bytes: a view valid only during the callback that receives it. */
export interface BytesRecord {
  kind: RecordKind.SectionData | RecordKind.VmDescriptionData | RecordKind.Verbatim;
  /** For SectionData: the section the bytes belong to. */
  sectionId: number;
  bytes: Buffer;
  streamOffset: number;
}

export interface RamBlockListRecord {
  kind: RecordKind.RamBlockList;
  /** The low flag bits of the header word exactly as sent (MEM_SIZE, maybe CONTINUE). */
  flags: number;
  totalBytes: number;
  blocks: readonly RamBlock[];
  streamOffset: number;
}

/**
 * A RAM page record. The parser reuses one object for every page: read what you need during the
 * callback. The payload is `data[dataStart, dataStart + dataLength)`, in the caller's chunk when it
 * arrived whole, else in a parser-owned scratch buffer.
 */
export interface RamPageRecord {
  kind: RecordKind.RamPage | RecordKind.RamZero | RecordKind.RamXbzrle | RecordKind.RamCompressed;
  /** The low flag bits of the header word exactly as sent, CONTINUE included. */
  flags: number;
  block: RamBlock;
  /** Byte offset of the page within its block. */
  offset: number;
  /** Page number across all blocks: block.firstPage + offset / pageSize. */
  pageIndex: number;
  /** RamZero: the fill byte. RamXbzrle: the encoding byte. */
  byteValue: number;
  data: Buffer;
  dataStart: number;
  dataLength: number;
  streamOffset: number;
}

/** EOS, MULTIFD_FLUSH, HOOK: a header word and nothing else. */
export interface RamMarkerRecord {
  kind: RecordKind.RamEos | RecordKind.RamMultifdFlush | RecordKind.RamHook;
  /** The whole low 12 bits as sent, and the high part of the word (normally 0). */
  flags: number;
  offset: number;
  streamOffset: number;
}

export interface CommandRecord {
  kind: RecordKind.Command;
  command: number;
  data: Buffer;
  streamOffset: number;
}

export interface PackageEndRecord {
  kind: RecordKind.PackageEnd;
  /** Just past the package's last byte. */
  streamOffset: number;
}

export interface EofRecord {
  kind: RecordKind.Eof;
  streamOffset: number;
}

export interface VmDescriptionHeaderRecord {
  kind: RecordKind.VmDescriptionHeader;
  length: number;
  streamOffset: number;
}

/**
 * What made the parser give up and relay the rest verbatim, in a few stable words (a metric label):
 * a newer stream version, an unknown section type, a live section other than RAM, a second or FULL
 * RAM section, RDMA, unknown RAM flags, a command it does not follow (COLO, unknown ones), bytes
 * after the end, a configuration it does not know; on a multifd channel (qemu/multifd.ts): a packet
 * version other than 1, compressed pages, flags it does not know (device state, newer ones).
 */
export type FallbackCode =
  | 'stream-version'
  | 'section-type'
  | 'live-section'
  | 'ram-section'
  | 'rdma'
  | 'ram-flags'
  | 'command'
  | 'after-end'
  | 'configuration'
  | 'multifd-version'
  | 'multifd-compression'
  | 'multifd-flags'
  /** QEMU's own TLS (`tls-creds`): the whole stream is encrypted end to end. */
  | 'encrypted';

/** Where and why a stream stopped being parsed: everything from `streamOffset` on was relayed as it was. */
export interface StreamFallback {
  code: FallbackCode;
  reason: string;
  streamOffset: number;
}

export interface FallbackRecord {
  kind: RecordKind.Fallback;
  code: FallbackCode;
  /** The same, said for a person. */
  reason: string;
  streamOffset: number;
}

export type StreamRecord =
  | FileHeaderRecord
  | ConfigurationRecord
  | SectionHeaderRecord
  | SectionFooterRecord
  | BytesRecord
  | RamBlockListRecord
  | RamPageRecord
  | RamMarkerRecord
  | CommandRecord
  | PackageEndRecord
  | EofRecord
  | VmDescriptionHeaderRecord
  | FallbackRecord;

export type RecordSink = (record: StreamRecord) => void;
