/**
 * A Node child process for crash tests: it runs a CommonJS script against the compiled modules of
 * dist/ (jest's globalSetup rebuilds a stale dist first), says when it got somewhere, and is killed
 * with SIGKILL, as a crash leaves things: no flush, no close, no exit handlers.
 */
import { spawn } from 'node:child_process';
import * as path from 'node:path';
import { PACKAGE_ROOT } from '../../digest/package-root';

/**
 * A compiled module of this package, as a JavaScript string literal to paste into a child's script:
 * `require(${distModule('src/store/index')})`.
 */
export function distModule(relative: string): string {
  return JSON.stringify(path.join(PACKAGE_ROOT, 'dist', `${relative}.js`));
}

export interface ChildExit {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export interface NodeChild {
  readonly pid: number;
  /** Resolves with its output so far once its stdout holds `text`; rejects if it exits before. */
  said(text: string): Promise<string>;
  /** Resolves when it has exited, however it ended. */
  readonly exited: Promise<ChildExit>;
  /** SIGKILL (a crash); resolves once it is gone. */
  kill(): Promise<ChildExit>;
}

export interface NodeChildOptions {
  /** Its process.argv[1] on. */
  args?: readonly string[];
  /** Added to this process's environment. */
  env?: NodeJS.ProcessEnv;
}

/** Starts `node -e script`. */
export function startNodeChild(script: string, options: NodeChildOptions = {}): NodeChild {
  const proc = spawn(process.execPath, ['-e', script, ...(options.args ?? [])], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...options.env } });
  if (proc.pid === undefined) throw new Error('node did not start');
  let stdout = '';
  let stderr = '';
  const waiting = new Set<() => void>();
  proc.stdout.on('data', (b: Buffer) => {
    stdout += b.toString();
    for (const check of waiting) check();
  });
  proc.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
  const exited = new Promise<ChildExit>((resolve) => proc.on('close', (code, signal) => resolve({ code, signal, stdout, stderr })));
  return {
    pid: proc.pid,
    said: (text) =>
      new Promise<string>((resolve, reject) => {
        const check = (): void => {
          if (!stdout.includes(text)) return;
          waiting.delete(check);
          resolve(stdout);
        };
        waiting.add(check);
        check();
        void exited.then((end) => {
          if (!waiting.delete(check)) return;
          reject(new Error(`child exited (${end.code ?? end.signal}) before it said ${JSON.stringify(text)}; stdout: ${end.stdout} stderr: ${end.stderr}`));
        });
      }),
    exited,
    kill: () => {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
      return exited;
    },
  };
}
