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
