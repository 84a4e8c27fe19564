import { createReadStream } from 'node:fs';
import type { Readable } from 'node:stream';
import { type InspectReport, StreamInspector } from '../qemu/inspect';
import { RecordKind } from '../qemu/records';
import { StreamWriter } from '../qemu/writer';
import { CompressionMeter } from '../wire/compression';

/** What a sending gateway's zstd would make of the stream's Literal bytes on a first leg. */
export interface CompressionReport {
  /** Bytes that go as Literal on a first leg: the whole stream but its zero-page records (those go in Runs). */
  literalBytes: number;
  /** The frames they become when the WAN is the bottleneck throughout (Compressed, or Literal where zstd did not shrink a batch). */
  frameBytes: number;
  /** frameBytes / literalBytes: `bfmig predict --compression`. */
  ratio: number;
}

export interface InspectResult extends InspectReport {
  compression: CompressionReport;
}

export async function inspectSource(source: Readable): Promise<InspectResult> {
  const meter = new CompressionMeter();
  // The Literal bytes rebuilt from the records (byte-identical, inspect checks it): a writer's buffers are never reused.
  const literal = new StreamWriter((bytes) => meter.literal(bytes));
  const inspector = new StreamInspector((record) => {
    if (record.kind !== RecordKind.RamZero) literal.write(record);
  });
  for await (const chunk of source) inspector.push(chunk as Buffer);
  const report = inspector.end();
  literal.flush();
  meter.end();
  const ratio = meter.literalBytes === 0 ? 1 : meter.frameBytes / meter.literalBytes;
  return { ...report, compression: { literalBytes: meter.literalBytes, frameBytes: meter.frameBytes, ratio } };
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
  return lines.join('\n');
}
