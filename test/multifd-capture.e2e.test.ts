/**
 * The multifd codec against real QEMU 7.2 and 10.0: a guest migrates with multifd on (3 channels) to a
 * Node listener that accepts every connection and keeps each one's bytes, twice (the guest runs on in
 * between). Each time the parsers' page counts must equal query-migrate's, and every channel must come
 * out of encoder → decoder byte for byte; the second time most pages come from the stores the first
 * migration filled.
 */
import * as net from 'node:net';
import { MemoryPages } from '../src/lab/harness/fuzz';
import { multifdRoundTrip } from '../src/lab/harness/multifd-stream';
import { ensureGuestBuilt } from '../src/lab/vm/guest-image';
import { disposeAllVms, QemuVm } from '../src/lab/vm/qemu-vm';
import { qemuBinary, qemuInstalled, type QemuRelease } from '../src/lab/vm/qemu-releases';
import type { MigrationInfo } from '../src/lab/vm/qmp-types';
import { layoutOf, type PageLayout } from '../src/proxy/retained';
import { MultifdParser, MultifdRecordKind } from '../src/qemu/multifd';
import { StreamParser } from '../src/qemu/parser';
import { type RamBlock, RecordKind } from '../src/qemu/records';
import { requireInCi } from './mounts';

const SKIP = process.env.BFMIG_SKIP_E2E === '1';
const CHANNELS = 3;
const QEVM = Buffer.from('QEVM');

/** Listens on loopback; every connection's bytes, in the order they were accepted, once all have closed. */
async function sink(): Promise<{ port: number; connections: () => Promise<Buffer[]>; close: () => void }> {
  const closed: Promise<Buffer>[] = [];
  const server = net.createServer((socket) => {
    const parts: Buffer[] = [];
    socket.on('data', (chunk: Buffer) => parts.push(chunk));
    closed.push(new Promise((resolve, reject) => {
      socket.on('error', reject);
      socket.on('close', () => resolve(Buffer.concat(parts)));
    }));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as net.AddressInfo).port,
    connections: () => Promise.all(closed),
    close: () => server.close(),
  };
}

interface Counted {
  layout: PageLayout;
  channels: Buffer[];
  normal: number;
  zero: number;
  /** MULTIFD_FLUSH records on the main channel (QEMU 8 and later). */
  flushes: number;
}

/** Splits the connections into the main channel and multifd channels, and counts pages as QEMU does. */
function count(connections: Buffer[]): Counted {
  const main = connections.filter((c) => c.subarray(0, 4).equals(QEVM));
  expect(main).toHaveLength(1);
  const channels = connections.filter((c) => !c.subarray(0, 4).equals(QEVM));
  expect(channels).toHaveLength(CHANNELS);
  let blocks: readonly RamBlock[] = [];
  let normal = 0;
  let zero = 0;
  let flushes = 0;
  const parser = new StreamParser((r) => {
    if (r.kind === RecordKind.RamBlockList) blocks = r.blocks;
    else if (r.kind === RecordKind.RamPage) normal++;
    else if (r.kind === RecordKind.RamZero) zero++;
    else if (r.kind === RecordKind.RamMultifdFlush) flushes++;
  });
  parser.push(main[0]);
  parser.end();
  expect(parser.fallenBack).toBeNull();
  let syncs = -1;
  // QEMU counts a page as it queues it; before 9.0 it may put one page in two packets of an epoch (see
  // MultifdMigration), so pages are counted once per epoch, block and offset.
  const sent = new Set<string>();
  for (const channel of channels) {
    let channelSyncs = 0;
    const p = new MultifdParser((r) => {
      if (r.kind !== MultifdRecordKind.Page && r.kind !== MultifdRecordKind.ZeroPage) {
        if (r.kind === MultifdRecordKind.PacketEnd && r.sync) channelSyncs++;
        return;
      }
      const key = `${channelSyncs} ${p.currentPacket.block} ${r.offset}`;
      if (sent.has(key)) return;
      sent.add(key);
      if (r.kind === MultifdRecordKind.Page) normal++;
      else zero++;
    });
    p.push(channel);
    p.end();
    expect(p.fallenBack).toBeNull();
    // Every channel has one SYNC packet per synchronisation point.
    if (syncs < 0) syncs = channelSyncs;
    expect(channelSyncs).toBe(syncs);
  }
  expect(syncs).toBeGreaterThan(0);
  return { layout: layoutOf(blocks), channels, normal, zero, flushes };
}

async function migrateToSink(vm: QemuVm): Promise<{ info: MigrationInfo; counted: Counted }> {
  const listener = await sink();
  try {
    await vm.migrate(`tcp:127.0.0.1:${listener.port}`);
    const info = await vm.waitForMigration({ timeoutMs: 120_000 });
    expect(info.status).toBe('completed');
    return { info, counted: count(await listener.connections()) };
  } finally {
    listener.close();
  }
}

const RELEASES: QemuRelease[] = ['7.2', '10.0'];
const haveQemu10 = SKIP ? false : requireInCi(qemuInstalled('10.0'), 'QEMU 10.0 (scripts/install-qemu10.sh)');

(SKIP ? describe.skip : describe).each(RELEASES.filter((r) => r === '7.2' || haveQemu10))('multifd channels of real QEMU %s', (release) => {
  beforeAll(() => ensureGuestBuilt());
  afterAll(async () => {
    await disposeAllVms();
  });

  test('page counts match query-migrate, every channel rebuilds byte for byte, a second migration reuses most pages', async () => {
    // 10.0 on its own machine type: older ones synchronise at each section's EOS, as 7.2 does.
    const machine = release === '7.2' ? 'pc-i440fx-7.2' : 'pc-i440fx-10.0';
    const vm = new QemuVm({ name: 'source', machine, memMiB: 128, qemuBinary: qemuBinary(release), workload: { mib: 16, seed: 3, rewritePct: 2, intervalMs: 300 } });
    await vm.start();
    await vm.waitForSerial(/WORKLOAD READY pages=\d+/, 180_000);
    await vm.setMigrationCapabilities({ multifd: true });
    await vm.setMigrationParameters({ 'multifd-channels': CHANNELS });

    const first = await migrateToSink(vm);
    expect(first.counted.normal).toBe(first.info.ram?.normal);
    expect(first.counted.zero).toBe(first.info.ram?.duplicate);
    // 7.2 synchronises at every RAM section's EOS; 10.0 says so on the main channel.
    expect(first.counted.flushes > 0).toBe(release === '10.0');
    const sender = new MemoryPages();
    const receiver = new MemoryPages();
    sender.begin(first.counted.layout);
    receiver.begin(first.counted.layout);
    const one = multifdRoundTrip(first.counted.channels, first.counted.layout, { store: sender, reference: null }, receiver);
    one.rebuilt.forEach((bytes, c) => expect(bytes.equals(first.counted.channels[c])).toBe(true));
    expect(sender.digests).toEqual(receiver.digests);

    // The guest runs on and rewrites some of its pages; then it migrates again.
    const mark = vm.serialMark();
    await vm.qmp('cont');
    await vm.waitForSerial(/WORKLOAD VERIFY OK round=\d+/, 60_000, { since: mark });
    const second = await migrateToSink(vm);
    expect(second.counted.normal).toBe(second.info.ram?.normal);
    expect(second.counted.zero).toBe(second.info.ram?.duplicate);
    const two = multifdRoundTrip(second.counted.channels, second.counted.layout, { store: sender, reference: sender.digests }, receiver);
    two.rebuilt.forEach((bytes, c) => expect(bytes.equals(second.counted.channels[c])).toBe(true));
    const reused = two.encoders.reduce((n, e) => n + e.counts.pagesReused, 0);
    const sent = two.encoders.reduce((n, e) => n + e.counts.pagesSent, 0);
    expect(two.decoders.reduce((n, d) => n + d.counts.pagesReused, 0)).toBe(reused);
    expect(reused).toBeGreaterThan(sent);
    expect(sender.digests).toEqual(receiver.digests);
    await vm.dispose();
  }, 600_000);
});
