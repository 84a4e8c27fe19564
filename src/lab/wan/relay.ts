/**
 * A plain Node TCP relay: accepts on `listen`, dials `target` for each connection and pipes both
 * ways (noDelay, half-close relayed). The baseline the gateway's throughput is compared against.
 */
import { createServer, connect, type Server, type Socket } from 'node:net';
import type { Endpoint } from '../../gateway/address';
import { closeServer, listenServer, watchPair, type Pair } from './net';

export interface TcpRelayOptions {
  listen: Endpoint;
  target: Endpoint;
}

export interface TcpRelayStats {
  connections: number;
  active: number;
  bytesForward: number;
  bytesBackward: number;
}

export class TcpRelay {
  private readonly server: Server;
  private readonly live = new Set<Pair>();
  private connections = 0;
  private forward = 0;
  private backward = 0;

  constructor(private readonly options: TcpRelayOptions) {
    this.server = createServer({ allowHalfOpen: true, noDelay: true }, (socket) => this.accept(socket));
  }

  /** Bytes relayed from the accepting side to the target so far. */
  get bytesForward(): number {
    return this.forward;
  }

  /** Bytes relayed from the target back to the accepting side so far. */
  get bytesBackward(): number {
    return this.backward;
  }

  stats(): TcpRelayStats {
    return { connections: this.connections, active: this.live.size, bytesForward: this.forward, bytesBackward: this.backward };
  }

  /** Starts listening; resolves with the bound endpoint (port 0 picks a free one). */
  listen(): Promise<Endpoint> {
    return listenServer(this.server, this.options.listen);
  }

  /** Stops accepting and destroys every open connection; resolves once all their sockets are closed. */
  close(): Promise<void> {
    return closeServer(this.server, this.live);
  }

  /** Cuts every open connection with a TCP reset, as a failing link would, and goes on accepting. */
  async cut(): Promise<number> {
    const pairs = [...this.live];
    for (const pair of pairs) pair.teardown(true);
    await Promise.all(pairs.map((p) => p.closed));
    return pairs.length;
  }

  /** Cuts the connection opened last with a TCP reset (one channel of a multi-connection migration); 0 when none is open. */
  async cutNewest(): Promise<number> {
    const pair = [...this.live].at(-1);
    if (!pair) return 0;
    pair.teardown(true);
    await pair.closed;
    return 1;
  }

  private accept(client: Socket): void {
    this.connections++;
    client.setNoDelay(true);
    const target = connect({ host: this.options.target.host, port: this.options.target.port, allowHalfOpen: true, noDelay: true });
    const ended = new Set<Socket>();
    client.on('data', (chunk: Buffer) => (this.forward += chunk.length));
    target.on('data', (chunk: Buffer) => (this.backward += chunk.length));
    client.on('end', () => ended.add(client));
    target.on('end', () => ended.add(target));
    client.pipe(target);
    target.pipe(client);
    const pair = watchPair(
      client,
      target,
      (s) => ended.has(s) && ended.has(s === client ? target : client) && s.writableFinished,
      () => undefined,
    );
    this.live.add(pair);
    void pair.closed.then(() => this.live.delete(pair));
  }
}
