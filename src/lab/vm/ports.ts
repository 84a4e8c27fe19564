/** Loopback ports for test servers: picked outside the kernel's ephemeral range where it can. */
import * as fs from 'node:fs';
import * as net from 'node:net';

/**
 * Ports below the kernel's ephemeral range: outgoing connections take their local port from that range,
 * so a port picked there (as listening on port 0 does) may be taken by one before the caller binds it.
 */
function portsOutsideEphemeralRange(): [number, number] | null {
  try {
    const [low] = fs.readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/).map(Number);
    return low > 12_000 ? [10_000, low - 1] : null;
  } catch {
    return null;
  }
}

function tryListen(port: number): Promise<number | null> {
  return new Promise((resolve) => {
    const srv = net.createServer();
    srv.unref();
    srv.once('error', () => resolve(null));
    srv.listen(port, '127.0.0.1', () => {
      const addr = srv.address();
      const bound = addr !== null && typeof addr !== 'string' ? addr.port : null;
      srv.close(() => resolve(bound));
    });
  });
}

/** A loopback port nothing listens on now, for a server the caller starts soon after. */
export async function freePort(): Promise<number> {
  const range = portsOutsideEphemeralRange();
  for (let attempt = 0; range && attempt < 64; attempt++) {
    const port = await tryListen(range[0] + Math.floor(Math.random() * (range[1] - range[0] + 1)));
    if (port !== null) return port;
  }
  const port = await tryListen(0);
  if (port === null) throw new Error('freePort: no port');
  return port;
}

