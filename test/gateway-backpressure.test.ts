/**
 * A destination that reads slowly, through a real gateway pair on plain TCP: the receiving gateway
 * pauses its frame parser and its peer connection while the destination is behind, and reads the peer
 * into reused buffers. The bytes it holds across a pause are views of those buffers; every leg must
 * still reach the destination byte for byte. That the gateways do stop taking the source's stream
 * while the destination reads nothing is observed in gateway-backpressure-stall.test.ts.
 */
import * as net from 'node:net';
import { startPair, stopPair, type TestSite as Site } from '../src/lab/harness/gateway-pair';
import { sourceStandIn as migrate } from '../src/lab/harness/qemu-standins';
import { dirty, guestMemory, migrationStream } from '../src/lab/harness/migration-stream';
import { suiteTempDir } from './temp-dir';

/** Accepts one connection and reads it in small sips: a pause after every chunk. */
function slowDestination(port: number): Promise<{ received: Promise<Buffer> }> {
  return new Promise((listening) => {
    let done: (b: Buffer) => void;
    const received = new Promise<Buffer>((r) => (done = r));
    const server = net.createServer((socket) => {
      server.close();
      const parts: Buffer[] = [];
      let chunks = 0;
      socket.on('data', (b: Buffer) => {
        parts.push(b);
        if (++chunks % 2 === 0) {
          socket.pause();
          setTimeout(() => socket.resume(), 1);
        }
      });
      socket.on('end', () => socket.end());
      socket.on('close', () => done(Buffer.concat(parts)));
    });
    server.listen(port, '127.0.0.1', () => listening({ received }));
  });
}

describe('a slow destination behind the receiving gateway', () => {
  let tmp = '';
  let a: Site;
  let b: Site;

  beforeAll(async () => {
    tmp = suiteTempDir('bfmig-backpressure-');
    [a, b] = await startPair(tmp);
  });

  afterAll(() => stopPair([a, b]));

  test('first leg, back leg and legs with changed pages all arrive byte for byte', async () => {
    const memory = guestMemory([['pc.ram', 6000]], 33);
    const legs: Array<[Site, Site, Buffer]> = [
      [a, b, migrationStream(memory, [dirty(memory, 0.05, 1)])],
      [b, a, migrationStream(memory, [])],
    ];
    // Changed pages between held ones: Runs rebuilt from the store and literal pages alternate.
    for (let k = 0; k < 4; k++) {
      const stream = migrationStream(memory, [dirty(memory, 0.3, 2 + k)]);
      legs.push(k % 2 === 0 ? [a, b, stream] : [b, a, stream]);
    }
    for (const [i, [from, to, stream]] of legs.entries()) {
      const { received } = await slowDestination(to.destPort);
      expect({ leg: i, source: await migrate(from.routePort, stream) }).toEqual({ leg: i, source: 'closed' });
      const got = await received;
      expect({ leg: i, length: got.length }).toEqual({ leg: i, length: stream.length });
      expect({ leg: i, identical: got.equals(stream) }).toEqual({ leg: i, identical: true });
    }
    // The back leg reused what the first left behind, so Runs and literal bytes both crossed the pauses.
    const back = b.gateway.history.find((r) => r.direction === 'send');
    expect(back?.result).toBe('completed');
    expect(back?.counts.pagesReused ?? 0).toBeGreaterThan(1000);
  });
});
