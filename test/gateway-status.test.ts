/**
 * A migration's live view while it is in flight: GET /status on the metrics listener, `bfmig status`,
 * progress lines and stall detection, with a source stand-in that goes quiet halfway through its stream
 * (a migration that stops moving) and later sends the rest.
 */
import { execFile, spawn } from 'node:child_process';
import * as http from 'node:http';
import * as path from 'node:path';
import { promisify } from 'node:util';
import type { Endpoint } from '../src/gateway/address';
import type { GatewayStatus } from '../src/gateway/gateway';
import type { MigrationStatus } from '../src/gateway/progress';
import { PACKAGE_ROOT } from '../src/digest/package-root';
import { startPair, stopPair, type TestSite, waitFor } from '../src/lab/harness/gateway-pair';
import { checkingDestination, pausingSource } from '../src/lab/harness/qemu-standins';
import { syntheticStream } from '../src/lab/harness/synthetic-stream';
import { X86_PAGE_SIZE } from '../src/qemu/constants';
import { suiteTempDir } from './temp-dir';

const PROGRESS = 'progress:\n  logSeconds: 1\n  stallSeconds: 1\n';

function get(at: Endpoint, urlPath: string): Promise<{ status: number; type: string | undefined; body: string }> {
  return new Promise((resolve, reject) => {
    http
      .get({ host: at.host, port: at.port, path: urlPath }, (res) => {
        const parts: Buffer[] = [];
        res.on('data', (b: Buffer) => parts.push(b));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, type: res.headers['content-type'], body: Buffer.concat(parts).toString('utf8') }));
      })
      .on('error', reject);
  });
}

async function statusOf(site: TestSite): Promise<GatewayStatus> {
  const reply = await get(metricsAt(site), '/status');
  expect(reply.status).toBe(200);
  expect(reply.type).toMatch(/^application\/json/);
  return JSON.parse(reply.body) as GatewayStatus;
}

function metricsAt(site: TestSite): Endpoint {
  const at = site.gateway.bound.get('metrics');
  if (!at) throw new Error(`${site.name} serves no metrics`);
  return at;
}

const bfmig = (args: string[]): Promise<{ stdout: string }> => promisify(execFile)(process.execPath, [path.join(PACKAGE_ROOT, 'bin', 'bfmig.js'), ...args]);

describe('a migration in flight: /status, bfmig status, progress lines, stalls', () => {
  let tmp = '';
  let a: TestSite;
  let b: TestSite;
  const { stream, pages } = syntheticStream(0.004, 256);
  const pauseAt = Math.floor(stream.length / 2);

  beforeAll(async () => {
    tmp = suiteTempDir('bfmig-status-');
    [a, b] = await startPair(tmp, [PROGRESS, PROGRESS]);
  });

  afterAll(() => stopPair([a, b]));

  test('seen stalled halfway, consistent with the final log, moving again and complete', async () => {
    const destination = await checkingDestination(stream, b.destPort);
    const source = pausingSource(a.routePort, stream, pauseAt);

    // The source has gone quiet: both directions stall, are logged once and counted.
    const stalledLog = (site: TestSite): Record<string, unknown> | undefined => site.logs.find((l) => l.msg === 'migration stalled: no bytes moved');
    await waitFor(() => stalledLog(a) !== undefined && stalledLog(b) !== undefined);
    expect(stalledLog(a)).toMatchObject({ vm: 'vm1', direction: 'send', phase: 'streaming', streamBytes: pauseAt, stallSeconds: 1 });
    expect(stalledLog(b)).toMatchObject({ vm: 'vm1', direction: 'receive', phase: 'streaming' });
    const metricsText = (await get(metricsAt(a), '/metrics')).body;
    expect(metricsText).toContain('bfmig_migrations_stalled{vm="vm1",direction="send"} 1');
    expect(metricsText).toContain('bfmig_migration_stalls_total{vm="vm1",direction="send"} 1');

    const sending = await statusOf(a);
    expect(sending.site).toBe('site-a');
    expect(sending.migrations).toHaveLength(1);
    const send = sending.migrations[0];
    const seen = send.pagesSent + send.pagesReused + send.pagesZero;
    expect(send).toMatchObject({ vm: 'vm1', direction: 'send', phase: 'streaming', qemuBytes: pauseAt, stalled: true, qemuBytesPerSecond: 0, ramBytes: pages * X86_PAGE_SIZE });
    // Half the stream read: about half the guest's pages seen, the rest left, no rate to estimate it by.
    expect(seen).toBeGreaterThan(pages / 3);
    expect(seen).toBeLessThan(pages);
    expect(send.remainingBytes).toBe((pages - seen) * X86_PAGE_SIZE);
    expect(send.etaSeconds).toBeNull();
    expect(send.wanBytes).toBeGreaterThan(0);
    expect(send.saving).toBeCloseTo(1 - send.wanBytes / send.qemuBytes, 10);
    expect(send.elapsedSeconds).toBeGreaterThanOrEqual(1);
    const receive = (await statusOf(b)).migrations[0] as MigrationStatus;
    expect(receive).toMatchObject({ vm: 'vm1', direction: 'receive', stalled: true, ramBytes: pages * X86_PAGE_SIZE });
    // What the receiver took off the WAN is what the sender has put on it (nothing moves now).
    expect(receive.wanBytes).toBe(send.wanBytes);

    // bfmig status, as JSON and as a table, says the same.
    const json = JSON.parse((await bfmig(['status', '--gateway', `127.0.0.1:${metricsAt(a).port}`, '--json'])).stdout) as GatewayStatus;
    expect(json.migrations.map((m) => ({ ...m, elapsedSeconds: 0 }))).toEqual([{ ...send, elapsedSeconds: 0 }]);
    const table = (await bfmig(['status', '--gateway', `127.0.0.1:${metricsAt(a).port}`])).stdout;
    expect(table).toMatch(/^site-a at .*: 1 in flight\n/);
    expect(table).toMatch(/^vm1 +send +streaming! /m);

    // A progress line every logSeconds while it is in flight.
    const progressLine = a.logs.find((l) => l.msg === 'migration progress');
    expect(progressLine).toMatchObject({ vm: 'vm1', direction: 'send', ramBytes: pages * X86_PAGE_SIZE });

    source.go();
    await waitFor(() => a.logs.some((l) => l.msg === 'migration moving again') && b.logs.some((l) => l.msg === 'migration moving again'));
    expect(await destination.done).toBe(stream.length);
    await source.closed;
    await waitFor(() => a.logs.some((l) => l.msg === 'migration completed') && b.logs.some((l) => l.msg === 'migration completed'));
    const completed = a.logs.find((l) => l.msg === 'migration completed') as Record<string, number>;
    // What /status said halfway is a part of what the final log says.
    expect(completed.streamBytes).toBe(stream.length);
    expect(completed.pagesSent + completed.pagesReused + completed.pagesZero).toBe(pages);
    expect(completed.pagesSent).toBeGreaterThanOrEqual(send.pagesSent);
    expect(completed.wanBytes).toBeGreaterThan(send.wanBytes);
    expect(completed.seconds).toBeGreaterThan(send.elapsedSeconds);
    // Over: out of /status, the gauge back to 0, the stall counted once.
    expect((await statusOf(a)).migrations).toEqual([]);
    expect((await statusOf(b)).migrations).toEqual([]);
    const after = (await get(metricsAt(a), '/metrics')).body;
    expect(after).toContain('bfmig_migrations_stalled{vm="vm1",direction="send"} 0');
    expect(after).toContain('bfmig_migration_stalls_total{vm="vm1",direction="send"} 1');
    expect(a.logs.filter((l) => l.msg === 'migration stalled: no bytes moved')).toHaveLength(1);
  });

  test('bfmig status --watch --json: one line per refresh, until stopped', async () => {
    const child = spawn(process.execPath, [path.join(PACKAGE_ROOT, 'bin', 'bfmig.js'), 'status', '--gateway', `127.0.0.1:${metricsAt(a).port}`, '--watch', '--json']);
    let out = '';
    const lines = await new Promise<string[]>((resolve) => {
      child.stdout.on('data', (chunk: Buffer) => {
        out += chunk.toString();
        const complete = out.split('\n').slice(0, -1);
        if (complete.length >= 2) resolve(complete);
      });
    });
    child.kill();
    const answers = lines.map((l) => JSON.parse(l) as GatewayStatus);
    expect(answers.map((s) => ({ site: s.site, migrations: s.migrations }))).toEqual([
      { site: 'site-a', migrations: [] },
      { site: 'site-a', migrations: [] },
    ]);
    expect(answers[1].time > answers[0].time).toBe(true);
  });

  test('bfmig status: a gateway that cannot be asked exits 1', async () => {
    await expect(bfmig(['status', '--gateway', `127.0.0.1:${a.peerPort}`, '--json'])).rejects.toMatchObject({ code: 1 });
  });
});
