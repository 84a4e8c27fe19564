/**
 * reapWithThisProcess: the lab's child processes (QEMU, gateways, relays) end with the process that
 * started them, whether it exits or a signal ends it (a benchmark stopped with `kill`).
 */
import * as fs from 'node:fs';
import { distModule, type NodeChild, startNodeChild } from '../src/lab/harness/child';

/** A parent that starts `sleep 600`, registered or not, says its pid, then does `then`. */
function parent(register: boolean, then: string): NodeChild {
  return startNodeChild(`const { spawn } = require('node:child_process');
    const { reapWithThisProcess } = require(${distModule('src/lab/harness/reap-children')});
    const child = spawn('sleep', ['600'], { stdio: 'ignore' });
    ${register ? 'reapWithThisProcess(child);' : ''}
    console.log('child ' + child.pid);
    ${then}`);
}

async function childPid(p: NodeChild): Promise<number> {
  return Number(/child (\d+)/.exec(await p.said(/child \d+/))?.[1]);
}

/** Still running: present in /proc and not a zombie (a killed child waits there for its new parent to reap it). */
function running(pid: number): boolean {
  try {
    return fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]?.[0] !== 'Z';
  } catch {
    return false;
  }
}

async function gone(pid: number): Promise<boolean> {
  for (let i = 0; i < 100 && running(pid); i++) await new Promise((r) => setTimeout(r, 50));
  return !running(pid);
}

describe('reapWithThisProcess', () => {
  test.each(['SIGTERM', 'SIGINT', 'SIGHUP'] as const)('a parent ended by %s takes its child with it, and still ends by that signal', async (signal) => {
    const p = parent(true, 'setInterval(() => {}, 1000);');
    const pid = await childPid(p);
    expect(running(pid)).toBe(true);
    p.signal(signal);
    expect((await p.exited).signal).toBe(signal);
    expect(await gone(pid)).toBe(true);
  });

  test('a parent that exits takes its child with it', async () => {
    const p = parent(true, 'setTimeout(() => process.exit(3), 100);');
    const pid = await childPid(p);
    expect((await p.exited).code).toBe(3);
    expect(await gone(pid)).toBe(true);
  });

  test('a child not registered outlives a parent ended by SIGTERM (what the registration is for)', async () => {
    const p = parent(false, 'setInterval(() => {}, 1000);');
    const pid = await childPid(p);
    p.signal('SIGTERM');
    await p.exited;
    try {
      await new Promise((r) => setTimeout(r, 300));
      expect(running(pid)).toBe(true);
    } finally {
      process.kill(pid, 'SIGKILL');
    }
  });
});
