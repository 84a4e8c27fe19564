/**
 * WAN emulator and plain relay benchmark, loopback only.
 *
 *   npx tsc -p tsconfig.json && node dist/bench/wan.js [scale]
 *
 * Each relay under test (WanEmulator or TcpRelay) runs in a child process of its own, so that it
 * has a core to itself as it would in a gateway; the sender, the receiver and the echo server run
 * in this process. For each case:
 *   - throughput: one connection sends a stream of random bytes through the relay to a discarding
 *     server; the figure is the bytes received after the first one over the time from the first to
 *     the last byte received (Mbit/s = 1e6 bit/s);
 *   - both ways: the same, with a stream in each direction at once (figure per direction);
 *   - 4 connections: four streams at once, a quarter of the bytes each; the figure is their bytes over
 *     the time from the first byte of any to the last of all (the emulator's connections share its rate);
 *   - RTT: ping-pong of 64-byte messages on one connection, median and 90th percentile after a
 *     warm-up; "added" is the median minus the configured round trip (2 × the one-way delay).
 * `scale` (default 1) multiplies the bytes sent.
 */
import { randomBytes } from 'node:crypto';
import { fork, type ChildProcess } from 'node:child_process';
import { createServer, connect, type Server, type Socket } from 'node:net';
import type { Endpoint } from '../src/gateway/address';
import { reapWithThisProcess } from '../src/lab/harness/reap-children';
import { TcpRelay, WanEmulator } from '../src/lab/wan';
import { benchPositionals, numberArg } from './command-line';

const MiB = 1024 * 1024;
const LOOPBACK = '127.0.0.1';

interface Case {
  name: string;
  kind: 'direct' | 'relay' | 'emulator';
  rateMbit?: number;
  delayMs?: number;
  /** Bytes each throughput run sends. */
  bytes: number;
  bothWays: boolean;
}

interface ServeRequest {
  kind: 'relay' | 'emulator';
  target: Endpoint;
  rateMbit: number;
  delayMs: number;
}

// ---- child: runs one relay until its parent disconnects ------------------------------------------

async function serve(req: ServeRequest): Promise<void> {
  const listen = { host: LOOPBACK, port: 0 };
  const relay =
    req.kind === 'relay'
      ? new TcpRelay({ listen, target: req.target })
      : new WanEmulator({ listen, target: req.target, rateMbit: req.rateMbit, delayMs: req.delayMs });
  const at = await relay.listen();
  process.on('disconnect', () => {
    void relay.close().then(() => process.exit(0));
  });
  process.send?.({ port: at.port });
}

function startChild(req: ServeRequest): Promise<{ child: ChildProcess; at: Endpoint }> {
  return new Promise((resolve, reject) => {
    const child = fork(__filename, ['serve', JSON.stringify(req)], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    reapWithThisProcess(child);
    child.once('error', reject);
    child.once('exit', (code) => reject(new Error(`relay process exited with ${code}`)));
    child.once('message', (m: { port: number }) => resolve({ child, at: { host: LOOPBACK, port: m.port } }));
  });
}

function stopChild(child: ChildProcess): Promise<void> {
  return new Promise((resolve) => {
    if (child.exitCode !== null) return resolve();
    child.removeAllListeners('exit');
    child.once('exit', () => resolve());
    child.disconnect();
  });
}

// ---- servers in this process ------------------------------------------------------------------

async function startServer(handler: (s: Socket) => void, allowHalfOpen = false): Promise<{ server: Server; at: Endpoint }> {
  const server = createServer({ noDelay: true, allowHalfOpen }, (s) => {
    s.on('error', () => undefined);
    handler(s);
  });
  await new Promise<void>((resolve) => server.listen(0, LOOPBACK, resolve));
  const address = server.address();
  if (address === null || typeof address === 'string') throw new Error('no address');
  return { server, at: { host: LOOPBACK, port: address.port } };
}

function dial(at: Endpoint): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = connect({ host: at.host, port: at.port, noDelay: true, allowHalfOpen: true });
    s.once('connect', () => {
      s.off('error', reject);
      resolve(s);
    });
    s.once('error', reject);
  });
}

const block = randomBytes(1 * MiB);

/** Writes `bytes` bytes (copies of `block`) honouring backpressure, then ends. */
async function send(s: Socket, bytes: number): Promise<void> {
  let left = bytes;
  while (left > 0) {
    const n = Math.min(left, block.length);
    left -= n;
    if (!s.write(n === block.length ? block : block.subarray(0, n))) {
      await new Promise<void>((resolve, reject) => {
        const onClose = (): void => reject(new Error(`closed while sending, ${bytes - left} of ${bytes} bytes written`));
        s.once('close', onClose);
        s.once('drain', () => {
          s.off('close', onClose);
          resolve();
        });
      });
    }
  }
  s.end();
}

interface Arrival {
  bytes: number;
  /** Bytes per second from the first byte to the last. */
  rate: number;
  /** When the first and the last byte arrived (process.hrtime.bigint()). */
  first: bigint;
  last: bigint;
}

/** Counts what arrives on `s` until its end. */
function receive(s: Socket): Promise<Arrival> {
  return new Promise((resolve, reject) => {
    let bytes = 0;
    let first = 0n;
    let firstLen = 0;
    let last = 0n;
    s.on('data', (chunk: Buffer) => {
      const now = process.hrtime.bigint();
      if (bytes === 0) {
        first = now;
        firstLen = chunk.length;
      }
      last = now;
      bytes += chunk.length;
    });
    s.once('end', () => {
      const seconds = Number(last - first) / 1e9;
      resolve({ bytes, rate: seconds > 0 ? (bytes - firstLen) / seconds : NaN, first, last });
    });
    s.once('error', reject);
  });
}

/** Throughput of one stream (or one each way) through `at` to the sink server. */
async function throughput(at: Endpoint, sink: { received: Promise<Arrival>[] }, bytes: number, bothWays: boolean): Promise<Arrival[]> {
  sink.received.length = 0;
  const client = await dial(at);
  const back = bothWays ? receive(client) : null;
  await send(client, bytes);
  if (!bothWays) client.resume();
  while (sink.received.length === 0) await new Promise((r) => setTimeout(r, 5));
  const results = [await sink.received[0]];
  if (back) results.push(await back);
  client.destroy();
  for (const r of results) if (r.bytes !== bytes) throw new Error(`sent ${bytes} bytes, ${r.bytes} arrived`);
  return results;
}

/** Bytes per second of `count` streams at once through `at` to the sink server, `bytes` in all. */
async function parallelThroughput(at: Endpoint, sink: { received: Promise<Arrival>[] }, bytes: number, count: number): Promise<number> {
  sink.received.length = 0;
  const each = Math.floor(bytes / count);
  const clients = await Promise.all(Array.from({ length: count }, () => dial(at)));
  await Promise.all(clients.map((c) => send(c, each).then(() => c.resume())));
  while (sink.received.length < count) await new Promise((r) => setTimeout(r, 5));
  const arrivals = await Promise.all(sink.received);
  for (const c of clients) c.destroy();
  for (const a of arrivals) if (a.bytes !== each) throw new Error(`sent ${each} bytes, ${a.bytes} arrived`);
  const first = arrivals.reduce((m, a) => (a.first < m ? a.first : m), arrivals[0].first);
  const last = arrivals.reduce((m, a) => (a.last > m ? a.last : m), arrivals[0].last);
  return (each * count) / (Number(last - first) / 1e9);
}

/** Ping-pong of `size`-byte messages through `at` to the echo server; RTTs in ms. */
async function pingPong(at: Endpoint, rounds: number, warmup: number, size = 64): Promise<number[]> {
  const client = await dial(at);
  const msg = randomBytes(size);
  const rtts: number[] = [];
  let got = 0;
  let wake: (() => void) | null = null;
  client.on('data', (chunk: Buffer) => {
    got += chunk.length;
    if (got >= size && wake) wake();
  });
  for (let i = 0; i < warmup + rounds; i++) {
    const t0 = process.hrtime.bigint();
    const back = new Promise<void>((resolve) => (wake = resolve));
    client.write(msg);
    await back;
    got -= size;
    wake = null;
    if (i >= warmup) rtts.push(Number(process.hrtime.bigint() - t0) / 1e6);
  }
  client.destroy();
  return rtts;
}

function quantile(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(q * s.length))];
}

// ---- main --------------------------------------------------------------------------------------

async function main(): Promise<void> {
  const argv = benchPositionals();
  const scale = numberArg(argv[0] ?? process.env.BENCH_SCALE, 1, 'scale');
  if (!(scale > 0)) throw new Error(`scale must be > 0, got ${argv[0]}`);
  const cases: Case[] = [
    { name: 'direct loopback (no relay)', kind: 'direct', bytes: 2048 * MiB * scale, bothWays: true },
    { name: 'TcpRelay (plain pipe)', kind: 'relay', bytes: 2048 * MiB * scale, bothWays: true },
    { name: 'WanEmulator unlimited, 0 ms', kind: 'emulator', rateMbit: 0, delayMs: 0, bytes: 2048 * MiB * scale, bothWays: true },
    { name: 'WanEmulator 1000 Mbit, 5 ms', kind: 'emulator', rateMbit: 1000, delayMs: 5, bytes: 256 * MiB * scale, bothWays: true },
    { name: 'WanEmulator 100 Mbit, 20 ms', kind: 'emulator', rateMbit: 100, delayMs: 20, bytes: 48 * MiB * scale, bothWays: true },
  ];

  const sink = { received: [] as Promise<Arrival>[] };
  let currentBytes = 0;
  const discard = await startServer((s) => {
    const r = receive(s);
    sink.received.push(r);
  });
  const echo = await startServer((s) => s.pipe(s));
  const bothSink = await startServer((s) => {
    sink.received.push(receive(s));
    send(s, currentBytes).catch((err: Error) => console.error(`both-ways sink: ${err.message}`));
  }, true);

  const rows: string[][] = [];
  for (const c of cases) {
    const rate = c.rateMbit ?? 0;
    const delay = c.delayMs ?? 0;
    const started: ChildProcess[] = [];
    const via = async (target: Endpoint): Promise<Endpoint> => {
      if (c.kind === 'direct') return target;
      const { child, at } = await startChild({ kind: c.kind, target, rateMbit: rate, delayMs: delay });
      started.push(child);
      return at;
    };
    try {
      const one = await throughput(await via(discard.at), sink, c.bytes, false);
      currentBytes = c.bytes;
      const two = c.bothWays ? await throughput(await via(bothSink.at), sink, c.bytes, true) : null;
      const four = await parallelThroughput(await via(discard.at), sink, c.bytes, 4);
      const rounds = delay >= 10 ? 50 : 200;
      const rtts = await pingPong(await via(echo.at), rounds, 5);
      const mbit = (bps: number): string => ((bps * 8) / 1e6).toFixed(0);
      const pct = (bps: number): string => (rate > 0 ? `${((bps * 8) / 1e6 / rate * 100).toFixed(1)}%` : '');
      const med = quantile(rtts, 0.5);
      rows.push([
        c.name,
        `${(c.bytes / MiB).toFixed(0)} MiB`,
        mbit(one[0].rate),
        pct(one[0].rate),
        two ? `${mbit(two[0].rate)} / ${mbit(two[1].rate)}` : '',
        mbit(four),
        med.toFixed(3),
        quantile(rtts, 0.9).toFixed(3),
        (2 * delay).toFixed(0),
        (med - 2 * delay).toFixed(3),
      ]);
    } finally {
      for (const child of started) await stopChild(child);
    }
  }
  for (const s of [discard, echo, bothSink]) s.server.close();

  const header = ['case', 'sent', 'Mbit/s', 'of rate', 'both ways Mbit/s (fwd / back)', '4 connections Mbit/s', 'RTT p50 ms', 'RTT p90 ms', '2×delay ms', 'added ms'];
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: string[]): string => cells.map((x, i) => (i === 0 ? x.padEnd(widths[i]) : x.padStart(widths[i]))).join('  ');
  console.log(`node ${process.version}, ${process.platform}/${process.arch}; relays in child processes; loopback`);
  console.log(line(header));
  console.log(widths.map((w) => '-'.repeat(w)).join('  '));
  for (const r of rows) console.log(line(r));
}

if (process.argv[2] === 'serve') {
  serve(JSON.parse(process.argv[3]) as ServeRequest).catch((err: unknown) => {
    console.error(err);
    process.exit(1);
  });
} else {
  main().then(
    () => process.exit(0),
    (err: unknown) => {
      console.error(err);
      process.exit(1);
    },
  );
}
