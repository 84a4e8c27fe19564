/**
 * The test guest's workload (guest/workload.c) run on the host, small and fast: its realistic memory
 * (--content files) and database-like updates (--scribble-bytes/--scribble-rate) verify clean rounds,
 * and catch a page that was changed behind their back (--inject-fault-round), as the pseudo-random
 * content always has.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { REPO_ROOT } from '../src/lab/vm/guest-image';
import { suiteTempDir } from './temp-dir';

const tmp = suiteTempDir('bfmig-workload-');
const binary = path.join(tmp, 'workload');
const corpus = path.join(tmp, 'corpus');

beforeAll(() => {
  execFileSync('gcc', ['-O2', '-Wall', '-Wextra', '-o', binary, path.join(REPO_ROOT, 'guest', 'workload.c')]);
  // A small corpus of the kinds the guest's holds: an executable, text, a compressed file.
  fs.mkdirSync(path.join(corpus, 'bin'), { recursive: true });
  fs.copyFileSync(process.execPath, path.join(corpus, 'bin', 'node'));
  fs.writeFileSync(path.join(corpus, 'text.txt'), 'static int the_answer(void) { return 42; }\n'.repeat(3000));
  fs.writeFileSync(path.join(corpus, 'short'), 'a file shorter than a page');
}, 60_000);

function run(...args: string[]): string[] {
  const r = spawnSync(binary, ['--mib', '2', '--interval-ms', '20', '--rounds', '3', ...args], { encoding: 'utf8', timeout: 60_000 });
  if (r.error) throw r.error;
  return r.stdout.split('\n').filter((l) => l.startsWith('WORKLOAD'));
}

const verdicts = (lines: string[]): string[] => lines.filter((l) => /^WORKLOAD VERIFY (OK|FAIL) round=/.test(l)).map((l) => l.split(' ')[2]);

describe('guest workload content and updates', () => {
  test.each<[string, string[]]>([
    ['pseudo-random', []],
    ['pages of files', ['--content', 'files', '--corpus', corpus, '--rewrite-pct', '50']],
    ['database-like updates on pseudo-random pages', ['--scribble-bytes', '64', '--scribble-rate', '5000']],
    ['database-like updates on pages of files', ['--content', 'files', '--corpus', corpus, '--scribble-bytes', '200', '--scribble-rate', '5000', '--rewrite-pct', '20']],
  ])('%s: every round verifies, and a flipped bit fails the round it happened in', (_what, args) => {
    expect(verdicts(run(...args))).toEqual(['OK', 'OK', 'OK']);
    expect(verdicts(run(...args, '--inject-fault-round', '2'))).toEqual(['OK', 'FAIL', 'FAIL']);
  });

  test('every page of every file under the corpus (the last one partial) is a page the workload copies from', () => {
    const lines = run('--content', 'files', '--corpus', corpus);
    const start = lines.find((l) => l.startsWith('WORKLOAD START')) ?? '';
    const pages = Number(/corpus_pages=(\d+)/.exec(start)?.[1]);
    const expected = [path.join(corpus, 'bin', 'node'), path.join(corpus, 'text.txt'), path.join(corpus, 'short')].reduce((n, f) => n + Math.ceil(fs.statSync(f).size / 4096), 0);
    expect(pages).toBe(expected);
  });

  test('files content without a corpus is an error, not pseudo-random pages', () => {
    const r = spawnSync(binary, ['--mib', '1', '--rounds', '1', '--content', 'files', '--corpus', path.join(tmp, 'none')], { encoding: 'utf8' });
    expect(r.status).toBe(1);
    expect(r.stdout).toMatch(/WORKLOAD ERROR no corpus files/);
  });
});
