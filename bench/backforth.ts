/**
 * Back-and-forth over the emulated WAN, direct QEMU → QEMU versus through bfmig, with a real guest.
 *
 * One run (default: 100 Mbit/s, 20 ms, 256 MiB guest; idle, then rewriting 1% of its workload per
 * second), checked against the figures the gateways must reach (PASS/FAIL):
 *   node dist/bench/backforth.js [--mbit 100] [--delay-ms 20] [--legs 3] [--mem-mib 256] [--workload-mib 128] [--rewrite-pcts 0,1]
 *       [--changes 0,1,10]   percent of guest RAM rewritten before leg 2, 3, … (the guest quiet while it migrates)
 *       [--out FILE.json]    also write every leg to FILE.json and FILE.csv
 *       [--qemu 7.2|10.0] [--machine pc-i440fx-7.2] [--capabilities postcopy-ram,return-path]
 *       [--parameters multifd-channels=4]
 *       [--content random|files]   the guest's pages: pseudo-random (default, the worst case for
 *                                  compression) or pages of real files (binaries, libraries, text, .gz)
 *       [--scribble BYTES:PER_SECOND]  database-like updates in the guest, also while it migrates
 *       [--uncompressed]           also migrate through a gateway pair with `compression: off`, and
 *                                  print what compression changed (WAN bytes, throughput, CPU per GiB)
 * A grid of runs (bench/backforth-grid.json), every leg written to JSON and CSV as it finishes:
 *   node dist/bench/backforth.js --grid bench/backforth-grid.json --out docs/benchmarks/backforth.json [--only ID,ID [--merge]]
 * (--merge: re-measure the --only runs and replace them in an existing results file, keeping the others)
 * Gateways run as `bfmig gateway` child processes so their CPU seconds are their own.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { type BackForthOptions, type BenchResults, formatTable, type GridFile, type GridRun, type LegResult, runBackForth } from '../src/lab/demo/backforth';
import { defaultGuestDir } from '../src/lab/vm/guest-image';
import { QEMU_RELEASES, type QemuRelease, qemuBinary, qemuVersion } from '../src/lab/vm/qemu-releases';
import { X86_PAGE_SIZE } from '../src/qemu/constants';
import { benchOptions } from './command-line';

function hostInfo(): BenchResults['host'] {
  let qemu = 'unknown';
  try {
    qemu = execFileSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8' }).split('\n')[0];
  } catch {
    // reported as unknown
  }
  let accel = process.env.BFMIG_QEMU_ACCEL ?? 'auto';
  try {
    const probe = JSON.parse(fs.readFileSync(path.join(defaultGuestDir(), 'kvm-probe.json'), 'utf8')) as { boots?: boolean };
    if (accel === 'auto') accel = probe.boots ? 'kvm' : 'tcg';
  } catch {
    if (accel === 'auto' && !fs.existsSync('/dev/kvm')) accel = 'tcg';
  }
  return { cpu: os.cpus()[0]?.model ?? 'unknown', cores: os.cpus().length, node: process.version, qemu, accel, kernel: os.release() };
}

const CSV_COLUMNS: Array<keyof GridRun | keyof LegResult> = [
  'id', 'mbit', 'delayMs', 'memMiB', 'workloadMiB', 'rewritePct', 'leg', 'path', 'from', 'to', 'changedPages', 'secondsAtSource', 'pageWritesAtSource', 'wanBytes', 'wanBytesForward', 'wanBytesBackward',
  'streamBytes', 'qemuTransferredBytes', 'totalTimeMs', 'downtimeMs', 'setupTimeMs', 'untilRunningMs', 'openingMs', 'pausedMs', 'pagesSent', 'pagesReused', 'qemuNormalPages', 'qemuZeroPages', 'dirtySyncCount',
  'gatewayCpuSecondsSend', 'gatewayCpuSecondsReceive', 'compressionSavedBytes', 'pagesDelta', 'pagesMatched', 'deltaBytes', 'verified',
];

function writeResults(file: string, results: BenchResults): void {
  results.host = hostInfo(); // the accelerator is known once a guest has booted
  fs.mkdirSync(path.dirname(path.resolve(file)), { recursive: true });
  fs.writeFileSync(file, JSON.stringify(results, null, 1) + '\n');
  const lines = [CSV_COLUMNS.join(',')];
  for (const run of results.runs) {
    for (const leg of run.legs) {
      const row: Record<string, unknown> = { ...run, ...leg };
      lines.push(CSV_COLUMNS.map((c) => (row[c] === null || row[c] === undefined ? '' : String(row[c]))).join(','));
    }
  }
  fs.writeFileSync(file.replace(/\.json$/, '') + '.csv', lines.join('\n') + '\n');
}

/** What the command line may change of the QEMU side of a run. */
interface QemuChoice {
  qemu: QemuRelease;
  machine: string;
  capabilities?: Record<string, boolean>;
  /** QEMU migration parameters, e.g. multifd-channels=4. */
  parameters?: Record<string, number>;
}

const DEFAULT_QEMU: QemuChoice = { qemu: '7.2', machine: 'pc-i440fx-7.2' };

/** What the command line may change of the guest and the gateways. */
interface GuestChoice {
  content: 'random' | 'files';
  scribble?: { bytes: number; perSecond: number };
  uncompressed: boolean;
}

const DEFAULT_GUEST: GuestChoice = { content: 'random', uncompressed: false };

function runOptions(run: GridRun, downtimeLimitMs: number, q: QemuChoice = DEFAULT_QEMU, g: GuestChoice = DEFAULT_GUEST): BackForthOptions {
  return {
    legs: run.changePcts.length + 1,
    memMiB: run.memMiB,
    workloadMiB: run.workloadMiB,
    rewritePct: run.rewritePct,
    changePcts: run.changePcts,
    rateMbit: run.mbit,
    delayMs: run.delayMs,
    machine: q.machine,
    downtimeLimitMs,
    direct: true,
    gatewayProcesses: true,
    out: process.stdout,
    qemuAt: [qemuBinary(q.qemu), qemuBinary(q.qemu)],
    capabilities: q.capabilities,
    parameters: q.parameters,
    content: g.content,
    scribble: g.scribble,
    uncompressed: g.uncompressed,
  };
}

/** Every bfmig leg must leave the guest verified: a figure from a guest that broke is no figure. */
function allBfmigVerified(legs: LegResult[]): boolean {
  return legs.filter((l) => l.path !== 'direct').every((l) => l.verified);
}

const MiB = 2 ** 20;
/** What a delta costs beyond its payload: the record's 8-byte header in a Literal frame, the Delta frame's header and a Run's 38 bytes. */
const DELTA_OVERHEAD_BYTES = 5 + 8 + 5 + 38;

/**
 * Per leg, direct against bfmig without and with compression: WAN bytes, throughput (QEMU stream
 * bytes over QEMU's total time) and the gateways' CPU seconds per GiB of QEMU stream. With
 * pseudo-random memory compression must cost no more than 1% of WAN bytes (PASS/FAIL).
 */
function compressionSummary(legs: LegResult[], content: 'random' | 'files'): boolean {
  let ok = true;
  const perGiB = (cpu: number | null, bytes: number): string => (cpu === null || bytes === 0 ? '?' : (cpu / (bytes / 2 ** 30)).toFixed(2));
  const rate = (l: LegResult): string => `${((l.streamBytes / MiB) / (l.totalTimeMs / 1000)).toFixed(1)} MiB/s`;
  for (const leg of [...new Set(legs.map((l) => l.leg))]) {
    const at = (p: LegResult['path']): LegResult | undefined => legs.find((l) => l.leg === leg && l.path === p);
    const direct = at('direct');
    const plain = at('bfmig-uncompressed');
    const zstd = at('bfmig');
    if (!plain || !zstd) continue;
    const ratio = zstd.wanBytes / plain.wanBytes;
    const bounded = content === 'files' || ratio <= 1.01;
    ok &&= bounded;
    console.log(
      `leg ${leg}: WAN ${direct ? `direct ${(direct.wanBytes / MiB).toFixed(1)} MiB (${rate(direct)}), ` : ''}` +
        `bfmig ${(plain.wanBytes / MiB).toFixed(1)} MiB (${rate(plain)}), bfmig+zstd ${(zstd.wanBytes / MiB).toFixed(1)} MiB (${rate(zstd)}) = ${(ratio * 100).toFixed(1)}% of bfmig, ` +
        `${(zstd.compressionSavedBytes / MiB).toFixed(1)} MiB saved by compression; ` +
        `gateway CPU s/GiB of QEMU stream: send ${perGiB(plain.gatewayCpuSecondsSend, plain.streamBytes)} → ${perGiB(zstd.gatewayCpuSecondsSend, zstd.streamBytes)}, ` +
        `receive ${perGiB(plain.gatewayCpuSecondsReceive, plain.streamBytes)} → ${perGiB(zstd.gatewayCpuSecondsReceive, zstd.streamBytes)}` +
        (content === 'random' ? `; pseudo-random memory: zstd ≤ 101% of uncompressed ${bounded ? 'PASS' : 'FAIL'}` : ''),
    );
  }
  return ok;
}

/**
 * A back leg against the raw size of the pages it had to carry (sent whole, as deltas or as content
 * matches): what deltas and compression made of them.
 */
function changedPagesLine(back: LegResult): string {
  const changed = back.pagesSent + back.pagesDelta + back.pagesMatched;
  const raw = changed * X86_PAGE_SIZE;
  const deltas = back.pagesDelta + back.pagesMatched;
  const perDelta = deltas === 0 ? '-' : (back.deltaBytes / deltas).toFixed(0);
  return (
    `leg ${back.leg} ${back.path}: ${changed} changed pages (${back.pagesSent} whole, ${back.pagesDelta} deltas, ${back.pagesMatched} content matches), raw ${raw.toLocaleString('en-US')} B; ` +
    `WAN ${back.wanBytes.toLocaleString('en-US')} B = ${raw === 0 ? '-' : ((back.wanBytes / raw) * 100).toFixed(1)}% of raw; delta bytes ${back.deltaBytes.toLocaleString('en-US')} (${perDelta} B a delta)`
  );
}

async function runGrid(gridPath: string, outFile: string, only: string[] | null, merge: boolean): Promise<boolean> {
  const grid = JSON.parse(fs.readFileSync(gridPath, 'utf8')) as GridFile;
  const results: BenchResults = merge
    ? (JSON.parse(fs.readFileSync(outFile, 'utf8')) as BenchResults)
    : { host: hostInfo(), downtimeLimitMs: grid.downtimeLimitMs, started: new Date().toISOString(), runs: [] };
  if (results.downtimeLimitMs !== grid.downtimeLimitMs) throw new Error(`${outFile} was measured with another downtime limit`);
  let ok = true;
  for (const run of grid.runs.filter((r) => !only || only.includes(r.id))) {
    console.log(`\n== ${run.id}: ${run.mbit} Mbit/s, ${run.delayMs} ms, ${run.memMiB} MiB guest (${run.workloadMiB} MiB workload), changes ${run.changePcts.join('/')}%, rewriting ${run.rewritePct}%/s ==`);
    const t0 = Date.now();
    const legs = await runBackForth(runOptions(run, grid.downtimeLimitMs));
    console.log(formatTable(legs));
    console.log(`(${((Date.now() - t0) / 1000).toFixed(0)} s)`);
    const measured = { ...run, finished: new Date().toISOString(), legs };
    const at = results.runs.findIndex((r) => r.id === run.id);
    if (at >= 0) results.runs[at] = measured;
    else results.runs.push(measured);
    writeResults(outFile, results);
    ok &&= allBfmigVerified(legs);
  }
  return ok;
}

async function main(): Promise<void> {
  const text = { type: 'string' } as const;
  const { values: args } = benchOptions({
    merge: { type: 'boolean' }, out: text, grid: text, only: text, changes: text, 'rewrite-pcts': text,
    'mem-mib': text, 'downtime-limit-ms': text, mbit: text, 'delay-ms': text, 'workload-mib': text, legs: text,
    qemu: text, machine: text, capabilities: text, parameters: text, content: text, scribble: text, uncompressed: { type: 'boolean' },
  });
  const num = (name: 'mem-mib' | 'downtime-limit-ms' | 'mbit' | 'delay-ms' | 'workload-mib' | 'legs', fallback: number): number => Number(args[name] ?? fallback);
  const outFile = args.out;
  const gridPath = args.grid;
  if (gridPath) {
    if (!outFile) throw new Error('--grid needs --out FILE.json');
    const only = args.only?.split(',') ?? null;
    const merge = args.merge === true;
    if (merge && !only) throw new Error('--merge needs --only');
    process.exitCode = (await runGrid(gridPath, outFile, only, merge)) ? 0 : 1;
    return;
  }
  const release = args.qemu ?? '7.2';
  if (!(QEMU_RELEASES as readonly string[]).includes(release)) throw new Error(`--qemu takes ${QEMU_RELEASES.join(' or ')}`);
  const choice: QemuChoice = {
    qemu: release as QemuRelease,
    machine: args.machine ?? DEFAULT_QEMU.machine,
    capabilities: args.capabilities ? Object.fromEntries(args.capabilities.split(',').map((c) => [c, true])) : undefined,
    parameters: args.parameters ? Object.fromEntries(args.parameters.split(',').map((p) => p.split('=')).map(([k, v]) => [k, Number(v)])) : undefined,
  };
  const content = args.content ?? 'random';
  if (content !== 'random' && content !== 'files') throw new Error('--content takes random or files');
  const scribbleMatch = args.scribble === undefined ? null : /^(\d+):(\d+(?:\.\d+)?)$/.exec(args.scribble);
  if (args.scribble !== undefined && !scribbleMatch) throw new Error('--scribble takes BYTES:PER_SECOND, e.g. 64:2000');
  const guest: GuestChoice = {
    content,
    scribble: scribbleMatch ? { bytes: Number(scribbleMatch[1]), perSecond: Number(scribbleMatch[2]) } : undefined,
    uncompressed: args.uncompressed === true,
  };
  const memMiB = num('mem-mib', 256);
  const changes = args.changes?.split(',').map(Number);
  const downtimeLimitMs = num('downtime-limit-ms', 500);
  const base = { mbit: num('mbit', 100), delayMs: num('delay-ms', 20), memMiB, workloadMiB: num('workload-mib', 128) };
  const results: BenchResults = { host: hostInfo(), downtimeLimitMs, started: new Date().toISOString(), runs: [] };
  let ok = true;
  for (const rewritePct of (args['rewrite-pcts'] ?? '0,1').split(',').map(Number)) {
    const run: GridRun = { id: `cli-rewrite${rewritePct}`, ...base, rewritePct, changePcts: changes ?? Array.from({ length: num('legs', 3) - 1 }, () => 0) };
    console.log(`\n== QEMU ${choice.qemu} (${qemuVersion(qemuBinary(choice.qemu)) ?? '?'}), ${choice.machine}${choice.capabilities ? `, ${Object.keys(choice.capabilities).join(', ')}` : ''}: guest rewriting ${rewritePct}% of its ${base.workloadMiB} MiB workload per second ==`);
    const results_ = await runBackForth({ ...runOptions(run, downtimeLimitMs, choice, guest), changePcts: changes });
    console.log(formatTable(results_));
    if (guest.uncompressed) ok &&= compressionSummary(results_, guest.content);
    for (const plain of results_.filter((r) => r.path === 'bfmig-uncompressed' && r.leg > 1)) console.log(changedPagesLine(plain));
    results.runs.push({ ...run, finished: new Date().toISOString(), legs: results_ });
    if (outFile) writeResults(outFile, results);
    ok &&= allBfmigVerified(results_);
    const bfmig = results_.filter((r) => r.path === 'bfmig');
    const direct = results_.filter((r) => r.path === 'direct');
    const first = bfmig[0];
    for (const back of bfmig.slice(1)) {
      const twin = direct.find((d) => d.leg === back.leg) as LegResult;
      const share = back.wanBytes / first.wanBytes;
      // A delta costs its payload, its record's header in a Literal frame, its own frame header and the Run it breaks off.
      const deltas = back.pagesDelta + back.pagesMatched;
      const bound = 1.05 * (back.pagesSent * X86_PAGE_SIZE + back.deltaBytes + deltas * DELTA_OVERHEAD_BYTES) + 0.001 * memMiB * 2 ** 20;
      const idle = rewritePct === 0 && back.changedPages === 0 && guest.scribble === undefined;
      const pass = idle ? share <= 0.005 : back.wanBytes <= bound;
      ok &&= pass && back.verified;
      console.log(
        `leg ${back.leg}: WAN ${back.wanBytes.toLocaleString('en-US')} B = ${(share * 100).toFixed(3)}% of the first leg` +
          (idle
            ? ' (target ≤ 0.5%)'
            : `; bound 1.05 × (${back.pagesSent} changed pages × 4 KiB + ${deltas} deltas' ${back.deltaBytes} B + ${DELTA_OVERHEAD_BYTES} B each) + 0.1% of RAM = ${Math.round(bound).toLocaleString('en-US')} B`) +
          `; total time ${(back.totalTimeMs / 1000).toFixed(2)} s vs direct ${(twin.totalTimeMs / 1000).toFixed(2)} s (${((1 - back.totalTimeMs / twin.totalTimeMs) * 100).toFixed(0)}% less)` +
          `; ${pass ? 'PASS' : 'FAIL'}`,
      );
      console.log(changedPagesLine(back));
    }
  }
  process.exitCode = ok ? 0 : 1;
}

if (require.main === module) {
  main().catch((err: unknown) => {
    console.error(err);
    process.exitCode = 1;
  });
}
