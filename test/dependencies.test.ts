/**
 * The import rules of ARCHITECTURE.md, as written in .dependency-cruiser.cjs: no cycles, the product
 * never imports the lab, the wire knows no QEMU, no sockets below the gateway, tests and benchmarks
 * never import each other, and so on.
 * `npm run check:deps` runs the same check and prints each offending import.
 */
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';
import { PACKAGE_ROOT } from '../src/digest/package-root';

interface Violation {
  from: string;
  to: string;
  rule: { name: string };
  cycle?: { name: string }[];
}

interface CruiseResult {
  summary: { violations: Violation[]; totalCruised: number; ruleSetUsed: { forbidden?: { name: string }[] } };
}

function cruise(): CruiseResult {
  const bin = path.join(PACKAGE_ROOT, 'node_modules', 'dependency-cruiser', 'bin', 'dependency-cruise.mjs');
  const run = spawnSync(process.execPath, [bin, '--config', '.dependency-cruiser.cjs', '--output-type', 'json', 'src', 'test', 'bench', 'scripts'], {
    cwd: PACKAGE_ROOT,
    encoding: 'utf8',
    maxBuffer: 64 * 1024 * 1024,
  });
  if (run.error) throw run.error;
  // Exit status is the number of errors: the JSON on stdout says which.
  if (run.stdout.trim() === '') throw new Error(`dependency-cruiser printed nothing (status ${run.status}): ${run.stderr}`);
  return JSON.parse(run.stdout) as CruiseResult;
}

describe('import rules (ARCHITECTURE.md, .dependency-cruiser.cjs)', () => {
  test('no cycles and no forbidden imports', () => {
    const { summary } = cruise();
    // Guard against a check that passes because it saw nothing.
    expect(summary.totalCruised).toBeGreaterThan(100);
    expect((summary.ruleSetUsed.forbidden ?? []).map((r) => r.name)).toEqual(
      expect.arrayContaining(['no-circular', 'product-not-lab', 'cli-loads-lab-lazily', 'layer-wire', 'layer-store', 'no-sockets-below-gateway', 'tests-not-bench', 'bench-not-tests']),
    );
    const found = summary.violations.map((v) => `${v.rule.name}: ${v.from} → ${v.cycle ? v.cycle.map((c) => c.name).join(' → ') : v.to}`);
    expect(found).toEqual([]);
  }, 60_000);

  test('the CLI, as bfmig gateway starts it, loads no lab module', () => {
    // The compiled CLI (npm test builds dist/ first): what `require` has loaded once main.js is in.
    const main = path.join(PACKAGE_ROOT, 'dist', 'src', 'cli', 'main.js');
    const script = `require(${JSON.stringify(main)}); process.stdout.write(JSON.stringify(Object.keys(require.cache)));`;
    const run = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8' });
    expect(run.status).toBe(0);
    const loaded = (JSON.parse(run.stdout) as string[]).map((f) => path.relative(PACKAGE_ROOT, f));
    expect(loaded).toContain(path.join('dist', 'src', 'gateway', 'gateway.js'));
    expect(loaded.filter((f) => f.startsWith(path.join('dist', 'src', 'lab') + path.sep))).toEqual([]);
  });
});
