import type { Server, Socket } from 'node:net';
import type { Endpoint } from '../../gateway/address';

/** Starts `server` listening on `at`; resolves with the bound endpoint (port 0 picks a free one). */
export function listenServer(server: Server, at: Endpoint): Promise<Endpoint> {
  return new Promise((resolve, reject) => {
    const onError = (err: Error): void => reject(err);
    server.once('error', onError);
    server.listen(at.port, at.host, () => {
      server.off('error', onError);
      const address = server.address();
      if (address === null || typeof address === 'string') return reject(new Error('no TCP address'));
      resolve({ host: address.address, port: address.port });
    });
  });
}

/** Stops accepting and destroys every open connection; resolves once the server and all their sockets are closed. */
export async function closeServer(server: Server, live: Iterable<Pair>): Promise<void> {
  const pairs = [...live];
  const closed = new Promise<void>((resolve) => {
    if (!server.listening) return resolve();
    server.close(() => resolve());
  });
  for (const pair of pairs) pair.teardown(false);
  await Promise.all([closed, ...pairs.map((p) => p.closed)]);
}

/**
 * Ends a socket abruptly. With `reset`, a connected socket is closed with a TCP RST, so that an
 * error on one leg reaches the peer on the other leg as an error rather than as a clean end of stream.
 */
export function abort(socket: Socket, reset: boolean): void {
  if (socket.destroyed) return;
  if (reset && !socket.connecting && socket.readyState !== 'closed') socket.resetAndDestroy();
  else socket.destroy();
}

/** One relayed connection: its two sockets, as watched by `watchPair`. */
export interface Pair {
  /** Destroys both sockets (with `reset`, connected ones with a TCP RST). */
  teardown(reset: boolean): void;
  /** Resolves once both sockets are closed. */
  readonly closed: Promise<void>;
}

/**
 * Watches one relayed connection's two sockets: an error on either, or a close that was not the
 * clean end of both of its directions, tears the pair down. `cleanEnd(s)` tells whether socket `s`
 * closed after its read side saw the end and its write side was ended by the relay and flushed.
 */
export function watchPair(a: Socket, b: Socket, cleanEnd: (s: Socket) => boolean, onTeardown: () => void): Pair {
  let torn = false;
  let open = 2;
  let resolveClosed!: () => void;
  const closed = new Promise<void>((resolve) => (resolveClosed = resolve));
  const teardown = (reset: boolean): void => {
    if (torn) return;
    torn = true;
    onTeardown();
    abort(a, reset);
    abort(b, reset);
  };
  for (const s of [a, b]) {
    s.on('error', () => teardown(true));
    s.on('close', () => {
      if (!cleanEnd(s)) teardown(false);
      if (--open === 0) resolveClosed();
    });
  }
  return { teardown, closed };
}
