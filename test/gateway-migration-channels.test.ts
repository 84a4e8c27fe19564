/**
 * A migration's extra channels (multifd, postcopy-preempt) through a real gateway pair on loopback,
 * with QEMU stand-ins: grouped with their main channel in any order, carried one peer connection
 * each, handed to the destination after the main channel and verbatim; channels that claim no
 * migration, another VM UUID, a taken id or one past the limit are refused; one channel failing fails
 * the whole migration on both gateways.
 */
import { randomBytes } from 'node:crypto';
import * as path from 'node:path';
import { issueCerts } from '../src/cli/certs';
import type { Gateway } from '../src/gateway/gateway';
import type { MigrationReport } from '../src/gateway/session';
import { rawPeer, refusals, startPair, stopPair, type TestSite as Site, waitFor } from '../src/lab/harness/gateway-pair';
import { guestMemory, migrationStream, PAGE } from '../src/lab/harness/migration-stream';
import { multifdPacket } from '../src/lab/harness/multifd-stream';
import { ChannelsDestination, multifdInitPacket, sourceChannel } from '../src/lab/harness/qemu-standins';
import { StreamHash } from '../src/digest';
import { encodeJson, frameHeader, FrameType, PROTOCOL_VERSION } from '../src/wire/frames';
import { suiteTempDir } from './temp-dir';

const LIMITS = 'limits:\n  handshakeSeconds: 2\n  maxChannels: 4\n';
const UUID = Buffer.alloc(16, 0x5a);

async function report(gateway: Gateway, count: number): Promise<MigrationReport> {
  await waitFor(() => gateway.history.length >= count);
  return gateway.history[count - 1];
}

/**
 * A multifd channel's bytes: its initial packet, then packets (QEMU 10.0's) of `pages` random pages of
 * pc.ram, channel `id`'s own among the block's first `blockPages`.
 */
function channelBytes(id: number, pages: number, uuid = UUID, blockPages = 300): Buffer {
  const packets = [multifdInitPacket(uuid, id)];
  for (let first = 0; first < pages; first += 16) {
    const count = Math.min(16, pages - first);
    const offset = (k: number): number => ((id * pages + first + k) % blockPages) * PAGE;
    packets.push(multifdPacket({ format: 'qemu-10.0', packetNumber: id * 1000 + first, block: 'pc.ram', pages: Array.from({ length: count }, (_, k) => ({ offset: offset(k), data: randomBytes(PAGE) })) }));
  }
  return Buffer.concat(packets);
}

describe('migration channels through a gateway pair', () => {
  let tmp = '';
  let a: Site;
  let b: Site;
  let dest: ChannelsDestination | null = null;
  const memory = guestMemory([['pc.ram', 300]], 5);
  const stream = migrationStream(memory, []);
  const half = stream.length >> 1;

  beforeAll(async () => {
    tmp = suiteTempDir('bfmig-channels-');
    [a, b] = await startPair(tmp, [LIMITS, LIMITS]);
  });

  afterEach(async () => {
    await dest?.close();
    dest = null;
  });

  afterAll(() => stopPair([a, b]));

  test('a main channel and 4 multifd channels, one opened before the main: the destination gets the main first, each channel as sent', async () => {
    dest = await ChannelsDestination.listen(b.destPort);
    const sent = [0, 1, 2, 3].map((id) => channelBytes(id, 70 + id));
    const early = await sourceChannel(a.routePort);
    await early.write(sent[2]);
    const main = await sourceChannel(a.routePort);
    await main.write(stream.subarray(0, half));
    const others = await Promise.all([0, 1, 3].map(() => sourceChannel(a.routePort)));
    await Promise.all(others.map((c, i) => c.write(sent[[0, 1, 3][i]])));
    for (const c of [early, ...others]) c.socket.end();
    await main.write(stream.subarray(half));
    main.socket.end();

    const got = await dest.settled(5);
    expect(got[0].bytes.equals(stream)).toBe(true);
    const byId = new Map(got.slice(1).map((c) => [c.bytes[24], c.bytes]));
    for (const [id, bytes] of sent.entries()) expect(byId.get(id)?.equals(bytes)).toBe(true);
    expect(got.every((c) => !c.reset)).toBe(true);
    expect(await Promise.all([early, main, ...others].map((c) => c.closed))).toEqual(Array(5).fill('closed'));
    // Every page the channels carried was kept: both sides claim this migration's snapshot.
    const reports = [await report(a.gateway, 1), await report(b.gateway, 1)];
    expect(reports).toMatchObject([{ result: 'completed' }, { result: 'completed' }]);
    expect(reports[0].snapshotId).not.toBeNull();
    expect(reports[1].snapshotId).toBe(reports[0].snapshotId);
    expect(a.logs.filter((l) => l.msg === 'channel joined')).toHaveLength(4);
  });

  test('channels with no migration, a taken id, another VM UUID or an id past limits.maxChannels are refused; the migration goes on', async () => {
    const before = a.gateway.history.length;
    // No migration on the route within handshakeSeconds.
    const orphan = await sourceChannel(a.routePort);
    await orphan.write(channelBytes(0, 1));
    expect(await orphan.closed).toBe('reset');
    expect(refusals(a).at(-1)).toMatchObject({ listener: 'source', reason: 'no-migration' });

    dest = await ChannelsDestination.listen(b.destPort);
    const main = await sourceChannel(a.routePort);
    await main.write(stream.subarray(0, half));
    const good = await sourceChannel(a.routePort);
    await good.write(channelBytes(1, 2));
    await waitFor(() => a.logs.filter((l) => l.msg === 'channel joined').length === 5);
    const cases: Array<[Buffer, string]> = [
      [channelBytes(1, 1), 'duplicate-channel'],
      [channelBytes(2, 1, Buffer.alloc(16, 1)), 'channel-mismatch'],
      [channelBytes(4, 1), 'channel-limit'],
      [multifdInitPacket(UUID, 2, 2), 'not-qemu'],
    ];
    for (const [bytes, reason] of cases) {
      const hostile = await sourceChannel(a.routePort);
      await hostile.write(bytes);
      expect(await hostile.closed).toBe('reset');
      expect(refusals(a).at(-1)).toMatchObject({ listener: 'source', reason });
    }
    good.socket.end();
    await main.write(stream.subarray(half));
    main.socket.end();
    const got = await dest.settled(2);
    expect(got[0].bytes.equals(stream)).toBe(true);
    expect(await report(a.gateway, before + 1)).toMatchObject({ result: 'completed' });
  });

  test("a peer's channel Hello naming a migration that does not exist is refused", async () => {
    const peer = await rawPeer(b.peerPort);
    peer.socket.write(
      encodeJson(FrameType.Hello, { protocol: PROTOCOL_VERSION, site: 'raw', vm: 'vm1', target: `127.0.0.1:${b.destPort}`, migration: 'no-such-migration', channel: { kind: 'multifd', index: 0 } }),
    );
    await peer.closed;
    expect(refusals(b).at(-1)).toMatchObject({ listener: 'peer', reason: 'no-migration' });
  });

  test("a peer's second migration naming the id of one in progress fails (it could otherwise take that migration's channels)", async () => {
    dest = await ChannelsDestination.listen(b.destPort);
    const hello = (vm: string): Buffer => encodeJson(FrameType.Hello, { protocol: PROTOCOL_VERSION, site: 'raw', vm, target: `127.0.0.1:${b.destPort}`, migration: 'taken' });
    const first = await rawPeer(b.peerPort);
    first.socket.write(hello('vm-first'));
    await waitFor(() => first.frames.some((f) => f.type === FrameType.Offer));
    const second = await rawPeer(b.peerPort);
    second.socket.write(hello('vm-second'));
    await second.closed;
    expect(second.abortText()).toMatch(/migration taken is already in progress/);
    expect(b.gateway.history.at(-1)).toMatchObject({ vm: 'vm-second', result: 'failed' });
    first.socket.destroy();
    await waitFor(() => b.gateway.history.at(-1)?.vm === 'vm-first');
  });

  test('the receiving gateway completes a migration only once every channel the sender had has joined', async () => {
    const before = b.gateway.history.length;
    dest = await ChannelsDestination.listen(b.destPort);
    const target = `127.0.0.1:${b.destPort}`;
    const main = await rawPeer(b.peerPort);
    main.socket.write(encodeJson(FrameType.Hello, { protocol: PROTOCOL_VERSION, site: 'raw', vm: 'vm-late', target, migration: 'late' }));
    await waitFor(() => main.frames.some((f) => f.type === FrameType.Offer));
    // The whole stream and its End, naming one extra channel that has not joined yet (as a source QEMU
    // that sent everything before its last channel crossed the WAN).
    const check = new StreamHash();
    check.update(stream);
    main.socket.write(Buffer.concat([frameHeader(FrameType.Literal, stream.length), stream]));
    main.socket.write(encodeJson(FrameType.End, { streamBytes: stream.length, streamCheck: check.digest(), snapshotId: 'late-snapshot', channels: 1 }));
    await waitFor(() => b.logs.some((l) => l.vm === 'vm-late' && l.msg === 'waiting for extra channels'));
    const bytes = channelBytes(0, 2);
    const channelCheck = new StreamHash();
    channelCheck.update(bytes);
    expect(main.frames.some((f) => f.type === FrameType.Done)).toBe(false);
    const channel = await rawPeer(b.peerPort);
    channel.socket.write(encodeJson(FrameType.Hello, { protocol: PROTOCOL_VERSION, site: 'raw', vm: 'vm-late', target, migration: 'late', channel: { kind: 'multifd', index: 0 } }));
    channel.socket.write(Buffer.concat([frameHeader(FrameType.Literal, bytes.length), bytes]));
    channel.socket.end(encodeJson(FrameType.End, { streamBytes: bytes.length, streamCheck: channelCheck.digest() }));
    await waitFor(() => main.frames.some((f) => f.type === FrameType.Done));
    main.socket.end();
    const got = await dest.settled(2);
    expect(got[0].bytes.equals(stream)).toBe(true);
    expect(got[1].bytes.equals(bytes)).toBe(true);
    expect(await report(b.gateway, before + 1)).toMatchObject({ vm: 'vm-late', result: 'completed' });
  });

  test('one channel cut mid-migration fails the whole migration on both gateways: every connection is reset', async () => {
    const beforeA = a.gateway.history.length;
    const beforeB = b.gateway.history.length;
    dest = await ChannelsDestination.listen(b.destPort);
    const main = await sourceChannel(a.routePort);
    await main.write(stream.subarray(0, half));
    const channels = await Promise.all([0, 1].map(() => sourceChannel(a.routePort)));
    await Promise.all(channels.map((c, id) => c.write(channelBytes(id, 2, UUID, 64))));
    await waitFor(() => dest?.accepted === 3);
    channels[0].socket.resetAndDestroy();
    expect(await main.closed).toBe('reset');
    expect(await channels[1].closed).toBe('reset');
    const got = await dest.settled(3);
    expect(got.every((c) => c.reset)).toBe(true);
    expect(got[0].bytes.length).toBeLessThan(stream.length);
    expect(await report(a.gateway, beforeA + 1)).toMatchObject({ result: 'failed' });
    expect(await report(b.gateway, beforeB + 1)).toMatchObject({ result: 'failed' });
  });

  test('postcopy-preempt: a connection with no magic joins a migration that advised postcopy, from its address, once', async () => {
    const before = a.gateway.history.length;
    const advised = migrationStream(memory, [], { machine: 'pc-i440fx-10.0', postcopyAdvise: true });
    dest = await ChannelsDestination.listen(b.destPort);
    const main = await sourceChannel(a.routePort);
    await main.write(advised.subarray(0, half));
    await waitFor(() => a.logs.filter((l) => l.msg === 'reuse decided').length === before + 1);
    const preempt = await sourceChannel(a.routePort);
    await waitFor(() => a.logs.some((l) => l.msg === 'channel joined' && l.channel === 'preempt'));
    // A second one is not the preempt channel: it must say what it is like any other, and cannot.
    const second = await sourceChannel(a.routePort);
    await second.write(Buffer.from('not a migration'));
    expect(await second.closed).toBe('reset');
    expect(refusals(a).at(-1)).toMatchObject({ listener: 'source', reason: 'not-qemu' });
    const pages = randomBytes(50_000);
    await preempt.write(pages);
    preempt.socket.end();
    await main.write(advised.subarray(half));
    main.socket.end();
    const got = await dest.settled(2);
    expect(got[0].bytes.equals(advised)).toBe(true);
    expect(got[1].bytes.equals(pages)).toBe(true);
    expect(await report(a.gateway, before + 1)).toMatchObject({ result: 'completed' });
  });
});

describe('migration channels that stall', () => {
  let a: Site;
  let b: Site;
  let dest: ChannelsDestination | null = null;

  beforeAll(async () => {
    const limits = 'limits:\n  idleSeconds: 1\n';
    [a, b] = await startPair(suiteTempDir('bfmig-channels-idle-'), [limits, limits]);
  });

  afterAll(async () => {
    await dest?.close();
    await stopPair([a, b]);
  });

  test('a migration whose channels move nothing for limits.idleSeconds fails on both gateways: every connection is reset', async () => {
    dest = await ChannelsDestination.listen(b.destPort);
    const stream = migrationStream(guestMemory([['pc.ram', 64]], 9), []);
    const main = await sourceChannel(a.routePort);
    await main.write(stream.subarray(0, stream.length >> 1));
    const channels = await Promise.all([0, 1].map(() => sourceChannel(a.routePort)));
    await Promise.all(channels.map((c, id) => c.write(channelBytes(id, 2, UUID, 64))));
    // Then nothing more: QEMU's channels wait on each other at every sync, so one that stalls stalls them all.
    expect(await Promise.all([main, ...channels].map((c) => c.closed))).toEqual(['reset', 'reset', 'reset']);
    const got = await dest.settled(3);
    expect(got.every((c) => c.reset)).toBe(true);
    expect(await report(a.gateway, 1)).toMatchObject({ result: 'failed', error: expect.stringMatching(/limits.idleSeconds/) });
    expect(await report(b.gateway, 1)).toMatchObject({ result: 'failed' });
  });
});

describe('migration channels over mutual TLS', () => {
  let a: Site;
  let b: Site;
  let dest: ChannelsDestination | null = null;

  beforeAll(async () => {
    const tmp = suiteTempDir('bfmig-channels-tls-');
    const certs = path.join(tmp, 'certs');
    issueCerts(certs, ['site-a', 'site-b'], 30);
    const block = (site: string, peer: string): string => `tls:\n  cert: ${certs}/${site}.crt\n  key: ${certs}/${site}.key\n  ca: ${certs}/ca.crt\n  allowPeers: [${peer}]\n`;
    [a, b] = await startPair(tmp, [block('site-a', 'site-b'), block('site-b', 'site-a')]);
  });

  afterAll(async () => {
    await dest?.close();
    await stopPair([a, b]);
  });

  test('a main channel and 2 multifd channels cross, each on a TLS connection of its own', async () => {
    dest = await ChannelsDestination.listen(b.destPort);
    const stream = migrationStream(guestMemory([['pc.ram', 64]], 3), []);
    const sent = [0, 1].map((id) => channelBytes(id, 40, UUID, 64));
    const main = await sourceChannel(a.routePort);
    await main.write(stream.subarray(0, stream.length >> 1));
    const channels = await Promise.all(sent.map(() => sourceChannel(a.routePort)));
    await Promise.all(channels.map((c, i) => c.write(sent[i])));
    for (const c of channels) c.socket.end();
    await main.write(stream.subarray(stream.length >> 1));
    main.socket.end();
    const got = await dest.settled(3);
    expect(got[0].bytes.equals(stream)).toBe(true);
    const byId = new Map(got.slice(1).map((c) => [c.bytes[24], c.bytes]));
    expect(sent.every((bytes, id) => byId.get(id)?.equals(bytes))).toBe(true);
    expect(await report(b.gateway, 1)).toMatchObject({ result: 'completed' });
  });
});
