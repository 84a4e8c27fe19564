/**
 * How a migration's extra channels should cross the WAN: one connection per channel (what the gateways
 * do, gateway/channel-relay.ts) or all channels multiplexed over one connection. Loopback, through the
 * user-space WAN emulator (src/lab/wan) at 20 ms RTT, in this process.
 *
 *   npx tsc -p tsconfig.json && node dist/bench/channels-wan.js [MiB per channel=64] [channels=4]
 *
 * For each layout:
 *   - bulk: `channels` channels each send `MiB` of random bytes at once, unlimited rate (what limits
 *     them is TCP's window over the 20 ms round trip); the figure is the time until the far side has
 *     every byte, and the aggregate Mbit/s;
 *   - urgent: while one channel sends bulk at 100 Mbit/s, a 64-byte message (a page the postcopy
 *     destination waits for) is sent on another channel every 50 ms; the figure is its one-way latency
 *     (median and worst), against the 10 ms the link itself takes.
 * The emulator shapes each connection on its own here (`perConnection`), as when these figures were first
 * measured, so with a rate only the urgent figure compares the layouts fairly: one bulk and one urgent
 * channel, on one shaped connection or on two.
 */
import { randomBytes } from 'node:crypto';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { performance } from 'node:perf_hooks';
import { WanEmulator } from '../src/lab/wan';
import { benchPositionals, numberArg } from './command-line';

const MiB = 1024 * 1024;
const LOOPBACK = '127.0.0.1';
const ONE_WAY_MS = 10;
const CHUNK = 256 * 1024;
/** Multiplexed frames: u8 channel | u32 length | payload. */
const MUX_HEADER = 5;
const URGENT_BYTES = 64;

type Layout = 'per-channel' | 'multiplexed';

/** The far end: counts bytes per channel, and timestamps urgent messages (channel 255) as they arrive. */
class Sink {
  readonly server: Server;
  received = 0;
  readonly urgentAt: number[] = [];
  onBytes: () => void = () => undefined;

  constructor(layout: Layout) {
    this.server = createServer((socket) => (layout === 'multiplexed' ? this.demux(socket) : this.channel(socket)));
  }

  /** A per-channel connection: its first byte says which channel it is. */
  private channel(socket: Socket): void {
    let urgent: boolean | null = null;
    let pending = 0;
    socket.on('data', (chunk: Buffer) => {
      if (urgent === null) {
        urgent = chunk[0] === 255;
        chunk = chunk.subarray(1);
      }
      if (!urgent) return this.bulk(chunk.length);
      pending += chunk.length;
      for (; pending >= URGENT_BYTES; pending -= URGENT_BYTES) this.urgentAt.push(performance.now());
    });
  }

  private demux(socket: Socket): void {
    let buffered: Buffer = Buffer.alloc(0);
    socket.on('data', (chunk: Buffer) => {
      buffered = buffered.length === 0 ? chunk : Buffer.concat([buffered, chunk]);
      while (buffered.length >= MUX_HEADER) {
        const length = buffered.readUInt32BE(1);
        if (buffered.length < MUX_HEADER + length) break;
        if (buffered[0] === 255) this.urgentAt.push(performance.now());
        else this.bulk(length);
        buffered = buffered.subarray(MUX_HEADER + length);
      }
    });
  }

  private bulk(bytes: number): void {
    this.received += bytes;
    this.onBytes();
  }
}

async function listen(server: Server): Promise<number> {
  await new Promise<void>((r) => server.listen(0, LOOPBACK, () => r()));
  return (server.address() as { port: number }).port;
}

function dial(port: number): Promise<Socket> {
  return new Promise((resolve) => {
    const socket = connect({ host: LOOPBACK, port, noDelay: true }, () => resolve(socket));
  });
}

/** Writes `bytes` on `socket` in chunks, each behind `header(chunk)`, waiting for 'drain'. */
async function pump(socket: Socket, total: number, header: (length: number) => Buffer | null, block: Buffer): Promise<void> {
  for (let sent = 0; sent < total; sent += CHUNK) {
    const length = Math.min(CHUNK, total - sent);
    const h = header(length);
    if (h) socket.write(h);
    if (!socket.write(block.subarray(0, length))) await new Promise((r) => socket.once('drain', r));
  }
}

const muxHeader = (channel: number, length: number): Buffer => {
  const h = Buffer.alloc(MUX_HEADER);
  h[0] = channel;
  h.writeUInt32BE(length, 1);
  return h;
};

async function setUp(layout: Layout, rateMbit: number): Promise<{ sink: Sink; wanPort: number; close: () => Promise<void> }> {
  const sink = new Sink(layout);
  const sinkPort = await listen(sink.server);
  const wan = new WanEmulator({ listen: { host: LOOPBACK, port: 0 }, target: { host: LOOPBACK, port: sinkPort }, rateMbit, delayMs: ONE_WAY_MS, perConnection: true });
  const wanPort = (await wan.listen()).port;
  return { sink, wanPort, close: async () => (await wan.close(), await new Promise<void>((r) => sink.server.close(() => r()))) };
}

async function bulk(layout: Layout, channels: number, bytesEach: number): Promise<{ seconds: number; mbit: number }> {
  const { sink, wanPort, close } = await setUp(layout, 0);
  const block = randomBytes(CHUNK);
  const total = channels * bytesEach;
  const done = new Promise<void>((r) => (sink.onBytes = () => sink.received >= total && r()));
  const start = performance.now();
  if (layout === 'per-channel') {
    const sockets = await Promise.all(Array.from({ length: channels }, () => dial(wanPort)));
    await Promise.all(sockets.map((s, i) => (s.write(Buffer.from([i])), pump(s, bytesEach, () => null, block))));
    await done;
    for (const s of sockets) s.destroy();
  } else {
    const socket = await dial(wanPort);
    // The channels' chunks interleave on the one connection, as a multiplexing gateway would send them.
    await pump(socket, total, (length) => muxHeader(0, length), block);
    await done;
    socket.destroy();
  }
  const seconds = (performance.now() - start) / 1000;
  await close();
  return { seconds, mbit: (total * 8) / seconds / 1e6 };
}

async function urgent(layout: Layout, rateMbit: number, messages: number): Promise<{ medianMs: number; worstMs: number }> {
  const { sink, wanPort, close } = await setUp(layout, rateMbit);
  const block = randomBytes(CHUNK);
  const bulkSocket = await dial(wanPort);
  const urgentSocket = layout === 'per-channel' ? await dial(wanPort) : bulkSocket;
  if (layout === 'per-channel') {
    bulkSocket.write(Buffer.from([0]));
    urgentSocket.write(Buffer.from([255]));
  }
  let stop = false;
  // Left waiting for a 'drain' that never comes once its socket is destroyed.
  void (async () => {
    while (!stop) await pump(bulkSocket, 4 * CHUNK, (length) => (layout === 'multiplexed' ? muxHeader(0, length) : null), block);
  })();
  await new Promise((r) => setTimeout(r, 1000)); // the bulk channel fills the link and its queues
  const sentAt: number[] = [];
  for (let i = 0; i < messages; i++) {
    sentAt.push(performance.now());
    if (layout === 'multiplexed') urgentSocket.write(muxHeader(255, URGENT_BYTES));
    urgentSocket.write(Buffer.alloc(URGENT_BYTES, 1));
    await new Promise((r) => setTimeout(r, 50));
  }
  while (sink.urgentAt.length < messages) await new Promise((r) => setTimeout(r, 20));
  stop = true;
  bulkSocket.destroy();
  urgentSocket.destroy();
  await close();
  const latencies = sentAt.map((t, i) => sink.urgentAt[i] - t).sort((x, y) => x - y);
  return { medianMs: latencies[latencies.length >> 1], worstMs: latencies[latencies.length - 1] };
}

async function main(): Promise<void> {
  const argv = benchPositionals();
  const mib = numberArg(argv[0], 64, 'MiB');
  const channels = numberArg(argv[1], 4, 'channels');
  console.log(`extra channels across the WAN emulator: ${2 * ONE_WAY_MS} ms RTT; ${channels} channels × ${mib} MiB bulk (unlimited rate); urgent 64 B every 50 ms behind 100 Mbit/s bulk`);
  for (const layout of ['per-channel', 'multiplexed'] as const) {
    const b = await bulk(layout, channels, mib * MiB);
    const u = await urgent(layout, 100, 20);
    console.log(
      `${layout.padEnd(12)} bulk: ${b.seconds.toFixed(2)} s (${b.mbit.toFixed(0)} Mbit/s)   urgent message: median ${u.medianMs.toFixed(1)} ms, worst ${u.worstMs.toFixed(1)} ms (link: ${ONE_WAY_MS} ms)`,
    );
  }
}

void main().then(() => process.exit(0));
