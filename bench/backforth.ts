/**
 * Back-and-forth over the emulated WAN (100 Mbit/s, 20 ms by default) with a 256 MiB guest, direct
 * versus through bfmig, for an idle guest and for one rewriting 1% of its workload pages per second.
 * Checks the figures the gateways must reach and prints them.
 * Usage: node dist/bench/backforth.js [--mbit 100] [--delay-ms 20] [--legs 3] [--workload-mib 128] [--rewrite-pcts 0,1]
 */
import { formatTable, type LegResult, runBackForth } from '../src/demo/backforth';
import { parseArgs, stringOption } from '../src/cli/args';

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2), []);
  const num = (name: string, fallback: number): number => Number(stringOption(args, name) ?? fallback);
  const memMiB = 256;
  const base = { legs: num('legs', 3), memMiB, workloadMiB: num('workload-mib', 128), rateMbit: num('mbit', 100), delayMs: num('delay-ms', 20), machine: 'pc-i440fx-7.2', direct: true, out: process.stdout };
  let ok = true;
  for (const rewritePct of (stringOption(args, 'rewrite-pcts') ?? '0,1').split(',').map(Number)) {
    console.log(`\n== guest rewriting ${rewritePct}% of its ${base.workloadMiB} MiB workload per second ==`);
    const results = await runBackForth({ ...base, rewritePct });
    console.log(formatTable(results));
    const bfmig = results.filter((r) => r.path === 'bfmig');
    const direct = results.filter((r) => r.path === 'direct');
    const first = bfmig[0];
    for (const back of bfmig.slice(1)) {
      const twin = direct.find((d) => d.leg === back.leg) as LegResult;
      const share = back.wanBytes / first.wanBytes;
      const bound = 1.05 * back.pagesSent * 4096 + 0.001 * memMiB * 2 ** 20;
      const pass = rewritePct === 0 ? share <= 0.005 : back.wanBytes <= bound;
      ok &&= pass && back.verified;
      console.log(
        `leg ${back.leg}: WAN ${back.wanBytes.toLocaleString('en-US')} B = ${(share * 100).toFixed(3)}% of the first leg` +
          (rewritePct === 0 ? ' (target ≤ 0.5%)' : `; bound 1.05 × ${back.pagesSent} changed pages × 4 KiB + 0.1% of RAM = ${Math.round(bound).toLocaleString('en-US')} B`) +
          `; total time ${(back.totalTimeMs / 1000).toFixed(2)} s vs direct ${(twin.totalTimeMs / 1000).toFixed(2)} s (${((1 - back.totalTimeMs / twin.totalTimeMs) * 100).toFixed(0)}% less)` +
          `; ${pass ? 'PASS' : 'FAIL'}`,
      );
    }
  }
  process.exitCode = ok ? 0 : 1;
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
