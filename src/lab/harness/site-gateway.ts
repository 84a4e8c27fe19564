/**
 * A site's gateway for the back-and-forth runs, either in this process (the demo) or as a `bfmig gateway`
 * child process of its own (the benchmark), so that its CPU seconds are its own.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createInterface } from 'node:readline';
import { parseConfig } from '../../gateway/config';
import { Gateway } from '../../gateway/gateway';
import { createLogger } from '../../gateway/log';
import { GatewayMetrics } from '../../gateway/metrics';
import type { Direction } from '../../gateway/session';
import { PACKAGE_ROOT } from '../../digest/package-root';
import { procStats } from '../demo/proc-stats';

/** What a gateway says about one finished migration (its report, or its 'migration completed' log line). */
export interface GatewayLegReport {
  vm: string;
  direction: Direction;
  result: 'completed' | 'failed';
  streamBytes: number;
  pagesSent: number;
  pagesReused: number;
  pagesZero: number;
  snapshotId: string | null;
}

export interface SiteGateway {
  /** Reports of finished migrations, oldest first. */
  readonly reports: readonly GatewayLegReport[];
  /** CPU seconds the gateway has used so far, or null when it shares this process. */
  cpuSeconds(): number | null;
  /** Peak resident set size (VmHWM) in MiB so far, or null when it shares this process. */
  peakRssMiB(): number | null;
  stop(): Promise<void>;
  /** SIGKILL: the gateway dies mid-whatever, as on a crash (a gateway in this process cannot be killed). */
  kill(): Promise<void>;
}

/** Writes `yaml` to DIR/NAME.yaml and starts the gateway, in process or as a child. */
export async function startSiteGateway(dir: string, name: string, yaml: string, own: 'in-process' | 'child-process'): Promise<SiteGateway> {
  const configPath = path.join(dir, `${name}.yaml`);
  fs.writeFileSync(configPath, yaml);
  return own === 'child-process' ? startChild(configPath, path.join(dir, `${name}.log`)) : startInProcess(yaml, path.join(dir, `${name}.log`));
}

async function startInProcess(yaml: string, logPath: string): Promise<SiteGateway> {
  const config = parseConfig(yaml);
  const log = createLogger({ name: config.name, level: 'warn', destination: fs.createWriteStream(logPath) });
  const gateway = new Gateway(config, log, new GatewayMetrics({ defaultMetrics: false }));
  await gateway.start();
  return {
    get reports(): GatewayLegReport[] {
      return gateway.history.map((r) => ({ vm: r.vm, direction: r.direction, result: r.result, streamBytes: r.streamBytes, ...pick(r.counts), snapshotId: r.snapshotId }));
    },
    cpuSeconds: () => null,
    peakRssMiB: () => null,
    stop: () => gateway.stop(1),
    kill: () => Promise.reject(new Error('a gateway in this process cannot be killed')),
  };
}

const pick = (c: { pagesSent: number; pagesReused: number; pagesZero: number }): Pick<GatewayLegReport, 'pagesSent' | 'pagesReused' | 'pagesZero'> => ({
  pagesSent: c.pagesSent,
  pagesReused: c.pagesReused,
  pagesZero: c.pagesZero,
});

interface FinishedLine {
  msg?: string;
  vm?: string;
  direction?: Direction;
  result?: 'completed' | 'failed';
  streamBytes?: number;
  pagesSent?: number;
  pagesReused?: number;
  pagesZero?: number;
  snapshotId?: string | null;
}

async function startChild(configPath: string, logPath: string): Promise<SiteGateway> {
  const child: ChildProcess = spawn(process.execPath, [path.join(PACKAGE_ROOT, 'bin', 'bfmig.js'), 'gateway', '--config', configPath], { stdio: ['ignore', 'pipe', 'pipe'] });
  const logFile = fs.createWriteStream(logPath);
  child.stderr?.pipe(logFile, { end: false });
  const reports: GatewayLegReport[] = [];
  let exited = false;
  const exitedPromise = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  await new Promise<void>((resolve, reject) => {
    createInterface({ input: child.stdout! }).on('line', (line) => {
      logFile.write(line + '\n');
      if (line.includes('gateway started')) resolve();
      if (!line.includes('"migration completed"') && !line.includes('"migration failed"')) return;
      let f: FinishedLine;
      try {
        f = JSON.parse(line) as FinishedLine;
      } catch {
        return;
      }
      if (f.direction && f.result) {
        reports.push({ vm: f.vm ?? '', direction: f.direction, result: f.result, streamBytes: f.streamBytes ?? 0, pagesSent: f.pagesSent ?? 0, pagesReused: f.pagesReused ?? 0, pagesZero: f.pagesZero ?? 0, snapshotId: f.snapshotId ?? null });
      }
    });
    child.once('exit', (code) => {
      exited = true;
      reject(new Error(`gateway ${configPath} exited with code ${code} before it started (log: ${logPath})`));
    });
  });
  return {
    reports,
    cpuSeconds: () => (exited || child.pid === undefined ? null : procStats(child.pid).cpuSeconds),
    peakRssMiB: () => (exited || child.pid === undefined ? null : procStats(child.pid).peakRssMiB),
    stop: async () => {
      if (!exited) child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
      await exitedPromise;
      clearTimeout(timer);
      logFile.end();
    },
    kill: async () => {
      if (!exited) child.kill('SIGKILL');
      await exitedPromise;
      logFile.end();
    },
  };
}
