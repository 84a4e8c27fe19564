/**
 * The gateway-to-gateway link: plain TCP, or mutual TLS 1.3 when the config has a `tls` block.
 * Sessions only ever see a connected Socket (a TLSSocket is one); everything about certificates
 * lives here.
 *
 * With TLS, both ends present a certificate issued by the configured CA and both verify the other's
 * (`requestCert` + `rejectUnauthorized` on the accepting side, the CA check on the dialling side).
 * When `allowPeers` is set, the other end's certificate must name one of those sites (subject CN or a
 * DNS subjectAltName), in both directions. Host names are not checked against the certificate: a site
 * certificate names a site, not a host, and a route's peer may be dialled by any address.
 */
import type { Socket } from 'node:net';
import { connect as connectTls, type ConnectionOptions, createSecureContext, type PeerCertificate, type SecureContext, Server, TLSSocket } from 'node:tls';
import { type Endpoint, formatEndpoint } from './address';
import { Refusal } from './limits';
import type { TlsConfig } from './security-config';
import { connectWithQueue, WAN_QUEUE_BYTES } from './socket-tuning';

export class PeerTransport {
  private readonly context: SecureContext | null;
  /** Runs the TLS handshakes of accepted connections (it never listens itself). */
  private readonly server: Server | null;
  /** Accepted connections in their TLS handshake, by remote address:port. */
  private readonly handshaking = new Map<string, { settle: (result: Socket | Refusal) => void }>();

  /** `verified` is told of every peer certificate accepted, in both directions (the expiry metric). */
  constructor(
    private readonly tls: TlsConfig | null,
    private readonly verified: (peer: PeerCertificate) => void = () => undefined,
  ) {
    this.context = tls ? createSecureContext({ cert: tls.cert, key: tls.key, ca: tls.ca, minVersion: 'TLSv1.3', maxVersion: 'TLSv1.3' }) : null;
    if (!tls) {
      this.server = null;
      return;
    }
    // rejectUnauthorized is false so that an unverified peer reaches 'secureConnection' with its
    // authorizationError, and is refused below with that reason, before a byte of it is read.
    this.server = new Server({ cert: tls.cert, key: tls.key, ca: tls.ca, minVersion: 'TLSv1.3', maxVersion: 'TLSv1.3', requestCert: true, rejectUnauthorized: false, handshakeTimeout: 3_600_000 });
    this.server.on('secureConnection', (socket: TLSSocket) => {
      const pending = this.handshaking.get(addressKey(socket));
      if (!pending) return void socket.destroy();
      if (!socket.authorized) {
        pending.settle(new Refusal('tls', `peer certificate not accepted: ${String(socket.authorizationError ?? 'none presented')}`));
        return;
      }
      const cert = socket.getPeerCertificate();
      const denied = allowedPeerError(this.tls, certificateNames(cert));
      if (!denied) this.verified(cert);
      pending.settle(denied ? new Refusal('peer-not-allowed', denied) : socket);
    });
    this.server.on('tlsClientError', (err: Error, socket: TLSSocket) => {
      this.handshaking.get(addressKey(socket))?.settle(new Refusal('tls', `TLS handshake failed: ${err.message.trim()}`));
    });
  }

  get secure(): boolean {
    return this.tls !== null;
  }

  /**
   * The accepting side: the socket to read frames from once the link is up (the TCP socket itself
   * without TLS). Rejects with a Refusal ('tls', 'peer-not-allowed' or 'closed') and destroys the
   * connection when the peer fails the handshake or is not allowed. The caller bounds how long this may take.
   */
  accept(raw: Socket): Promise<Socket> {
    const server = this.server;
    if (!server) return Promise.resolve(raw); // still paused: the session adopts it unread (PooledReads)
    const key = addressKey(raw);
    return new Promise((resolve, reject) => {
      const settle = (result: Socket | Refusal): void => {
        if (this.handshaking.get(key)?.settle !== settle) return;
        this.handshaking.delete(key);
        raw.off('close', onClose);
        if (result instanceof Refusal) {
          raw.destroy();
          reject(result);
        } else {
          resolve(result);
        }
      };
      const onClose = (): void => settle(new Refusal('closed', 'the connection closed during the TLS handshake'));
      if (this.handshaking.has(key)) return reject(new Refusal('protocol', `a second connection from ${key} in handshake`));
      this.handshaking.set(key, { settle });
      raw.once('close', onClose);
      server.emit('connection', raw);
    });
  }

  /**
   * The dialling side: connects to a peer gateway and calls `onReady` once the link is up and the peer
   * verified. Failures (refused connection, handshake, a peer not on allowPeers) are emitted as
   * 'error' on the returned socket, as a TCP error would be.
   */
  connect(peer: Endpoint, onReady: () => void): Socket {
    const tls = this.tls;
    if (!tls || !this.context) {
      const socket = connectWithQueue({ ...peer, noDelay: true }, WAN_QUEUE_BYTES);
      socket.once('connect', onReady);
      return socket;
    }
    // Node passes highWaterMark on to the TLS socket's Writable (and Readable); @types/node does not list it.
    const options: ConnectionOptions & { highWaterMark: number } = {
      host: peer.host,
      port: peer.port,
      secureContext: this.context,
      minVersion: 'TLSv1.3',
      rejectUnauthorized: true,
      // The same WAN queue as a plain TCP link (Node's default would be 16 KiB).
      highWaterMark: WAN_QUEUE_BYTES,
      // The chain is checked against the CA by rejectUnauthorized; this replaces only the host-name match.
      checkServerIdentity: (_host: string, cert: PeerCertificate) => {
        const denied = allowedPeerError(tls, certificateNames(cert));
        return denied ? new Error(`${formatEndpoint(peer)}: ${denied}`) : undefined;
      },
    };
    const socket = connectTls(options);
    socket.setNoDelay(true);
    socket.once('secureConnect', () => {
      this.verified(socket.getPeerCertificate());
      onReady();
    });
    return socket;
  }
}

/** The names a certificate gives its holder: subject CN and DNS subjectAltNames. */
export function certificateNames(cert: PeerCertificate | null | undefined): string[] {
  if (!cert) return [];
  const names = new Set<string>();
  const cn = cert.subject?.CN;
  for (const name of Array.isArray(cn) ? cn : cn ? [cn] : []) names.add(name);
  for (const entry of (cert.subjectaltname ?? '').split(',')) {
    const m = /^\s*DNS:(.+?)\s*$/.exec(entry);
    if (m) names.add(m[1]);
  }
  return [...names];
}

/** The names a connected peer's certificate gives (none on a plain connection). */
export function peerNamesOf(socket: Socket): string[] {
  return socket instanceof TLSSocket ? certificateNames(socket.getPeerCertificate()) : [];
}

/** The name a connected peer's certificate gives (for logs), or null on a plain connection. */
export function peerNameOf(socket: Socket): string | null {
  return peerNamesOf(socket).join(',') || null;
}

function addressKey(socket: Socket): string {
  return `${socket.remoteAddress}:${socket.remotePort}`;
}

function allowedPeerError(tls: TlsConfig | null, names: string[]): string | null {
  if (tls === null || tls.allowPeers === null) return null;
  if (names.some((n) => tls.allowPeers?.includes(n))) return null;
  return `peer certificate names ${names.length > 0 ? names.map((n) => JSON.stringify(n)).join(', ') : 'nothing'}, not one of allowPeers (${tls.allowPeers.join(', ')})`;
}
