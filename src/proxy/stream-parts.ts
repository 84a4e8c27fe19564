import { SectionType, VmCommand } from '../qemu/constants';
import { RecordKind, type StreamRecord } from '../qemu/records';

/** Limits on what is kept: the head is a few hundred bytes, the device state rarely above a megabyte. */
const MAX_HEAD = 64 * 1024;
const MAX_TAIL = 16 * 1024 * 1024;
/** Bytes kept of a released chunk: far more than a section header and the parser's footer lookahead. */
const RECENT_KEEP = 4096;

/**
 * Keeps the parts of a migration stream that are not RAM pages, so that the store can later rebuild a
 * whole stream from its pages: the head (file header, configuration, the RAM setup section with its
 * block list) and the tail (every device section, EOF, the vmdesc trailer).
 */
export class StreamParts {
  private head: Buffer[] = [];
  private headBytes = 0;
  private headEnd = -1;
  /** Recent input, kept until the tail's start is known. */
  private recent: { bytes: Buffer; at: number; spare: Buffer | null }[] = [];
  private tailFrom = -1;
  private tail: Buffer[] = [];
  private tailBytes = 0;
  private ramEnded = false;
  private postcopy = false;
  private ramSectionId = -1;
  private overflow = false;
  /** From the configuration section; QEMU 2.0-framed streams do not say. */
  private machineType: string | null = null;
  private fedTo = 0;
  /** Copies of the ends of earlier chunks, for callers whose chunks do not outlive their turn. */
  private readonly spares: Buffer[] = [];

  /**
   * Stream offset of the first device section after RAM's last one, or of a postcopy package (-1 until
   * it is seen).
   */
  get tailStart(): number {
    return this.tailFrom;
  }

  /** Bytes of the stream, in order, as they pass (views are fine: what is kept is copied). */
  feed(bytes: Buffer): void {
    const at = this.fedTo;
    this.fedTo += bytes.length;
    if (this.headEnd < 0 && this.headBytes < MAX_HEAD) {
      const take = bytes.subarray(0, MAX_HEAD - this.headBytes);
      this.head.push(Buffer.from(take));
      this.headBytes += take.length;
    }
    if (this.tailFrom >= 0) {
      this.keepTail(bytes);
    } else {
      this.recent.push({ bytes, at, spare: null });
      // Two chunks cover any section header split across them.
      if (this.recent.length > 3) {
        const dropped = this.recent.shift();
        if (dropped?.spare) this.spares.push(dropped.spare);
      }
    }
  }

  /**
   * The chunks fed so far are about to be reused by their owner: keep copies of their last RECENT_KEEP
   * bytes instead of views. Call after the records of those chunks have been passed to record().
   */
  release(): void {
    for (let i = 0; i < this.recent.length; i++) {
      const entry = this.recent[i];
      if (entry.spare) continue;
      const keep = Math.min(RECENT_KEEP, entry.bytes.length);
      const spare = this.spares.pop() ?? Buffer.allocUnsafe(RECENT_KEEP);
      entry.bytes.copy(spare, 0, entry.bytes.length - keep);
      this.recent[i] = { bytes: spare.subarray(0, keep), at: entry.at + entry.bytes.length - keep, spare };
    }
  }

  /** Records of the same stream, as the parser emits them (after the bytes they came in were fed). */
  record(record: StreamRecord): void {
    switch (record.kind) {
      case RecordKind.Configuration:
        this.machineType = record.machineType;
        return;
      case RecordKind.Command:
        // Postcopy: the device state travels in this package, and the destination runs the guest
        // once it has loaded it, while RAM still arrives. The package is the stream's tail.
        if (record.command === VmCommand.Packaged && this.tailFrom < 0) this.startTail(record.streamOffset);
        return;
      case RecordKind.PackageEnd:
        // What follows is RAM again, and the END and EOF of postcopy: not device state. A store keeps
        // no tail of a postcopy stream (restore rebuilds precopy streams only).
        this.postcopy = true;
        return;
      case RecordKind.SectionHeader:
        break;
      default:
        return;
    }
    if (record.idstr === 'ram') {
      if (record.type === SectionType.Start) this.ramSectionId = record.sectionId;
      if (this.headEnd < 0 && (record.type === SectionType.Part || record.type === SectionType.End)) this.headEnd = record.streamOffset;
      if (record.type === SectionType.End) this.ramEnded = true;
      return;
    }
    if (record.type === SectionType.Full && this.ramEnded && this.tailFrom < 0) this.startTail(record.streamOffset);
  }

  /** Whether the stream switched to postcopy: its device state went in a package, before RAM's end. */
  get postcopyStarted(): boolean {
    return this.postcopy;
  }

  private startTail(from: number): void {
    this.tailFrom = from;
    // The kept input must cover the tail's start without a gap (released chunks keep only their
    // ends); otherwise no tail, so no restore, rather than a wrong one.
    let covered = this.tailFrom;
    for (const { bytes, at } of this.recent) {
      if (at + bytes.length <= this.tailFrom) continue;
      if (at > covered) this.overflow = true;
      covered = at + bytes.length;
    }
    if (covered !== this.fedTo) this.overflow = true;
    for (const { bytes, at } of this.recent) {
      if (at + bytes.length > this.tailFrom) this.keepTail(bytes.subarray(Math.max(0, this.tailFrom - at)));
    }
    this.recent = [];
  }

  private keepTail(bytes: Buffer): void {
    if (this.postcopy) return;
    if (this.tailBytes + bytes.length > MAX_TAIL) {
      this.overflow = true;
      return;
    }
    this.tail.push(Buffer.from(bytes));
    this.tailBytes += bytes.length;
  }

  /** The head and tail, when the stream had both and they fit the limits. */
  result(): { head: Buffer; tail: Buffer; ramSectionId: number; machineType: string | null } | null {
    if (this.headEnd < 0 || this.tailFrom < 0 || this.postcopy || this.overflow || this.headEnd > this.headBytes || this.ramSectionId < 0) return null;
    return { head: Buffer.concat(this.head).subarray(0, this.headEnd), tail: Buffer.concat(this.tail), ramSectionId: this.ramSectionId, machineType: this.machineType };
  }
}
