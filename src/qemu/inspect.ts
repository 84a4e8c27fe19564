import { createHash, type Hash } from 'node:crypto';
import { SectionType, VmCommand } from './constants';
import { StreamError } from './errors';
import { StreamParser } from './parser';
import { type ConfigSubsection, RecordKind, type StreamRecord } from './records';
import { StreamWriter } from './writer';

export interface SectionReport {
  sectionId: number;
  /** "scanned" for device sections found in legacy-framed device state by their header pattern. */
  found?: 'scanned';
  idstr: string;
  instanceId: number;
  versionId: number;
  /** How many START, PART, END and FULL headers it had. */
  headers: { start: number; part: number; end: number; full: number };
  /** All of its bytes: headers, data, footers. */
  bytes: number;
}

/** The fields of `bfmig inspect --json`; documented in the README. */
export interface InspectReport {
  bytes: number;
  /** "current" (footers), "legacy" (QEMU 2.0 machine types: no configuration, no footers) or "unknown". */
  framing: 'current' | 'legacy' | 'unknown';
  version: number | null;
  configuration: { machineType: string; subsections: ConfigSubsection[] } | null;
  footers: boolean | null;
  vmDescription: { present: boolean; bytes: number; devices: number | null; matchesSections: boolean | null };
  sections: SectionReport[];
  ram: {
    totalBytes: number;
    blocks: { name: string; bytes: number; pages: number }[];
    /** Record counts; `normal` and `zero` match query-migrate's ram.normal and ram.duplicate. */
    records: { normal: number; zero: number; xbzrle: number; compressed: number; eos: number; multifdFlush: number; hook: number };
  };
  /** Bytes of the stream by record kind; they add up to `bytes`. */
  bytesByKind: Record<string, number>;
  commands: { command: number; length: number }[];
  /** Set when the migration switched to postcopy: where its package (the device state) starts, and its size. */
  postcopy: { packageOffset: number; packageBytes: number } | null;
  /** Set when the parser met something it does not understand and relayed the rest verbatim. */
  fallback: { code: string; reason: string; offset: number } | null;
  /** Set when the stream was rejected. */
  error: { code: string; offset: number; message: string } | null;
  complete: boolean;
  /** Whether parse → write reproduced the input byte for byte. */
  identical: boolean;
}

const KIND_NAMES: Record<RecordKind, string> = {
  [RecordKind.FileHeader]: 'fileHeader',
  [RecordKind.Configuration]: 'configuration',
  [RecordKind.SectionHeader]: 'sectionHeaders',
  [RecordKind.SectionData]: 'deviceState',
  [RecordKind.SectionFooter]: 'sectionFooters',
  [RecordKind.RamBlockList]: 'ramBlockList',
  [RecordKind.RamPage]: 'ramNormalPages',
  [RecordKind.RamZero]: 'ramZeroPages',
  [RecordKind.RamXbzrle]: 'ramXbzrle',
  [RecordKind.RamCompressed]: 'ramCompressed',
  [RecordKind.RamEos]: 'ramEos',
  [RecordKind.RamMultifdFlush]: 'ramMultifdFlush',
  [RecordKind.RamHook]: 'ramHook',
  [RecordKind.Command]: 'commands',
  [RecordKind.PackageEnd]: 'commands',
  [RecordKind.Eof]: 'eof',
  [RecordKind.VmDescriptionHeader]: 'vmDescription',
  [RecordKind.VmDescriptionData]: 'vmDescription',
  [RecordKind.Fallback]: 'verbatim',
  [RecordKind.Verbatim]: 'verbatim',
};

/** The vmdesc JSON is kept for the cross-check only up to this size. */
const MAX_VMDESC_KEPT = 16 * 1024 * 1024;

/**
 * Reads a whole stream and reports what it holds; feeds every record through the writer and
 * compares digests of input and output to prove the rewrite byte-identical.
 */
export class StreamInspector {
  private readonly parser: StreamParser;
  private readonly writer: StreamWriter;
  private readonly inputDigest: Hash = createHash('sha256');
  private readonly outputDigest: Hash = createHash('sha256');
  private outputBytes = 0;
  private inputBytes = 0;
  private lastKind: string | null = null;
  private lastOffset = 0;
  private lastSection: SectionReport | null = null;
  private readonly sections = new Map<number, SectionReport>();
  private readonly fullOrder: SectionReport[] = [];
  private vmdescChunks: Buffer[] = [];
  /** Unframed (legacy) device state after the first FULL header, kept to find the later sections. */
  private unframed: Buffer[] = [];
  private unframedBytes = 0;
  private unframedStart = -1;
  private vmdescKept = 0;
  private readonly report: InspectReport = {
    bytes: 0,
    framing: 'unknown',
    version: null,
    configuration: null,
    footers: null,
    vmDescription: { present: false, bytes: 0, devices: null, matchesSections: null },
    sections: [],
    ram: { totalBytes: 0, blocks: [], records: { normal: 0, zero: 0, xbzrle: 0, compressed: 0, eos: 0, multifdFlush: 0, hook: 0 } },
    bytesByKind: {},
    commands: [],
    postcopy: null,
    fallback: null,
    error: null,
    complete: false,
    identical: false,
  };

  /** `observer` sees every record after the inspector (a view of the stream it may keep only while the call lasts). */
  constructor(private readonly observer: ((record: StreamRecord) => void) | null = null) {
    this.writer = new StreamWriter((bytes) => {
      this.outputDigest.update(bytes);
      this.outputBytes += bytes.length;
    });
    this.parser = new StreamParser((record) => this.onRecord(record));
  }

  push(chunk: Buffer): void {
    this.inputDigest.update(chunk);
    this.inputBytes += chunk.length;
    if (this.report.error) return;
    try {
      this.parser.push(chunk);
    } catch (err) {
      this.onError(err);
    }
  }

  end(): InspectReport {
    if (!this.report.error) {
      try {
        this.parser.end();
      } catch (err) {
        this.onError(err);
      }
    }
    this.writer.flush();
    // The bytes of the record that was rejected, and everything after it, count as `rejected`.
    if (this.report.error) this.account('rejected', this.lastKind === null ? 0 : Math.max(this.lastOffset, this.parser.recordsEnd));
    this.account(null, this.inputBytes);
    const r = this.report;
    r.bytes = this.inputBytes;
    r.footers = this.parser.framing.footers;
    r.framing = r.footers === true ? 'current' : r.footers === false && r.configuration === null ? 'legacy' : 'unknown';
    if (r.framing === 'legacy') this.scanUnframed();
    r.sections = [...this.sections.values()];
    r.complete = this.parser.complete && !r.error;
    r.identical =
      !r.error && this.outputBytes === this.inputBytes && this.outputDigest.digest('hex') === this.inputDigest.digest('hex');
    this.checkVmDescription();
    return r;
  }

  private onError(err: unknown): void {
    if (!(err instanceof StreamError)) throw err;
    this.report.error = { code: err.code, offset: err.offset, message: err.message };
  }

  /** Attributes the bytes since the previous record to that record's kind and section. */
  private account(kind: string | null, offset: number): void {
    if (this.lastKind !== null && offset > this.lastOffset) {
      const bytes = offset - this.lastOffset;
      this.report.bytesByKind[this.lastKind] = (this.report.bytesByKind[this.lastKind] ?? 0) + bytes;
      if (this.lastSection) this.lastSection.bytes += bytes;
    }
    this.lastKind = kind;
    this.lastOffset = offset;
  }

  private onRecord(record: StreamRecord): void {
    this.writer.write(record);
    const r = this.report;
    // Opaque pieces continue the record before them (device state, vmdesc, verbatim runs).
    if (record.kind !== RecordKind.SectionData || this.lastKind !== 'deviceState') {
      this.account(KIND_NAMES[record.kind], record.streamOffset);
    }
    switch (record.kind) {
      case RecordKind.FileHeader:
        r.version = record.version;
        break;
      case RecordKind.Configuration:
        r.configuration = { machineType: record.machineType, subsections: record.subsections };
        break;
      case RecordKind.SectionHeader: {
        let section = this.sections.get(record.sectionId);
        if (!section) {
          section = {
            sectionId: record.sectionId,
            idstr: record.idstr,
            instanceId: record.instanceId,
            versionId: record.versionId,
            headers: { start: 0, part: 0, end: 0, full: 0 },
            bytes: 0,
          };
          this.sections.set(record.sectionId, section);
        }
        if (record.type === SectionType.Start) section.headers.start++;
        else if (record.type === SectionType.Part) section.headers.part++;
        else if (record.type === SectionType.End) section.headers.end++;
        else {
          section.headers.full++;
          this.fullOrder.push(section);
        }
        this.lastSection = section;
        break;
      }
      case RecordKind.SectionFooter:
        break;
      case RecordKind.RamBlockList:
        r.ram.totalBytes = record.totalBytes;
        r.ram.blocks = record.blocks.map((b) => ({ name: b.name, bytes: b.length, pages: b.pages }));
        break;
      case RecordKind.RamPage:
        r.ram.records.normal++;
        break;
      case RecordKind.RamZero:
        r.ram.records.zero++;
        break;
      case RecordKind.RamXbzrle:
        r.ram.records.xbzrle++;
        break;
      case RecordKind.RamCompressed:
        r.ram.records.compressed++;
        break;
      case RecordKind.RamEos:
        r.ram.records.eos++;
        break;
      case RecordKind.RamMultifdFlush:
        r.ram.records.multifdFlush++;
        break;
      case RecordKind.RamHook:
        r.ram.records.hook++;
        break;
      case RecordKind.Command:
        r.commands.push({ command: record.command, length: record.data.length });
        if (record.command === VmCommand.Packaged && record.data.length === 4) r.postcopy = { packageOffset: record.streamOffset, packageBytes: record.data.readUInt32BE(0) };
        this.lastSection = null;
        break;
      case RecordKind.Eof:
        this.lastSection = null;
        break;
      case RecordKind.VmDescriptionHeader:
        r.vmDescription.present = true;
        r.vmDescription.bytes = record.length;
        this.lastSection = null;
        break;
      case RecordKind.VmDescriptionData:
        if (this.vmdescKept + record.bytes.length <= MAX_VMDESC_KEPT) {
          this.vmdescChunks.push(Buffer.from(record.bytes));
          this.vmdescKept += record.bytes.length;
        } else {
          this.vmdescChunks = [];
          this.vmdescKept = Infinity;
        }
        break;
      case RecordKind.Fallback:
        r.fallback = { code: record.code, reason: record.reason, offset: record.streamOffset };
        this.lastSection = null;
        break;
      case RecordKind.SectionData:
        if (this.parser.framing.footers !== true && this.unframedBytes + record.bytes.length <= MAX_VMDESC_KEPT) {
          if (this.unframedStart < 0) this.unframedStart = record.streamOffset;
          this.unframed.push(Buffer.from(record.bytes));
          this.unframedBytes += record.bytes.length;
        }
        break;
      case RecordKind.Verbatim:
        break;
    }
    this.observer?.(record);
  }

  /**
   * The legacy framing marks no section ends: QEMU 2.0 device sections follow one another with nothing
   * between them. Later sections are found by their header pattern — type FULL, an unseen section id,
   * a plausible idstr, small instance and version — and reported as "scanned".
   */
  private scanUnframed(): void {
    const first = this.fullOrder[this.fullOrder.length - 1];
    if (!first || this.unframedBytes === 0 || this.unframedBytes !== this.unframed.reduce((n, b) => n + b.length, 0)) return;
    const data = Buffer.concat(this.unframed);
    const ids = new Set(this.sections.keys());
    const idstrPattern = /^[A-Za-z0-9/][A-Za-z0-9_.:/@-]*$/;
    const found: { at: number; section: SectionReport }[] = [];
    for (let p = data.indexOf(SectionType.Full); p >= 0; p = data.indexOf(SectionType.Full, p + 1)) {
      if (p + 6 > data.length) break;
      const id = data.readUInt32BE(p + 1);
      const length = data[p + 5];
      const end = p + 6 + length + 8;
      if (ids.has(id) || length === 0 || end > data.length) continue;
      const idstr = data.toString('latin1', p + 6, p + 6 + length);
      const instanceId = data.readUInt32BE(p + 6 + length);
      const versionId = data.readUInt32BE(p + 10 + length);
      if (!idstrPattern.test(idstr) || instanceId > 0xffff || versionId > 0xffff) continue;
      ids.add(id);
      found.push({ at: p, section: { sectionId: id, found: 'scanned', idstr, instanceId, versionId, headers: { start: 0, part: 0, end: 0, full: 1 }, bytes: 0 } });
      p = end - 1;
    }
    if (found.length === 0) return;
    // The first section keeps its header and the data before the first header found.
    first.bytes -= data.length - found[0].at;
    found.forEach((f, i) => {
      f.section.bytes = (i + 1 < found.length ? found[i + 1].at : data.length) - f.at;
      this.sections.set(f.section.sectionId, f.section);
      this.fullOrder.push(f.section);
    });
  }

  /** The vmdesc lists every device saved in FULL sections, in order: a check on the boundaries found. */
  private checkVmDescription(): void {
    const v = this.report.vmDescription;
    if (!v.present || this.vmdescKept !== v.bytes) return;
    let parsed: unknown;
    try {
      parsed = JSON.parse(Buffer.concat(this.vmdescChunks).toString('utf8'));
    } catch {
      return;
    }
    const devices = (parsed as { devices?: unknown }).devices;
    if (!Array.isArray(devices)) return;
    v.devices = devices.length;
    const names = devices.map((d) => `${(d as { name?: unknown }).name}/${(d as { instance_id?: unknown }).instance_id}`);
    const seen = this.fullOrder.map((s) => `${s.idstr}/${s.instanceId}`);
    v.matchesSections = names.length === seen.length && names.every((n, i) => n === seen[i]);
  }
}
