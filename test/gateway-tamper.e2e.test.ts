/**
 * A stream damaged between the gateways never runs, with real QEMU 7.2 and two `bfmig gateway`
 * processes on a plaintext link. A relay standing for the WAN flips one byte of one Literal frame —
 * in a page, in the device state, or in the vmdesc trailer — for the QEMU 7.2 framing and the QEMU
 * 2.0 one (which has no trailer), with QEMU's return path off and on. Each time the source QEMU must
 * report a failed migration while its VM runs on and verifies, and the destination QEMU must never
 * reach `completed` or `running`. A control migration through the same relay, untouched, completes:
 * the relay itself breaks nothing, so the failures are the damage's doing; its guest must verify at the
 * destination, unless the source's own capture fails too (QEMU 7.2's known problem), when it is repeated once.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { Capture } from '../src/lab/capture';
import { loopbackMultiRouteYaml } from '../src/lab/harness/loopback-config';
import { type SiteGateway, startSiteGateway } from '../src/lab/harness/site-gateway';
import { QemuVm, disposeAllVms, type QemuVmOptions } from '../src/lab/vm/qemu-vm';
import { resumeSource, verifiedOrSourceBroken } from '../src/lab/vm/replay-verdict';
import { ensureGuestBuilt } from '../src/lab/vm/guest-image';
import { freePort } from '../src/lab/vm/ports';
import { encodeFrame, FrameParser, FrameType, MAX_FRAME_PAYLOAD } from '../src/wire/frames';
import { suiteTempDir } from './temp-dir';

const SKIP = process.env.BFMIG_SKIP_E2E === '1';
const VERIFIED = /WORKLOAD VERIFY OK round=\d+ pages=\d+/;
const VM = 'vm1';

/** Where to flip a byte: returns the index in a Literal payload, or -1 where this frame has no such place. */
type Target = (payload: Buffer) => number;

/** A byte of the SeaBIOS image in guest memory: a page the destination would load without a word. */
const inPage: Target = (p) => {
  const at = p.indexOf('SeaBIOS');
  return at < 0 ? -1 : at;
};

/** A byte of the `timer` device's state (its clock offsets: any value loads). */
const inDeviceState: Target = (p) => {
  // FULL section header: 0x04, u32 id, u8 name length, "timer", u32 instance, u32 version; then data.
  const name = p.indexOf(Buffer.from([5, ...Buffer.from('timer')]));
  if (name < 5 || p[name - 5] !== 0x04 || name + 6 + 8 + 8 > p.length) return -1;
  return name + 6 + 8 + 3;
};

/** A byte of the vmdesc JSON after EOF, which QEMU's loader reads after the machine state. */
const inTrailer: Target = (p) => {
  const at = p.indexOf('{"page_size":');
  return at < 0 || at + 20 > p.length ? -1 : at + 15;
};

/**
 * The WAN link from the sending gateway to the receiving one: frames pass as they are, except that
 * `target`, while set, flips one byte of the first Literal frame it finds a place in (with
 * `channelsOnly`, on a multifd channel's connection only: its Hello names the channel).
 */
class TamperLink {
  target: Target | null = null;
  channelsOnly = false;
  flipped = false;
  private readonly server: net.Server;

  constructor(private readonly to: number) {
    this.server = net.createServer((client) => this.accept(client));
  }

  listen(): Promise<number> {
    return new Promise((resolve) => this.server.listen(0, '127.0.0.1', () => resolve((this.server.address() as net.AddressInfo).port)));
  }

  close(): Promise<void> {
    return new Promise((resolve) => this.server.close(() => resolve()));
  }

  private accept(client: net.Socket): void {
    const far = net.connect({ host: '127.0.0.1', port: this.to });
    let channel = false;
    const frames = new FrameParser((type, payload) => {
      let bytes = payload;
      if (type === FrameType.Hello) channel = (JSON.parse(payload.toString()) as { channel?: { kind: string } }).channel?.kind === 'multifd';
      if (type === FrameType.Literal && this.target && !this.flipped && (channel || !this.channelsOnly)) {
        const at = this.target(payload);
        if (at >= 0) {
          bytes = Buffer.from(payload);
          bytes[at] ^= 0x01;
          this.flipped = true;
        }
      }
      far.write(encodeFrame(type, Buffer.from(bytes)));
    });
    frames.maxPayload = MAX_FRAME_PAYLOAD;
    client.on('data', (chunk: Buffer) => frames.push(chunk));
    far.on('data', (chunk: Buffer) => client.write(chunk));
    const close = (): void => {
      client.destroy();
      far.destroy();
    };
    for (const s of [client, far]) {
      s.on('error', close);
      s.on('close', close);
    }
  }
}

(SKIP ? describe.skip : describe)('a stream damaged between the gateways never runs (real QEMU)', () => {
  let tmp = '';
  let sender: SiteGateway;
  let receiver: SiteGateway;
  let link: TamperLink;
  let routePort = 0;
  let destPort = 0;
  const outcomes: string[] = [];

  beforeAll(async () => {
    ensureGuestBuilt();
    tmp = suiteTempDir('bfmig-tamper-');
    const [peerA, peerB, route, dest, unused] = await Promise.all(Array.from({ length: 5 }, () => freePort()));
    routePort = route;
    destPort = dest;
    link = new TamperLink(peerB);
    const linkPort = await link.listen();
    const site = (name: string, peer: number, farPeer: number, routeAt: number, target: number): string => {
      const data = path.join(tmp, name);
      fs.mkdirSync(data);
      // The relay finds what it damages in Literal payloads: compression off, so none is hidden in a
      // Compressed frame (damage there is refused by zstd or, decoded, caught by the same stream check).
      return loopbackMultiRouteYaml({ name, data, peerPort: peer, farPeerPort: farPeer, routes: [{ vm: VM, routePort: routeAt, targetPort: target }] }) + 'compression: off\n';
    };
    sender = await startSiteGateway(tmp, 'site-a', site('site-a', peerA, linkPort, routePort, destPort), 'child-process');
    receiver = await startSiteGateway(tmp, 'site-b', site('site-b', peerB, peerA, unused, unused), 'child-process');
  });

  afterAll(async () => {
    await disposeAllVms();
    await sender?.stop();
    await receiver?.stop();
    await link?.close();
    if (outcomes.length > 0) console.log(['damaged between the gateways (real QEMU):', ...outcomes].join('\n'));
  });

  const framings: Array<{ machine: string; targets: Array<[string, Target]> }> = [
    {
      machine: 'pc-i440fx-7.2',
      targets: [
        ['a page', inPage],
        ['the device state', inDeviceState],
        ['the vmdesc trailer', inTrailer],
      ],
    },
    {
      machine: 'pc-i440fx-2.0',
      targets: [
        ['a page', inPage],
        ['the device state', inDeviceState],
      ],
    },
  ];

  for (const { machine, targets } of framings) {
    for (const returnPath of [false, true]) {
      test(`${machine}, return path ${returnPath ? 'on' : 'off'}: every damaged migration fails cleanly, the untouched one completes`, async () => {
        const options: QemuVmOptions = { machine, memMiB: 128, workload: { mib: 16, seed: 41, rewritePct: 0, intervalMs: 500 } };
        const vm = new QemuVm({ ...options, name: `tamper-src-${machine}` });
        await vm.start();
        if (returnPath) await vm.setMigrationCapabilities({ 'return-path': true });
        await vm.waitForSerial(/WORKLOAD READY/, 180_000);
        const destination = async (label: string): Promise<QemuVm> => {
          const dest = new QemuVm({ ...options, name: `tamper-${label}`, incoming: `tcp:127.0.0.1:${destPort}` });
          await dest.start();
          if (returnPath) await dest.setMigrationCapabilities({ 'return-path': true });
          return dest;
        };
        for (const [where, target] of targets) {
          // Nothing retained: every page crosses as Literal bytes (a retained one would cross as a Run).
          for (const site of ['site-a', 'site-b']) fs.rmSync(path.join(tmp, site, VM), { recursive: true, force: true });
          const counts = receiver.reports.length;
          link.target = target;
          link.flipped = false;
          const dest = await destination(`${where.replace(/ /g, '-')}`);
          await vm.migrate(`tcp:127.0.0.1:${routePort}`);
          const info = await vm.waitForMigration({ timeoutMs: 120_000, allowFailure: true });
          // Without the return path the source may be done before the link has passed the tail on.
          await waitFor(() => receiver.reports.length > counts);
          expect(link.flipped).toBe(true);
          let source = 'failed and runs on';
          if (returnPath) {
            // The destination's verdict reaches the source QEMU, which fails the migration and runs on.
            expect({ where, status: info.status }).toEqual({ where, status: 'failed' });
          } else if (info.status === 'completed') {
            // Without the return path QEMU's source counts a migration complete once its socket took the
            // last byte, and leaves its VM paused: what reaches it is the destination's failure, below.
            expect((await vm.status()).status).toBe('postmigrate');
            await vm.qmp('cont');
            source = 'reported completed (no return path), VM paused; resumed with cont';
          } else {
            expect({ where, status: info.status }).toEqual({ where, status: 'failed' });
          }
          // The source's VM runs and still verifies its memory. QEMU reports the migration failed before its
          // migration thread resumes the VM (finish-migrate until then): wait for it, briefly.
          await vm.waitForStatus('running', 10_000);
          await vm.waitForSerial(VERIFIED, 60_000, { since: vm.serialMark() });
          // The destination never completed loading nor ran the guest.
          const exited = await dest.waitForExit(30_000);
          if (!exited) {
            expect((await dest.status()).status).not.toBe('running');
            expect((await dest.queryMigrate()).status).not.toBe('completed');
          }
          expect(receiver.reports[counts]).toMatchObject({ direction: 'receive', result: 'failed' });
          outcomes.push(`- ${machine}, return path ${returnPath ? 'on' : 'off'}, byte flipped in ${where}: source ${source}; destination ${exited ? `exited (${dest.exit?.code ?? dest.exit?.signal})` : 'waiting, never ran'}`);
          await dest.dispose();
        }
        // The control: the same link, nothing flipped. What the source sent is kept to tell a guest state
        // QEMU 7.2 sent broken from one the gateways broke (README, "Known problem"): if the source's own
        // bytes fail too, the control is repeated once.
        link.target = null;
        const controlCapture = path.join(tmp, 'control.mig');
        for (let attempt = 1; ; attempt++) {
          const dest = await destination('control');
          const capturePort = await freePort();
          const capture = new Capture({ listen: { host: '127.0.0.1', port: capturePort }, out: controlCapture, forward: { host: '127.0.0.1', port: routePort } });
          await capture.listen();
          await vm.migrate(`tcp:127.0.0.1:${capturePort}`);
          expect((await vm.waitForMigration({ timeoutMs: 120_000 })).status).toBe('completed');
          expect((await capture.done).error).toBeNull();
          const verdict = await verifiedOrSourceBroken(dest, controlCapture, VERIFIED);
          await dest.dispose();
          if (!verdict) break;
          if (attempt > 1) throw new Error(`control repeated: ${verdict.detail}`);
          console.log(`${machine}: the control's destination guest failed and ${verdict.detail}: repeating the control once`);
          await resumeSource(vm, VERIFIED);
        }
        outcomes.push(`- ${machine}, return path ${returnPath ? 'on' : 'off'}, nothing flipped: completed, guest verified at the destination`);
        await vm.dispose();
        // A repeated control (a guest's wait, the replay, the second leg) can take minutes on a busy machine.
      }, 300_000);
    }
  }

  // Multifd channels are checked after every SYNC packet, and the receiving gateway holds each SYNC packet
  // back until its check passes: QEMU's destination loads the device state only once every channel's
  // last SYNC packet is in, so it never runs what a damaged channel brought.
  test('multifd (4 channels), return path on: a byte of a page damaged on a channel fails the migration, the destination never runs', async () => {
    const options: QemuVmOptions = { machine: 'pc-i440fx-7.2', memMiB: 128, workload: { mib: 16, seed: 42, rewritePct: 0, intervalMs: 500 } };
    const multifd = { 'return-path': true, multifd: true };
    const channels = { 'multifd-channels': 4 };
    const vm = new QemuVm({ ...options, name: 'tamper-src-multifd' });
    await vm.start();
    await vm.setMigrationCapabilities(multifd);
    await vm.setMigrationParameters(channels);
    await vm.waitForSerial(/WORKLOAD READY/, 180_000);
    for (const site of ['site-a', 'site-b']) fs.rmSync(path.join(tmp, site, VM), { recursive: true, force: true });
    const counts = receiver.reports.length;
    link.target = inPage;
    link.channelsOnly = true;
    link.flipped = false;
    const dest = new QemuVm({ ...options, name: 'tamper-multifd', incoming: 'defer' });
    try {
      await dest.start();
      await dest.setMigrationCapabilities(multifd);
      await dest.setMigrationParameters(channels);
      await dest.migrateIncoming(`tcp:127.0.0.1:${destPort}`);
      await vm.migrate(`tcp:127.0.0.1:${routePort}`);
      const info = await vm.waitForMigration({ timeoutMs: 120_000, allowFailure: true });
      await waitFor(() => receiver.reports.length > counts);
      expect(link.flipped).toBe(true);
      expect(info.status).toBe('failed');
      await vm.waitForStatus('running', 10_000); // resumed once QEMU's migration thread has cleaned up
      await vm.waitForSerial(VERIFIED, 60_000, { since: vm.serialMark() });
      const exited = await dest.waitForExit(30_000);
      let how = exited ? `exited (${dest.exit?.code ?? dest.exit?.signal})` : 'waiting, never ran';
      if (!exited) {
        // QEMU 7.2's destination waits in its main thread for every channel's SYNC packet
        // (multifd_recv_sync_main), which the receiving gateway held back and a failed channel never
        // brings: it hangs there, monitor and all, before the device state (fixed in later releases).
        const status = await dest.qmp<{ status: string }>('query-status', undefined, 10_000).then(
          (reply) => reply.status,
          (err: unknown) => {
            if (err instanceof Error && /no reply/.test(err.message)) return null;
            throw err;
          },
        );
        expect(status).not.toBe('running');
        if (status === null) {
          // It never ran: its guest printed nothing.
          expect(dest.serial).not.toMatch(/WORKLOAD/);
          how = 'hung in its multifd sync, never ran';
        } else {
          expect((await dest.queryMigrate()).status).not.toBe('completed');
        }
      }
      // The check after the channel's next SYNC packet finds it, unless a Delta against that page (its
      // content's digest) comes first.
      const failure = receiver.reports[counts];
      expect(failure).toMatchObject({ direction: 'receive', result: 'failed', error: expect.stringMatching(/XXH3-64|does not hold/) });
      outcomes.push(`- multifd, 4 channels, return path on, byte flipped in a page on a channel: source failed and runs on; destination ${how}; found by ${/XXH3-64/.test(String(failure.error)) ? 'the channel check' : 'a Delta against that page'}`);
    } finally {
      link.target = null;
      link.channelsOnly = false;
      await dest.dispose();
      await vm.dispose();
    }
  }, 300_000);
});

async function waitFor(condition: () => boolean, timeoutMs = 30_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > until) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 50));
  }
}
