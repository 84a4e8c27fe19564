import * as net from 'node:net';
import { afterTimeAndReads } from '../src/gateway/after-reads';

/** A connected loopback pair: what `client` writes, `server` reads. */
async function socketPair(): Promise<{ client: net.Socket; server: net.Socket; close: () => void }> {
  const listener = net.createServer();
  await new Promise<void>((resolve) => listener.listen(0, '127.0.0.1', resolve));
  const accepted = new Promise<net.Socket>((resolve) => listener.once('connection', resolve));
  const client = net.connect((listener.address() as net.AddressInfo).port, '127.0.0.1');
  await new Promise<void>((resolve) => client.once('connect', resolve));
  const server = await accepted;
  return { client, server, close: () => (client.destroy(), server.destroy(), listener.close()) };
}

/** Holds the event loop, as a synchronous store read or a long collection does. */
function holdLoop(ms: number): void {
  const until = Date.now() + ms;
  while (Date.now() < until) {
    // busy: nothing else runs
  }
}

test('a timer the event loop held up past its time runs after the bytes that arrived meanwhile are read', async () => {
  const { client, server, close } = await socketPair();
  try {
    const order: string[] = [];
    server.on('data', () => order.push('read'));
    // What Node does by itself: the expired timer first, the socket's bytes after it.
    const plain = new Promise<void>((resolve) => setTimeout(() => (order.push('plain timer'), resolve()), 10));
    client.write('marker');
    holdLoop(60);
    await plain;
    await new Promise<void>((resolve) => setImmediate(resolve));
    expect(order).toEqual(['plain timer', 'read']);

    order.length = 0;
    const handedOver = new Promise<void>((resolve) => afterTimeAndReads(10, () => (order.push('timer'), resolve())));
    client.write('marker');
    holdLoop(60);
    await handedOver;
    expect(order).toEqual(['read', 'timer']);
  } finally {
    close();
  }
});
