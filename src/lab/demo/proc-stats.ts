import * as fs from 'node:fs';

/** Linux's USER_HZ: the unit of utime/stime in /proc/PID/stat. */
const CLOCK_TICKS = 100;

export interface ProcStats {
  /** User + system CPU seconds the process has used so far. */
  cpuSeconds: number;
  /** Of those, the seconds spent in the kernel (socket and disk system calls, page faults). */
  systemSeconds: number;
  /** Of those, the main thread's (a Node process's event loop; the rest: libuv's pool, the store's threads, V8's). */
  mainThreadSeconds: number;
  /** Peak resident set size (VmHWM), MiB. */
  peakRssMiB: number;
}

/** A process's CPU seconds so far, and of them the seconds in the kernel. */
export type CpuTime = Pick<ProcStats, 'cpuSeconds' | 'systemSeconds' | 'mainThreadSeconds'>;

/** The CPU time of `stats`. */
export function cpuTime(stats: ProcStats): CpuTime {
  return { cpuSeconds: stats.cpuSeconds, systemSeconds: stats.systemSeconds, mainThreadSeconds: stats.mainThreadSeconds };
}

/** CPU time and peak RSS of a running process on this host, from /proc. */
export function procStats(pid: number): ProcStats {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const system = Number(fields[12]) / CLOCK_TICKS;
  const cpu = Number(fields[11]) / CLOCK_TICKS + system;
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const hwm = /VmHWM:\s+(\d+) kB/.exec(status);
  return { cpuSeconds: cpu, systemSeconds: system, mainThreadSeconds: threadCpuSeconds(pid, pid), peakRssMiB: hwm ? Number(hwm[1]) / 1024 : NaN };
}

/**
 * CPU seconds one thread of a process has used so far, from /proc (10 ms ticks): the main thread is the
 * one whose id is the process's. Node 20's process.cpuUsage() counts every thread, the store's writer
 * and reader threads too.
 */
export function threadCpuSeconds(pid: number, tid: number): number {
  const stat = fs.readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / CLOCK_TICKS;
}
