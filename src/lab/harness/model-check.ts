/**
 * The model (src/model) beside every measured leg of a back-and-forth results file: the model's
 * inputs come from the run's settings and from what the guest did (pages it changed, pages QEMU found
 * non-zero on the first direct leg), never from the leg's own measured bytes or times. Used by
 * bench/model-check.ts and by the model's tests.
 */
import type { BenchResults, GridRun, LegPath, LegResult } from '../demo/backforth';
import { BENCH_PLATFORM } from '../../model/calibration';
import { PAGE_BYTES, type PathPrediction, predictBfmig, predictDirect, type ModelInputs } from '../../model/precopy';

/**
 * Pages the guest dirties at a site besides the workload's own pages: its kernel and the workload's
 * generation counters (4 bytes a page). Measured: leg 2 of run r100-d20-m256, an idle guest, sent 51
 * pages through bfmig.
 */
const IDLE_CHURN_PAGES = 51;

/**
 * Whether a constant of src/model/calibration.ts (or IDLE_CHURN_PAGES) was read from this leg of the
 * third grid run, docs/benchmarks/backforth.json (docs/model.md names each): every direct first leg
 * (device state, direct buffer, emulated-link ceiling), r100-d20-m256's first bfmig leg (bfmig
 * buffer), every idle bfmig back leg (gateway ceiling, idle churn) and r1000-d5-m1024's bfmig leg 4
 * (per-Run time). The model is validated on the other legs alone: they are held out.
 */
export function calibratedOn(run: GridRun, leg: LegResult): boolean {
  if (leg.leg === 1) return leg.path === 'direct' || run.id === 'r100-d20-m256';
  if (leg.path !== 'bfmig') return false;
  return (leg.changedPages === 0 && run.rewritePct === 0) || (run.id === 'r1000-d5-m1024' && leg.leg === 4);
}

export interface CheckedLeg {
  run: string;
  leg: number;
  path: LegPath;
  changedPct: number;
  measured: { wanBytes: number; totalSeconds: number; downtimeMs: number; verified: boolean };
  predicted: PathPrediction;
  /** (predicted − measured) / measured. */
  wanError: number;
  timeError: number;
  /** A constant was read from this leg (calibratedOn): it cannot validate the model. */
  calibration: boolean;
}

export function inputsFor(run: GridRun, leg: LegResult, firstDirect: LegResult, downtimeLimitMs: number): ModelInputs {
  const ramPages = leg.qemuNormalPages + leg.qemuZeroPages;
  const workloadPages = (run.workloadMiB * 2 ** 20) / PAGE_BYTES;
  const dirtyPagesPerS = (run.rewritePct / 100) * workloadPages;
  // Pages changed since the VM left the destination: the guest's commanded change (distinct pages), its
  // per-second rewriting at the source (random pages of the workload, so k writes touch W·(1 − e^(−k/W))
  // of them) — as the guest reported it, or else at its rate over the seconds it spent there — the
  // generation counters those writes update, and idle churn.
  const writes = leg.pageWritesAtSource !== null && leg.pageWritesAtSource !== undefined
    ? leg.pageWritesAtSource - leg.changedPages
    : dirtyPagesPerS * (leg.secondsAtSource ?? 0);
  const rewritten = leg.leg === 1 ? 0 : leg.changedPages + workloadPages * (1 - Math.exp(-writes / workloadPages));
  const counters = Math.min(rewritten, (workloadPages * 4) / PAGE_BYTES);
  const changed = leg.leg === 1 ? ramPages : Math.min(firstDirect.qemuNormalPages, rewritten + counters + IDLE_CHURN_PAGES);
  return {
    ramBytes: ramPages * PAGE_BYTES,
    usedShare: firstDirect.qemuNormalPages / ramPages,
    rateMbit: run.mbit,
    rttMs: 2 * run.delayMs,
    changedShare: changed / ramPages,
    dirtyMbit: (dirtyPagesPerS * PAGE_BYTES * 8) / 1e6,
    hotShare: workloadPages / ramPages,
    downtimeLimitMs,
    maxBandwidthBytesPerS: 10 * 2 ** 30,
    senderHasDigests: true,
    ...(run.multifdChannels ? { multifdChannels: run.multifdChannels } : {}),
    platform: BENCH_PLATFORM,
  };
}

export function checkResults(results: BenchResults): CheckedLeg[] {
  const out: CheckedLeg[] = [];
  for (const run of results.runs) {
    const firstDirect = run.legs.find((l) => l.path === 'direct' && l.leg === 1) ?? run.legs[0];
    for (const leg of run.legs) {
      const inputs = inputsFor(run, leg, firstDirect, results.downtimeLimitMs);
      const predicted = leg.path === 'direct' ? predictDirect(inputs) : predictBfmig(inputs, leg.leg > 1);
      const measured = { wanBytes: leg.wanBytes, totalSeconds: leg.totalTimeMs / 1000, downtimeMs: leg.downtimeMs, verified: leg.verified };
      out.push({
        run: run.id,
        leg: leg.leg,
        path: leg.path,
        changedPct: leg.leg === 1 ? 100 : (inputs.changedShare * 100),
        measured,
        predicted,
        wanError: predicted.wanBytes / measured.wanBytes - 1,
        timeError: predicted.totalSeconds / measured.totalSeconds - 1,
        calibration: calibratedOn(run, leg),
      });
    }
  }
  return out;
}

export const pct = (x: number): string => `${x >= 0 ? '+' : ''}${(x * 100).toFixed(1)}%`;
export const mb = (b: number): string => (b / 1e6).toFixed(b < 1e7 ? 3 : 1);

export function markdownTable(checked: CheckedLeg[]): string {
  const rows = ['| run | leg | path | changed % of RAM | WAN MB measured | WAN MB model | error | total s measured | total s model | error | downtime ms measured / model | guest |', '|---|---|---|---|---|---|---|---|---|---|---|---|'];
  for (const c of checked) {
    rows.push(
      `| ${c.run} | ${c.leg} | ${c.path} | ${c.leg === 1 ? 'first' : c.changedPct.toFixed(2)} | ${mb(c.measured.wanBytes)} | ${mb(c.predicted.wanBytes)} | ${pct(c.wanError)} | ` +
        `${c.measured.totalSeconds.toFixed(2)} | ${c.predicted.totalSeconds.toFixed(2)} | ${pct(c.timeError)} | ${c.measured.downtimeMs} / ${Math.round(c.predicted.downtimeMs)} | ${c.measured.verified ? 'verified' : 'FAILED'} |`,
    );
  }
  return rows.join('\n');
}

