/**
 * WAN caps on loopback: site A routes vm1 and vm2 to site B through a TCP relay that counts the bytes
 * crossing it (the WAN). vm1's route is capped at 24 Mbit/s, the peer (every route to it) at 32 Mbit/s.
 * The cap is a property of the limiter, so the tests assert ratios of bytes to time against it, measured
 * over windows of several seconds, never absolute times.
 */
import { createHash } from 'node:crypto';
import * as path from 'node:path';
import { startLoggedGateway, type LoggedGateway, waitFor } from '../src/lab/harness/gateway-pair';
import { loopbackMultiRouteYaml } from '../src/lab/harness/loopback-config';
import { HashingDestination, playStream } from '../src/lab/harness/qemu-standins';
import { syntheticStream } from '../src/lab/harness/synthetic-stream';
import { freePort } from '../src/lab/vm/ports';
import { TcpRelay } from '../src/lab/wan/relay';
import { suiteTempDir } from './temp-dir';

const ROUTE_MBIT = 24;
const PEER_MBIT = 32;
const MIB = 1024 * 1024;

/**
 * Records when the bytes through the relay grow (sampled every few milliseconds), and measures the rate
 * between two byte counts: from the step where the count leaves `from` to the step where it leaves `to`,
 * so that a window starts and ends where a capped writer was let go, not somewhere within its wait.
 */
class RelayTimeline {
  private readonly steps: Array<{ at: number; before: number }> = [];
  private last = 0;
  private readonly timer: NodeJS.Timeout;

  constructor(private readonly relay: TcpRelay) {
    this.timer = setInterval(() => {
      const now = relay.bytesForward;
      if (now !== this.last) this.steps.push({ at: performance.now(), before: this.last });
      this.last = now;
    }, 2);
  }

  get bytes(): number {
    return this.relay.bytesForward;
  }

  /** Bytes per second between the counts `from` and `to` (waits until the relay has passed `to`). */
  async rate(from: number, to: number): Promise<number> {
    await waitFor(() => this.steps.some((s) => s.before >= to), 60_000);
    const first = this.steps.find((s) => s.before >= from);
    const last = this.steps.find((s) => s.before >= to);
    if (!first || !last || last.at <= first.at) throw new Error('no window');
    return (last.before - first.before) / ((last.at - first.at) / 1000);
  }

  stop(): void {
    clearInterval(this.timer);
  }
}

describe('WAN caps', () => {
  let tmp = '';
  let a: LoggedGateway;
  let b: LoggedGateway;
  let relay: TcpRelay;
  const routePorts: number[] = [];
  const destinations: HashingDestination[] = [];

  beforeAll(async () => {
    tmp = suiteTempDir('bfmig-wan-cap-');
    const [peerA, peerB, route1, route2] = await Promise.all(Array.from({ length: 4 }, () => freePort()));
    routePorts.push(route1, route2);
    destinations.push(await HashingDestination.listen(), await HashingDestination.listen());
    relay = new TcpRelay({ listen: { host: '127.0.0.1', port: 0 }, target: { host: '127.0.0.1', port: peerB } });
    const wan = await relay.listen();
    const routes = [
      { vm: 'vm1', routePort: route1, targetPort: destinations[0].port },
      { vm: 'vm2', routePort: route2, targetPort: destinations[1].port },
    ];
    const yamlA =
      loopbackMultiRouteYaml({ name: 'site-a', data: path.join(tmp, 'a'), peerPort: peerA, farPeerPort: wan.port, routes }).replace(
        `    target: 127.0.0.1:${destinations[0].port}\n`,
        `    target: 127.0.0.1:${destinations[0].port}\n    wan: { maxMbit: ${ROUTE_MBIT} }\n`,
      ) + `peers:\n  - peer: 127.0.0.1:${wan.port}\n    wan: { maxMbit: ${PEER_MBIT} }\n`;
    a = await startLoggedGateway('site-a', yamlA);
    b = await startLoggedGateway('site-b', loopbackMultiRouteYaml({ name: 'site-b', data: path.join(tmp, 'b'), peerPort: peerB, farPeerPort: peerA, routes: [] }));
  });

  afterAll(async () => {
    await a?.gateway.stop(1);
    await b?.gateway.stop(1);
    await relay?.close();
    for (const d of destinations) await d.close();
  });

  const sha256 = (bytes: Buffer): string => createHash('sha256').update(bytes).digest('hex');

  test("one migration holds its route's cap within 5%, completes and verifies", async () => {
    const { stream } = syntheticStream(16 / 1024);
    const timeline = new RelayTimeline(relay);
    const start = timeline.bytes;
    try {
      const played = playStream(routePorts[0], stream);
      const rate = await timeline.rate(start + 2 * MIB, start + 14 * MIB);
      const cap = (ROUTE_MBIT * 1e6) / 8;
      expect(rate / cap).toBeGreaterThan(0.95);
      expect(rate / cap).toBeLessThan(1.05);
      await played;
      const received = await destinations[0].next();
      expect(received).toEqual({ bytes: stream.length, sha256: sha256(stream), reset: false });
    } finally {
      timeline.stop();
    }
    await waitFor(() => a.logs.some((l) => l.msg === 'migration completed' && l.vm === 'vm1'));
  }, 60_000);

  test("two concurrent migrations share the peer's cap fairly, and it holds within 5%", async () => {
    const streams = [syntheticStream(12 / 1024).stream, syntheticStream(12 / 1024).stream];
    const timeline = new RelayTimeline(relay);
    const start = timeline.bytes;
    const counted = destinations.map((d) => d.bytesReceived);
    try {
      const played = streams.map((s, i) => playStream(routePorts[i], s));
      // Both in flight the whole window: each is past neither end of its stream.
      const rate = await timeline.rate(start + 2 * MIB, start + 16 * MIB);
      const cap = (PEER_MBIT * 1e6) / 8;
      expect(rate / cap).toBeGreaterThan(0.95);
      expect(rate / cap).toBeLessThan(1.05);
      // Fair: each has had about the same share (vm1's own route cap, 24 Mbit/s, is above its half).
      const got = destinations.map((d, i) => d.bytesReceived - counted[i]);
      expect(Math.min(...got) / Math.max(...got)).toBeGreaterThan(0.9);
      await Promise.all(played);
      const received = await Promise.all(destinations.map((d) => d.next()));
      received.forEach((r, i) => expect(r).toEqual({ bytes: streams[i].length, sha256: sha256(streams[i]), reset: false }));
    } finally {
      timeline.stop();
    }
  }, 60_000);
});
