/**
 * Sets the model (src/model) beside every measured leg of a back-and-forth results file: the model's
 * inputs come from the run's settings and from what the guest did (pages it changed, pages QEMU found
 * non-zero on the first direct leg), never from the leg's own measured bytes or times.
 * Usage: node dist/bench/model-check.js [docs/benchmarks/backforth.json] [--markdown] [--out FILE.json]
 */
import * as fs from 'node:fs';
import type { BenchResults } from '../src/lab/demo/backforth';
import { type CheckedLeg, checkResults, markdownTable, mb, pct } from '../src/lab/harness/model-check';
import { benchOptions } from './command-line';

function main(): void {
  const { values: args, positionals } = benchOptions({ markdown: { type: 'boolean' }, out: { type: 'string' } }, true);
  const file = positionals[0] ?? 'docs/benchmarks/backforth.json';
  const results = JSON.parse(fs.readFileSync(file, 'utf8')) as BenchResults;
  const checked = checkResults(results);
  const outFile = args.out;
  if (outFile) fs.writeFileSync(outFile, JSON.stringify(checked, null, 1) + '\n');
  if (args.markdown === true) {
    console.log(markdownTable(checked));
  } else {
    for (const c of checked) {
      console.log(
        `${c.run.padEnd(22)} leg ${c.leg} ${c.path.padEnd(6)} changed ${(c.leg === 1 ? 'first' : c.changedPct.toFixed(2)).padStart(6)}  ` +
          `WAN ${mb(c.measured.wanBytes).padStart(8)} MB model ${mb(c.predicted.wanBytes).padStart(8)} (${pct(c.wanError).padStart(7)})  ` +
          `time ${c.measured.totalSeconds.toFixed(2).padStart(6)} s model ${c.predicted.totalSeconds.toFixed(2).padStart(6)} (${pct(c.timeError).padStart(7)})  ` +
          `downtime ${String(c.measured.downtimeMs).padStart(5)} / ${String(Math.round(c.predicted.downtimeMs)).padStart(5)} ms`,
      );
    }
  }
  const worst = (legs: CheckedLeg[]): string => (Math.max(...legs.map((c) => Math.max(Math.abs(c.wanError), Math.abs(c.timeError)))) * 100).toFixed(1);
  const heldOut = checked.filter((c) => !c.calibration);
  console.log(`\nworst error: ${worst(checked)}% over ${checked.length} legs; ${worst(heldOut)}% over the ${heldOut.length} held out (no constant read from them; meaningful for the third grid run only)`);
}

if (require.main === module) main();
