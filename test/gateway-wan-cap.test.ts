/**
 * WAN caps on loopback: site A routes vm1, vm2 and vm3 to site B through a TCP relay that counts the
 * bytes crossing it (the WAN). vm1's route is capped at 24 Mbit/s, the peer (every route to it) at 32
 * Mbit/s; vm3 migrates with multifd channels, which the peer's cap holds as it holds a main channel.
 * The peer's link is stated at the cap's rate (linkMbit), as an operator whose cap is the link would.
 * The cap is a property of the limiter, so the tests assert ratios of bytes to time against it, measured
 * over windows of several seconds, never absolute times.
 */
import { createHash } from 'node:crypto';
import * as path from 'node:path';
import { startLoggedGateway, type LoggedGateway, waitFor } from '../src/lab/harness/gateway-pair';
import { loopbackMultiRouteYaml } from '../src/lab/harness/loopback-config';
import { guestMemory, migrationStream, PAGE, streamStart } from '../src/lab/harness/migration-stream';
import { multifdMigration } from '../src/lab/harness/multifd-stream';
import { ChannelsDestination, HashingDestination, playStream, sourceChannel } from '../src/lab/harness/qemu-standins';
import { MULTIFD_INIT_BYTES } from '../src/qemu/multifd';
import { syntheticStream } from '../src/lab/harness/synthetic-stream';
import { freePort } from '../src/lab/vm/ports';
import { TcpRelay } from '../src/lab/wan/relay';
import { suiteTempDir } from './temp-dir';

const ROUTE_MBIT = 24;
const PEER_MBIT = 32;
const MIB = 1024 * 1024;
/** vm3's guest: 12 MiB of pseudo-random pages (nothing to compress, nothing retained at site B yet). */
const MULTIFD_BLOCKS: [string, number][] = [['pc.ram', 3072]];
const MULTIFD_CHANNELS = 4;

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
  let channelsDestination: ChannelsDestination;

  beforeAll(async () => {
    tmp = suiteTempDir('bfmig-wan-cap-');
    const [peerA, peerB, route1, route2, route3, target3] = await Promise.all(Array.from({ length: 6 }, () => freePort()));
    routePorts.push(route1, route2, route3);
    destinations.push(await HashingDestination.listen(), await HashingDestination.listen());
    channelsDestination = await ChannelsDestination.listen(target3);
    relay = new TcpRelay({ listen: { host: '127.0.0.1', port: 0 }, target: { host: '127.0.0.1', port: peerB } });
    const wan = await relay.listen();
    const routes = [
      { vm: 'vm1', routePort: route1, targetPort: destinations[0].port },
      { vm: 'vm2', routePort: route2, targetPort: destinations[1].port },
      { vm: 'vm3', routePort: route3, targetPort: target3 },
    ];
    const yamlA =
      loopbackMultiRouteYaml({ name: 'site-a', data: path.join(tmp, 'a'), peerPort: peerA, farPeerPort: wan.port, routes }).replace(
        `    target: 127.0.0.1:${destinations[0].port}\n`,
        `    target: 127.0.0.1:${destinations[0].port}\n    wan: { maxMbit: ${ROUTE_MBIT} }\n`,
      ) + `peers:\n  - peer: 127.0.0.1:${wan.port}\n    wan: { maxMbit: ${PEER_MBIT}, linkMbit: ${PEER_MBIT} }\n`;
    a = await startLoggedGateway('site-a', yamlA);
    b = await startLoggedGateway('site-b', loopbackMultiRouteYaml({ name: 'site-b', data: path.join(tmp, 'b'), peerPort: peerB, farPeerPort: peerA, routes: [] }));
  });

  afterAll(async () => {
    await a?.gateway.stop(1);
    await b?.gateway.stop(1);
    await relay?.close();
    for (const d of destinations) await d.close();
    await channelsDestination?.close();
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

  test("a multifd migration's channels hold the peer's cap between them, and every channel arrives whole", async () => {
    const memory = guestMemory(MULTIFD_BLOCKS, 7, 0);
    const all = memory.pages.map((_, i) => i);
    const main = migrationStream(memory, [], { machine: 'pc-i440fx-7.2', multifd: 'qemu-10.0' });
    const { channels } = multifdMigration(memory, { format: 'qemu-10.0', channels: MULTIFD_CHANNELS, rounds: [all], leadingSync: true });
    const start = streamStart(MULTIFD_BLOCKS.map(([name, pages]) => [name, pages * PAGE]));
    const timeline = new RelayTimeline(relay);
    const from = timeline.bytes;
    try {
      // As QEMU opens a migration: the main channel to its block list, then every channel's first packet.
      const source = await sourceChannel(routePorts[2]);
      await source.write(main.subarray(0, start.length));
      const sources = await Promise.all(channels.map(() => sourceChannel(routePorts[2])));
      await Promise.all(sources.map((c, i) => c.write(channels[i].subarray(0, MULTIFD_INIT_BYTES))));
      const sent = Promise.all([
        source.write(main.subarray(start.length)).then(() => source.socket.end()),
        ...sources.map((c, i) => c.write(channels[i].subarray(MULTIFD_INIT_BYTES)).then(() => c.socket.end())),
      ]);
      // The channels carry the pages: a window of 8 MiB of the 12 is theirs.
      const rate = await timeline.rate(from + 2 * MIB, from + 10 * MIB);
      const cap = (PEER_MBIT * 1e6) / 8;
      expect(rate / cap).toBeGreaterThan(0.9);
      expect(rate / cap).toBeLessThan(1.05);
      await sent;
      const got = await channelsDestination.settled(1 + MULTIFD_CHANNELS);
      expect(got.every((c) => !c.reset)).toBe(true);
      expect(got[0].bytes.equals(main)).toBe(true);
      const byId = new Map(got.slice(1).map((c) => [c.bytes[24], c.bytes]));
      expect(channels.every((bytes, id) => byId.get(id)?.equals(bytes))).toBe(true);
    } finally {
      timeline.stop();
    }
    await waitFor(() => a.logs.some((l) => l.msg === 'migration completed' && l.vm === 'vm3'));
    // The link stated at the cap's rate: each channel worked with a quarter of it while all four were
    // open (its main channel, carrying no pages meanwhile, took no share of its own), more as others ended.
    const ended = a.logs.filter((l) => l.msg === 'channel ended' && l.vm === 'vm3');
    expect(ended).toHaveLength(MULTIFD_CHANNELS);
    expect(ended.every((l) => l.linkStated === true)).toBe(true);
    expect(Math.min(...ended.map((l) => Number(l.linkBytesPerSecond)))).toBe((PEER_MBIT * 1e6) / 8 / MULTIFD_CHANNELS);
  }, 60_000);
});
