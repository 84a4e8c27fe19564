/**
 * What a connection must do before it costs the gateway anything: fit under the connection limits,
 * and say who it is in time (a peer: TLS and a valid Hello; a source: QEMU's stream magic or a multifd
 * channel's initial packet; a metrics
 * client: its request headers, in time, though it never leaves the pending pools). Until then a
 * connection holds no store, no VM and no outgoing connection, and at most a few KiB of input.
 */
import { isIP, type Socket } from 'node:net';
import { type ChannelHead, classifyChannelHead } from '../qemu/channel-head';
import { decodeHello, FRAME_HEADER_BYTES, FrameType, type HelloMessage, MAX_HANDSHAKE_PAYLOAD } from '../wire/frames';

/** Which listener a connection came in on. */
export type Listener = 'peer' | 'source' | 'metrics';

/** Why a connection was refused before any migration began. */
export type RefusalReason =
  | 'connection-limit'
  | 'pending-limit'
  | 'per-address-limit'
  | 'tls'
  | 'peer-not-allowed'
  | 'handshake-timeout'
  | 'frame-too-large'
  | 'protocol'
  | 'bad-vm-name'
  | 'target-not-allowed'
  | 'vm-not-allowed'
  | 'busy'
  | 'not-qemu'
  /** A migration channel (multifd, postcopy-preempt) of no migration in progress on that route, in time. */
  | 'no-migration'
  /** A channel from another address than its migration's main channel, or naming another VM UUID or destination. */
  | 'channel-mismatch'
  | 'duplicate-channel'
  /** More channels than limits.maxChannels. */
  | 'channel-limit'
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

/** The `limits:` keys the gate enforces (see security-config.ts). */
export interface AdmissionLimits {
  /** Open connections across every listener, pending or not. */
  maxConnections: number;
  /** Pending connections (not yet said who they are) on one listener kind. */
  maxPendingConnections: number;
  /** Pending connections from one remote address (IPv6: one /64, see addressGroup), across every listener. */
  maxPendingPerAddress: number;
}

export type Admission = { admitted: true } | { admitted: false; reason: RefusalReason; detail: string };

/** A pending connection the gate cut to make room for a newer one: the gateway logs, counts and resets it. */
export type Evict = (socket: Socket, listener: Listener, reason: RefusalReason, detail: string) => void;

interface PendingEntry {
  listener: Listener;
  address: string;
}

/**
 * Admission for one gateway's listeners. Every connection counts against maxConnections from accept
 * until its socket closes. Until it has said who it is (`identified`) it is also pending, and pending
 * connections are held to their own, smaller pools: per listener kind and per remote address. So
 * strangers can never fill the gateway: when a pool (or the whole gateway) is full, a new connection
 * takes the place of the oldest pending connection of the address that holds the most, and only
 * connections that have identified themselves can make the gateway refuse one (`connection-limit`).
 * A legitimate source or peer is pending for milliseconds and from an address holding one or two
 * pending connections; a flood's connections wait out the handshake deadline from addresses that hold
 * the most, so they are the ones cut. An address already holding maxPendingPerAddress pending
 * connections is refused outright (`per-address-limit`): it could otherwise churn the pools alone.
 */
export class ConnectionGate {
  private readonly open = new Map<Listener, number>();
  /** Sockets counted in, until they close (or are cut). */
  private readonly counted = new Set<Socket>();
  /** Pending connections, oldest first (a Map iterates in insertion order). */
  private readonly pending = new Map<Socket, PendingEntry>();
  private readonly pendingPerAddress = new Map<string, number>();
  private readonly pendingPerListener = new Map<Listener, number>();

  constructor(
    readonly limits: Readonly<AdmissionLimits>,
    private readonly evict: Evict,
    private readonly onChange: (listener: Listener, open: number) => void = () => undefined,
  ) {}

  get maxConnections(): number {
    return this.limits.maxConnections;
  }

  /**
   * Counts the socket in as pending, possibly cutting an older pending connection (through `evict`)
   * to make room; or says why it is refused (the caller refuses it).
   */
  admit(socket: Socket, listener: Listener): Admission {
    const { maxConnections, maxPendingConnections, maxPendingPerAddress } = this.limits;
    const address = addressGroup(socket.remoteAddress ?? '?');
    if ((this.pendingPerAddress.get(address) ?? 0) >= maxPendingPerAddress) {
      return { admitted: false, reason: 'per-address-limit', detail: `${address} already has ${maxPendingPerAddress} connections that have not said who they are (limits.maxPendingPerAddress)` };
    }
    if ((this.pendingPerListener.get(listener) ?? 0) >= maxPendingConnections) {
      this.evictOne(listener, `${maxPendingConnections} ${listener} connections had not said who they are; a newer one took this one's place (limits.maxPendingConnections)`);
    }
    if (this.counted.size >= maxConnections && !this.evictOne(null, `${maxConnections} connections were open; a newer one took the place of this one, which had not said who it is (limits.maxConnections)`)) {
      return { admitted: false, reason: 'connection-limit', detail: `${maxConnections} connections are open and all have said who they are (limits.maxConnections)` };
    }
    this.counted.add(socket);
    this.set(listener, +1);
    this.pending.set(socket, { listener, address });
    this.bump(this.pendingPerAddress, address, +1);
    this.bump(this.pendingPerListener, listener, +1);
    socket.once('close', () => this.release(socket, listener));
    return { admitted: true };
  }

  /** The connection has said who it is (TLS and an accepted Hello, QEMU's magic): no longer pending. */
  identified(socket: Socket): void {
    const entry = this.pending.get(socket);
    if (!entry) return;
    this.pending.delete(socket);
    this.bump(this.pendingPerAddress, entry.address, -1);
    this.bump(this.pendingPerListener, entry.listener, -1);
  }

  /** Connections that have not said who they are yet (the gateway cuts them when it stops). */
  pendingSockets(): Socket[] {
    return [...this.pending.keys()];
  }

  get openConnections(): number {
    return this.counted.size;
  }

  get pendingConnections(): number {
    return this.pending.size;
  }

  /**
   * Cuts the oldest pending connection (of `listener`, or of any listener) of the address holding the
   * most of them; false when there is none. It stops counting at once: its socket closes later.
   */
  private evictOne(listener: Listener | null, detail: string): boolean {
    const perAddress = new Map<string, number>();
    for (const entry of this.pending.values()) {
      if (listener === null || entry.listener === listener) this.bump(perAddress, entry.address, +1);
    }
    const most = Math.max(0, ...perAddress.values());
    for (const [socket, entry] of this.pending) {
      if ((listener !== null && entry.listener !== listener) || perAddress.get(entry.address) !== most) continue;
      this.release(socket, entry.listener);
      this.evict(socket, entry.listener, 'pending-limit', detail);
      return true;
    }
    return false;
  }

  private release(socket: Socket, listener: Listener): void {
    if (!this.counted.delete(socket)) return;
    this.identified(socket);
    this.set(listener, -1);
  }

  private bump<K>(map: Map<K, number>, key: K, delta: number): void {
    const n = (map.get(key) ?? 0) + delta;
    if (n <= 0) map.delete(key);
    else map.set(key, n);
  }

  private set(listener: Listener, delta: number): void {
    const n = (this.open.get(listener) ?? 0) + delta;
    this.open.set(listener, n);
    this.onChange(listener, n);
  }
}

/**
 * The "remote address" the per-address limit counts by: an IPv4 address as it is, an IPv6 address by
 * its /64, since one host or site is routinely handed a whole /64 and could otherwise take a fresh
 * address for each connection.
 */
export function addressGroup(address: string): string {
  const bare = address.replace(/%.*$/, '');
  if (isIP(bare) !== 6 || bare.includes('.')) return bare; // includes IPv4-mapped ::ffff:a.b.c.d
  const [head, tail] = bare.split('::');
  const left = head === '' ? [] : head.split(':');
  const right = tail === undefined || tail === '' ? [] : tail.split(':');
  const groups = tail === undefined ? left : [...left, ...Array<string>(8 - left.length - right.length).fill('0'), ...right];
  return `${groups
    .slice(0, 4)
    .map((g) => parseInt(g, 16).toString(16))
    .join(':')}::/64`;
}

/**
 * Reads a connection's first bytes until `need(head)` asks for no more than it has. Resolves with them,
 * the socket paused and the bytes put back, so whoever reads it next reads from the start. Rejects with
 * a Refusal when the socket closes or fails first.
 */
function readHead(socket: Socket, who: string, need: (head: Buffer) => number): Promise<Buffer> {
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
      const head = parts.length === 1 ? chunk : Buffer.concat(parts);
      if (need(head) > got) return;
      socket.pause();
      cleanup();
      socket.unshift(head);
      resolve(head);
    };
    const onClose = (): void => {
      cleanup();
      reject(new Refusal('closed', `the ${who} closed the connection after ${got} bytes, before it said what it is`));
    };
    const onError = (err: Error): void => {
      cleanup();
      reject(new Refusal('closed', `${who}: ${err.message}`));
    };
    socket.on('data', onData);
    socket.once('close', onClose);
    socket.once('error', onError);
    socket.resume();
  });
}

/**
 * What a source connection is, from its first bytes: a main channel (QEMU's stream magic, "QEVM") or
 * a multifd channel (its whole initial packet). Rejects with a Refusal ('not-qemu') for anything else.
 */
export async function awaitChannelHead(socket: Socket): Promise<Exclude<ChannelHead, { kind: 'need' | 'other' }>> {
  const head = classifyChannelHead(
    await readHead(socket, 'source', (bytes) => {
      const c = classifyChannelHead(bytes);
      return c.kind === 'need' ? c.bytes : 0;
    }),
  );
  if (head.kind === 'need' || head.kind === 'other') {
    throw new Refusal('not-qemu', `the source did not start a QEMU migration channel (${head.kind === 'other' ? head.reason : 'too few bytes'})`);
  }
  return head;
}

/**
 * A peer connection's Hello, read ahead so the gateway can tell an extra channel's connection from a
 * migration's main one; null when the first frame is not a well-formed Hello (the receive session then
 * refuses it as it does any other). The bytes are put back.
 */
export async function peekHello(socket: Socket): Promise<HelloMessage | null> {
  const head = await readHead(socket, 'peer', (bytes) => {
    if (bytes.length < FRAME_HEADER_BYTES) return FRAME_HEADER_BYTES;
    const length = bytes.readUInt32BE(1);
    return bytes[0] === FrameType.Hello && length <= MAX_HANDSHAKE_PAYLOAD ? FRAME_HEADER_BYTES + length : 0;
  });
  const length = head.readUInt32BE(1);
  if (head[0] !== FrameType.Hello || length > MAX_HANDSHAKE_PAYLOAD) return null;
  try {
    return decodeHello(head.subarray(FRAME_HEADER_BYTES, FRAME_HEADER_BYTES + length));
  } catch {
    return null;
  }
}
