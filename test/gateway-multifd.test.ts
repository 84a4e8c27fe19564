/**
 * Multifd channels through a real gateway pair on loopback, with QEMU stand-ins: the pages they carry
 * are kept in both stores and reused on the way back, every channel is rebuilt byte for byte, each store
 * keeps every page's final version whichever channel (the main one included) carried it last and in
 * whatever order the gateways read the channels, and a malformed packet fails the whole migration.
 */
import { Socket } from 'node:net';
import type { Gateway } from '../src/gateway/gateway';
import type { MigrationReport } from '../src/gateway/session';
import { refusals, startPair, stopPair, type TestSite as Site, waitFor } from '../src/lab/harness/gateway-pair';
import { dirty, guestMemory, migrationStream, PAGE, patchPages, streamStart } from '../src/lab/harness/migration-stream';
import { multifdMigration, multifdPacket, type MultifdFormat } from '../src/lab/harness/multifd-stream';
import { restoreSnapshot } from '../src/cli/restore';
import { ChannelsDestination, type ReceivedChannel, sourceChannel } from '../src/lab/harness/qemu-standins';
import { checkStores, claimedSnapshot } from '../src/lab/harness/stores';
import { MULTIFD_INIT_BYTES, MULTIFD_MAGIC, MultifdParser, MultifdRecordKind } from '../src/qemu/multifd';
import { SOURCE_RECV_BUFFER_BYTES, socketTuning, WAN_NOT_SENT_BYTES } from '../src/gateway/socket-tuning';
import { PageStore } from '../src/store';
import { slowSyncs } from './slow-syncs';
import { suiteTempDir } from './temp-dir';

const LIMITS = 'limits:\n  handshakeSeconds: 4\n  maxChannels: 4\n';
const BLOCKS: [string, number][] = [['pc.ram', 256]];

async function report(gateway: Gateway, count: number): Promise<MigrationReport> {
  await waitFor(() => gateway.history.length >= count);
  return gateway.history[count - 1];
}

/** A migration's main channel and its multifd channels, as a QEMU of `format` sends them. */
function multifdRun(format: MultifdFormat, rounds: number[][], pagesOf: (round: number) => Buffer[]): { main: Buffer; channels: Buffer[] } {
  const memory = guestMemory(BLOCKS, 1);
  memory.pages = pagesOf(0);
  const main = migrationStream(memory, rounds.slice(1), { machine: 'pc-i440fx-7.2', multifd: format, pagesOf });
  const { channels } = multifdMigration(memory, { format, channels: 4, rounds, pagesOf, pagesPerPacket: 16, leadingSync: true });
  return { main, channels };
}

/**
 * One migration from `from` to `to`, as QEMU opens it: the main channel up to its RAM block list, then
 * every channel's initial packet (both gateways have them all before any page). Then `mainFirst`: the
 * rest of the main channel, then of every channel; else the other way round (the gateways see the
 * channels' pages of every round before the main channel's).
 */
async function migrate(from: Site, to: Site, run: { main: Buffer; channels: Buffer[] }, mainFirst: boolean, vm = 'vm1', whileJoined?: () => void): Promise<ReceivedChannel[]> {
  const dest = await ChannelsDestination.listen(to.destPort);
  try {
    const start = streamStart(BLOCKS.map(([name, pages]) => [name, pages * PAGE]));
    if (!run.main.subarray(0, start.length).equals(start)) throw new Error('the main channel does not open as streamStart');
    const joined = (site: Site): number => site.logs.filter((l) => l.msg === 'channel joined').length;
    const [fromJoined, toJoined] = [joined(from), joined(to)];
    const main = await sourceChannel(from.routePorts[vm]);
    await main.write(run.main.subarray(0, start.length));
    const channels = await Promise.all(run.channels.map(() => sourceChannel(from.routePorts[vm])));
    await Promise.all(channels.map((c, i) => c.write(run.channels[i].subarray(0, MULTIFD_INIT_BYTES))));
    await waitFor(() => joined(from) === fromJoined + channels.length && joined(to) === toJoined + channels.length);
    whileJoined?.();
    const rest = async (): Promise<void> => {
      await Promise.all(channels.map((c, i) => c.write(run.channels[i].subarray(MULTIFD_INIT_BYTES))));
      for (const c of channels) c.socket.end();
    };
    if (!mainFirst) await rest();
    await main.write(run.main.subarray(start.length));
    if (mainFirst) await rest();
    main.socket.end();
    return await dest.settled(1 + run.channels.length);
  } finally {
    await dest.close();
  }
}

/** A QEMU 10.0 multifd first leg of `pages` from `from` to `to` (VM `vm`): every channel rebuilt, both gateways report it completed. */
async function firstLeg(from: Site, to: Site, pages: Buffer[], vm = 'vm1'): Promise<void> {
  const run = multifdRun('qemu-10.0', [pages.map((_, i) => i)], () => pages);
  const [sent, received] = [from.gateway.history.length + 1, to.gateway.history.length + 1];
  expectRebuilt(await migrate(from, to, run, true, vm), run);
  expect([await report(from.gateway, sent), await report(to.gateway, received)]).toMatchObject([{ result: 'completed' }, { result: 'completed' }]);
}

/** Every channel reached the destination as the source sent it, the main one first. */
function expectRebuilt(got: ReceivedChannel[], run: { main: Buffer; channels: Buffer[] }): void {
  expect(got.every((c) => !c.reset)).toBe(true);
  expect(got[0].bytes.equals(run.main)).toBe(true);
  const byId = new Map(got.slice(1).map((c) => [c.bytes[24], c.bytes]));
  expect(run.channels.every((bytes, id) => byId.get(id)?.equals(bytes))).toBe(true);
}

/** Pages of VM `vm`'s store at `site` that differ from `pages` (the store must be sound). */
function pagesDiffering(site: Site, pages: Buffer[], vm = 'vm1'): number[] {
  expect(checkStores(site.data, [vm])[0].badPages).toEqual([]);
  const store = PageStore.open(site.data, vm);
  try {
    const page = Buffer.alloc(PAGE);
    return pages.flatMap((expected, i) => {
      store.readPages(i, 1, page, 0);
      return page.equals(expected) ? [] : [i];
    });
  } finally {
    store.close();
  }
}

/** The channels' WAN bytes against their length, from the sending gateway's 'channel ended' lines since `from`. */
function channelShare(site: Site, from: number): { streamBytes: number; wanBytes: number; headerSavedBytes: number } {
  const ended = site.logs.slice(from).filter((l) => l.msg === 'channel ended');
  expect(ended).toHaveLength(4);
  // Both gateways compress: each channel's Runs and Deltas went inside its batches (channel-compressed-frames).
  expect(ended.map((l) => l.framesBatched)).toEqual([true, true, true, true]);
  const total = (key: string): number => ended.reduce((sum, l) => sum + Number(l[key]), 0);
  return { streamBytes: total('streamBytes'), wanBytes: total('wanBytes'), headerSavedBytes: total('headerSavedBytes') };
}

// Each channel's zstd batches on the event loop (the default) and on libuv's thread pool.
describe.each(['event-loop', 'thread-pool'])('multifd channels through a gateway pair, compressing on the %s', (runsOn) => {
  let a: Site;
  let b: Site;

  beforeEach(async () => {
    const config = `${LIMITS}compressionRunsOn: ${runsOn}\n`;
    [a, b] = await startPair(suiteTempDir('bfmig-multifd-'), [config, config]);
  });

  afterEach(() => stopPair([a, b]));

  test('a QEMU 10.0 multifd migration there and back: both stores keep its snapshot, the back leg reuses the pages, every channel is rebuilt byte for byte', async () => {
    const memory = guestMemory(BLOCKS, 1);
    const all = memory.pages.map((_, i) => i);
    const run = multifdRun('qemu-10.0', [all, all.filter((i) => i % 5 === 0)], () => memory.pages);

    expectRebuilt(await migrate(a, b, run, true), run);
    const there = [await report(a.gateway, 1), await report(b.gateway, 1)];
    expect(there).toMatchObject([{ result: 'completed' }, { result: 'completed' }]);
    expect(there[0].snapshotId).not.toBeNull();
    expect(there[1].snapshotId).toBe(there[0].snapshotId);
    const first = channelShare(a, 0);
    // The first leg carries the pages (its second round only what the receiver holds from its first).
    expect(first.wanBytes).toBeGreaterThan(0.5 * first.streamBytes);
    expect(pagesDiffering(a, memory.pages)).toEqual([]);
    expect(pagesDiffering(b, memory.pages)).toEqual([]);

    const logged = b.logs.length;
    expectRebuilt(await migrate(b, a, run, true), run);
    const back = [await report(b.gateway, 2), await report(a.gateway, 2)];
    expect(back).toMatchObject([{ result: 'completed' }, { result: 'completed' }]);
    expect(back[0].snapshotId).not.toBeNull();
    expect(back[1].snapshotId).toBe(back[0].snapshotId);
    // Every page the channels carry is held at the far site: what crosses is packet headers and Runs.
    const again = channelShare(b, logged);
    expect(again.streamBytes).toBe(first.streamBytes);
    expect(again.wanBytes).toBeLessThan(0.1 * first.wanBytes);
    // The headers crossed as PacketHeader frames (channel-packet-headers), each a sixth of its 1,344 bytes at most.
    let packets = 0;
    for (const channel of run.channels) new MultifdParser((r) => (packets += r.kind === MultifdRecordKind.Packet ? 1 : 0)).push(channel);
    expect(packets).toBeGreaterThan(8);
    expect(again.headerSavedBytes).toBeGreaterThanOrEqual(packets * (1344 - 1344 / 6));
    // Both reports count the whole migration, its channels' bytes and pages with the main channel's.
    const pageRecords = all.length + all.filter((i) => i % 5 === 0).length;
    for (const r of back) {
      expect(r.streamBytes).toBe(run.main.length + run.channels.reduce((n, c) => n + c.length, 0));
      expect(r.counts).toMatchObject({ pagesSent: 0, pagesDelta: 0, pagesMatched: 0 });
      expect(r.counts.pagesReused + r.counts.pagesZero).toBe(pageRecords);
    }
  });

  test('a QEMU 10.0 multifd back leg whose pages changed in a few bytes: they cross the channels as Deltas, rebuilt byte for byte, and both stores keep their new versions', async () => {
    const memory = guestMemory(BLOCKS, 1);
    const all = memory.pages.map((_, i) => i);
    await firstLeg(a, b, memory.pages);

    // At B the guest changes 64 bytes in a fifth of its pages; it migrates back.
    const changed = patchPages(memory, 0.2, 64, 7).filter((i) => memory.pages[i].some((x) => x !== 0));
    expect(changed.length).toBeGreaterThan(20);
    const back = multifdRun('qemu-10.0', [all], () => memory.pages);
    const logged = b.logs.length;
    expectRebuilt(await migrate(b, a, back, true), back);
    const reports = [await report(b.gateway, 2), await report(a.gateway, 2)];
    expect(reports).toMatchObject([{ result: 'completed' }, { result: 'completed' }]);
    // Every changed page is a Delta (a page's first change in the migration: the sender's undo journal reads its old version anyway).
    for (const r of reports) expect(r.counts.pagesDelta).toBe(changed.length);
    const wan = channelShare(b, logged);
    expect(wan.wanBytes).toBeLessThan(0.25 * changed.length * PAGE);
    expect(pagesDiffering(a, memory.pages)).toEqual([]);
    expect(pagesDiffering(b, memory.pages)).toEqual([]);
    expect(claimedSnapshot(a.data, 'vm1')).toBe(reports[0].snapshotId);
  });

  test('pages rewritten between rounds, on other channels or on the main channel (QEMU 7.2 zero pages), end in their final version in both stores, whatever channel the gateways read first', async () => {
    const before = guestMemory(BLOCKS, 2);
    const after = before.pages.map((p) => Buffer.from(p));
    const zeroThenData = before.pages.findIndex((p) => p.every((v) => v === 0));
    const dataThenZero = before.pages.findIndex((p) => p.some((v) => v !== 0));
    const dataThenData = before.pages.findIndex((p, i) => i > dataThenZero && p.some((v) => v !== 0));
    after[zeroThenData].fill(0x11);
    after[dataThenZero].fill(0);
    after[dataThenData].fill(0x22);
    const all = before.pages.map((_, i) => i);
    const rewritten = [zeroThenData, dataThenZero, dataThenData].sort((x, y) => x - y);
    const run = multifdRun('qemu-7.2', [all, rewritten], (round) => (round === 0 ? before.pages : after));

    expectRebuilt(await migrate(a, b, run, false), run);
    expect([await report(a.gateway, 1), await report(b.gateway, 1)]).toMatchObject([{ result: 'completed' }, { result: 'completed' }]);
    expect(pagesDiffering(a, after)).toEqual([]);
    expect(pagesDiffering(b, after)).toEqual([]);
  });

  test('a destination that closes a channel once it has it all, while both codecs still wait at the SYNC for another channel, sees the migration complete', async () => {
    const memory = guestMemory(BLOCKS, 4);
    const all = memory.pages.map((_, i) => i);
    const run = multifdRun('qemu-10.0', [all], () => memory.pages);
    // QEMU's destination closes a channel once it is done with it; this one does so as soon as it has
    // every byte of a multifd channel, before the gateways' codecs have passed the last SYNC.
    const dest = await ChannelsDestination.listen(b.destPort, (received) => run.channels.some((c) => c.equals(received)));
    const magic = Buffer.alloc(4);
    magic.writeUInt32BE(MULTIFD_MAGIC);
    const lastSync = run.channels[1].lastIndexOf(magic);
    try {
      const main = await sourceChannel(a.routePort);
      await main.write(run.main);
      const channels = await Promise.all(run.channels.map(() => sourceChannel(a.routePort)));
      // Channel 1 holds back its last SYNC packet: the others wait at that SYNC on both gateways.
      await Promise.all(channels.map((c, i) => c.write(i === 1 ? run.channels[1].subarray(0, lastSync) : run.channels[i])));
      // The destination closed channel 0, the receiving gateway's End and FIN reached the sending one,
      // which closed the source's channel 0 while its codec still waited.
      expect(await channels[0].closed).toBe('closed');
      await channels[1].write(run.channels[1].subarray(lastSync));
      for (const c of [main, ...channels]) c.socket.end();
      expectRebuilt(await dest.settled(1 + run.channels.length), run);
    } finally {
      await dest.close();
    }
    expect([await report(a.gateway, 1), await report(b.gateway, 1)]).toMatchObject([{ result: 'completed' }, { result: 'completed' }]);
  });

  test('a migration whose channel is relayed verbatim from a compressed packet on completes, both stores keep the snapshot they held, and restore refuses that older snapshot', async () => {
    const memory = guestMemory(BLOCKS, 1);
    const all = memory.pages.map((_, i) => i);
    const run = multifdRun('qemu-10.0', [all], () => memory.pages);
    expectRebuilt(await migrate(a, b, run, true), run);
    // The next migration of vm1 starts once the sender, too, is done with this one (its store synced), as a
    // real source QEMU's would: it hears "completed" only then.
    await report(a.gateway, 1);
    const kept = (await report(b.gateway, 1)).snapshotId;
    expect(kept).not.toBeNull();
    // QEMU with multifd-compression: the codec cannot read the packet, so the rest of that channel
    // crosses as it is and its pages never reach the stores.
    const compressed = multifdPacket({ format: 'qemu-10.0', packetNumber: 1000, block: 'pc.ram', pages: [], extraFlags: 1 << 1 });
    const verbatim = { main: run.main, channels: run.channels.map((c, i) => (i === 2 ? Buffer.concat([c, compressed]) : c)) };
    expectRebuilt(await migrate(a, b, verbatim, true), verbatim);
    // Never silent: both reports name the channel's fallback, and both gateways warned of it.
    expect([await report(a.gateway, 2), await report(b.gateway, 2)]).toMatchObject([
      { result: 'completed', snapshotId: null, verbatim: { code: 'multifd-compression' } },
      { result: 'completed', snapshotId: null, verbatim: { code: 'multifd-compression' } },
    ]);
    for (const site of [a, b]) expect(site.logs.some((l) => /verbatim/.test(String(l.msg)) && JSON.stringify(l).includes('multifd-compression'))).toBe(true);
    for (const site of [a, b]) {
      expect(claimedSnapshot(site.data, 'vm1')).toBe(kept);
      await expect(restoreSnapshot(site.data, 'vm1', { host: '127.0.0.1', port: 9 })).rejects.toThrow(
        new RegExp(`last migration \\(${site === a ? 'sent' : 'received'} .*\\) completed without this store keeping its snapshot .*snapshot ${kept} is older than the VM`),
      );
    }
  });

  test('a multifd migration begun while the last one of its VM still settles its stores: its channels join the new migration, not the one settling', async () => {
    // Each store's sync before its commit takes 600 ms more: the first migration is still ending (the
    // receiving gateway syncs before its Done, the sending one awaits that Done, then syncs) while the
    // second one's channels arrive.
    const syncs = slowSyncs(600);
    try {
      const memory = guestMemory(BLOCKS, 5);
      const all = memory.pages.map((_, i) => i);
      const first = multifdRun('qemu-10.0', [all], () => memory.pages);
      const changed = memory.pages.map((p, i) => (i % 7 === 0 ? Buffer.alloc(PAGE, i & 0xff) : p));
      const second = multifdRun('qemu-10.0', [all], () => changed);
      expectRebuilt(await migrate(a, b, first, true), first);
      // The destination has every channel; the first migration has not ended on the sending gateway.
      expect(a.gateway.history).toHaveLength(0);
      expect(syncs.running).toBeGreaterThan(0);
      expectRebuilt(await migrate(a, b, second, true), second);
      const reports = [await report(a.gateway, 2), await report(b.gateway, 2)];
      expect(reports).toMatchObject([{ result: 'completed' }, { result: 'completed' }]);
      expect(reports[1].snapshotId).toBe(reports[0].snapshotId);
      expect([...a.gateway.history, ...b.gateway.history].map((r) => r.result)).toEqual(Array(4).fill('completed'));
      for (const site of [a, b]) expect(refusals(site)).toEqual([]);
      expect(pagesDiffering(a, changed)).toEqual([]);
      expect(pagesDiffering(b, changed)).toEqual([]);
    } finally {
      jest.restoreAllMocks();
    }
  });

  test("every connection of a multifd migration queues as little as the main channel's: the source's receive buffer and the WAN socket's unsent bytes are held small", async () => {
    const memory = guestMemory(BLOCKS, 1);
    const run = multifdRun('qemu-10.0', [memory.pages.map((_, i) => i)], () => memory.pages);
    // The sending gateway's sockets, in this process: those it accepted from the source, those it dialled to the peer.
    const sockets = (): Socket[] => (process as unknown as { _getActiveHandles(): unknown[] })._getActiveHandles().filter((h): h is Socket => h instanceof Socket);
    let fromSource: Array<ReturnType<typeof socketTuning>> = [];
    let toPeer: Array<ReturnType<typeof socketTuning>> = [];
    const received = await migrate(a, b, run, true, 'vm1', () => {
      fromSource = sockets().filter((s) => s.localPort === a.routePort).map(socketTuning);
      toPeer = sockets().filter((s) => s.remotePort === b.peerPort).map(socketTuning);
    });
    expectRebuilt(received, run);
    // The main channel and each of its 4 channels; Linux reports twice the receive buffer it was given.
    expect(fromSource).toHaveLength(5);
    expect(fromSource.map((t) => t?.recvBufferBytes)).toEqual(Array(5).fill(2 * SOURCE_RECV_BUFFER_BYTES));
    expect(toPeer).toHaveLength(5);
    expect(toPeer.map((t) => t?.notSentBytes)).toEqual(Array(5).fill(WAN_NOT_SENT_BYTES));
  });

  test('a malformed packet on one channel fails the whole migration on both gateways: every connection is reset, no store commits', async () => {
    const memory = guestMemory(BLOCKS, 3);
    const all = memory.pages.map((_, i) => i);
    const run = multifdRun('qemu-10.0', [all], () => memory.pages);
    // The second packet of channel 1 (after its initial packet and its first SYNC) loses its magic.
    const bad = Buffer.from(run.channels[1]);
    const magic = Buffer.alloc(4);
    magic.writeUInt32BE(MULTIFD_MAGIC);
    bad.writeUInt32BE(0xdeadbeef, bad.indexOf(magic, bad.indexOf(magic, bad.indexOf(magic, 1) + 1) + 1));
    const dest = await ChannelsDestination.listen(b.destPort);
    try {
      const main = await sourceChannel(a.routePort);
      await main.write(run.main.subarray(0, run.main.length >> 1));
      const channels = await Promise.all(run.channels.map(() => sourceChannel(a.routePort)));
      await Promise.all(channels.map((c, i) => c.write(i === 1 ? bad : run.channels[i])));
      expect(await Promise.all([main, ...channels].map((c) => c.closed))).toEqual(Array(5).fill('reset'));
      // What reached the destination (the main channel, and any channel dialled before the failure) was reset.
      const got = await dest.settled(1);
      expect(got.every((c) => c.reset)).toBe(true);
    } finally {
      await dest.close();
    }
    const failed = [await report(a.gateway, 1), await report(b.gateway, 1)];
    expect(failed).toMatchObject([{ result: 'failed', snapshotId: null }, { result: 'failed', snapshotId: null }]);
    expect(failed[0].error).toMatch(/BAD_MAGIC/);
    expect(checkStores(a.data, ['vm1'])[0].snapshotId).toBeNull();
    expect(checkStores(b.data, ['vm1'])[0].snapshotId).toBeNull();
  });
});

describe('multifd channels through a gateway pair that sends Deltas whatever the pace', () => {
  let a: Site;
  let b: Site;

  beforeEach(async () => {
    // `deltas: always`: on loopback the WAN never sets the pace (see gateway-deltas.test.ts).
    const extra = LIMITS + 'deltas: always\n';
    [a, b] = await startPair(suiteTempDir('bfmig-multifd-siblings-'), [extra, extra], undefined, [{ vm: 'vm1' }, { vm: 'vm2', siblings: ['vm1'] }]);
  });

  afterEach(() => stopPair([a, b]));

  test("vm2's first leg sends the pages that vm1's retained snapshot holds across the channels as references to it, rebuilt byte for byte and kept", async () => {
    const image = guestMemory(BLOCKS, 1);
    const all = image.pages.map((_, i) => i);
    await firstLeg(a, b, image.pages);

    // vm2 booted from vm1's image; its workload rewrote a third of its pages.
    const memory = { blocks: image.blocks, pages: image.pages.map((p) => Buffer.from(p)) };
    const changed = new Set(dirty(memory, 0.3, 9));
    const shared = memory.pages.filter((p, i) => !changed.has(i) && p.some((x) => x !== 0)).length;
    expect(shared).toBeGreaterThan(100);
    const run = multifdRun('qemu-10.0', [all], () => memory.pages);
    const logged = a.logs.length;
    expectRebuilt(await migrate(a, b, run, true, 'vm2'), run);
    const reports = [await report(a.gateway, 2), await report(b.gateway, 2)];
    expect(reports).toMatchObject([{ vm: 'vm2', result: 'completed' }, { vm: 'vm2', result: 'completed' }]);
    for (const r of reports) expect(r.counts.pagesSibling).toBe(shared);
    // What crossed the channels: the rewritten pages whole, each shared one as a reference of a few dozen bytes.
    const wan = channelShare(a, logged);
    expect(wan.wanBytes).toBeLessThan((memory.pages.length - shared) * PAGE + shared * 100);
    expect(pagesDiffering(b, memory.pages, 'vm2')).toEqual([]);
    expect(pagesDiffering(a, memory.pages, 'vm2')).toEqual([]);
  });

  test("a QEMU 10.0 first leg's pages that repeat or resemble another page of the epoch cross the channels as Deltas against it, whatever channel carried that one", async () => {
    const memory = guestMemory(BLOCKS, 6);
    const nonZero = memory.pages.map((p, i) => [p, i] as const).filter(([p]) => p.some((x) => x !== 0)).map(([, i]) => i);
    // A quarter of the pages repeat an earlier page, a quarter resemble one (16 bytes differ).
    const repeated = nonZero.filter((_, k) => k > 4 && k % 4 === 1);
    const alike = nonZero.filter((_, k) => k > 4 && k % 4 === 2);
    for (const i of [...repeated, ...alike]) memory.pages[i] = Buffer.from(memory.pages[nonZero[(i * 7) % 4]]);
    for (const i of alike) for (let k = 0; k < 16; k++) memory.pages[i][(i * 131 + k * 257) % PAGE] ^= 0x5a;
    const all = memory.pages.map((_, i) => i);
    const run = multifdRun('qemu-10.0', [all], () => memory.pages);
    const logged = a.logs.length;
    expectRebuilt(await migrate(a, b, run, true), run);
    const reports = [await report(a.gateway, 1), await report(b.gateway, 1)];
    expect(reports).toMatchObject([{ result: 'completed' }, { result: 'completed' }]);
    expect(reports[1].counts).toMatchObject({ pagesMatched: reports[0].counts.pagesMatched, pagesDelta: reports[0].counts.pagesDelta });
    expect(reports[0].counts.pagesMatched).toBeGreaterThan(0.9 * repeated.length);
    expect(reports[0].counts.pagesDelta).toBeGreaterThan(0.5 * alike.length);
    // What crossed the channels: about the pages held nowhere.
    const wan = channelShare(a, logged);
    expect(wan.wanBytes).toBeLessThan((nonZero.length - repeated.length - 0.5 * alike.length) * PAGE);
    expect(pagesDiffering(a, memory.pages)).toEqual([]);
    expect(pagesDiffering(b, memory.pages)).toEqual([]);
  });

  test("a QEMU 7.2 first leg in short epochs (a SYNC every 32 pages): pages like one of an earlier epoch cross the channels as Deltas against it", async () => {
    const memory = guestMemory(BLOCKS, 7, 0);
    // Every third page from the second epoch on repeats a page of the first; every third resembles one.
    const repeated = memory.pages.map((_, i) => i).filter((i) => i >= 32 && i % 3 === 1);
    const alike = memory.pages.map((_, i) => i).filter((i) => i >= 32 && i % 3 === 2);
    for (const i of [...repeated, ...alike]) memory.pages[i] = Buffer.from(memory.pages[(i * 7) % 32]);
    for (const i of alike) for (let k = 0; k < 16; k++) memory.pages[i][(i * 131 + k * 257) % PAGE] ^= 0x5a;
    const rounds = Array.from({ length: memory.pages.length / 32 }, (_, r) => memory.pages.map((_, i) => i).slice(r * 32, r * 32 + 32));
    // A last epoch rewrites pages 40-55 with the first epoch's pages 0-15, each followed in its packet by
    // that page itself, rewritten: its KeepVersion frame crosses inside the channel's batches.
    const last: Buffer[] = memory.pages.map((p) => Buffer.from(p));
    const pairs = Array.from({ length: 16 }, (_, k) => [40 + k, k] as const);
    for (const [page, base] of pairs) {
      last[page] = Buffer.from(memory.pages[base]);
      last[base] = guestMemory([['pc.ram', 1]], 100 + base, 0).pages[0];
    }
    rounds.push(pairs.flatMap(([page, base]) => [page, base]));
    const pagesOf = (round: number): Buffer[] => (round === rounds.length - 1 ? last : memory.pages);
    const run = multifdRun('qemu-7.2', rounds, pagesOf);
    const logged = a.logs.length;
    expectRebuilt(await migrate(a, b, run, true), run);
    const reports = [await report(a.gateway, 1), await report(b.gateway, 1)];
    expect(reports).toMatchObject([{ result: 'completed' }, { result: 'completed' }]);
    expect(reports[1].counts).toMatchObject({ pagesMatched: reports[0].counts.pagesMatched, pagesDelta: reports[0].counts.pagesDelta });
    // Their originals all went in the first epoch: against the same epoch's pages alone, none would.
    const ended = a.logs.slice(logged).filter((l) => l.msg === 'channel ended');
    const earlier = ended.reduce((n, l) => n + Number(l.earlierBaseDeltas), 0);
    expect(earlier).toBeGreaterThan(0.8 * (repeated.length + alike.length + pairs.length));
    expect(reports[0].counts.pagesMatched + reports[0].counts.pagesDelta).toBeGreaterThanOrEqual(earlier);
    // A packet's first and last pages (QEMU 7.2 may send them twice) go against nothing: most pairs do.
    expect(ended.reduce((n, l) => n + Number(l.versionsKept), 0)).toBeGreaterThan(pairs.length / 2);
    expect(pagesDiffering(a, last)).toEqual([]);
    expect(pagesDiffering(b, last)).toEqual([]);
  });
});

describe('multifd channels through a gateway pair whose receiving site has compression off', () => {
  let a: Site;
  let b: Site;

  beforeEach(async () => {
    [a, b] = await startPair(suiteTempDir('bfmig-multifd-off-'), [LIMITS, `${LIMITS}compression: off\n`]);
  });

  afterEach(() => stopPair([a, b]));

  test('packet headers cross as the Literal bytes they are, no PacketHeader frame, and every channel is rebuilt byte for byte', async () => {
    const memory = guestMemory(BLOCKS, 3);
    const all = memory.pages.map((_, i) => i);
    const run = multifdRun('qemu-10.0', [all, all.filter((i) => i % 3 === 0)], () => memory.pages);
    expectRebuilt(await migrate(a, b, run, true), run);
    expect([await report(a.gateway, 1), await report(b.gateway, 1)]).toMatchObject([{ result: 'completed', compressionSavedBytes: 0 }, { result: 'completed', compressionSavedBytes: 0 }]);
    const ended = a.logs.filter((l) => l.msg === 'channel ended');
    expect(ended).toHaveLength(4);
    expect(ended.map((l) => l.headerSavedBytes)).toEqual([0, 0, 0, 0]);
    expect(pagesDiffering(b, memory.pages)).toEqual([]);
  });
});
