/**
 * A short run of bench/backforth (one leg pair, a 128 MiB guest on a 1000 Mbit/s emulated link, 10% of
 * its RAM changed between the legs): the results file has every field the charts and the model check
 * read, both paths measured, and every leg through bfmig left the guest's memory verified.
 */
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { PACKAGE_ROOT } from '../src/digest/package-root';
import type { BenchResults } from '../src/lab/demo/backforth';
import { suiteTempDir } from './temp-dir';

const SKIP = process.env.BFMIG_SKIP_E2E === '1';

(SKIP ? describe.skip : describe)('bench/backforth smoke run', () => {
  let dir = '';
  beforeAll(() => {
    dir = suiteTempDir('bfmig-bench-smoke-');
  });

  test('one leg pair direct and through bfmig, written to JSON and CSV', async () => {
    const out = path.join(dir, 'smoke.json');
    const bench = path.join(PACKAGE_ROOT, 'dist', 'bench', 'backforth.js');
    const args = ['--mbit', '1000', '--delay-ms', '5', '--mem-mib', '128', '--workload-mib', '32', '--rewrite-pcts', '0', '--changes', '10', '--out', out];
    await promisify(execFile)(process.execPath, [bench, ...args], { timeout: 170_000, maxBuffer: 16 << 20 });

    const results = JSON.parse(fs.readFileSync(out, 'utf8')) as BenchResults;
    expect(results.host.cores).toBeGreaterThan(0);
    expect(results.runs).toHaveLength(1);
    const legs = results.runs[0].legs;
    expect(legs.map((l) => `${l.path}${l.leg}`)).toEqual(['direct1', 'direct2', 'bfmig1', 'bfmig2']);
    for (const leg of legs.filter((l) => l.path === 'bfmig')) {
      expect(leg.verified).toBe(true);
      expect(leg.gatewayCpuSecondsSend).toBeGreaterThan(0);
      expect(leg.gatewayCpuSecondsReceive).toBeGreaterThan(0);
    }
    for (const leg of legs) {
      expect(leg.totalTimeMs).toBeGreaterThan(0);
      expect(leg.wanBytesForward + leg.wanBytesBackward).toBe(leg.wanBytes);
      expect(leg.qemuNormalPages + leg.qemuZeroPages).toBeGreaterThanOrEqual(32768);
    }
    const back = legs[3];
    // About 10% of the 32,768 pages changed (each page with probability 10% / 25% of the workload's pages).
    expect(back.changedPages).toBeGreaterThan(2800);
    expect(back.changedPages).toBeLessThan(3800);
    expect(back.pagesSent).toBeGreaterThanOrEqual(back.changedPages);
    expect(back.wanBytes).toBeLessThan(legs[2].wanBytes / 3);

    const csv = fs.readFileSync(out.replace(/\.json$/, '.csv'), 'utf8').trim().split('\n');
    expect(csv).toHaveLength(5);
    expect(csv[0].split(',')).toEqual(expect.arrayContaining(['wanBytesForward', 'gatewayCpuSecondsSend', 'verified', 'changedPages']));

    // The model check reads the same file: one prediction per leg.
    const checked = path.join(dir, 'model-check.json');
    await promisify(execFile)(process.execPath, [path.join(PACKAGE_ROOT, 'dist', 'bench', 'model-check.js'), out, '--out', checked], { timeout: 30_000 });
    expect(JSON.parse(fs.readFileSync(checked, 'utf8'))).toHaveLength(4);
  }, 180_000);
});
