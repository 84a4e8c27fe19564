/**
 * Wire constants of the QEMU migration stream (migration/savevm.c, migration/ram.c).
 * All integers on the wire are big-endian.
 */

/** "QEVM": QEMU_VM_FILE_MAGIC. */
export const FILE_MAGIC = 0x5145564d;
/** QEMU_VM_FILE_VERSION: the same in QEMU 2.0 and 7.2. */
export const FILE_VERSION = 3;
/** QEMU_VM_FILE_VERSION_COMPAT: rejected by every QEMU since 2.x as obsolete. */
export const FILE_VERSION_COMPAT = 2;

/** The top-level record type byte. */
export const enum SectionType {
  /** End of device state; only the vmdesc trailer may follow. */
  Eof = 0x00,
  /** First section of a live (iterative) handler, e.g. `ram` at setup. */
  Start = 0x01,
  /** One iteration of a live handler. */
  Part = 0x02,
  /** Last iteration of a live handler, at completion. */
  End = 0x03,
  /** Complete state of a non-iterative device; its data has no length prefix. */
  Full = 0x04,
  /** Optional part of a vmstate, inside a section's data (and the configuration). */
  Subsection = 0x05,
  /** JSON description of the device state, after EOF. */
  VmDescription = 0x06,
  /** Machine type (and a few validated settings), right after the file header. */
  Configuration = 0x07,
  /** Control message: return path, ping, postcopy, packaged sub-streams. */
  Command = 0x08,
  /** Marks the end of one section's data; absent in the QEMU 2.0 framing. */
  Footer = 0x7e,
}

/** Low bits of a RAM record's 64-bit header word; the high bits are the page offset. */
export const enum RamFlag {
  /** Setup: the high bits are the total RAM size; the RAM block list follows. */
  MemSize = 0x04,
  /** A page filled with one byte (always 0 since QEMU 2.x); was COMPRESS. */
  Zero = 0x02,
  /** A whole page in clear. */
  Page = 0x08,
  /** End of this section's RAM data. */
  Eos = 0x10,
  /** Same RAM block as the previous record: no block name follows. */
  Continue = 0x20,
  /** An XBZRLE delta against the destination's cache (capability xbzrle). */
  Xbzrle = 0x40,
  /** RDMA control hook: the transport carries the data, not this stream. */
  Hook = 0x80,
  /** A zlib-compressed page (capability compress). */
  CompressPage = 0x100,
  /** A multifd synchronisation point (QEMU 8+). */
  MultifdFlush = 0x200,
}

/**
 * QEMU_VM_COMMAND codes (enum qemu_vm_cmd in migration/savevm.c; the same numbers from QEMU 2.x to
 * 10.0, new ones only appended).
 */
export const enum VmCommand {
  OpenReturnPath = 1,
  Ping = 2,
  PostcopyAdvise = 3,
  PostcopyListen = 4,
  PostcopyRun = 5,
  PostcopyRamDiscard = 6,
  Packaged = 7,
  EnableColo = 8,
  PostcopyResume = 9,
  RecvBitmap = 10,
  /** Machine types 10.0 and newer, as the source switches over (machine property send-switchover-start). */
  SwitchoverStart = 11,
}

/** ENCODING_FLAG_XBZRLE: the only encoding byte QEMU writes before an XBZRLE delta. */
export const XBZRLE_ENCODING = 0x01;

/** x86 TARGET_PAGE_SIZE; the flag bits of a RAM header word live below it. */
export const X86_PAGE_SIZE = 4096;

/**
 * Limits that keep hostile input from costing memory or time out of proportion.
 * Each is far above anything real QEMU sends.
 */
export const enum Limit {
  /** Configuration machine-type name (QEMU machine names are short). */
  ConfigNameBytes = 256,
  /** Validated capabilities listed in the configuration. */
  ConfigCapabilities = 64,
  /** RAM blocks in the MEM_SIZE list. */
  RamBlocks = 4096,
  /** Distinct sections in one stream. */
  Sections = 65536,
  /** Total guest RAM: 1 PiB keeps every offset exact in a JS number. */
  RamBytesLog2 = 50,
}

/** zlib compressBound(4096): the largest COMPRESS_PAGE payload QEMU accepts for a 4 KiB page. */
export const MAX_COMPRESSED_PAGE = 4110;
