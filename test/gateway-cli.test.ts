import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { PACKAGE_ROOT } from '../src/digest/package-root';
import { suiteTempDir } from './temp-dir';

const BFMIG = path.join(PACKAGE_ROOT, 'bin', 'bfmig.js');

function run(args: string[], untilLine?: RegExp): Promise<{ code: number | null; stdout: string; stderr: string; signalSent: boolean }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [BFMIG, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    let signalSent = false;
    child.stdout.on('data', (b: Buffer) => {
      stdout += b.toString();
      if (untilLine && !signalSent && untilLine.test(stdout)) {
        signalSent = true;
        child.kill('SIGTERM');
      }
    });
    child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
    child.on('exit', (code) => resolve({ code, stdout, stderr, signalSent }));
  });
}

describe('bfmig gateway (the process)', () => {
  let dir = '';
  beforeAll(() => {
    dir = suiteTempDir('bfmig-cli-');
  });

  test('a config error stops start-up with a message naming the key', async () => {
    const file = path.join(dir, 'bad.yaml');
    fs.writeFileSync(file, 'name: a\ndata: ./d\npeerListen: 127.0.0.1:0\nroutes:\n  - vm: vm1\n    listen: nowhere\n    peer: 127.0.0.1:1\n    target: 127.0.0.1:2\n');
    const result = await run(['gateway', '--config', file]);
    expect(result.code).toBe(2);
    expect(result.stderr).toMatch(/routes\[0\]\.listen/);
  });

  test('starts, logs JSON lines, and exits 0 on SIGTERM', async () => {
    const file = path.join(dir, 'ok.yaml');
    fs.writeFileSync(file, 'name: site-a\ndata: ./store\npeerListen: 127.0.0.1:0\nmetrics: 127.0.0.1:0\n');
    const result = await run(['gateway', '--config', file], /gateway started/);
    expect(result.signalSent).toBe(true);
    expect(result.code).toBe(0);
    const lines = result.stdout.trim().split('\n').map((l) => JSON.parse(l) as { msg: string; site?: string });
    expect(lines.map((l) => l.msg)).toEqual(expect.arrayContaining(['gateway started', 'stopping', 'gateway stopped']));
    expect(lines.find((l) => l.msg === 'gateway started')?.site).toBe('site-a');
  });
});
