/**
 * A site's gateway, either in this process (the demo, tests) or as a `bfmig gateway` child process of
 * its own (benchmarks, crash tests), so that its CPU seconds and memory are its own and it can be killed.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createInterface } from 'node:readline';
import { Writable } from 'node:stream';
import { parseConfig } from '../../gateway/config';
import { Gateway } from '../../gateway/gateway';
import { createLogger } from '../../gateway/log';
import { GatewayMetrics } from '../../gateway/metrics';
import type { Direction } from '../../gateway/session';
import { PACKAGE_ROOT } from '../../digest/package-root';
import { type CpuTime, cpuTime, procStats } from '../demo/proc-stats';
import { reapWithThisProcess } from './reap-children';

/** What a gateway says about one finished migration (its report, or its 'migration completed' log line). */
export interface GatewayLegReport {
  vm: string;
  direction: Direction;
  result: 'completed' | 'failed';
  /** Why it failed (null: it completed). */
  error: string | null;
  streamBytes: number;
  pagesSent: number;
  pagesReused: number;
  pagesZero: number;
  /** Pages the receiver held that a multifd migration sent whole all the same (TransferCounts.pagesUnordered). */
  pagesUnordered: number;
  snapshotId: string | null;
  /** Why the stream was relayed verbatim from some point on (the fallback code), null when parsed whole. */
  verbatim: string | null;
  postcopy: boolean;
  /** WAN bytes compression saved (0: not compressed). */
  compressionSavedBytes: number;
  /** Bytes of pages the VM's store read from and wrote to its file in the migration (MigrationReport.storeIo). */
  storeReadBytes: number;
  storeWrittenBytes: number;
  /** Pages sent as the ranges that changed from the receiver's version, pages sent as a reference to the same content elsewhere (in this VM, in a sibling's snapshot), and the payload bytes they took. */
  pagesDelta: number;
  pagesMatched: number;
  pagesSibling: number;
  deltaBytes: number;
}

export interface SiteGateway {
  /** Reports of finished migrations, oldest first. */
  readonly reports: readonly GatewayLegReport[];
  /** CPU seconds the gateway has used so far (and of them in the kernel), or null when it shares this process. */
  cpu(): CpuTime | null;
  /** Peak resident set size (VmHWM) in MiB so far, or null when it shares this process. */
  peakRssMiB(): number | null;
  /** The child's process id, or null when the gateway shares this process. */
  readonly pid: number | null;
  /** Whether it still runs (a gateway in this process runs until stopped). */
  alive(): boolean;
  /** The child's log lines (JSON, one per line), oldest first; empty for a gateway in this process (its log is DIR/NAME.log). */
  readonly logLines: readonly string[];
  stop(): Promise<void>;
  /** SIGKILL: the gateway dies mid-whatever, as on a crash (a gateway in this process cannot be killed). */
  kill(): Promise<void>;
}

export interface SiteGatewayOptions {
  /** Node flags of a child gateway (the deployment's recommended ones, for a benchmark). */
  nodeArgs?: readonly string[];
  /** Where its log goes; DIR/NAME.log unless given. */
  logPath?: string;
}

/** Writes `yaml` to DIR/NAME.yaml and starts the gateway, in process or as a child. */
export async function startSiteGateway(dir: string, name: string, yaml: string, own: 'in-process' | 'child-process', options: SiteGatewayOptions = {}): Promise<SiteGateway> {
  const configPath = path.join(dir, `${name}.yaml`);
  fs.writeFileSync(configPath, yaml);
  const logPath = options.logPath ?? path.join(dir, `${name}.log`);
  return own === 'child-process' ? startChild(configPath, logPath, options.nodeArgs ?? []) : startInProcess(yaml, logPath);
}

/**
 * The log file of a gateway in this process, closed once the gateway has stopped: a line logged after
 * that (a timer of a session still ending) is dropped, where writing it after the end would throw.
 */
function inProcessLog(logPath: string): { destination: Writable; close: () => Promise<void> } {
  const file = fs.createWriteStream(logPath);
  const destination = new Writable({
    write(chunk: Buffer, _encoding, done) {
      if (file.writableEnded) done();
      else file.write(chunk, done);
    },
  });
  return { destination, close: () => new Promise<void>((resolve) => file.end(resolve)) };
}

async function startInProcess(yaml: string, logPath: string): Promise<SiteGateway> {
  const config = parseConfig(yaml);
  const logFile = inProcessLog(logPath);
  const log = createLogger({ name: config.name, level: 'warn', destination: logFile.destination });
  const gateway = new Gateway(config, log, new GatewayMetrics({ defaultMetrics: false }));
  await gateway.start();
  return {
    get reports(): GatewayLegReport[] {
      return gateway.history.map((r) => ({ vm: r.vm, direction: r.direction, result: r.result, error: r.error, streamBytes: r.streamBytes, ...pageCounts(r.counts), snapshotId: r.snapshotId, verbatim: r.verbatim?.code ?? null, postcopy: r.postcopy, compressionSavedBytes: r.compressionSavedBytes, storeReadBytes: r.storeIo.readBytes, storeWrittenBytes: r.storeIo.writtenBytes }));
    },
    cpu: () => null,
    peakRssMiB: () => null,
    pid: null,
    alive: () => true,
    logLines: [],
    stop: async () => {
      await gateway.stop(1);
      await logFile.close();
    },
    kill: () => Promise.reject(new Error('a gateway in this process cannot be killed')),
  };
}

const PAGE_COUNTS = ['pagesSent', 'pagesReused', 'pagesUnordered', 'pagesZero', 'pagesDelta', 'pagesMatched', 'pagesSibling', 'deltaBytes'] as const;
type PageCounts = Pick<GatewayLegReport, (typeof PAGE_COUNTS)[number]>;

/** A report's page counts, from a migration's counts or from its log line (which leaves out counts of 0). */
function pageCounts(c: Partial<PageCounts>): PageCounts {
  return Object.fromEntries(PAGE_COUNTS.map((name) => [name, c[name] ?? 0])) as PageCounts;
}

/** A `migration completed` or `migration failed` line; its page counts are there only when not 0. */
interface FinishedLine extends Partial<PageCounts> {
  msg?: string;
  compressionSavedBytes?: number;
  storeReadBytes?: number;
  storeWrittenBytes?: number;
  vm?: string;
  direction?: Direction;
  result?: 'completed' | 'failed';
  error?: string;
  streamBytes?: number;
  snapshotId?: string | null;
  verbatim?: string;
  postcopy?: boolean;
}

async function startChild(configPath: string, logPath: string, nodeArgs: readonly string[]): Promise<SiteGateway> {
  const child: ChildProcess = spawn(process.execPath, [...nodeArgs, path.join(PACKAGE_ROOT, 'bin', 'bfmig.js'), 'gateway', '--config', configPath], { stdio: ['ignore', 'pipe', 'pipe'] });
  reapWithThisProcess(child);
  const logFile = fs.createWriteStream(logPath);
  child.stderr?.pipe(logFile, { end: false });
  const reports: GatewayLegReport[] = [];
  const logLines: string[] = [];
  let exited = false;
  const exitedPromise = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  await new Promise<void>((resolve, reject) => {
    createInterface({ input: child.stdout! }).on('line', (line) => {
      logFile.write(line + '\n');
      logLines.push(line);
      if (line.includes('gateway started')) resolve();
      if (!line.includes('"migration completed"') && !line.includes('"migration failed"')) return;
      let f: FinishedLine;
      try {
        f = JSON.parse(line) as FinishedLine;
      } catch {
        return;
      }
      if (f.direction && f.result) {
        reports.push({ vm: f.vm ?? '', direction: f.direction, result: f.result, error: f.error ?? null, streamBytes: f.streamBytes ?? 0, ...pageCounts(f), snapshotId: f.snapshotId ?? null, verbatim: f.verbatim ?? null, postcopy: f.postcopy ?? false, compressionSavedBytes: f.compressionSavedBytes ?? 0, storeReadBytes: f.storeReadBytes ?? 0, storeWrittenBytes: f.storeWrittenBytes ?? 0 });
      }
    });
    child.once('exit', (code) => {
      exited = true;
      reject(new Error(`gateway ${configPath} exited with code ${code} before it started (log: ${logPath})`));
    });
  });
  return {
    reports,
    cpu: () => (exited || child.pid === undefined ? null : cpuTime(procStats(child.pid))),
    peakRssMiB: () => (exited || child.pid === undefined ? null : procStats(child.pid).peakRssMiB),
    pid: child.pid ?? null,
    alive: () => !exited,
    logLines,
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
