/**
 * `leg-cost.js --from` re-summarises results files that earlier sessions wrote (docs/benchmarks/),
 * which lack what later sessions measured: every one must still be read, what it lacks shown as unknown.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { PACKAGE_ROOT } from '../src/digest/package-root';

const LEG_COST = path.join(PACKAGE_ROOT, 'dist', 'bench', 'leg-cost.js');
const RESULTS = path.join(PACKAGE_ROOT, 'docs', 'benchmarks');

/** The results files of bench/leg-cost.js kept in docs/benchmarks (those with runs). */
const resultsFiles = fs
  .readdirSync(RESULTS)
  .filter((f) => f.startsWith('leg-cost-') && f.endsWith('.json'))
  .filter((f) => Array.isArray((JSON.parse(fs.readFileSync(path.join(RESULTS, f), 'utf8')) as { runs?: unknown }).runs))
  .map((f) => path.join(RESULTS, f));

describe('leg-cost --from', () => {
  test('reads every results file kept, old and new together, and shows what an old one lacks as unknown', () => {
    expect(resultsFiles.length).toBeGreaterThan(20);
    const out = execFileSync(process.execPath, [LEG_COST, '--from', resultsFiles.join(',')], { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 });
    expect(out).not.toMatch(/NaN|undefined/);
    // One summary per setting (content, rate, delay, channels), each with every table.
    const summaries = out.split(/^\S.*: median \(min–max\) over \d+ runs$/m).length - 1;
    expect(summaries).toBeGreaterThan(5);
    expect(out.match(/^QEMU's switchover: median/gm)).toHaveLength(summaries);
    expect(out.match(/^paired by run/gm)).toHaveLength(summaries);
    // The oldest files have no trace of QEMU's rate windows: the column says so rather than 0.
    const oldest = execFileSync(process.execPath, [LEG_COST, '--from', path.join(RESULTS, 'leg-cost-1000.json')], { encoding: 'utf8' });
    const switchover = oldest.split('\n').filter((l) => /^1 +bfmig /.test(l))[1];
    expect(switchover.split(/\s{2,}/).filter((cell) => cell === '?').length).toBeGreaterThanOrEqual(4);
  });

  test('a file that holds no runs is refused by name', () => {
    const other = path.join(RESULTS, 'leg-cost-1000-prefill-ab.json');
    const run = spawnSync(process.execPath, [LEG_COST, '--from', other], { encoding: 'utf8' });
    expect(run.status).not.toBe(0);
    expect(run.stderr).toContain(`${other} is not a results file of this benchmark`);
  });
});
