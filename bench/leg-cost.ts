/**
 * Issue 16's "no leg slower than today's": the same legs of a real guest through bfmig as shipped
 * (compression zstd adaptive, deltas auto: path 'bfmig') and through bfmig as it was before either
 * existed (`compression: off`, `deltas: off`: path 'bfmig-plain'), and through a plain TCP relay pair
 * (path 'relay'), interleaved: each run boots a guest per path and migrates it `--legs` legs, the paths
 * in an order turned one place each run (so that no path always follows the same one), and every
 * figure printed is the median over the runs (min–max beside it).
 *
 *   node dist/bench/leg-cost.js [--runs 2] [--mbit 1000] [--delay-ms 20] [--legs 2] [--contents files,random]
 *       [--scribble-files 64:500]   updates of the files guest (none for the pseudo-random one)
 *       [--qemu 10.0] [--machine pc-i440fx-10.0] [--out FILE.json]
 *       [--uncompressed]           also through bfmig with `compression: off` (deltas auto): path
 *                                  'bfmig-uncompressed', which splits bfmig's cost between the two
 *       [--link-stated]            also through bfmig whose sites state the link's rate (`peers[].wan.linkMbit`
 *                                  at --mbit), so that its compression policy need not measure it: path
 *                                  'bfmig-link-stated'
 *       [--thread-pool]            also through bfmig compressing on libuv's thread pool
 *                                  (`compressionRunsOn: thread-pool`): path 'bfmig-thread-pool'
 *       [--multifd N]              every leg with QEMU's multifd on, N channels (each path carries them)
 *       [--downtime-ms 500]        QEMU's downtime-limit at the source of every leg (QEMU's default is 300)
 *   node dist/bench/leg-cost.js --from A.json,B.json,…   the summaries of earlier --out files together
 *
 * Per content, path and leg: WAN bytes, QEMU's total time, migrate → running at the destination, the
 * opening (migrate → the leg's first 8 MiB out of the WAN emulator: the handshake and the records the
 * gateway, not yet the link, sets the pace of), and
 * each gateway's (or relay's) CPU seconds per GiB of QEMU stream (its process's /proc counters), with the
 * medians of the kernel's share of them (system time: sockets, the disk, page faults) beside; what each
 * gateway's store read from and wrote to its file for the leg. Then each
 * bfmig path's total time less bfmig-plain's, run by run: paths of one run meet the host in the same
 * minutes, so the pairs show a difference smaller than the spread between runs.
 * Gateways and relays run as processes of their own, the gateways with the recommended Node flags
 * ($BFMIG_BENCH_NODE_ARGS instead when set, e.g. "--cpu-prof --cpu-prof-dir=DIR").
 */
import * as fs from 'node:fs';
import { type BenchResults, type LegPath, type LegResult, runBackForth } from '../src/lab/demo/backforth';
import { RECOMMENDED_GATEWAY_NODE_OPTIONS } from '../src/gateway/node-options';
import { QEMU_RELEASES, type QemuRelease, qemuBinary } from '../src/lab/vm/qemu-releases';
import { median } from '../src/common/median';
import { benchOptions } from './command-line';

/** Node flags of the gateway processes: the deployment's recommended ones unless overridden (e.g. with --cpu-prof). */
const nodeArgs = (process.env.BFMIG_BENCH_NODE_ARGS ?? RECOMMENDED_GATEWAY_NODE_OPTIONS).split(' ').filter(Boolean);

const PATHS: readonly LegPath[] = ['bfmig', 'bfmig-link-stated', 'bfmig-thread-pool', 'bfmig-uncompressed', 'bfmig-plain', 'relay'];
const GiB = 2 ** 30;

/** "median (min–max)" of `values`, each formatted by `f`. */
function spread(values: number[], f: (v: number) => string): string {
  if (values.length === 0) return '?';
  return `${f(median(values))} (${f(Math.min(...values))}–${f(Math.max(...values))})`;
}

/** The median of `values` to two places, "?" for none. */
const medianOf = (values: number[]): string => (values.length === 0 ? '?' : median(values).toFixed(2));
const perGiB = (cpu: number | null, bytes: number): number | null => (cpu === null || bytes === 0 ? null : cpu / (bytes / GiB));
/**
 * The values that are known: not null, and not missing either (a results file of an earlier session lacks
 * what later ones measured: `--from` reads them all).
 */
const present = (values: Array<number | null | undefined>): number[] => values.filter((v): v is number => typeof v === 'number' && Number.isFinite(v));

/** One line per leg and path that has legs: its number, its path, then `cells` of its legs. */
function perPath(legs: LegResult[], cells: (at: LegResult[]) => string[]): string[] {
  const lines: string[] = [];
  for (const leg of [...new Set(legs.map((l) => l.leg))].sort((a, b) => a - b)) {
    for (const path of PATHS) {
      const at = legs.filter((l) => l.leg === leg && l.path === path);
      if (at.length > 0) lines.push([String(leg).padEnd(4), path.padEnd(18), ...cells(at)].join(' '));
    }
  }
  return lines;
}

function summarise(label: string, runs: number, legs: LegResult[]): string[] {
  const lines = [`${label}: median (min–max) over ${runs} runs`];
  lines.push('leg  path               WAN MiB                 pages carried        total time s         until running s      first 8 MiB s        CPU s/GiB send       CPU s/GiB receive    system s/GiB send, receive  guest');
  lines.push(
    ...perPath(legs, (at) => [
      spread(at.map((l) => l.wanBytes / 2 ** 20), (v) => v.toFixed(2)).padEnd(23),
      spread(at.map(carried), (v) => v.toFixed(0)).padEnd(20),
      spread(at.map((l) => l.totalTimeMs / 1000), (v) => v.toFixed(2)).padEnd(20),
      spread(present(at.map((l) => (l.untilRunningMs === null ? null : l.untilRunningMs / 1000))), (v) => v.toFixed(2)).padEnd(20),
      spread(present(at.map((l) => (l.openingMs === null ? null : l.openingMs / 1000))), (v) => v.toFixed(2)).padEnd(20),
      spread(present(at.map((l) => perGiB(l.gatewayCpuSecondsSend, l.streamBytes))), (v) => v.toFixed(2)).padEnd(20),
      spread(present(at.map((l) => perGiB(l.gatewayCpuSecondsReceive, l.streamBytes))), (v) => v.toFixed(2)).padEnd(20),
      `${medianOf(present(at.map((l) => perGiB(l.gatewaySystemSecondsSend, l.streamBytes))))}, ${medianOf(present(at.map((l) => perGiB(l.gatewaySystemSecondsReceive, l.streamBytes))))}`.padEnd(27),
      at.every((l) => l.verified) ? 'verified' : 'FAILED',
    ]),
  );
  // QEMU switches over once what is left would cross within its downtime limit at the rate it measured:
  // a path that QEMU measures faster, or that leaves more for the stop, moves the leg's total time.
  lines.push('', "QEMU's switchover: median (min–max) over the runs");
  // From the source's trace: the windows QEMU measured its rate in before it stopped the guest, the last
  // one's rate (the one it weighed what was left against), what it left for the stop, and how fast that
  // went (left ÷ downtime): through the gateways a back leg leaves about the same whatever its length,
  // which the stop's pace sets (docs/benchmarks.md, "Twenty-ninth session").
  // The guest's own pause (its STOP at the source to its RESUME at the destination) beside QEMU's downtime,
  // which ends when the source has written its last byte to the gateway.
  lines.push("leg  path               downtime ms          guest paused ms      downtime MiB         QEMU's rate Mbit/s   dirty syncs  windows   last window MB/s     left at stop MiB     left ÷ downtime MB/s");
  // Results files before the source's trace was read have no windows: unknown, not none.
  const windows = (l: LegResult): LegResult['qemuWindows'] | null => (Array.isArray(l.qemuWindows) ? l.qemuWindows : null);
  const lastWindow = (l: LegResult): number | null => {
    const w = windows(l)?.at(-1);
    return w === undefined || w.ms === 0 ? null : w.bytes / 1e6 / (w.ms / 1000);
  };
  lines.push(
    ...perPath(legs, (at) => [
      spread(at.map((l) => l.downtimeMs), (v) => v.toFixed(0)).padEnd(20),
      spread(present(at.map((l) => l.pausedMs)), (v) => v.toFixed(0)).padEnd(20),
      spread(present(at.map((l) => (l.downtimeBytes === null ? null : l.downtimeBytes / 2 ** 20))), (v) => v.toFixed(2)).padEnd(20),
      spread(present(at.map((l) => l.qemuMbps)), (v) => v.toFixed(0)).padEnd(20),
      spread(at.map((l) => l.dirtySyncCount), (v) => v.toFixed(0)).padEnd(12),
      spread(present(at.map((l) => windows(l)?.length)), (v) => v.toFixed(0)).padEnd(9),
      spread(present(at.map(lastWindow)), (v) => v.toFixed(0)).padEnd(20),
      spread(present(at.map((l) => (l.pendingAtSwitchoverBytes === null ? null : l.pendingAtSwitchoverBytes / 2 ** 20))), (v) => v.toFixed(1)).padEnd(20),
      spread(present(at.map((l) => (l.pendingAtSwitchoverBytes === null || l.downtimeMs === 0 ? null : l.pendingAtSwitchoverBytes / 1e6 / (l.downtimeMs / 1000)))), (v) => v.toFixed(0)),
    ]),
  );
  // The event loop's share: what bounds a gateway with cores to spare (zstd on the thread pool leaves it).
  lines.push('', 'main threads (event loops): median CPU s/GiB of QEMU stream, and their share of the process');
  lines.push('leg  path               main s/GiB send      main s/GiB receive   share send, receive');
  lines.push(
    ...perPath(legs, (at) => {
      const main = (l: LegResult, side: 'Send' | 'Receive'): number | null => l[`gatewayMainThreadSeconds${side}`] ?? null;
      const share = (side: 'Send' | 'Receive'): string =>
        medianOf(present(at.map((l) => (main(l, side) === null || !l[`gatewayCpuSeconds${side}`] ? null : (main(l, side) as number) / (l[`gatewayCpuSeconds${side}`] as number)))));
      return [
        medianOf(present(at.map((l) => perGiB(main(l, 'Send'), l.streamBytes)))).padEnd(20),
        medianOf(present(at.map((l) => perGiB(main(l, 'Receive'), l.streamBytes)))).padEnd(20),
        `${share('Send')}, ${share('Receive')}`,
      ];
    }),
  );
  // What each leg cost the stores' disks (gateway paths only; bfmig_store_read/written_bytes_total): a back
  // leg's receiver reads about the guest's RAM to rebuild it, a first leg writes what it carried at both sites.
  const stored = legs.filter((l) => l.storeIo);
  if (stored.length > 0) {
    lines.push('', "stores' files: median MB of pages read and written for the leg, sending and receiving gateway");
    lines.push('leg  path               read send            written send         read receive         written receive');
    const sides = ['readSend', 'writtenSend', 'readReceive', 'writtenReceive'] as const;
    lines.push(...perPath(stored, (at) => sides.map((side) => spread(at.map((l) => (l.storeIo?.[side] ?? 0) / 1e6), (v) => v.toFixed(1)).padEnd(20))));
  }
  lines.push('', 'paired by run (each run migrates every path): total time of each bfmig path less bfmig-plain\'s in that run');
  lines.push(`and of those pairs only the ones whose guests gave both legs about the same pages to carry (within ${SAME_WORK_SHARE * 100}%)`);
  for (const leg of [...new Set(legs.map((l) => l.leg))].sort((a, b) => a - b)) {
    const plain = legs.filter((l) => l.leg === leg && l.path === 'bfmig-plain');
    for (const path of PATHS.filter((p) => p !== 'bfmig-plain' && p !== 'relay')) {
      // Runs add their legs in order, so the i-th leg of a path is run i's.
      const pairs = legs.filter((l) => l.leg === leg && l.path === path).slice(0, plain.length).map((l, i): [LegResult, LegResult] => [l, plain[i]]);
      if (pairs.length === 0) continue;
      const same = pairs.filter(([l, p]) => Math.abs(carried(l) - carried(p)) <= SAME_WORK_SHARE * Math.max(carried(l), carried(p), 1));
      lines.push(`${String(leg).padEnd(4)} ${path.padEnd(18)} ${pairedLine(pairs)}`);
      if (same.length < pairs.length) lines.push(`${''.padEnd(4)} ${'  same work'.padEnd(18)} ${same.length === 0 ? 'none' : pairedLine(same)}`);
    }
  }
  return lines;
}

/**
 * Pairs whose legs' pages to carry differ by at most this share are the same work. The files guest's
 * workload wrote its updates once a second, in a burst: a back leg carried one burst or two (before the
 * runner waited a whole round at the arrival site, none or one, ~45 pages or ~600) by where the legs
 * fell in that second, and a leg with more costs more on this host's one disk: paired with one of the
 * other kind, a leg won or lost by that alone (docs/benchmarks.md, "Thirtieth session"). Spread through
 * the second since the forty-second session, the updates a leg carries follow how long it and the wait
 * before it took: a slower leg carries more, which is its own cost.
 */
const SAME_WORK_SHARE = 0.2;

/** Pages the leg's gateways carried: sent whole, as deltas or matches (not reused, not zero). */
function carried(l: LegResult): number {
  return l.pagesSent + l.pagesDelta + l.pagesMatched;
}

/** Total time of each pair's first leg less its second's: their spread, the median relative one, how many slower. */
function pairedLine(pairs: readonly [LegResult, LegResult][]): string {
  const diffs = pairs.map(([l, p]) => (l.totalTimeMs - p.totalTimeMs) / 1000);
  const relative = pairs.map(([l, p]) => l.totalTimeMs / p.totalTimeMs - 1);
  const slower = diffs.filter((d) => d > 0).length;
  return `${spread(diffs, (v) => `${v >= 0 ? '+' : ''}${v.toFixed(3)} s`)}  median ${(median(relative) * 100).toFixed(1)}%, slower in ${slower} of ${diffs.length}`;
}

async function main(): Promise<void> {
  const text = { type: 'string' } as const;
  const { values: args } = benchOptions({ runs: text, mbit: text, 'delay-ms': text, legs: text, contents: text, 'scribble-files': text, qemu: text, machine: text, out: text, multifd: text, 'downtime-ms': text, uncompressed: { type: 'boolean' }, 'link-stated': { type: 'boolean' }, 'thread-pool': { type: 'boolean' }, from: text });
  if (args.from !== undefined) return summariseFiles(args.from.split(','));
  const runs = Number(args.runs ?? 2);
  const mbit = Number(args.mbit ?? 1000);
  const delayMs = Number(args['delay-ms'] ?? 20);
  const legs = Number(args.legs ?? 2);
  const contents = (args.contents ?? 'files,random').split(',');
  const release = args.qemu ?? '10.0';
  if (!(QEMU_RELEASES as readonly string[]).includes(release)) throw new Error(`--qemu takes ${QEMU_RELEASES.join(' or ')}`);
  const machine = args.machine ?? `pc-i440fx-${release}`;
  const channels = args.multifd === undefined ? 0 : Number(args.multifd);
  if (!Number.isInteger(channels) || channels < 0) throw new Error('--multifd takes a number of channels');
  const multifd = channels > 0 ? { capabilities: { multifd: true }, parameters: { 'multifd-channels': channels } } : {};
  const scribbleMatch = /^(\d+):(\d+)$/.exec(args['scribble-files'] ?? '64:500');
  if (!scribbleMatch) throw new Error('--scribble-files takes BYTES:PER_SECOND');
  const downtimeLimitMs = Number(args['downtime-ms'] ?? 500);
  if (!Number.isInteger(downtimeLimitMs) || downtimeLimitMs <= 0) throw new Error('--downtime-ms takes a number of milliseconds');
  const results: BenchResults = { host: { cpu: '', cores: 0, node: process.version, qemu: release, accel: process.env.BFMIG_QEMU_ACCEL ?? 'auto', kernel: '' }, downtimeLimitMs, started: new Date().toISOString(), runs: [] };
  const byContent = new Map<string, LegResult[]>();
  let ok = true;
  for (let run = 1; run <= runs; run++) {
    for (const content of contents) {
      if (content !== 'files' && content !== 'random') throw new Error('--contents takes files and/or random');
      const scribble = content === 'files' ? { bytes: Number(scribbleMatch[1]), perSecond: Number(scribbleMatch[2]) } : undefined;
      console.log(`\n== run ${run}/${runs}: ${content}, ${mbit} Mbit/s, ${delayMs} ms, QEMU ${release}${channels > 0 ? `, multifd ${channels} channels` : ''}, downtime limit ${downtimeLimitMs} ms ==`);
      const legResults = await runBackForth({
        legs,
        memMiB: 256,
        workloadMiB: 128,
        rewritePct: 0,
        rateMbit: mbit,
        delayMs,
        machine,
        direct: false,
        relay: true,
        plain: true,
        uncompressed: args.uncompressed === true,
        linkStated: args['link-stated'] === true,
        threadPool: args['thread-pool'] === true,
        gatewayProcesses: true,
        gatewayNodeArgs: nodeArgs,
        out: process.stdout,
        qemuAt: [qemuBinary(release as QemuRelease), qemuBinary(release as QemuRelease)],
        content,
        scribble,
        rotatePaths: run - 1,
        downtimeLimitMs,
        ...multifd,
      });
      ok &&= legResults.every((l) => l.verified);
      byContent.set(content, [...(byContent.get(content) ?? []), ...legResults]);
      results.runs.push({ id: `${content}-run${run}`, mbit, delayMs, memMiB: 256, workloadMiB: 128, rewritePct: 0, changePcts: [], ...(channels > 0 ? { multifdChannels: channels } : {}), finished: new Date().toISOString(), legs: legResults });
      if (args.out) fs.writeFileSync(args.out, JSON.stringify(results, null, 1) + '\n');
    }
  }
  for (const [content, legResults] of byContent) {
    console.log('\n' + summarise(`${content}${content === 'files' ? ` (updates ${scribbleMatch[1]} B × ${scribbleMatch[2]}/s)` : ''}, ${mbit} Mbit/s, ${delayMs} ms`, runs, legResults).join('\n'));
  }
  process.exitCode = ok ? 0 : 1;
}

/**
 * The summaries of earlier --out files together (runs of one setting from several invocations, such as
 * the halves of an A/B alternated run by run), migrating nothing.
 */
function summariseFiles(files: readonly string[]): void {
  const byContent = new Map<string, { runs: number; legs: LegResult[]; label: string }>();
  for (const file of files) {
    const results = JSON.parse(fs.readFileSync(file, 'utf8')) as BenchResults;
    if (!Array.isArray(results.runs)) throw new Error(`${file} is not a results file of this benchmark (it has no runs)`);
    for (const run of results.runs) {
      const content = run.id.replace(/-run\d+$/, '');
      const label = `${content}, ${run.mbit} Mbit/s, ${run.delayMs} ms${run.multifdChannels ? `, multifd ${run.multifdChannels} channels` : ''}`;
      const at = byContent.get(label) ?? { runs: 0, legs: [], label };
      at.runs++;
      at.legs.push(...run.legs);
      byContent.set(label, at);
    }
  }
  for (const { runs, legs, label } of byContent.values()) console.log('\n' + summarise(label, runs, legs).join('\n'));
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
