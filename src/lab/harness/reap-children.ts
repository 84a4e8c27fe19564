/**
 * Processes the lab starts (QEMU, gateways, relays, helpers) end with the process that started them:
 * at its exit, and when SIGINT, SIGTERM or SIGHUP ends it. A signal's default action ends a Node
 * process without its 'exit' handlers, so a benchmark stopped with `kill` left its gateway processes
 * and QEMUs running; here each of those signals first SIGKILLs the children, then ends the process
 * with the same signal (exit status 128 + its number, as before).
 */
import type { ChildProcess } from 'node:child_process';

const live = new Set<ChildProcess>();
let installed = false;

function killAll(): void {
  for (const child of live) {
    try {
      child.kill('SIGKILL');
    } catch {
      // gone already
    }
  }
  live.clear();
}

function install(): void {
  if (installed) return;
  installed = true;
  process.once('exit', killAll);
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.once(signal, () => {
      killAll();
      // The listener is gone: the signal's default action ends the process now.
      process.kill(process.pid, signal);
    });
  }
}

/** Has `child` killed when this process exits or is ended by a signal, unless it has exited first. */
export function reapWithThisProcess(child: ChildProcess): void {
  install();
  if (child.exitCode !== null || child.signalCode !== null) return;
  live.add(child);
  child.once('exit', () => live.delete(child));
}
