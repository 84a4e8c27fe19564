/**
 * Backpressure from end to end, through a real gateway pair on plain TCP: while the destination reads
 * nothing, the gateways stop taking the source's stream once their queues and the sockets' buffers
 * are full, instead of buffering the rest; once the destination reads, the stream arrives byte for
 * byte. A gateway that read its source regardless would take the whole stream while the destination
 * stalled, and this test would fail.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { startPair, type TestSite as Site } from '../src/lab/harness/gateway-pair';
import { guestMemory, migrationStream } from '../src/lab/harness/migration-stream';

const MiB = 2 ** 20;

/** Accepts one connection and reads nothing until `resume()`. */
function stalledDestination(port: number): Promise<{ connected: Promise<void>; resume: () => void; received: Promise<Buffer> }> {
  return new Promise((listening) => {
    let done!: (b: Buffer) => void;
    let accepted!: (s: net.Socket) => void;
    const received = new Promise<Buffer>((r) => (done = r));
    const socket = new Promise<net.Socket>((r) => (accepted = r));
    const server = net.createServer({ pauseOnConnect: true }, (s) => {
      server.close();
      const parts: Buffer[] = [];
      s.on('data', (b: Buffer) => parts.push(b));
      s.on('end', () => s.end());
      s.on('close', () => done(Buffer.concat(parts)));
      accepted(s);
    });
    server.listen(port, '127.0.0.1', () =>
      listening({ connected: socket.then(() => undefined), resume: () => void socket.then((s) => s.resume()), received }),
    );
  });
}

/** A source that writes `stream` in 1 MiB pieces, each only once the socket has taken the last ('drain'). */
function pacedSource(port: number, stream: Buffer): { taken: () => number; closed: Promise<'closed' | 'reset'> } {
  let taken = 0;
  const socket = net.connect({ host: '127.0.0.1', port });
  let reset = false;
  socket.on('error', () => (reset = true));
  socket.resume();
  const closed = new Promise<'closed' | 'reset'>((r) => socket.on('close', () => r(reset ? 'reset' : 'closed')));
  const writeFrom = (offset: number): void => {
    for (let at = offset; at < stream.length; at += MiB) {
      const piece = stream.subarray(at, Math.min(at + MiB, stream.length));
      // The callback runs once the kernel has the piece: what the gateway's side has taken.
      const more = socket.write(piece, () => (taken += piece.length));
      if (!more) return void socket.once('drain', () => writeFrom(at + MiB));
    }
    socket.end();
  };
  socket.once('connect', () => writeFrom(0));
  return { taken: () => taken, closed };
}

/** Resolves once `value()` has not changed for `quietMs` (checked every 50 ms), or rejects after `limitMs`. */
async function settled(value: () => number, quietMs: number, limitMs = 30_000): Promise<number> {
  const until = Date.now() + limitMs;
  let last = value();
  let since = Date.now();
  while (Date.now() - since < quietMs) {
    if (Date.now() > until) throw new Error(`still moving after ${limitMs} ms`);
    await new Promise((r) => setTimeout(r, 50));
    if (value() !== last) {
      last = value();
      since = Date.now();
    }
  }
  return last;
}

describe('a destination that stops reading', () => {
  let tmp = '';
  let a: Site;
  let b: Site;

  beforeAll(async () => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'bfmig-stall-'));
    [a, b] = await startPair(tmp);
  });

  afterAll(async () => {
    await a.gateway.stop(1);
    await b.gateway.stop(1);
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  test('stalls the source once the queues between them are full, and the stream then arrives whole', async () => {
    // 80 MiB of guest pages, none zero: far more than every queue and socket buffer on the way hold.
    const stream = migrationStream(guestMemory([['pc.ram', 20_480]], 77, 0), []);
    const dest = await stalledDestination(b.destPort);
    const source = pacedSource(a.routePort, stream);
    await dest.connected;
    const taken = await settled(source.taken, 1000);
    console.log(`taken while stalled: ${(taken / MiB).toFixed(1)} MiB of ${(stream.length / MiB).toFixed(0)}`);
    // Three TCP connections (their kernel buffers: a few MiB each on loopback), the sender's 256 KiB
    // WAN queue, the receiver's 1 MiB destination queue and its read buffers: 13 MiB here, well under
    // half the stream.
    expect(taken).toBeGreaterThan(0);
    expect(taken).toBeLessThan(40 * MiB);
    dest.resume();
    expect(await source.closed).toBe('closed');
    const got = await dest.received;
    expect(got.length).toBe(stream.length);
    expect(got.equals(stream)).toBe(true);
  });
});
