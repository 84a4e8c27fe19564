/**
 * Stand-ins for QEMU at either end of a gateway pair: sources that play a migration stream into a
 * route's listen port, destinations that take what the receiving gateway delivers and keep it, hash it
 * or compare it with what was sent.
 */
import { createHash } from 'node:crypto';
import * as net from 'node:net';
import { MULTIFD_INIT_BYTES, MULTIFD_MAGIC, MULTIFD_VERSION } from '../../qemu/channel-head';

/** A source stand-in: sends `stream` to the route, reports how the connection ended. */
export function sourceStandIn(port: number, stream: Buffer): Promise<'closed' | 'reset'> {
  return new Promise((resolve) => {
    const socket = net.connect({ host: '127.0.0.1', port }, () => {
      socket.write(stream);
      socket.end();
    });
    let reset = false;
    socket.on('error', () => (reset = true));
    socket.resume();
    socket.on('close', () => resolve(reset ? 'reset' : 'closed'));
  });
}

/** A destination stand-in: accepts one connection and keeps what it receives. */
export function destinationStandIn(port: number): Promise<{ received: Promise<{ bytes: Buffer; reset: boolean }>; close: () => void }> {
  return new Promise((listening) => {
    let done: (r: { bytes: Buffer; reset: boolean }) => void;
    const received = new Promise<{ bytes: Buffer; reset: boolean }>((r) => (done = r));
    const server = net.createServer((socket) => {
      server.close();
      const parts: Buffer[] = [];
      let reset = false;
      socket.on('data', (b: Buffer) => parts.push(b));
      socket.on('error', () => (reset = true));
      socket.on('end', () => socket.end());
      socket.on('close', () => done({ bytes: Buffer.concat(parts), reset }));
    });
    server.listen(port, '127.0.0.1', () => listening({ received, close: () => server.close() }));
  });
}

/** A source stand-in: plays `stream` into `port` in 1 MiB writes, waiting for 'drain' when the receiver pushes back. */
export function playStream(port: number, stream: Buffer): Promise<void> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: '127.0.0.1', port, noDelay: true }, () => {
      let at = 0;
      const step = 1 << 20;
      const pump = (): void => {
        while (at < stream.length) {
          const ok = socket.write(stream.subarray(at, at + step));
          at += step;
          if (!ok) return void socket.once('drain', pump);
        }
        socket.end();
      };
      pump();
    });
    let failure: Error | null = null;
    socket.on('error', (err) => (failure = err));
    socket.resume(); // QEMU's return path, unused in precopy
    socket.on('close', () => (failure ? reject(failure) : resolve()));
  });
}

/** What a destination stand-in received. */
export interface Received {
  bytes: number;
  sha256: string;
  reset: boolean;
}

/**
 * A destination stand-in: listens from the start (a port picked now and bound later could be taken by
 * then) and hashes everything each connection brings, one connection per migration.
 */
export class HashingDestination {
  private readonly outcomes: Received[] = [];
  private readonly waiting: Array<(r: Received) => void> = [];
  /** Bytes received so far over every connection, as they arrive. */
  bytesReceived = 0;

  private constructor(private readonly server: net.Server) {
    server.on('connection', (socket) => {
      const hash = createHash('sha256');
      let bytes = 0;
      let reset = false;
      socket.on('data', (chunk: Buffer) => {
        hash.update(chunk);
        bytes += chunk.length;
        this.bytesReceived += chunk.length;
      });
      socket.on('error', () => (reset = true));
      socket.on('end', () => socket.end());
      socket.on('close', () => {
        const outcome = { bytes, sha256: hash.digest('hex'), reset };
        const waiter = this.waiting.shift();
        if (waiter) waiter(outcome);
        else this.outcomes.push(outcome);
      });
    });
  }

  static listen(): Promise<HashingDestination> {
    return new Promise((resolve, reject) => {
      const server = net.createServer();
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => resolve(new HashingDestination(server)));
    });
  }

  get port(): number {
    return (this.server.address() as net.AddressInfo).port;
  }

  /** What the next connection (in order of closing) received. */
  next(): Promise<Received> {
    const ready = this.outcomes.shift();
    return ready ? Promise.resolve(ready) : new Promise((r) => this.waiting.push(r));
  }

  close(): Promise<void> {
    return new Promise((r) => this.server.close(() => r()));
  }
}

/** A destination: accepts one connection, reads everything, compares it with `expected`. */
export function checkingDestination(expected: Buffer, port = 0): Promise<{ port: number; done: Promise<number> }> {
  return new Promise((resolveListen) => {
    let resolveDone: (bytes: number) => void;
    let rejectDone: (err: Error) => void;
    const done = new Promise<number>((res, rej) => {
      resolveDone = res;
      rejectDone = rej;
    });
    const server = net.createServer((socket) => {
      server.close();
      let at = 0;
      let mismatch = false;
      socket.on('data', (chunk: Buffer) => {
        if (!mismatch && expected.compare(chunk, 0, chunk.length, at, at + chunk.length) !== 0) mismatch = true;
        at += chunk.length;
      });
      socket.on('end', () => {
        socket.end();
        if (mismatch || at !== expected.length) rejectDone(new Error(`destination got ${at} bytes${mismatch ? ', not identical' : ''}`));
        else resolveDone(at);
      });
    });
    server.listen(port, '127.0.0.1', () => resolveListen({ port: (server.address() as net.AddressInfo).port, done }));
  });
}

/**
 * A source stand-in that sends `stream` up to byte `pauseAt` and holds its connection open, quiet,
 * until `go()`: then it sends the rest and ends. A migration that stops moving mid-stream.
 */
export function pausingSource(port: number, stream: Buffer, pauseAt: number): { go: () => void; closed: Promise<void> } {
  const socket = net.connect({ host: '127.0.0.1', port, noDelay: true }, () => socket.write(stream.subarray(0, pauseAt)));
  socket.resume(); // QEMU's return path, unused in precopy
  socket.on('error', () => undefined); // the migration's outcome is the gateways' to report
  const closed = new Promise<void>((resolve) => socket.on('close', () => resolve()));
  return { go: () => socket.end(stream.subarray(pauseAt)), closed };
}

/**
 * A multifd channel's initial packet as QEMU sends it (MultiFDInit_t: magic, version 1, the VM's UUID,
 * the channel id, reserved bytes), for stand-ins and hostile cases.
 */
export function multifdInitPacket(uuid: Buffer, id: number, version = MULTIFD_VERSION): Buffer {
  const packet = Buffer.alloc(MULTIFD_INIT_BYTES);
  packet.writeUInt32BE(MULTIFD_MAGIC, 0);
  packet.writeUInt32BE(version, 4);
  uuid.copy(packet, 8, 0, 16);
  packet[24] = id;
  return packet;
}

/** One connection of a stand-in source: written to and ended by hand, as QEMU drives each of its channels. */
export interface SourceChannel {
  socket: net.Socket;
  /** Resolves once the connection is gone: 'reset' when it failed (the gateway cut it). */
  closed: Promise<'closed' | 'reset'>;
  /** Writes `bytes`, resolving once the socket has taken them. */
  write(bytes: Buffer): Promise<void>;
}

/** Opens one channel of a stand-in source to `port` (resolves once connected). */
export function sourceChannel(port: number): Promise<SourceChannel> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: '127.0.0.1', port, noDelay: true });
    let reset = false;
    const closed = new Promise<'closed' | 'reset'>((r) => socket.on('close', () => r(reset ? 'reset' : 'closed')));
    socket.on('error', (err) => {
      reset = true;
      reject(err);
    });
    socket.resume(); // a return path, if any, is not read here
    socket.once('connect', () =>
      resolve({
        socket,
        closed,
        write: (bytes) => new Promise<void>((done) => (socket.write(bytes) ? done() : socket.once('drain', () => done()))),
      }),
    );
  });
}

/** What one connection to a channel-keeping destination brought, in the order the connections came. */
export interface ReceivedChannel {
  /** 0 for the first connection accepted. */
  order: number;
  bytes: Buffer;
  reset: boolean;
}

/**
 * A destination stand-in that takes any number of connections (a migration's main channel and its
 * extra channels) and keeps what each brought, in the order they were accepted.
 */
export class ChannelsDestination {
  private readonly channels: ReceivedChannel[] = [];
  private readonly open = new Set<net.Socket>();
  private readonly closedWaiters: Array<() => void> = [];

  private constructor(
    private readonly server: net.Server,
    /** Closes a connection's sending side (as QEMU does with a channel it is done with) once this says so of what it received. */
    private readonly doneWith: ((received: Buffer) => boolean) | null,
  ) {
    server.on('connection', (socket) => {
      const channel: ReceivedChannel = { order: this.channels.length, bytes: Buffer.alloc(0), reset: false };
      this.channels.push(channel);
      this.open.add(socket);
      const parts: Buffer[] = [];
      socket.on('data', (chunk: Buffer) => {
        parts.push(chunk);
        if (this.doneWith?.(Buffer.concat(parts))) socket.end();
      });
      socket.on('error', () => (channel.reset = true));
      socket.on('end', () => socket.end());
      socket.on('close', () => {
        channel.bytes = Buffer.concat(parts);
        this.open.delete(socket);
        for (const w of this.closedWaiters.splice(0)) w();
      });
    });
  }

  static listen(port: number, doneWith: ((received: Buffer) => boolean) | null = null): Promise<ChannelsDestination> {
    return new Promise((resolve, reject) => {
      const server = net.createServer({ allowHalfOpen: true });
      server.once('error', reject);
      server.listen(port, '127.0.0.1', () => resolve(new ChannelsDestination(server, doneWith)));
    });
  }

  /** Resolves with every connection once `count` have come and all of them have closed. */
  async settled(count: number): Promise<ReceivedChannel[]> {
    while (this.channels.length < count || this.open.size > 0) await new Promise<void>((r) => this.closedWaiters.push(r));
    return this.channels;
  }

  /** Connections accepted so far. */
  get accepted(): number {
    return this.channels.length;
  }

  close(): Promise<void> {
    for (const socket of this.open) socket.destroy();
    return new Promise((r) => this.server.close(() => r()));
  }
}
