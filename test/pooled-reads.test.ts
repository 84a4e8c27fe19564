/**
 * PooledReads: a connection read into a few reused buffers. Reads come from a real TCP connection;
 * the downstream is a stand-in whose write queue never empties, the case where only the marker write
 * (an empty write that completes once every write before it has) gives buffers back.
 */
import { randomBytes } from 'node:crypto';
import * as net from 'node:net';
import { type PooledDownstream, PooledReads, SOURCE_READ_BYTES } from '../src/gateway/pooled-reads';

/** A downstream that always has bytes queued; `completes` decides whether its writes ever complete. */
function busyDownstream(completes: boolean): PooledDownstream & { markers: number } {
  const d = {
    markers: 0,
    writableLength: 1,
    writableEnded: false,
    destroyed: false,
    write(chunk: Uint8Array, callback: (err?: Error | null) => void): boolean {
      expect(chunk.length).toBe(0);
      d.markers++;
      if (completes) setTimeout(() => callback(), 1);
      return true;
    },
  };
  return d;
}

/**
 * Sends `payload` to a connection that `adopt` takes over, a read's worth every 2 ms (slowly enough that
 * reads go one at a time, so that marker completions keep up); resolves with what `adopt` resolves.
 */
function sendSlowly<T>(payload: Buffer, adopt: (accepted: net.Socket, resolve: (result: T) => void, reject: (err: Error) => void) => void): Promise<T> {
  return new Promise((resolve, reject) => {
    const server = net.createServer({ pauseOnConnect: true }, (accepted) => {
      server.close();
      adopt(accepted, resolve, reject);
    });
    server.listen(0, '127.0.0.1', () => {
      const client = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1', () => {
        let at = 0;
        const step = (): void => {
          if (at >= payload.length) {
            client.end();
            return;
          }
          client.write(payload.subarray(at, at + SOURCE_READ_BYTES));
          at += SOURCE_READ_BYTES;
          setTimeout(step, 2);
        };
        step();
      });
      client.on('error', reject);
    });
  });
}

/** Sends `payload` through a connection adopted by PooledReads; resolves with what was read and the buffers made. */
function readThrough(payload: Buffer, downstream: PooledDownstream): Promise<{ got: Buffer; buffers: number }> {
  return sendSlowly(payload, (accepted, resolve, reject) => {
    const parts: Buffer[] = [];
    const reads = new PooledReads(accepted, downstream, (chunk) => parts.push(Buffer.from(chunk)), false);
    expect(reads.pooled).toBe(true);
    reads.socket.on('end', () => resolve({ got: Buffer.concat(parts), buffers: reads.buffers }));
    reads.socket.on('error', reject);
    reads.socket.resume();
  });
}

const payload = randomBytes(96 * SOURCE_READ_BYTES);

test('with a write queue that never empties, marker writes give the buffers back: a handful serve the whole transfer', async () => {
  const downstream = busyDownstream(true);
  const { got, buffers } = await readThrough(payload, downstream);
  expect(got.equals(payload)).toBe(true);
  expect(downstream.markers).toBeGreaterThan(0);
  expect(buffers).toBeLessThanOrEqual(8);
});

test('without completions nothing comes back (the bound above is the markers’ doing)', async () => {
  const downstream = busyDownstream(false);
  const { got, buffers } = await readThrough(payload, downstream);
  expect(got.equals(payload)).toBe(true);
  // One marker is queued and never completes; every later read needs a fresh buffer.
  expect(downstream.markers).toBe(1);
  expect(buffers).toBeGreaterThan(32);
});

/** A downstream whose queue is always empty: every buffer lent is free again at the next read. */
const idleDownstream: PooledDownstream = { writableLength: 0, writableEnded: false, destroyed: false, write: () => true };

/**
 * Sends `sent` through a connection adopted by PooledReads whose reader holds each read back until the
 * next has come (as a sending gateway does), and takes its bytes only then; with `hold`, telling PooledReads so.
 */
function readHoldingBack(sent: Buffer, hold: boolean): Promise<{ got: Buffer; buffers: number }> {
  return sendSlowly(sent, (accepted, resolve, reject) => {
    const parts: Buffer[] = [];
    let held: Buffer | null = null;
    const reads = new PooledReads(
      accepted,
      idleDownstream,
      (chunk) => {
        if (held !== null) parts.push(Buffer.from(held));
        held = chunk;
        if (hold) reads.hold(chunk);
      },
      false,
    );
    reads.socket.on('end', () => {
      if (held !== null) parts.push(Buffer.from(held));
      resolve({ got: Buffer.concat(parts), buffers: reads.buffers });
    });
    reads.socket.on('error', reject);
    reads.socket.resume();
  });
}

test('a read held back until the next has come keeps its bytes: its buffer is not read into meanwhile', async () => {
  const sent = payload.subarray(0, payload.length / 8);
  const { got, buffers } = await readHoldingBack(sent, true);
  expect(got.equals(sent)).toBe(true);
  // The held buffer and the one being read into.
  expect(buffers).toBe(2);
  // Not told, PooledReads reads into the held buffer again at once: the bytes taken later are another read's.
  const unheld = await readHoldingBack(sent, false);
  expect(unheld.got.equals(sent)).toBe(false);
});
