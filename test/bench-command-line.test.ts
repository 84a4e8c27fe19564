/**
 * Every benchmark answers `--help` with the usage its header comment gives, and a command line it cannot
 * use with what was wrong and exit status 2, not a stack trace (bench/command-line.ts).
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { PACKAGE_ROOT } from '../src/digest/package-root';

const BENCH = path.join(PACKAGE_ROOT, 'bench');

/** The benchmark scripts: every bench/*.ts but the modules they share. */
const scripts = fs
  .readdirSync(BENCH)
  .filter((f) => f.endsWith('.ts') && f !== 'command-line.ts' && f !== 'loopback-processes.ts')
  .map((f) => f.replace(/\.ts$/, ''));

function run(script: string, args: string[]): { status: number | null; stdout: string; stderr: string } {
  return spawnSync(process.execPath, [path.join(PACKAGE_ROOT, 'dist', 'bench', `${script}.js`), ...args], { encoding: 'utf8', timeout: 60_000 });
}

/** The first line of the script's header comment, as `--help` should print it first. */
function firstHeaderLine(script: string): string {
  const source = fs.readFileSync(path.join(BENCH, `${script}.ts`), 'utf8');
  const header = /\/\*\*\s*\n?\s*\*?\s*(.*)/.exec(source);
  if (header === null) throw new Error(`${script}.ts has no header comment`);
  return header[1].trim();
}

test('the benchmarks are found', () => {
  expect(scripts).toEqual(expect.arrayContaining(['leg-cost', 'throughput', 'fuzz', 'backforth', 'channels-throughput']));
});

test.each(scripts)('%s --help prints its usage and exits 0', (script) => {
  const result = run(script, ['--help']);
  expect(result.stderr).toBe('');
  expect(result.status).toBe(0);
  expect(result.stdout.split('\n')[0]).toBe(firstHeaderLine(script));
});

test.each(scripts)('%s refuses an option it does not take, exit status 2', (script) => {
  const result = run(script, ['--no-such-option']);
  expect(result.status).toBe(2);
  expect(result.stderr).toContain('--no-such-option');
  expect(result.stderr).toContain('--help prints the usage');
  expect(result.stderr).not.toMatch(/\n\s+at /);
});

test('a number a benchmark cannot read is named, exit status 2', () => {
  const result = run('throughput', ['one']);
  expect(result.status).toBe(2);
  expect(result.stderr).toContain('GiB: not a number: one');
});
