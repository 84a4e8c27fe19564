import { createReadStream } from 'node:fs';
import type { Readable } from 'node:stream';
import { type InspectReport, StreamInspector } from '../qemu/inspect';
import { RecordKind } from '../qemu/records';
import { StreamWriter } from '../qemu/writer';
import { CompressionMeter } from '../wire/compression';
import { DIGEST_BYTES } from '../digest';
import { StreamEncoder } from '../proxy/encoder';
import { errorMessage } from '../common/errors';

/** What a sending gateway's zstd would make of the stream's Literal bytes on a first leg. */
export interface CompressionReport {
  /** Bytes that go as Literal on a first leg: the whole stream but its zero-page records (those go in Runs). */
  literalBytes: number;
  /** The frames they become when the WAN is the bottleneck throughout (Compressed, or Literal where zstd did not shrink a batch). */
  frameBytes: number;
  /** frameBytes / literalBytes: `bfmig predict --compression`. */
  ratio: number;
}

/**
 * What a first leg with deltas would carry (the receiver holding nothing of the VM yet, the WAN setting
 * the pace): pages whose content came earlier in the stream go as references, pages like one sent lately
 * as deltas against it (`proxy/resemblance-cache.ts`), the rest whole, compressed.
 */
export interface FirstLegDeltaReport {
  /** Normal pages sent whole or as deltas and references (not zero pages). */
  carriedPages: number;
  /** Of them, as deltas or references. */
  deltaPages: number;
  /** deltaPages / carriedPages: `bfmig predict --first-leg-deltas`. */
  share: number;
  /** Mean bytes of a Delta payload: `bfmig predict --delta-bytes`. */
  meanDeltaBytes: number;
  /** The Literal bytes left and their compression: `bfmig predict --compression` with deltas. */
  compression: CompressionReport;
  /** Why the codec could not take the stream (then the figures are those of no deltas at all). */
  error?: string;
}

export interface InspectResult extends InspectReport {
  compression: CompressionReport;
  firstLegDeltas: FirstLegDeltaReport;
}

/** What an ended meter's Literal bytes became. */
function compressionOf(meter: CompressionMeter): CompressionReport {
  const { literalBytes, frameBytes } = meter;
  return { literalBytes, frameBytes, ratio: literalBytes === 0 ? 1 : frameBytes / literalBytes };
}

/** The first leg's deltas: the source's chunks through a sending gateway's codec, without a store. */
class FirstLegDeltaMeter {
  private readonly meter = new CompressionMeter();
  private readonly encoder: StreamEncoder;

  constructor() {
    this.encoder = new StreamEncoder(
      { literal: (bytes) => this.meter.literal(bytes), run: () => undefined, delta: () => undefined },
      null,
      (layout) => {
        this.encoder.reference = new Uint8Array(layout.pageCount * DIGEST_BYTES);
        this.encoder.deltas = true;
      },
    );
  }

  push(chunk: Buffer): void {
    this.encoder.push(chunk);
  }

  end(): FirstLegDeltaReport {
    this.encoder.end();
    this.meter.end();
    const c = this.encoder.counts;
    const deltaPages = c.pagesDelta + c.pagesMatched;
    const carriedPages = c.pagesSent + deltaPages;
    return {
      carriedPages,
      deltaPages,
      share: carriedPages === 0 ? 0 : deltaPages / carriedPages,
      meanDeltaBytes: deltaPages === 0 ? 0 : c.deltaBytes / deltaPages,
      compression: compressionOf(this.meter),
    };
  }
}

export async function inspectSource(source: Readable): Promise<InspectResult> {
  const meter = new CompressionMeter();
  // The Literal bytes rebuilt from the records (byte-identical, inspect checks it): a writer's buffers are never reused.
  const literal = new StreamWriter((bytes) => meter.literal(bytes));
  const inspector = new StreamInspector((record) => {
    if (record.kind !== RecordKind.RamZero) literal.write(record);
  });
  const firstLeg = new FirstLegDeltaMeter();
  // A stream the codec cannot take still gets the rest of its report, and says why this part is missing.
  let firstLegError: string | null = null;
  for await (const chunk of source) {
    inspector.push(chunk as Buffer);
    if (firstLegError !== null) continue;
    try {
      firstLeg.push(chunk as Buffer);
    } catch (err) {
      firstLegError = errorMessage(err);
    }
  }
  const report = inspector.end();
  literal.flush();
  meter.end();
  const compression = compressionOf(meter);
  if (firstLegError === null) {
    try {
      return { ...report, compression, firstLegDeltas: firstLeg.end() };
    } catch (err) {
      firstLegError = errorMessage(err);
    }
  }
  return { ...report, compression, firstLegDeltas: { carriedPages: 0, deltaPages: 0, share: 0, meanDeltaBytes: 0, compression, error: firstLegError } };
}

export async function inspectPath(path: string): Promise<InspectResult> {
  return inspectSource(path === '-' ? process.stdin : createReadStream(path, { highWaterMark: 1 << 20 }));
}

const n = (v: number): string => v.toLocaleString('en-US');

function table(rows: (string | number)[][], align: ('l' | 'r')[]): string {
  const cells = rows.map((r) => r.map((c) => (typeof c === 'number' ? n(c) : c)));
  const widths = align.map((_, i) => Math.max(...cells.map((r) => (r[i] ?? '').length)));
  return cells
    .map((r) => '  ' + r.map((c, i) => (align[i] === 'r' ? c.padStart(widths[i]) : c.padEnd(widths[i]))).join('  ').trimEnd())
    .join('\n');
}

export function formatReport(r: InspectResult): string {
  const lines: string[] = [];
  const framing = [
    r.configuration ? `configuration ${r.configuration.machineType}` : 'no configuration',
    r.footers ? 'footers' : 'no footers',
    r.vmDescription.present ? `vmdesc ${n(r.vmDescription.bytes)} bytes` : 'no vmdesc',
  ].join(', ');
  lines.push(`stream     ${n(r.bytes)} bytes, version ${r.version ?? '?'}, framing ${r.framing} (${framing})`);
  lines.push(`rewrite    ${r.identical ? 'byte-identical' : 'NOT identical'}${r.complete ? '' : ' (stream incomplete)'}`);
  if (r.error) lines.push(`error      ${r.error.message}`);
  if (r.postcopy) lines.push(`postcopy   device state packaged at byte ${n(r.postcopy.packageOffset)} (${n(r.postcopy.packageBytes)} bytes); RAM after it went while the guest ran at the destination`);
  if (r.fallback) lines.push(`fallback   relayed verbatim from byte ${n(r.fallback.offset)} (${r.fallback.code}): ${r.fallback.reason}`);
  lines.push(`RAM        ${n(r.ram.totalBytes)} bytes in ${r.ram.blocks.length} blocks`);
  lines.push(table([['block', 'bytes', 'pages'], ...r.ram.blocks.map((b) => [b.name, b.bytes, b.pages])], ['l', 'r', 'r']));
  const rec = r.ram.records;
  lines.push(
    `RAM records normal ${n(rec.normal)}, zero ${n(rec.zero)}, xbzrle ${n(rec.xbzrle)}, compressed ${n(rec.compressed)}, ` +
      `eos ${n(rec.eos)}, multifd-flush ${n(rec.multifdFlush)}, hook ${n(rec.hook)}`,
  );
  lines.push('sections');
  lines.push(
    table(
      [
        ['id', 'idstr', 'instance', 'version', 'headers', 'bytes'],
        ...r.sections.map((s) => [
          String(s.sectionId),
          s.found === 'scanned' ? `${s.idstr} *` : s.idstr,
          String(s.instanceId),
          String(s.versionId),
          (['start', 'part', 'end', 'full'] as const).filter((k) => s.headers[k] > 0).map((k) => `${k} ${s.headers[k]}`).join(', '),
          s.bytes,
        ]),
      ],
      ['r', 'l', 'r', 'r', 'l', 'r'],
    ),
  );
  if (r.sections.some((s) => s.found === 'scanned')) {
    lines.push('  * found by its header pattern: the legacy framing does not mark where a device section ends');
  }
  if (r.vmDescription.matchesSections !== null) {
    lines.push(`vmdesc     ${r.vmDescription.devices} devices, ${r.vmDescription.matchesSections ? 'matching' : 'NOT matching'} the FULL sections found`);
  }
  if (r.commands.length) lines.push(`commands   ${r.commands.map((c) => `${c.command}(${c.length})`).join(' ')}`);
  lines.push('bytes by kind');
  lines.push(table(Object.entries(r.bytesByKind).sort((a, b) => b[1] - a[1]), ['l', 'r']));
  const c = r.compression;
  lines.push(`zstd       ${n(c.literalBytes)} Literal bytes (all but zero pages) → ${n(c.frameBytes)} bytes of frames: ratio ${c.ratio.toFixed(3)} (bfmig predict --compression)`);
  const d = r.firstLegDeltas;
  if (d.error !== undefined) lines.push(`deltas     not measured: ${d.error}`);
  else if (d.deltaPages > 0) {
    const pct = (d.share * 100).toFixed(1);
    lines.push(
      `deltas     on a first leg, ${n(d.deltaPages)} of ${n(d.carriedPages)} pages as references or deltas (${pct}%, ${d.meanDeltaBytes.toFixed(0)} B each), ` +
        `the ${n(d.compression.literalBytes)} Literal bytes left → ${n(d.compression.frameBytes)}: ratio ${d.compression.ratio.toFixed(3)} ` +
        `(bfmig predict --compression ${d.compression.ratio.toFixed(3)} --delta-bytes ${d.meanDeltaBytes.toFixed(0)} --first-leg-deltas ${pct}%)`,
    );
  }
  return lines.join('\n');
}
