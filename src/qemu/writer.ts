import { SectionType } from './constants';
import { encodeConfiguration, writeRamWord, writeShortString } from './encode';
import { type RamBlock, RecordKind, type StreamRecord } from './records';

/**
 * Serialises records back into a migration stream. Records are gathered into buffers of `bufferSize`
 * bytes; flush() hands the sink a view of what was written since the last flush, which the writer
 * never touches again (the sink may keep it). Opaque byte runs larger than a buffer go to the sink as
 * copies of their own. Parse → write reproduces the input byte for byte.
 */
export class StreamWriter {
  private out: Buffer;
  private used = 0;
  /** out[0, flushed) belongs to the sink already; flushes hand on views, not fresh buffers. */
  private flushed = 0;
  private blocks: readonly RamBlock[] = [];

  constructor(
    private readonly sink: (bytes: Buffer) => void,
    private readonly bufferSize = 256 * 1024,
  ) {
    this.out = Buffer.allocUnsafe(bufferSize);
  }

  write(record: StreamRecord): void {
    switch (record.kind) {
      case RecordKind.FileHeader:
        this.reserve(8);
        this.out.write('QEVM', this.used, 'latin1');
        this.out.writeUInt32BE(record.version, this.used + 4);
        this.used += 8;
        return;
      case RecordKind.Configuration:
        this.bytes(encodeConfiguration(record.machineType, record.subsections));
        return;
      case RecordKind.SectionHeader: {
        const full = record.type === SectionType.Start || record.type === SectionType.Full;
        this.reserve(5 + (full ? 1 + record.idstr.length + 8 : 0));
        this.out[this.used] = record.type;
        this.out.writeUInt32BE(record.sectionId, this.used + 1);
        this.used += 5;
        if (full) {
          this.shortString(record.idstr);
          this.out.writeUInt32BE(record.instanceId, this.used);
          this.out.writeUInt32BE(record.versionId, this.used + 4);
          this.used += 8;
        }
        return;
      }
      case RecordKind.SectionFooter:
        this.reserve(5);
        this.out[this.used] = SectionType.Footer;
        this.out.writeUInt32BE(record.sectionId, this.used + 1);
        this.used += 5;
        return;
      case RecordKind.SectionData:
      case RecordKind.VmDescriptionData:
      case RecordKind.Verbatim:
        this.bytes(record.bytes);
        return;
      case RecordKind.RamBlockList:
        this.blocks = record.blocks;
        this.reserve(8);
        this.used = writeRamWord(this.out, this.used, record.totalBytes, record.flags);
        for (const block of record.blocks) {
          this.reserve(1 + block.name.length + 16);
          this.shortString(block.name);
          this.used = writeRamWord(this.out, this.used, block.length, 0);
          if (block.sharedAddr !== undefined) {
            this.out.writeBigUInt64BE(block.sharedAddr, this.used);
            this.used += 8;
          }
        }
        return;
      case RecordKind.RamPage:
      case RecordKind.RamZero:
      case RecordKind.RamXbzrle:
      case RecordKind.RamCompressed: {
        const block = this.blocks[record.block.index];
        const named = (record.flags & 0x20) === 0;
        this.reserve(8 + (named ? 1 + block.name.length : 0) + 7);
        this.used = writeRamWord(this.out, this.used, record.offset, record.flags);
        if (named) this.shortString(block.name);
        if (record.kind === RecordKind.RamZero) {
          this.out[this.used++] = record.byteValue;
        } else if (record.kind === RecordKind.RamXbzrle) {
          this.out[this.used] = record.byteValue;
          this.out.writeUInt16BE(record.dataLength, this.used + 1);
          this.used += 3;
        } else if (record.kind === RecordKind.RamCompressed) {
          this.out.writeUInt32BE(record.dataLength, this.used);
          this.used += 4;
        }
        if (record.dataLength > 0) this.bytes(record.data.subarray(record.dataStart, record.dataStart + record.dataLength));
        return;
      }
      case RecordKind.RamEos:
      case RecordKind.RamMultifdFlush:
      case RecordKind.RamHook:
        this.reserve(8);
        this.used = writeRamWord(this.out, this.used, record.offset, record.flags);
        return;
      case RecordKind.Command:
        this.reserve(5);
        this.out[this.used] = SectionType.Command;
        this.out.writeUInt16BE(record.command, this.used + 1);
        this.out.writeUInt16BE(record.data.length, this.used + 3);
        this.used += 5;
        this.bytes(record.data);
        return;
      case RecordKind.Eof:
        this.reserve(1);
        this.out[this.used++] = SectionType.Eof;
        return;
      case RecordKind.VmDescriptionHeader:
        this.reserve(5);
        this.out[this.used] = SectionType.VmDescription;
        this.out.writeUInt32BE(record.length, this.used + 1);
        this.used += 5;
        return;
      case RecordKind.Fallback:
      case RecordKind.PackageEnd:
        return;
    }
  }

  /** Hands everything written so far to the sink. */
  flush(): void {
    if (this.used === this.flushed) return;
    this.sink(this.out.subarray(this.flushed, this.used));
    this.flushed = this.used;
  }

  private reserve(n: number): void {
    if (this.used + n > this.out.length) {
      this.flush();
      this.out = Buffer.allocUnsafe(this.bufferSize);
      this.used = 0;
      this.flushed = 0;
    }
  }

  private shortString(text: string): void {
    this.used = writeShortString(this.out, this.used, text);
  }

  private bytes(bytes: Buffer): void {
    if (bytes.length > this.bufferSize) {
      this.flush();
      this.sink(Buffer.from(bytes));
      return;
    }
    this.reserve(bytes.length);
    bytes.copy(this.out, this.used);
    this.used += bytes.length;
  }
}

