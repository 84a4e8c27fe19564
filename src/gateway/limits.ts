/**
 * What a connection must do before it costs the gateway anything: fit under the connection limit,
 * and say who it is in time (a peer: TLS and a valid Hello; a source: QEMU's stream magic). Until
 * then a connection holds no store, no VM and no outgoing connection, and at most a few KiB of input.
 */
import type { Socket } from 'node:net';
import { FILE_MAGIC } from '../qemu/constants';

/** Which listener a connection came in on. */
export type Listener = 'peer' | 'source' | 'metrics';

/** Why a connection was refused before any migration began. */
export type RefusalReason =
  | 'connection-limit'
  | 'tls'
  | 'peer-not-allowed'
  | 'handshake-timeout'
  | 'frame-too-large'
  | 'protocol'
  | 'bad-vm-name'
  | 'target-not-allowed'
  | 'busy'
  | 'not-qemu'
  | 'closed';

export class Refusal extends Error {
  override readonly name = 'Refusal';
  constructor(
    readonly reason: RefusalReason,
    message: string,
  ) {
    super(message);
  }
}

/**
 * Counts open connections across every listener of one gateway and refuses those above the limit.
 * A connection counts from accept until its socket closes.
 */
export class ConnectionGate {
  private readonly open = new Map<Listener, number>();
  private total = 0;

  constructor(
    readonly maxConnections: number,
    private readonly onChange: (listener: Listener, open: number) => void = () => undefined,
  ) {}

  /** Counts the socket in and returns true, or returns false when the gateway is full (the caller refuses it). */
  admit(socket: Socket, listener: Listener): boolean {
    if (this.total >= this.maxConnections) return false;
    this.total++;
    this.set(listener, +1);
    socket.once('close', () => {
      this.total--;
      this.set(listener, -1);
    });
    return true;
  }

  get openConnections(): number {
    return this.total;
  }

  private set(listener: Listener, delta: number): void {
    const n = (this.open.get(listener) ?? 0) + delta;
    this.open.set(listener, n);
    this.onChange(listener, n);
  }
}

/**
 * Reads the first 4 bytes a source sent and checks they are QEMU's stream magic ("QEVM"). Resolves
 * with the socket paused and the bytes put back, so the session reads the stream from its start.
 * Rejects with a Refusal when the bytes are something else, or the socket closes or fails first.
 */
export function awaitStreamMagic(socket: Socket): Promise<void> {
  return new Promise((resolve, reject) => {
    const parts: Buffer[] = [];
    let got = 0;
    const cleanup = (): void => {
      socket.off('data', onData);
      socket.off('close', onClose);
      socket.off('error', onError);
    };
    const onData = (chunk: Buffer): void => {
      parts.push(chunk);
      got += chunk.length;
      if (got < 4) return;
      socket.pause();
      cleanup();
      const head = Buffer.concat(parts);
      socket.unshift(head);
      if (head.readUInt32BE(0) !== FILE_MAGIC) {
        reject(new Refusal('not-qemu', `the source did not start a QEMU migration stream (first bytes ${head.subarray(0, 4).toString('hex')})`));
        return;
      }
      resolve();
    };
    const onClose = (): void => {
      cleanup();
      reject(new Refusal('closed', `the source closed the connection after ${got} bytes, before a QEMU stream began`));
    };
    const onError = (err: Error): void => {
      cleanup();
      reject(new Refusal('closed', `source: ${err.message}`));
    };
    socket.on('data', onData);
    socket.once('close', onClose);
    socket.once('error', onError);
    socket.resume();
  });
}
