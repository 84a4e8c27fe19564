import * as fs from 'node:fs';
import * as path from 'node:path';
import { startBfmig } from '../src/lab/harness/child';
import { suiteTempDir } from './temp-dir';

/** Runs `bfmig ARGS`; once its output matches `untilLine`, sends it SIGTERM. */
async function run(args: string[], untilLine?: RegExp): Promise<{ code: number | null; stdout: string; stderr: string; signalSent: boolean }> {
  const child = startBfmig(args);
  let signalSent = false;
  if (untilLine) {
    void child.said(untilLine).then(
      () => {
        signalSent = true;
        child.signal('SIGTERM');
      },
      () => undefined, // exited without saying it: the test sees signalSent false
    );
  }
  const { code, stdout, stderr } = await child.exited;
  return { code, stdout, stderr, signalSent };
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
