/**
 * A real Prometheus server (Debian's `prometheus`) for the end-to-end tests: loopback, its own temporary
 * directory, deploy/prometheus' rules, scraping the given targets every second in job "bfmig" (the job
 * the alerts look for), and its HTTP query API.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as path from 'node:path';
import type { Endpoint } from '../src/gateway/address';
import { freePort } from '../src/lab/vm/ports';
import { eventually } from './eventually';

export const RULES_FILE = path.join(__dirname, '..', 'deploy', 'prometheus', 'bfmig-rules.yml');

export interface Sample {
  metric: Record<string, string>;
  value: number;
}

export class PrometheusServer {
  private constructor(
    private readonly child: ChildProcess,
    readonly port: number,
    private readonly output: string[],
  ) {}

  /** Starts Prometheus in `dir` scraping `targets` ("site-a" → its metrics endpoint); resolves once it is ready. */
  static async start(dir: string, targets: ReadonlyMap<string, Endpoint>): Promise<PrometheusServer> {
    const port = await freePort();
    const config = [
      'global:',
      '  scrape_interval: 1s',
      '  evaluation_interval: 1s',
      'rule_files:',
      `  - ${JSON.stringify(RULES_FILE)}`,
      'scrape_configs:',
      '  - job_name: bfmig',
      '    static_configs:',
      ...[...targets].flatMap(([site, at]) => [`      - targets: ["${at.host}:${at.port}"]`, `        labels: { site: ${JSON.stringify(site)} }`]),
      '',
    ].join('\n');
    fs.writeFileSync(path.join(dir, 'prometheus.yml'), config);
    const child = spawn(
      'prometheus',
      [`--config.file=${path.join(dir, 'prometheus.yml')}`, `--storage.tsdb.path=${path.join(dir, 'tsdb')}`, `--web.listen-address=127.0.0.1:${port}`, '--log.level=warn'],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    const output: string[] = [];
    child.stdout?.on('data', (d: Buffer) => output.push(d.toString()));
    child.stderr?.on('data', (d: Buffer) => output.push(d.toString()));
    const server = new PrometheusServer(child, port, output);
    await eventually(async () => (await server.get('/-/ready')).status === 200, 30_000, () => `Prometheus not ready:\n${output.join('')}`);
    return server;
  }

  /** An instant query's samples (vector results only). */
  async query(expr: string): Promise<Sample[]> {
    const reply = await this.get(`/api/v1/query?query=${encodeURIComponent(expr)}`);
    const body = JSON.parse(reply.body) as { status: string; error?: string; data?: { resultType: string; result: Array<{ metric: Record<string, string>; value: [number, string] }> } };
    if (body.status !== 'success' || body.data?.resultType !== 'vector') throw new Error(`query ${expr}: ${body.error ?? reply.body}`);
    return body.data.result.map((r) => ({ metric: r.metric, value: Number(r.value[1]) }));
  }

  /** What Prometheus printed (for a failing test's message). */
  get log(): string {
    return this.output.join('');
  }

  stop(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return Promise.resolve();
    return new Promise((resolve) => {
      this.child.once('exit', () => resolve());
      this.child.kill('SIGTERM');
    });
  }

  private get(urlPath: string): Promise<{ status: number; body: string }> {
    return new Promise((resolve) => {
      const req = http.get({ host: '127.0.0.1', port: this.port, path: urlPath }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString() }));
        res.on('error', () => resolve({ status: 0, body: '' }));
      });
      req.on('error', () => resolve({ status: 0, body: '' }));
    });
  }
}
