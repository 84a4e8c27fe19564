/**
 * The model beside legs measured with compression and deltas (docs/benchmarks.md, "Compression, deltas
 * and content match"): each leg's inputs as bench/model-check.ts takes them, plus what the leg's own
 * sending gateway measured — the compression ratio (WAN bytes over WAN bytes + bytes zstd saved), the
 * mean Delta and the share of the pages it carried that went as deltas, and (back legs) the pages it
 * carried as the changed share. The guest's writes while it migrates are in the model's inputs already:
 * its used share comes from the direct first leg's page count, re-sent pages included.
 * Usage: node dist/bench/compression-model-check.js RESULTS.json... [--ratio R]
 *   --ratio R: the compression ratio of every compressing leg is R instead (`bfmig inspect` on a capture
 *              of the guest: what zstd makes of its stream when it compresses throughout)
 */
import * as fs from 'node:fs';
import { parseArgs } from 'node:util';
import type { BenchResults, LegResult } from '../src/lab/demo/backforth';
import { inputsFor, mb, pct } from '../src/lab/harness/model-check';
import { PAGE_BYTES, predictBfmig, predictDirect, type ModelInputs } from '../src/model/precopy';

/** What the leg's sending gateway measured, as model inputs. */
function measuredInputs(leg: LegResult, base: ModelInputs, ratio: number | null): ModelInputs {
  const deltas = leg.pagesDelta + leg.pagesMatched;
  const carried = leg.pagesSent + deltas;
  const ramPages = base.ramBytes / PAGE_BYTES;
  return {
    ...base,
    ...(leg.compressionSavedBytes > 0 ? { compressionRatio: ratio ?? leg.wanBytes / (leg.wanBytes + leg.compressionSavedBytes) } : {}),
    ...(deltas > 0 ? { delta: { bytes: leg.deltaBytes / deltas, share: deltas / carried, firstLegShare: deltas / carried } } : {}),
    ...(leg.leg > 1 ? { changedShare: Math.min(base.usedShare, carried / ramPages) } : {}),
  };
}

function main(): void {
  const { values, positionals } = parseArgs({ args: process.argv.slice(2), options: { ratio: { type: 'string' } }, strict: true, allowPositionals: true });
  const ratio = values.ratio === undefined ? null : Number(values.ratio);
  let worst = 0;
  let legs = 0;
  for (const file of positionals) {
    const results = JSON.parse(fs.readFileSync(file, 'utf8')) as BenchResults;
    for (const run of results.runs) {
      const firstDirect = run.legs.find((l) => l.path === 'direct' && l.leg === 1) ?? run.legs[0];
      console.log(`\n${file}: ${run.mbit} Mbit/s, ${run.delayMs} ms, ${run.memMiB} MiB guest`);
      for (const leg of run.legs) {
        const inputs = leg.path === 'direct' ? inputsFor(run, leg, firstDirect, results.downtimeLimitMs) : measuredInputs(leg, inputsFor(run, leg, firstDirect, results.downtimeLimitMs), ratio);
        const predicted = leg.path === 'direct' ? predictDirect(inputs) : predictBfmig(inputs, leg.leg > 1);
        const wanError = predicted.wanBytes / leg.wanBytes - 1;
        const timeError = predicted.totalSeconds / (leg.totalTimeMs / 1000) - 1;
        worst = Math.max(worst, Math.abs(wanError));
        legs++;
        const given = [
          inputs.compressionRatio !== undefined ? `ratio ${inputs.compressionRatio.toFixed(3)}` : '',
          inputs.delta ? `delta ${inputs.delta.bytes.toFixed(0)} B × ${(inputs.delta.share * 100).toFixed(1)}%` : '',
          leg.leg > 1 && leg.path !== 'direct' ? `changed ${(inputs.changedShare * 100).toFixed(2)}%` : '',
        ].filter((s) => s !== '').join(', ');
        console.log(
          `leg ${leg.leg} ${leg.path.padEnd(18)} WAN ${mb(leg.wanBytes).padStart(8)} MB model ${mb(predicted.wanBytes).padStart(8)} (${pct(wanError).padStart(7)}${Math.abs(wanError) <= 0.25 ? '' : ' >25%'})  ` +
            `time ${(leg.totalTimeMs / 1000).toFixed(2).padStart(6)} s model ${predicted.totalSeconds.toFixed(2).padStart(6)} (${pct(timeError).padStart(7)})  ${given}`,
        );
      }
    }
  }
  console.log(`\nworst WAN-bytes error ${(worst * 100).toFixed(1)}% over ${legs} legs`);
}

if (require.main === module) main();
