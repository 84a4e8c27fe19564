/**
 * A gateway pair on loopback, both in this process, for tests of the gateway-to-gateway link, and a
 * raw peer client that speaks frames by hand, over TCP or TLS. The QEMU stand-ins that drive it are in
 * qemu-standins.ts; pairs of `bfmig gateway` child processes in load-pair.ts and hostile-flood.ts.
 */
import * as net from 'node:net';
import * as path from 'node:path';
import { Writable } from 'node:stream';
import * as tls from 'node:tls';
import { loopbackMultiRouteYaml } from './loopback-config';
import { parseConfig } from '../../gateway/config';
import { Gateway } from '../../gateway/gateway';
import { createLogger } from '../../gateway/log';
import { GatewayMetrics } from '../../gateway/metrics';
import { freePort } from '../vm/ports';
import { WanEmulator } from '../wan/emulator';
import { destinationStandIn, sourceStandIn } from './qemu-standins';
import type { MigrationReport } from '../../gateway/session';
import { encodeJson, FrameParser, FrameType, PROTOCOL_VERSION } from '../../wire/frames';

export interface TestSite {
  name: string;
  gateway: Gateway;
  metrics: GatewayMetrics;
  data: string;
  /** Where the source of the first route's VM (vm1 unless startPair was given routes) migrates to. */
  routePort: number;
  /** Where the source of each routed VM migrates to. */
  routePorts: Record<string, number>;
  peerPort: number;
  /** The destination stand-in at this site listens here (every route's target at the far site). */
  destPort: number;
  logs: Array<Record<string, unknown>>;
  /** The WAN emulator the far gateway reaches this one through (startPair's `wan`). */
  inbound?: WanEmulator;
}

export interface LoggedGateway {
  gateway: Gateway;
  metrics: GatewayMetrics;
  /** Its log lines, parsed, oldest first. */
  logs: Array<Record<string, unknown>>;
}

/** A gateway in this process from `yaml` (relative paths resolve beside `configPath`), keeping its metrics and log lines. */
export async function startLoggedGateway(name: string, yaml: string, configPath?: string): Promise<LoggedGateway> {
  const logs: Array<Record<string, unknown>> = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const line of chunk.toString().split('\n').filter(Boolean)) logs.push(JSON.parse(line) as Record<string, unknown>);
      cb();
    },
  });
  const metrics = new GatewayMetrics({ defaultMetrics: false });
  const gateway = new Gateway(parseConfig(yaml, configPath), createLogger({ name, destination: sink }), metrics);
  await gateway.start();
  return { gateway, metrics, logs };
}

/** A VM both gateways of a pair route to each other, and its siblings (routes[].siblings). */
export interface PairRoute {
  vm: string;
  siblings?: readonly string[];
}

/**
 * Two gateways routing vm1 (or `routes`) to each other; `extra[i]` is YAML appended to site i's config
 * (tls:, limits:). With `wan`, each gateway reaches the other through a WAN emulator of that rate and
 * delay, closed with the pair (stopPair).
 */
export async function startPair(
  tmp: string,
  extra: [string, string] = ['', ''],
  wan?: { rateMbit: number; delayMs: number },
  routes: readonly PairRoute[] = [{ vm: 'vm1' }],
): Promise<[TestSite, TestSite]> {
  const [peerA, peerB, destA, destB, ...routePorts] = await Promise.all(Array.from({ length: 4 + 2 * routes.length }, () => freePort()));
  const [inboundA, inboundB] = wan ? [peerA, peerB].map((port) => new WanEmulator({ listen: { host: '127.0.0.1', port: 0 }, target: { host: '127.0.0.1', port }, ...wan })) : [];
  const farA = inboundA ? (await inboundA.listen()).port : peerA;
  const farB = inboundB ? (await inboundB.listen()).port : peerB;
  const make = async (name: string, peer: number, ports: number[], farPeer: number, farDest: number, dest: number, more: string): Promise<TestSite> => {
    const data = path.join(tmp, name);
    const siteRoutes = routes.map((r, i) => ({ vm: r.vm, siblings: r.siblings, routePort: ports[i], targetPort: farDest }));
    const yaml = loopbackMultiRouteYaml({ name, data, peerPort: peer, farPeerPort: farPeer, routes: siteRoutes }) + 'metrics: 127.0.0.1:0\n' + more;
    const { gateway, metrics, logs } = await startLoggedGateway(name, yaml, path.join(tmp, `${name}.yaml`));
    const byVm = Object.fromEntries(siteRoutes.map((r) => [r.vm, r.routePort]));
    return { name, gateway, metrics, data, routePort: ports[0], routePorts: byVm, peerPort: peer, destPort: dest, logs };
  };
  const a = await make('site-a', peerA, routePorts.slice(0, routes.length), farB, destB, destA, extra[0]);
  const b = await make('site-b', peerB, routePorts.slice(routes.length), farA, destA, destB, extra[1]);
  return [{ ...a, inbound: inboundA }, { ...b, inbound: inboundB }];
}

/**
 * One migration of `stream` (of `vm`, by default the first route's) from → to with QEMU stand-ins: resolves once both gateways reported it,
 * with what the destination stand-in received and both reports.
 */
export async function migrateThroughPair(from: TestSite, to: TestSite, stream: Buffer, vm?: string): Promise<{ received: Buffer; sent: MigrationReport; got: MigrationReport }> {
  const dest = await destinationStandIn(to.destPort);
  const before = [from.gateway.history.length, to.gateway.history.length];
  await sourceStandIn(vm === undefined ? from.routePort : from.routePorts[vm], stream);
  await waitFor(() => from.gateway.history.length > before[0] && to.gateway.history.length > before[1]);
  dest.close();
  return { received: (await dest.received).bytes, sent: from.gateway.history[before[0]], got: to.gateway.history[before[1]] };
}

/** Stops both gateways of a pair (a second's grace for their sessions); a site that never started is passed over. */
export async function stopPair(sites: readonly (TestSite | undefined)[]): Promise<void> {
  for (const site of sites) {
    await site?.gateway.stop(1);
    await site?.inbound?.close();
  }
}

export interface RawPeer {
  socket: net.Socket;
  /** Frames received so far. */
  frames: Array<{ type: FrameType; payload: Buffer }>;
  /** Resolves when the connection is gone, with any socket error. */
  closed: Promise<{ error: string | null }>;
  /** Sends a Hello for `vm`, asking the gateway to dial `target`. */
  hello(vm: string, target: string): void;
  /** The error text of an Abort the gateway sent, if any. */
  abortText(): string | null;
}

/**
 * A hand-driven peer: plain TCP when `credentials` is undefined, else TLS 1.3 with the given client
 * certificate (or none). It does not verify the gateway's certificate: the tests are about what the
 * gateway accepts.
 */
export function rawPeer(port: number, credentials?: { cert?: Buffer; key?: Buffer }): Promise<RawPeer> {
  return new Promise((resolve, reject) => {
    const socket: net.Socket = credentials
      ? tls.connect({ host: '127.0.0.1', port, rejectUnauthorized: false, minVersion: 'TLSv1.3', ...credentials })
      : net.connect({ host: '127.0.0.1', port });
    const frames: RawPeer['frames'] = [];
    const parser = new FrameParser((type, payload) => frames.push({ type, payload: Buffer.from(payload) }));
    let error: string | null = null;
    socket.on('data', (chunk: Buffer) => {
      try {
        parser.push(chunk);
      } catch {
        socket.destroy();
      }
    });
    socket.on('error', (err) => {
      error = err.message;
      reject(err);
    });
    const closed = new Promise<{ error: string | null }>((r) => socket.on('close', () => r({ error })));
    const peer: RawPeer = {
      socket,
      frames,
      closed,
      hello: (vm, target) => socket.write(encodeJson(FrameType.Hello, { protocol: PROTOCOL_VERSION, site: 'raw', vm, target })),
      abortText: () => {
        const abort = frames.find((f) => f.type === FrameType.Abort);
        return abort ? (JSON.parse(abort.payload.toString()) as { error: string }).error : null;
      },
    };
    socket.once(credentials ? 'secureConnect' : 'connect', () => resolve(peer));
  });
}

export async function waitFor(condition: () => boolean, timeoutMs = 10_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > until) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** The log lines of connections the site refused, newest last. */
export function refusals(site: TestSite): Array<{ listener: string; reason: string; error: string; peerName?: string; remote?: string }> {
  return site.logs.filter((l) => l.msg === 'connection refused') as Array<{ listener: string; reason: string; error: string; peerName?: string; remote?: string }>;
}
