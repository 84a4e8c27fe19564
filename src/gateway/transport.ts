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
import { connect as connectTcp, type Socket } from 'node:net';
import { connect as connectTls, createSecureContext, type PeerCertificate, type SecureContext, TLSSocket } from 'node:tls';
import { type Endpoint, formatEndpoint } from '../address';
import { Refusal } from './limits';
import type { TlsConfig } from './security-config';

export class PeerTransport {
  private readonly context: SecureContext | null;

  constructor(private readonly tls: TlsConfig | null) {
    this.context = tls
      ? createSecureContext({ cert: tls.cert, key: tls.key, ca: tls.ca, minVersion: 'TLSv1.3', maxVersion: 'TLSv1.3' })
      : null;
  }

  get secure(): boolean {
    return this.tls !== null;
  }

  /**
   * The accepting side: the socket to read frames from once the link is up (the TCP socket itself
   * without TLS). Rejects with a Refusal ('tls' or 'peer-not-allowed') and destroys the connection
   * when the peer fails the handshake or is not allowed. The caller bounds how long this may take.
   */
  accept(raw: Socket): Promise<Socket> {
    if (!this.tls || !this.context) {
      raw.resume();
      return Promise.resolve(raw);
    }
    const tls = this.tls;
    const socket = new TLSSocket(raw, { isServer: true, secureContext: this.context, requestCert: true, rejectUnauthorized: true });
    return new Promise((resolve, reject) => {
      const refuse = (refusal: Refusal): void => {
        socket.off('secure', onSecure);
        socket.off('error', onError);
        socket.off('close', onClose);
        // Errors after this are of a connection already refused and logged.
        socket.on('error', () => undefined);
        socket.destroy();
        raw.destroy();
        reject(refusal);
      };
      const onSecure = (): void => {
        socket.off('error', onError);
        socket.off('close', onClose);
        if (!socket.authorized) return refuse(new Refusal('tls', `peer certificate not accepted: ${String(socket.authorizationError)}`));
        const names = certificateNames(socket.getPeerCertificate());
        const denied = allowedPeerError(tls, names);
        if (denied) return refuse(new Refusal('peer-not-allowed', denied));
        resolve(socket);
      };
      const onError = (err: Error): void => refuse(new Refusal('tls', `TLS handshake failed: ${err.message}`));
      const onClose = (): void => refuse(new Refusal('closed', 'the peer closed the connection during the TLS handshake'));
      socket.once('secure', onSecure);
      socket.once('error', onError);
      socket.once('close', onClose);
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
      const socket = connectTcp({ ...peer, noDelay: true });
      socket.once('connect', onReady);
      return socket;
    }
    const socket = connectTls({
      host: peer.host,
      port: peer.port,
      secureContext: this.context,
      minVersion: 'TLSv1.3',
      rejectUnauthorized: true,
      // The chain is checked against the CA by rejectUnauthorized; this replaces only the host-name match.
      checkServerIdentity: (_host: string, cert: PeerCertificate) => {
        const denied = allowedPeerError(tls, certificateNames(cert));
        return denied ? new Error(`${formatEndpoint(peer)}: ${denied}`) : undefined;
      },
    });
    socket.setNoDelay(true);
    socket.once('secureConnect', onReady);
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

/** The name a connected peer's certificate gives (for logs), or null on a plain connection. */
export function peerNameOf(socket: Socket): string | null {
  if (!(socket instanceof TLSSocket)) return null;
  return certificateNames(socket.getPeerCertificate()).join(',') || null;
}

function allowedPeerError(tls: TlsConfig, names: string[]): string | null {
  if (tls.allowPeers === null) return null;
  if (names.some((n) => tls.allowPeers?.includes(n))) return null;
  return `peer certificate names ${names.length > 0 ? names.map((n) => JSON.stringify(n)).join(', ') : 'nothing'}, not one of allowPeers (${tls.allowPeers.join(', ')})`;
}
