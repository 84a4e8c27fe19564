/**
 * Child processes for tests: a CommonJS script against the compiled modules of dist/, or the `bfmig`
 * command (bin/bfmig.js, which runs dist/ too; jest's globalSetup rebuilds a stale dist first). A test
 * waits for what the child says, signals it, or kills it with SIGKILL, as a crash leaves things: no
 * flush, no close, no exit handlers.
 */
import { spawn } from 'node:child_process';
import * as path from 'node:path';
import { PACKAGE_ROOT } from '../../digest/package-root';
import { reapWithThisProcess } from './reap-children';

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
  /** Resolves with its output so far once its stdout holds `text` (or matches it); rejects if it exits before. */
  said(text: string | RegExp): Promise<string>;
  /** Sends `signal` if it still runs. */
  signal(signal: NodeJS.Signals): void;
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
  return startNode(['-e', script, ...(options.args ?? [])], options.env);
}

/** Starts `bfmig ARGS` (bin/bfmig.js). */
export function startBfmig(args: readonly string[], env?: NodeJS.ProcessEnv): NodeChild {
  return startNode([path.join(PACKAGE_ROOT, 'bin', 'bfmig.js'), ...args], env);
}

function startNode(argv: readonly string[], env: NodeJS.ProcessEnv = {}): NodeChild {
  const proc = spawn(process.execPath, argv, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  if (proc.pid === undefined) throw new Error('node did not start');
  reapWithThisProcess(proc);
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
          if (typeof text === 'string' ? !stdout.includes(text) : !text.test(stdout)) return;
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
    signal: (signal) => {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
    },
    kill: () => {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
      return exited;
    },
  };
}
