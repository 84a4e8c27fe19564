/**
 * The model beside legs measured with compression and deltas (docs/benchmarks.md, "Compression, deltas
 * and content match"): each leg's inputs as bench/model-check.ts takes them, plus what the leg's own
 * sending gateway measured — the compression ratio of its Literal bytes (literalRatio), the
 * mean Delta and the share of the pages it carried that went as deltas, and (back legs) the pages it
 * carried as the changed share. The guest's writes while it migrates are in the model's inputs already:
 * its used share comes from the direct first leg's page count, re-sent pages included.
 * Usage: node dist/bench/compression-model-check.js RESULTS.json... [--ratio R] [--platform bench|bench-qemu10|same-run] [--literal-headers]
 *   --ratio R: the compression ratio of every compressing leg is R instead (`bfmig inspect` on a capture
 *              of the guest: what zstd makes of its stream when it compresses throughout)
 *   --platform: the constants of src/model/calibration.ts to use (bench-qemu10 for bench/leg-cost.js
 *              results: QEMU 10.0 on this host as loaded when they were measured), or same-run:
 *              bench-qemu10's with the host's rates read from each file's own relay and bfmig-plain
 *              legs (calibrateFromBaseline), which are then not checked: only the new legs are
 *   --literal-headers: the legs were measured before PacketHeader frames (a multifd packet's header as
 *              Literal bytes through zstd: the model's packetHeaders false)
 * Relay legs (bench/leg-cost.js) are predicted as direct ones: two forwarders add no bytes.
 * Prints each leg, and the worst WAN-bytes and time errors.
 */
import * as fs from 'node:fs';
import type { BenchResults, LegResult } from '../src/lab/demo/backforth';
import { inputsFor, mb, pct } from '../src/lab/harness/model-check';
import { BENCH_PLATFORM, BENCH_PLATFORM_QEMU10, calibrateFromBaseline } from '../src/model/calibration';
import { NORMAL_PAGE_STREAM_BYTES, PAGE_BYTES, type Platform, predictBfmig, predictDirect, type ModelInputs } from '../src/model/precopy';
import { median } from '../src/common/median';
import { benchOptions } from './command-line';

const PLATFORMS: Record<string, Platform> = { bench: BENCH_PLATFORM, 'bench-qemu10': BENCH_PLATFORM_QEMU10 };

/**
 * The compression ratio of the leg's Literal bytes, the model's input: one less the bytes zstd saved over
 * the Literal bytes before compression, which are known (the pages sent whole, as records, and the
 * device state). Taken from the WAN side instead (WAN bytes less the Runs, deltas and control frames
 * framingWanBytes estimates), a back leg whose changed pages cluster breaks fewer Runs than the model's
 * scattered pages, its estimate of the framing exceeds its WAN bytes, and its ratio comes out 0.53 where
 * zstd made 114 kB of device state into 7 kB.
 */
function literalRatio(leg: LegResult, platform: Platform): number {
  const raw = leg.pagesSent * NORMAL_PAGE_STREAM_BYTES + platform.deviceStateBytes;
  return Math.max(0.001, 1 - leg.compressionSavedBytes / raw);
}

/** What the leg's sending gateway measured, as model inputs. */
function measuredInputs(leg: LegResult, base: ModelInputs, ratio: number | null): ModelInputs {
  const deltas = leg.pagesDelta + leg.pagesMatched;
  const carried = leg.pagesSent + deltas;
  const ramPages = base.ramBytes / PAGE_BYTES;
  return {
    ...base,
    ...(leg.compressionSavedBytes > 0 ? { compressionRatio: ratio ?? literalRatio(leg, base.platform) } : {}),
    ...(deltas > 0 ? { delta: { bytes: leg.deltaBytes / deltas, share: deltas / carried, firstLegShare: deltas / carried } } : {}),
    ...(leg.leg > 1 ? { changedShare: Math.min(base.usedShare, carried / ramPages) } : {}),
  };
}

const flag = (error: number): string => `${pct(error).padStart(7)}${Math.abs(error) <= 0.25 ? '' : ' >25%'}`;

/** One leg and the model's figures beside it. */
interface Checked {
  group: string;
  leg: LegResult;
  wanBytes: number;
  seconds: number;
}

function main(): void {
  const { values, positionals } = benchOptions({ ratio: { type: 'string' }, platform: { type: 'string' }, 'literal-headers': { type: 'boolean' } }, true);
  const literalHeaders = values['literal-headers'] === true ? { packetHeaders: false } : {};
  const ratio = values.ratio === undefined ? null : Number(values.ratio);
  const sameRun = values.platform === 'same-run';
  const named = PLATFORMS[values.platform ?? 'bench'];
  if (!named && !sameRun) throw new Error(`--platform is ${[...Object.keys(PLATFORMS), 'same-run'].join(' or ')}`);
  const baseline = (leg: LegResult): boolean => leg.path === 'relay' || leg.path === 'bfmig-plain';
  const checked: Checked[] = [];
  for (const file of positionals) {
    const results = JSON.parse(fs.readFileSync(file, 'utf8')) as BenchResults;
    // Runs of one setting (bench/leg-cost.js names them CONTENT-runN) are one group, calibrated together.
    const setting = (run: BenchResults['runs'][number]): string => run.id.replace(/-run\d+$/, '');
    const platforms = new Map<string, Platform>();
    for (const run of results.runs) {
      if (!sameRun || platforms.has(setting(run))) continue;
      // A plain back leg's inputs (the pages it carried as its changed share) let the model itself read the held-page rate from it.
      const legs = results.runs.filter((r) => setting(r) === setting(run)).flatMap((r) => {
        const firstDirect = r.legs.find((l) => l.path === 'direct' && l.leg === 1) ?? r.legs[0];
        return r.legs.map((leg) => (leg.path === 'bfmig-plain' && leg.leg > 1 ? { ...leg, inputs: measuredInputs(leg, { ...inputsFor(r, leg, firstDirect, results.downtimeLimitMs), platform: BENCH_PLATFORM_QEMU10 }, null) } : leg));
      });
      const p = calibrateFromBaseline(legs, 2 * run.delayMs, BENCH_PLATFORM_QEMU10);
      platforms.set(setting(run), p);
      console.log(
        `${file} ${setting(run)}: calibrated from its relay and bfmig-plain legs: link ${mb(p.linkCeilingBytesPerS)} MB/s, held pages ${mb(p.gatewayBytesPerS)} MB/s, ` +
          `carried pages ${mb(p.gatewayLiteralBytesPerS)} MB/s, zstd ${mb(p.compressorBytesPerS)} MB/s`,
      );
    }
    for (const run of results.runs) {
      const platform = platforms.get(setting(run)) ?? (named as Platform);
      const firstDirect = run.legs.find((l) => l.path === 'direct' && l.leg === 1) ?? run.legs[0];
      console.log(`\n${file} ${run.id}: ${run.mbit} Mbit/s, ${run.delayMs} ms, ${run.memMiB} MiB guest`);
      for (const leg of run.legs) {
        if (sameRun && baseline(leg)) continue;
        const direct = leg.path === 'direct' || leg.path === 'relay';
        const base = { ...inputsFor(run, leg, firstDirect, results.downtimeLimitMs), ...literalHeaders, platform };
        const inputs = direct ? base : measuredInputs(leg, base, ratio);
        const predicted = direct ? predictDirect(inputs) : predictBfmig(inputs, leg.leg > 1);
        checked.push({ group: `${file.replace(/.*\//, '')} ${setting(run)} ${run.mbit} Mbit/s`, leg, wanBytes: predicted.wanBytes, seconds: predicted.totalSeconds });
        const given = [
          inputs.compressionRatio !== undefined ? `ratio ${inputs.compressionRatio.toFixed(3)}` : '',
          inputs.delta ? `delta ${inputs.delta.bytes.toFixed(0)} B × ${(inputs.delta.share * 100).toFixed(1)}%` : '',
          leg.leg > 1 && !direct ? `changed ${(inputs.changedShare * 100).toFixed(2)}%` : '',
        ].filter((s) => s !== '').join(', ');
        console.log(
          `leg ${leg.leg} ${leg.path.padEnd(18)} WAN ${mb(leg.wanBytes).padStart(8)} MB model ${mb(predicted.wanBytes).padStart(8)} (${flag(predicted.wanBytes / leg.wanBytes - 1)})  ` +
            `time ${(leg.totalTimeMs / 1000).toFixed(2).padStart(6)} s model ${predicted.totalSeconds.toFixed(2).padStart(6)} (${flag(predicted.totalSeconds / (leg.totalTimeMs / 1000) - 1)})  ${given}`,
        );
      }
    }
  }
  const worst = (errors: number[]): string => `${(Math.max(...errors.map(Math.abs)) * 100).toFixed(1)}%`;
  console.log(`\nevery leg: worst WAN-bytes error ${worst(checked.map((c) => c.wanBytes / c.leg.wanBytes - 1))}, worst time error ${worst(checked.map((c) => c.seconds / (c.leg.totalTimeMs / 1000) - 1))} over ${checked.length} legs`);
  // Where a setting ran more than once: the median of the measured legs against the median of the model's.
  const groups = new Map<string, Checked[]>();
  for (const c of checked) {
    const key = `${c.group}, leg ${c.leg.leg} ${c.leg.path}`;
    groups.set(key, [...(groups.get(key) ?? []), c]);
  }
  if (![...groups.values()].some((g) => g.length > 1)) return;
  console.log('\nmedians over the runs of each setting:');
  const errors: number[] = [];
  for (const [key, g] of groups) {
    const measured = median(g.map((c) => c.leg.totalTimeMs / 1000));
    const model = median(g.map((c) => c.seconds));
    const wanError = median(g.map((c) => c.wanBytes)) / median(g.map((c) => c.leg.wanBytes)) - 1;
    errors.push(model / measured - 1, wanError);
    console.log(`${key.padEnd(58)} ${g.length} runs  WAN ${mb(median(g.map((c) => c.leg.wanBytes))).padStart(8)} MB (${flag(wanError)})  time ${measured.toFixed(2).padStart(6)} s model ${model.toFixed(2).padStart(6)} (${flag(model / measured - 1)})`);
  }
  console.log(`worst error of the medians (time or WAN bytes): ${worst(errors)} over ${groups.size} settings`);
}

if (require.main === module) main();
