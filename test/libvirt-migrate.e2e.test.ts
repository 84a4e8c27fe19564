/**
 * docs/libvirt.md's recipe end to end with real libvirt (Debian's libvirtd and virsh): two users'
 * session daemons on this machine play two hosts, each with its own host_uuid. `virsh migrate --live`
 * moves the self-verifying guest from one to the other through two gateways, the source QEMU sending
 * to the route (`--migrateuri tcp://127.0.0.1:PORT`) and the destination QEMU listening on the same port
 * on another loopback address (`--listen-address 127.0.0.2`), the route's target; then back the same
 * way. The guest verifies its memory at each destination, and the way back reuses the pages the first
 * migration left at the far site. Root only (it makes the two users); under CI=true it must not skip.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Gateway } from '../src/gateway/gateway';
import type { MigrationReport } from '../src/gateway/session';
import { startLoggedGateway, waitFor } from '../src/lab/harness/gateway-pair';
import { ConsoleFile, guestDomainXml } from '../src/lab/libvirt/guest-domain';
import { libvirtInstalled, type SessionDaemon, startSessionDaemon } from '../src/lab/libvirt/session-daemon';
import { ensureGuestBuilt } from '../src/lab/vm/guest-image';
import { freePort } from '../src/lab/vm/ports';
import { requireInCi } from './mounts';
import { suiteTempDir } from './temp-dir';

const SKIP = process.env.BFMIG_SKIP_E2E === '1';
const RUN = !SKIP && requireInCi(process.getuid?.() === 0 && libvirtInstalled(), 'libvirt (libvirt-daemon-driver-qemu, libvirt-clients) and root');
const DOMAIN = 'bfmig-guest';
/** Where each destination QEMU listens: not 127.0.0.1, where the routes listen on the same ports. */
const DEST_QEMU_HOST = '127.0.0.2';
const VERIFIED = /WORKLOAD VERIFY OK round=\d+ pages=16384/;

interface Site {
  name: string;
  daemon: SessionDaemon;
  gateway: Gateway;
  logs: Array<Record<string, unknown>>;
  /** The route here: the source QEMU sends to 127.0.0.1:routePort, the far gateway dials DEST_QEMU_HOST:routePort. */
  routePort: number;
}

(RUN ? describe : describe.skip)('libvirt: virsh migrate --live through two gateways', () => {
  const sites: Site[] = [];
  let consoleFile: ConsoleFile;

  beforeAll(async () => {
    const built = ensureGuestBuilt();
    const tmp = suiteTempDir('bfmig-libvirt-');
    // The daemons' users read the guest and append to its console here.
    fs.chmodSync(tmp, 0o755);
    const guestDir = path.join(tmp, 'guest');
    fs.mkdirSync(guestDir, { mode: 0o755 });
    const image = { ...built, dir: guestDir, kernel: path.join(guestDir, 'vmlinuz'), initrd: path.join(guestDir, 'initramfs') };
    fs.copyFileSync(built.kernel, image.kernel);
    fs.copyFileSync(built.initrd, image.initrd);
    consoleFile = new ConsoleFile(path.join(tmp, 'console.log'));
    fs.writeFileSync(consoleFile.path, '');
    for (const file of [image.kernel, image.initrd, consoleFile.path]) fs.chmodSync(file, file === consoleFile.path ? 0o666 : 0o644);
    fs.writeFileSync(path.join(tmp, 'domain.xml'), guestDomainXml({ name: DOMAIN, image, workload: { mib: 64, seed: 17, intervalMs: 500 }, memMiB: 256, machine: 'pc-i440fx-7.2', consoleFile: consoleFile.path }));

    const [peerA, peerB, routeA, routeB] = await Promise.all(Array.from({ length: 4 }, () => freePort()));
    const specs = [
      { name: 'site-a', user: 'bfmig-libvirt-a', peer: peerA, farPeer: peerB, route: routeA, farRoute: routeB },
      { name: 'site-b', user: 'bfmig-libvirt-b', peer: peerB, farPeer: peerA, route: routeB, farRoute: routeA },
    ];
    for (const s of specs) {
      const daemon = await startSessionDaemon(s.user, path.join(tmp, s.user));
      // docs/libvirt.md's YAML: the route's target is the destination QEMU's --listen-address and the route's own port.
      const yaml = [
        `name: ${s.name}`,
        `data: ${path.join(tmp, s.name)}`,
        `peerListen: 127.0.0.1:${s.peer}`,
        'routes:',
        `  - vm: ${DOMAIN}`,
        `    listen: 127.0.0.1:${s.route}`,
        `    peer: 127.0.0.1:${s.farPeer}`,
        `    target: ${DEST_QEMU_HOST}:${s.route}`,
        'allowTargets:',
        `  - ${DEST_QEMU_HOST}:${s.farRoute}`,
        '',
      ].join('\n');
      const { gateway, logs } = await startLoggedGateway(s.name, yaml);
      sites.push({ name: s.name, daemon, gateway, logs, routePort: s.route });
    }
    await sites[0].daemon.virsh('create', path.join(tmp, 'domain.xml'));
    await consoleFile.waitFor(VERIFIED, 60_000);
  }, 90_000);

  afterAll(async () => {
    for (const s of sites) await s.daemon.stop();
    for (const s of sites) await s.gateway.stop(1);
  });

  /** `virsh migrate --live` from `from`'s daemon to `to`'s through both gateways; the guest verifies at `to`. */
  async function migrate(from: Site, to: Site, more: string[] = []): Promise<MigrationReport> {
    const sentBefore = from.gateway.history.length;
    const receivedBefore = to.gateway.history.length;
    await from.daemon.virsh('migrate', '--live', ...more, DOMAIN, to.daemon.uri, '--migrateuri', `tcp://127.0.0.1:${from.routePort}`, '--listen-address', DEST_QEMU_HOST);
    // virsh returns once the source's QEMU is gone: every console line from here on is the destination's.
    const since = consoleFile.mark();
    expect((await from.daemon.virsh('list', '--all', '--name')).trim()).toBe('');
    expect((await to.daemon.virsh('domstate', DOMAIN)).trim()).toBe('running');
    await consoleFile.waitFor(VERIFIED, 60_000, since);
    await waitFor(() => from.gateway.history.length > sentBefore && to.gateway.history.length > receivedBefore);
    const sent = from.gateway.history[sentBefore];
    const received = to.gateway.history[receivedBefore];
    expect(sent).toMatchObject({ vm: DOMAIN, direction: 'send', result: 'completed' });
    expect(received).toMatchObject({ vm: DOMAIN, direction: 'receive', result: 'completed', streamBytes: sent.streamBytes, snapshotId: sent.snapshotId });
    // The receiving gateway dialled the destination QEMU's listen address on the route's port.
    expect(to.logs.filter((l) => l.msg === 'migration offered').at(-1)).toMatchObject({ vm: DOMAIN, target: `${DEST_QEMU_HOST}:${from.routePort}` });
    return sent;
  }

  test('A → B → A: the guest verifies at each destination, the way back reuses what the first migration left', async () => {
    const [a, b] = sites;
    const there = await migrate(a, b);
    const back = await migrate(b, a);
    // Nothing held at B: only pages QEMU sent twice with the same content (in a later pass) are reused.
    expect(there.mode).toBe('none');
    expect(there.counts.pagesReused).toBeLessThan(0.01 * there.counts.pagesSent);
    expect(back.mode).toBe('shared-snapshot');
    // The workload's 16384 pages (64 MiB) at least, and the way back costs a small fraction of the way there.
    expect(back.counts.pagesReused).toBeGreaterThan(16384);
    expect(back.wanBytesOut).toBeLessThan(there.wanBytesOut * 0.05);
  }, 90_000);

  test('virsh migrate --parallel (multifd, 4 connections): every channel goes through the gateways, the guest verifies', async () => {
    const [a, b] = sites;
    const sent = await migrate(a, b, ['--parallel', '--parallel-connections', '4']);
    const channels = b.logs.filter((l) => l.msg === 'channel joined' && l.direction === 'receive');
    expect(channels.map((l) => l.channel).sort()).toEqual(['multifd 0', 'multifd 1', 'multifd 2', 'multifd 3']);
    expect(sent.result).toBe('completed');
  }, 90_000);
});
