/** Loopback ports for the tests' servers: free when picked, and never one handed out lately. */
import * as net from 'node:net';
import { freePort } from '../src/lab/vm/ports';

test('ports picked one after another, before any is bound, are all different, and each can be listened on', async () => {
  // Each pick is free when made; nothing binds it until all are made (as a site's ports are picked).
  const ports: number[] = [];
  for (let i = 0; i < 600; i++) ports.push(await freePort());
  expect(new Set(ports).size).toBe(ports.length);
  const servers = await Promise.all(
    ports.map(
      (port) =>
        new Promise<net.Server>((resolve, reject) => {
          const server = net.createServer();
          server.once('error', reject);
          server.listen(port, '127.0.0.1', () => resolve(server));
        }),
    ),
  );
  await Promise.all(servers.map((s) => new Promise((resolve) => s.close(resolve))));
});

test('each jest worker picks from a slice of its own: two workers never pick the same port', async () => {
  const worker = process.env.JEST_WORKER_ID;
  const picks = async (id: string): Promise<number[]> => {
    process.env.JEST_WORKER_ID = id;
    const ports: number[] = [];
    for (let i = 0; i < 200; i++) ports.push(await freePort());
    return ports;
  };
  try {
    const one = await picks('1');
    const two = await picks('2');
    // Slices of one range, one after the other: every pick of one below (or above) every pick of the other.
    expect(Math.max(...one) < Math.min(...two) || Math.max(...two) < Math.min(...one)).toBe(true);
  } finally {
    process.env.JEST_WORKER_ID = worker;
  }
});
