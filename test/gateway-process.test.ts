/**
 * What the README promises of the `bfmig gateway` process itself: SIGTERM during a migration stops
 * new connections but lets the running migration finish (shutdownGraceSeconds), then exits 0; and
 * without a tls: block a config that would carry peer traffic off loopback refuses to start. Every
 * port here is bound as port 0 and read back, never picked before it is bound.
 */
import { type ChildProcessWithoutNullStreams, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { Writable } from 'node:stream';
import { parseEndpoint } from '../src/gateway/address';
import { parseConfig } from '../src/gateway/config';
import { Gateway } from '../src/gateway/gateway';
import { createLogger } from '../src/gateway/log';
import { PACKAGE_ROOT } from '../src/digest/package-root';
import { guestMemory, migrationStream } from '../src/lab/harness/migration-stream';

const BFMIG = path.join(PACKAGE_ROOT, 'bin', 'bfmig.js');

interface LogLine {
  msg: string;
  [key: string]: unknown;
}

/** A `bfmig gateway` child process whose JSON log lines are collected; `line()` waits for one. */
function gatewayProcess(config: string): { child: ChildProcessWithoutNullStreams; line: (msg: string) => Promise<LogLine>; exited: Promise<{ code: number | null; stderr: string }> } {
  const child = spawn(process.execPath, [BFMIG, 'gateway', '--config', config], { stdio: ['pipe', 'pipe', 'pipe'] });
  const lines: LogLine[] = [];
  const waiting: Array<{ msg: string; found: (l: LogLine) => void }> = [];
  let partial = '';
  let stderr = '';
  child.stdout.on('data', (b: Buffer) => {
    partial += b.toString();
    const complete = partial.split('\n');
    partial = complete.pop() ?? '';
    for (const text of complete.filter(Boolean)) {
      const l = JSON.parse(text) as LogLine;
      lines.push(l);
      for (const w of waiting.filter((x) => x.msg === l.msg)) w.found(l);
    }
  });
  child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
  const exited = new Promise<{ code: number | null; stderr: string }>((r) => child.on('exit', (code) => r({ code, stderr })));
  const line = (msg: string): Promise<LogLine> =>
    new Promise((found) => {
      const seen = lines.find((l) => l.msg === msg);
      if (seen) found(seen);
      else waiting.push({ msg, found });
    });
  return { child, line, exited };
}

/** A destination stand-in on a port of its own choosing: keeps what it gets, reports how many bytes so far. */
async function destination(): Promise<{ port: number; given: () => number; received: Promise<Buffer> }> {
  const parts: Buffer[] = [];
  let given = 0;
  let done!: (b: Buffer) => void;
  const received = new Promise<Buffer>((r) => (done = r));
  const server = net.createServer((socket) => {
    server.close();
    socket.on('data', (b: Buffer) => {
      parts.push(b);
      given += b.length;
    });
    socket.on('error', () => undefined);
    socket.on('end', () => socket.end());
    socket.on('close', () => done(Buffer.concat(parts)));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return { port: (server.address() as net.AddressInfo).port, given: () => given, received };
}

async function until(condition: () => boolean): Promise<void> {
  while (!condition()) await new Promise((r) => setTimeout(r, 20));
}

describe('the bfmig gateway process', () => {
  let tmp = '';
  beforeAll(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'bfmig-process-'));
  });
  afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

  test('SIGTERM during a migration: no new connection is taken, the running migration completes, the process exits 0', async () => {
    const dest = await destination();
    // Site B, the receiving gateway, is the child process.
    const configB = path.join(tmp, 'site-b.yaml');
    fs.writeFileSync(configB, ['name: site-b', `data: ${path.join(tmp, 'site-b')}`, 'peerListen: 127.0.0.1:0', 'shutdownGraceSeconds: 60', 'allowTargets:', '  - 127.0.0.0/8:*', ''].join('\n'));
    const b = gatewayProcess(configB);
    const started = await b.line('gateway started');
    const peerB = parseEndpoint((started.listening as Record<string, string>).peer);

    // Site A, the sending gateway, in this process.
    const yamlA = ['name: site-a', `data: ${path.join(tmp, 'site-a')}`, 'peerListen: 127.0.0.1:0', 'routes:', '  - vm: vm1', '    listen: 127.0.0.1:0', `    peer: 127.0.0.1:${peerB.port}`, `    target: 127.0.0.1:${dest.port}`, ''].join('\n');
    const sink = new Writable({ write: (_chunk, _enc, cb) => cb() });
    const a = new Gateway(parseConfig(yamlA, path.join(tmp, 'site-a.yaml')), createLogger({ name: 'site-a', destination: sink }), null);
    await a.start();
    try {
      const routeA = a.bound.get('route:vm1')?.port ?? 0;
      const stream = migrationStream(guestMemory([['pc.ram', 2000]], 41), []);
      const half = stream.length >> 1;
      const source = net.connect({ host: '127.0.0.1', port: routeA });
      let reset = false;
      source.on('error', () => (reset = true));
      source.resume();
      const sourceClosed = new Promise<void>((r) => source.on('close', () => r()));
      source.write(stream.subarray(0, half));
      // The migration is running: the destination is getting its bytes.
      await until(() => dest.given() > 0);
      b.child.kill('SIGTERM');
      expect(await b.line('waiting for running migrations')).toMatchObject({ running: 1 });
      // No new connection is taken any more: the peer listener is closed.
      const refused = await new Promise<boolean>((r) => {
        const probe = net.connect({ host: '127.0.0.1', port: peerB.port });
        probe.on('connect', () => {
          probe.destroy();
          r(false);
        });
        probe.on('error', () => r(true));
      });
      expect(refused).toBe(true);
      // The running migration goes on to its end.
      source.end(stream.subarray(half));
      await sourceClosed;
      expect(reset).toBe(false);
      const got = await dest.received;
      expect(got.equals(stream)).toBe(true);
      expect(await b.line('migration completed')).toMatchObject({ vm: 'vm1', direction: 'receive' });
      await b.line('gateway stopped');
      expect((await b.exited).code).toBe(0);
      await until(() => a.history.length === 1);
      expect(a.history[0]).toMatchObject({ direction: 'send', result: 'completed' });
    } finally {
      b.child.kill('SIGKILL');
      await a.stop(1);
    }
  });

  test.each([
    ['peerListen', 'peerListen: 0.0.0.0:0\n', /peerListen \(0\.0\.0\.0:0\) is not loopback/],
    ['a route\'s peer', 'peerListen: 127.0.0.1:0\nroutes:\n  - vm: vm1\n    listen: 127.0.0.1:0\n    peer: 192.0.2.1:7300\n    target: 127.0.0.1:4444\n', /routes\[0\]\.peer/],
  ])('without tls:, %s off loopback makes the process refuse to start (exit 2) unless insecurePlaintext: true', async (_what, yaml, message) => {
    const file = path.join(tmp, 'exposed.yaml');
    fs.writeFileSync(file, `name: site-x\ndata: ${path.join(tmp, 'site-x')}\n${yaml}`);
    const refused = gatewayProcess(file);
    const { code, stderr } = await refused.exited;
    expect(code).toBe(2);
    expect(stderr).toMatch(message);
    expect(stderr).toMatch(/insecurePlaintext: true/);

    // The same config with insecurePlaintext: true starts, with a warning, and stops on SIGTERM.
    fs.writeFileSync(file, `name: site-x\ndata: ${path.join(tmp, 'site-x')}\ninsecurePlaintext: true\n${yaml}`);
    const allowed = gatewayProcess(file);
    expect((await allowed.line('gateway started')).tls).toBe(false);
    allowed.child.kill('SIGTERM');
    expect((await allowed.exited).code).toBe(0);
  });
});
