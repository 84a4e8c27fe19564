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

/** Slices of the range, one a jest worker: more than the workers a test run starts. */
const WORKER_SLICES = 8;

/**
 * The part of `range` this process picks from: a slice of its own in a jest worker. Each worker process
 * keeps its own ports handed out (below), and a port one worker's stand-in binds anew for every
 * migration is free in between, where another worker's pick could take it: a stand-in's listen failed
 * with "address already in use" (test/gateway-hostile-receiver.test.ts, once in a CI run).
 */
function slicePicking(range: [number, number]): [number, number] {
  const worker = Number(process.env.JEST_WORKER_ID);
  if (!Number.isInteger(worker) || worker < 1) return range;
  const size = Math.floor((range[1] - range[0] + 1) / WORKER_SLICES);
  const low = range[0] + ((worker - 1) % WORKER_SLICES) * size;
  return [low, low + size - 1];
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

/**
 * Ports this process handed out lately, oldest first: a port handed out is free only until its server
 * binds it, and several are often picked together (a site's peer, route and QEMU ports) before any is
 * bound. Without this, two of them came out the same now and then, and a QEMU's listen failed with
 * "Address already in use".
 */
const handedOut = new Set<number>();
const HANDED_OUT_KEPT = 4096;

function handOut(port: number): number {
  handedOut.add(port);
  if (handedOut.size > HANDED_OUT_KEPT) handedOut.delete(handedOut.values().next().value as number);
  return port;
}

/** A loopback port nothing listens on now, for a server the caller starts soon after. */
export async function freePort(): Promise<number> {
  const outside = portsOutsideEphemeralRange();
  const range = outside === null ? null : slicePicking(outside);
  for (let attempt = 0; range && attempt < 64; attempt++) {
    const candidate = range[0] + Math.floor(Math.random() * (range[1] - range[0] + 1));
    if (handedOut.has(candidate)) continue;
    // Taken before the check listens: a call running meanwhile must not pick it too.
    handOut(candidate);
    if ((await tryListen(candidate)) !== null) return candidate;
  }
  for (let attempt = 0; attempt < 64; attempt++) {
    const port = await tryListen(0);
    if (port !== null && !handedOut.has(port)) return handOut(port);
  }
  throw new Error('freePort: no port');
}

