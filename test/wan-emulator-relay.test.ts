/**
 * Correctness of the WAN emulator and the plain TCP relay (loopback only). No timing assertions:
 * rates and delays are measured by bench/wan.ts.
 */
import { createHash, randomBytes } from 'node:crypto';
import { createServer, connect, type Server, type Socket } from 'node:net';
import type { Endpoint } from '../src/gateway/address';
import { TcpRelay, WanEmulator } from '../src/lab/wan';

const MiB = 1024 * 1024;
const LOOPBACK: Endpoint = { host: '127.0.0.1', port: 0 };

function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function until(what: string, cond: () => boolean, timeoutMs = 20000): Promise<void> {
  const t0 = Date.now();
  while (!cond()) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

/** A server on loopback; each accepted socket goes to `handler`. */
async function startServer(handler: (s: Socket) => void): Promise<{ server: Server; endpoint: Endpoint; sockets: Socket[] }> {
  const sockets: Socket[] = [];
  const server = createServer({ allowHalfOpen: true }, (s) => {
    sockets.push(s);
    s.on('error', () => undefined);
    handler(s);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address();
  if (address === null || typeof address === 'string') throw new Error('no address');
  return { server, endpoint: { host: '127.0.0.1', port: address.port }, sockets };
}

async function stopServer(s: { server: Server; sockets: Socket[] }): Promise<void> {
  for (const socket of s.sockets) socket.destroy();
  await new Promise<void>((resolve) => s.server.close(() => resolve()));
}

/**
 * Client sockets dialled by a test, destroyed after it: one that only saw the relay's end stays half-open
 * (allowHalfOpen), and a socket left open keeps the jest worker from exiting when the run ends.
 */
const dialled = new Set<Socket>();
afterEach(() => {
  for (const s of dialled) s.destroy();
  dialled.clear();
});

function dial(at: Endpoint): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = connect({ host: at.host, port: at.port, allowHalfOpen: true });
    dialled.add(s);
    s.once('connect', () => {
      s.off('error', reject);
      resolve(s);
    });
    s.once('error', reject);
  });
}

/** Writes `data` in pieces of varying size, waiting for 'drain' when write() says so, then ends. */
async function writeAll(s: Socket, data: Buffer, progress?: (written: number) => void): Promise<void> {
  const sizes = [1, 1000, 4096, 65536, 100_000, 7, 300_000, 1_048_576];
  let off = 0;
  for (let i = 0; off < data.length; i++) {
    const end = Math.min(data.length, off + sizes[i % sizes.length]);
    const ok = s.write(data.subarray(off, end));
    off = end;
    progress?.(off);
    if (!ok) await new Promise<void>((resolve, reject) => {
      const onClose = (): void => reject(new Error('socket closed while writing'));
      s.once('close', onClose);
      s.once('drain', () => {
        s.off('close', onClose);
        resolve();
      });
    });
  }
  s.end();
}

/** Resolves when the relay has ended or destroyed its side: `s` sees the end of stream or closes. */
function ended(s: Socket): Promise<void> {
  return new Promise((resolve) => {
    s.once('end', resolve);
    s.once('close', resolve);
  });
}

interface Received {
  bytes: number;
  sha256: string;
}

/** Reads `s` to its end. */
function readAll(s: Socket): Promise<Received> {
  return new Promise((resolve, reject) => {
    const hash = createHash('sha256');
    let bytes = 0;
    s.on('data', (chunk: Buffer) => {
      bytes += chunk.length;
      hash.update(chunk);
    });
    s.once('end', () => resolve({ bytes, sha256: hash.digest('hex') }));
    s.once('error', reject);
  });
}

interface Relay {
  listen(): Promise<Endpoint>;
  close(): Promise<void>;
  readonly bytesForward: number;
  readonly bytesBackward: number;
}

/**
 * Sends `up` from a client through `relay` to a target while the target sends `down` back, both
 * at once, and checks that each side receives the other's bytes exactly.
 */
async function bothWays(make: (target: Endpoint) => Relay, up: Buffer, down: Buffer): Promise<void> {
  let targetGot: Promise<Received> | null = null;
  let targetSent: Promise<void> | null = null;
  const target = await startServer((s) => {
    targetGot = readAll(s);
    targetSent = writeAll(s, down);
  });
  const relay = make(target.endpoint);
  try {
    const at = await relay.listen();
    const client = await dial(at);
    const clientGot = readAll(client);
    await writeAll(client, up);
    const got = await clientGot;
    await until('the target to accept', () => targetGot !== null);
    await targetSent;
    const tgot = await (targetGot as unknown as Promise<Received>);
    expect(tgot.bytes).toBe(up.length);
    expect(tgot.sha256).toBe(sha256(up));
    expect(got.bytes).toBe(down.length);
    expect(got.sha256).toBe(sha256(down));
    expect(relay.bytesForward).toBe(up.length);
    expect(relay.bytesBackward).toBe(down.length);
    client.destroy();
  } finally {
    await relay.close();
    await stopServer(target);
  }
}

/** The client half-closes after its request; the target answers only after seeing that end. */
async function halfClose(make: (target: Endpoint) => Relay): Promise<void> {
  const request = randomBytes(3 * MiB + 17);
  const target = await startServer((s) => {
    const parts: Buffer[] = [];
    s.on('data', (c: Buffer) => parts.push(c));
    s.on('end', () => {
      const got = Buffer.concat(parts);
      // Answer: the digest of what arrived, then the bytes themselves.
      s.write(createHash('sha256').update(got).digest());
      s.end(got);
    });
  });
  const relay = make(target.endpoint);
  try {
    const at = await relay.listen();
    const client = await dial(at);
    const parts: Buffer[] = [];
    client.on('data', (c: Buffer) => parts.push(c));
    const ended = new Promise<void>((resolve) => client.once('end', resolve));
    client.end(request);
    await ended;
    const answer = Buffer.concat(parts);
    expect(answer.subarray(0, 32).toString('hex')).toBe(sha256(request));
    expect(answer.length).toBe(32 + request.length);
    expect(answer.subarray(32).equals(request)).toBe(true);
    client.destroy();
  } finally {
    await relay.close();
    await stopServer(target);
  }
}

describe('WanEmulator', () => {
  const up = randomBytes(50 * MiB);
  const down = randomBytes(50 * MiB);

  test('50 MiB each way at once arrive byte-identical (2000 Mbit, 5 ms); counters match', async () => {
    await bothWays((target) => new WanEmulator({ listen: LOOPBACK, target, rateMbit: 2000, delayMs: 5 }), up, down);
  });

  test('unlimited rate and no delay relay byte-identical too', async () => {
    await bothWays((target) => new WanEmulator({ listen: LOOPBACK, target, rateMbit: 0, delayMs: 0 }), up.subarray(0, 8 * MiB), down.subarray(0, 8 * MiB));
    await bothWays(
      (target) => new WanEmulator({ listen: LOOPBACK, target, rateMbit: Infinity, delayMs: 3 }),
      up.subarray(0, 8 * MiB),
      down.subarray(0, 8 * MiB),
    );
  });

  test('a low rate splits chunks and still delivers everything (50 Mbit, small burst)', async () => {
    await bothWays(
      (target) => new WanEmulator({ listen: LOOPBACK, target, rateMbit: 50, delayMs: 2, burstBytes: 20000 }),
      up.subarray(0, 1 * MiB + 3),
      down.subarray(0, 512 * 1024 + 5),
    );
  });

  test('half-close: the end is relayed after the queue drains, the answer comes back', async () => {
    await halfClose((target) => new WanEmulator({ listen: LOOPBACK, target, rateMbit: 500, delayMs: 10 }));
  });

  test('a paused consumer stops the emulator reading; everything arrives after resume', async () => {
    const total = 64 * MiB;
    const data = up.length >= total ? up.subarray(0, total) : Buffer.concat([up, down]).subarray(0, total);
    let consumer: Socket | null = null;
    const target = await startServer((s) => {
      consumer = s;
      s.pause();
    });
    const emu = new WanEmulator({ listen: LOOPBACK, target: target.endpoint, rateMbit: 2000, delayMs: 5 });
    try {
      const at = await emu.listen();
      const client = await dial(at);
      let written = 0;
      const sending = writeAll(client, data, (n) => (written = n));
      // Wait until the sender makes no progress for a while: every buffer on the way is full.
      let last = -1;
      let stable = 0;
      while (stable < 5) {
        await sleep(100);
        const accepted = written - client.writableLength;
        stable = accepted === last ? stable + 1 : 0;
        last = accepted;
      }
      const stats = emu.stats();
      const accepted = written - client.writableLength;
      // Bounded: the emulator's queue plus what the kernel buffers on both legs hold (~10 MiB on
      // Linux loopback, most of it socket buffers) out of the 64 MiB offered.
      expect(accepted).toBeLessThan(24 * MiB);
      expect(client.writableLength).toBeLessThan(2 * MiB);
      expect(stats.forward.pauses).toBeGreaterThan(0);
      // The emulator holds at most its queue bound plus the one read that crossed it ...
      expect(stats.forward.queued).toBeLessThanOrEqual(stats.queueBytes + 64 * 1024);
      // ... and reads nothing more while the consumer stays paused.
      const taken = stats.forward.bytes + stats.forward.queued;
      await sleep(300);
      const later = emu.stats();
      expect(later.forward.bytes + later.forward.queued).toBe(taken);
      expect(written).toBeLessThan(total);
      // Resume the consumer: the rest flows.
      expect(consumer).not.toBeNull();
      const got = readAll(consumer as unknown as Socket);
      (consumer as unknown as Socket).resume();
      await sending;
      const r = await got;
      expect(r.bytes).toBe(total);
      expect(r.sha256).toBe(sha256(data));
      expect(emu.bytesForward).toBe(total);
      expect(emu.stats().forward.queued).toBe(0);
      client.destroy();
    } finally {
      await emu.close();
      await stopServer(target);
    }
  });

  test('a target that refuses the connection closes the client socket', async () => {
    // A port that was free a moment ago, with nothing listening on it now.
    const probe = await startServer(() => undefined);
    const refused = probe.endpoint;
    await stopServer(probe);
    const emu = new WanEmulator({ listen: LOOPBACK, target: refused, rateMbit: 100, delayMs: 20 });
    try {
      const at = await emu.listen();
      const client = await dial(at);
      client.on('error', () => undefined);
      client.write('hello');
      await new Promise<void>((resolve) => client.once('close', () => resolve()));
      await until('the emulator to drop the connection', () => emu.stats().active === 0);
    } finally {
      await emu.close();
    }
  });

  test('close() ends every connection and the listener', async () => {
    const target = await startServer(() => undefined);
    const emu = new WanEmulator({ listen: LOOPBACK, target: target.endpoint, rateMbit: 100, delayMs: 20 });
    const at = await emu.listen();
    const client = await dial(at);
    client.on('error', () => undefined);
    client.write(randomBytes(256 * 1024));
    await until('the target side to connect', () => target.sockets.length === 1);
    const far = target.sockets[0];
    const clientClosed = ended(client);
    const farClosed = ended(far);
    far.resume();
    await emu.close();
    await clientClosed;
    await farClosed;
    expect(emu.stats().active).toBe(0);
    await expect(dial(at)).rejects.toThrow();
    await stopServer(target);
  });

  test('a reset from the target reaches the client', async () => {
    const target = await startServer((s) => s.once('data', () => s.resetAndDestroy()));
    const emu = new WanEmulator({ listen: LOOPBACK, target: target.endpoint, rateMbit: 1000, delayMs: 1 });
    try {
      const client = await dial(await emu.listen());
      const closed = new Promise<Error | null>((resolve) => {
        let err: Error | null = null;
        client.on('error', (e) => (err = e));
        client.once('close', () => resolve(err));
      });
      client.write('x');
      const err = await closed;
      expect(err && (err as NodeJS.ErrnoException).code).toBe('ECONNRESET');
      await until('the emulator to drop the connection', () => emu.stats().active === 0);
    } finally {
      await emu.close();
      await stopServer(target);
    }
  });

  test('a forward mark notes when the bytes sent forward first reach its count, and no sooner', async () => {
    const received: Buffer[] = [];
    const target = await startServer((s) => s.on('data', (chunk: Buffer) => received.push(chunk)));
    const emu = new WanEmulator({ listen: LOOPBACK, target: target.endpoint, rateMbit: 0, delayMs: 0 });
    try {
      const at = await emu.listen();
      const mark = emu.markForward(3 * MiB);
      expect(mark.reachedAt).toBeNull();
      const client = await dial(at);
      client.write(up.subarray(0, 2 * MiB));
      await until('2 MiB through', () => emu.bytesForward >= 2 * MiB);
      expect(mark.reachedAt).toBeNull();
      const before = performance.now();
      client.write(up.subarray(2 * MiB, 4 * MiB));
      await until('the mark', () => mark.reachedAt !== null);
      expect(mark.reachedAt).toBeGreaterThanOrEqual(before);
      expect(emu.bytesForward).toBeGreaterThanOrEqual(3 * MiB);
      // A count already passed is reached at once.
      expect(emu.markForward(1 * MiB).reachedAt).not.toBeNull();
    } finally {
      await emu.close();
      await stopServer(target);
    }
  });

  test('options are checked', () => {
    const target = { host: '127.0.0.1', port: 1 };
    expect(() => new WanEmulator({ listen: LOOPBACK, target, rateMbit: -1, delayMs: 0 })).toThrow(/rateMbit/);
    expect(() => new WanEmulator({ listen: LOOPBACK, target, rateMbit: 1, delayMs: NaN })).toThrow(/delayMs/);
  });
});

describe('TcpRelay', () => {
  test('50 MiB each way at once arrive byte-identical; counters match', async () => {
    await bothWays((target) => new TcpRelay({ listen: LOOPBACK, target }), randomBytes(50 * MiB), randomBytes(50 * MiB));
  });

  test('half-close is relayed', async () => {
    await halfClose((target) => new TcpRelay({ listen: LOOPBACK, target }));
  });

  test('a refused target closes the client; close() ends everything', async () => {
    const probe = await startServer(() => undefined);
    const refused = probe.endpoint;
    await stopServer(probe);
    const relay = new TcpRelay({ listen: LOOPBACK, target: refused });
    const client = await dial(await relay.listen());
    client.on('error', () => undefined);
    await new Promise<void>((resolve) => client.once('close', () => resolve()));

    const target = await startServer(() => undefined);
    const relay2 = new TcpRelay({ listen: LOOPBACK, target: target.endpoint });
    const c2 = await dial(await relay2.listen());
    c2.on('error', () => undefined);
    await until('the target side to connect', () => target.sockets.length === 1);
    const closed = ended(c2);
    const farClosed = ended(target.sockets[0]);
    await relay2.close();
    await closed;
    await farClosed;
    expect(relay2.stats().active).toBe(0);
    await relay.close();
    await stopServer(target);
  });
});
