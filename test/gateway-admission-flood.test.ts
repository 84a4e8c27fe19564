/**
 * A flood of unidentified connections against every port of a TLS gateway pair (both peer ports, both
 * route ports, both metrics ports): 2,000 idle and slow-handshake connections, each re-opened when the
 * gateway cuts it, while migrations go A → B: a synthetic QEMU stream from migration-stream.ts, which
 * must arrive byte for byte, then a real QEMU guest, which must complete and verify its memory at the
 * destination (unless BFMIG_SKIP_E2E=1). The guest runs on QEMU 10.0 where it is installed: under a
 * flood the host is busy and a pre-copy drags on, which QEMU 7.2's software emulation survives only
 * sometimes (in one run both tries of the leg failed, the source's own bytes broken too: README, "Known
 * problem"). The config uses only keys older than the pending pools, so this runs unchanged against a
 * gateway without them (which refuses the migration: `connection-limit`).
 */
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as net from 'node:net';
import * as path from 'node:path';
import { issueCerts } from '../src/cli/certs';
import { Capture } from '../src/lab/capture';
import { disposeAllVms, QemuVm, type QemuVmOptions } from '../src/lab/vm/qemu-vm';
import { steadiestQemu } from '../src/lab/vm/qemu-releases';
import { resumeSource, verifiedOrSourceBroken } from '../src/lab/vm/replay-verdict';
import { ensureGuestBuilt } from '../src/lab/vm/guest-image';
import { refusals, startPair, type TestSite, waitFor } from '../src/lab/harness/gateway-pair';
import { destinationStandIn, sourceStandIn } from '../src/lab/harness/qemu-standins';
import { guestMemory, migrationStream } from '../src/lab/harness/migration-stream';
import { suiteTempDir } from './temp-dir';

type Role = 'peer' | 'source' | 'metrics';

/**
 * Hostile clients that keep `slots` connections to `targets` open: each slot connects (from one of
 * `sources`, bounded to `concurrency` connects in flight), stays idle or drips the start of a
 * handshake it never finishes, and when the gateway cuts it reconnects after a second or two.
 */
interface Flood {
  stats: { connects: number; openNow: number; peakOpen: number; firstRoundDone: number };
  /** Stops re-opening and closes every connection. */
  stop: () => Promise<void>;
}

function holdConnections(targets: Array<{ port: number; role: Role }>, slots: number, concurrency: number, sources: string[]): Flood {
  const drip: Record<Role, Buffer> = {
    // A TLS record header announcing a ClientHello that never comes.
    peer: Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc]),
    // Three bytes of QEMU's magic, never the fourth.
    source: Buffer.from('QEV'),
    metrics: Buffer.from('GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\n'),
  };
  const stats = { connects: 0, openNow: 0, peakOpen: 0, firstRoundDone: 0 };
  let running = true;
  let inFlight = 0;
  const waiting: Array<() => void> = [];
  const sockets = new Set<net.Socket>();
  const timers = new Set<NodeJS.Timeout>();
  const later = (ms: number, fn: () => void): void => {
    if (!running) return;
    const t = setTimeout(() => {
      timers.delete(t);
      fn();
    }, ms);
    timers.add(t);
  };
  const open = (slot: number, first: boolean): void => {
    if (!running) return;
    if (inFlight >= concurrency) return void waiting.push(() => open(slot, first));
    inFlight++;
    const target = targets[slot % targets.length];
    const slow = slot % 2 === 1;
    const socket = net.connect({ host: '127.0.0.1', port: target.port, localAddress: sources[slot % sources.length] });
    sockets.add(socket);
    stats.connects++;
    let settled = false;
    const settle = (): void => {
      if (settled) return;
      settled = true;
      inFlight--;
      if (first) stats.firstRoundDone++;
      waiting.shift()?.();
    };
    let sent = 0;
    let connected = false;
    let dripTimer: NodeJS.Timeout | null = null;
    socket.on('error', () => undefined);
    socket.resume();
    socket.once('connect', () => {
      settle();
      connected = true;
      stats.openNow++;
      stats.peakOpen = Math.max(stats.peakOpen, stats.openNow);
      if (slow) {
        dripTimer = setInterval(() => {
          if (sent < drip[target.role].length) socket.write(drip[target.role].subarray(sent, ++sent));
        }, 1000);
      }
    });
    socket.once('close', () => {
      settle();
      if (connected) stats.openNow--;
      if (dripTimer) clearInterval(dripTimer);
      sockets.delete(socket);
      later(1000 + Math.random() * 1000, () => open(slot, false));
    });
  };
  for (let slot = 0; slot < slots; slot++) open(slot, true);
  return {
    stats,
    stop: async (): Promise<void> => {
      running = false;
      for (const t of timers) clearTimeout(t);
      const closed = [...sockets].map((s) => new Promise<void>((r) => (s.destroyed ? r() : s.once('close', () => r()))));
      for (const s of sockets) s.destroy();
      await Promise.all(closed);
    },
  };
}

describe('admission under a flood of unidentified connections (TLS pair, synthetic QEMU stream)', () => {
  let tmp = '';
  let a: TestSite;
  let b: TestSite;
  const stream = migrationStream(guestMemory([['pc.ram', 2000]], 21), [[5, 9, 300]]);

  beforeAll(async () => {
    tmp = suiteTempDir('bfmig-admission-');
    const certs = path.join(tmp, 'certs');
    issueCerts(certs, ['site-a', 'site-b'], 30);
    // Only keys that the code before pending pools had: this test runs unchanged against it.
    const block = (site: string, peer: string): string =>
      `tls:\n  cert: ${certs}/${site}.crt\n  key: ${certs}/${site}.key\n  ca: ${certs}/ca.crt\n  allowPeers: [${peer}]\nlimits:\n  handshakeSeconds: 5\n  maxConnections: 64\n`;
    [a, b] = await startPair(tmp, [block('site-a', 'site-b'), block('site-b', 'site-a')]);
  });

  afterAll(async () => {
    await disposeAllVms();
    await a?.gateway.stop(1);
    await b?.gateway.stop(1);
  });

  test('2,000 idle and slow-handshake connections on every port do not keep a migration out', async () => {
    const ports = (s: TestSite): Array<{ port: number; role: Role }> => [
      { port: s.peerPort, role: 'peer' },
      { port: s.routePort, role: 'source' },
      { port: s.gateway.bound.get('metrics')?.port ?? 0, role: 'metrics' },
    ];
    // The flood comes from 50 addresses of its own; the source QEMU and the far gateway from 127.0.0.1.
    const sources = Array.from({ length: 50 }, (_, i) => `127.0.1.${i + 1}`);
    // The real guest boots before the flood starts (under it, TCG would only boot slower).
    const real = process.env.BFMIG_SKIP_E2E !== '1';
    const { release, machine, qemuBinary } = steadiestQemu();
    const options: QemuVmOptions = { machine, qemuBinary, memMiB: 128, workload: { mib: 16, seed: 7, rewritePct: 0, intervalMs: 500 } };
    let guest: QemuVm | null = null;
    if (real) {
      ensureGuestBuilt();
      guest = new QemuVm({ ...options, name: 'flood-source' });
      await guest.start();
      await guest.waitForSerial(/WORKLOAD READY/, 120_000);
    }
    const flood = holdConnections([...ports(a), ...ports(b)], 2000, 100, sources);
    try {
      await waitFor(() => flood.stats.firstRoundDone >= 2000, 30_000);
      // ...and has come back for more: the slots the gateways cut are re-opening.
      await waitFor(() => flood.stats.connects >= 3000, 30_000);
      // Both gateways are as full as the flood can make them.
      await waitFor(() => a.gateway.openConnections >= 40 && b.gateway.openConnections >= 40, 5_000);
      const dest = await destinationStandIn(b.destPort);
      const t0 = Date.now();
      const outcome = await sourceStandIn(a.routePort, stream);
      const received = await Promise.race([dest.received, new Promise<null>((r) => setTimeout(() => r(null), 30_000).unref())]);
      dest.close();
      const seconds = (Date.now() - t0) / 1000;
      // Prometheus, too, gets its answer during the flood.
      const scrape = await new Promise<number | string>((resolve) => {
        const req = http.get({ host: '127.0.0.1', port: a.gateway.bound.get('metrics')?.port, path: '/metrics', agent: false }, (res) => {
          res.resume();
          res.on('end', () => resolve(res.statusCode ?? 0));
        });
        req.on('error', (err) => resolve(String(err)));
      });
      const reasons = (site: TestSite): Record<string, number> => {
        const out: Record<string, number> = {};
        for (const r of refusals(site)) out[`${r.listener}/${r.reason}`] = (out[`${r.listener}/${r.reason}`] ?? 0) + 1;
        return out;
      };
      console.log(
        `flood: ${flood.stats.connects} connects, peak ${flood.stats.peakOpen} open at the clients; gateways open ${a.gateway.openConnections}/${b.gateway.openConnections}; ` +
          `migration ${outcome} in ${seconds.toFixed(2)} s; refusals A ${JSON.stringify(reasons(a))} B ${JSON.stringify(reasons(b))}`,
      );
      // The flood was as strong as it says: nearly all 2,000 connected at once (accepted or in the backlog).
      expect(flood.stats.peakOpen).toBeGreaterThan(1900);
      expect({ outcome, delivered: received?.bytes.equals(stream) ?? false, scrape }).toEqual({ outcome: 'closed', delivered: true, scrape: 200 });
      await waitFor(() => a.gateway.history.length === 1 && b.gateway.history.length === 1);
      expect(a.gateway.history[0]).toMatchObject({ direction: 'send', result: 'completed' });
      expect(b.gateway.history[0]).toMatchObject({ direction: 'receive', result: 'completed' });
      expect(a.gateway.openConnections).toBeLessThanOrEqual(64);
      const text = await a.metrics.text();
      expect(text).toMatch(/bfmig_connections_refused_total\{listener="(peer|source|metrics)",reason="(pending-limit|per-address-limit)"\} [1-9]/);
      if (guest) {
        // A real QEMU migrates through the same flood, and its guest verifies its memory at B.
        // What the source sent is kept to tell a guest state QEMU (7.2) sent broken from one the gateways
        // broke (README, "Known problem"): if the source's own bytes fail too, the leg is repeated once.
        for (let attempt = 1; ; attempt++) {
          const history = b.gateway.history.length;
          const capture = new Capture({ listen: { host: '127.0.0.1', port: 0 }, out: path.join(tmp, 'flood-leg.mig'), forward: { host: '127.0.0.1', port: a.routePort } });
          const { port } = await capture.listen();
          const destination = new QemuVm({ ...options, name: 'flood-destination', incoming: `tcp:127.0.0.1:${b.destPort}` });
          await destination.start();
          await guest.migrate(`tcp:127.0.0.1:${port}`);
          expect((await guest.waitForMigration({ timeoutMs: 120_000 })).status).toBe('completed');
          expect((await capture.done).error).toBeNull();
          await waitFor(() => b.gateway.history.length === history + 1, 30_000);
          expect(b.gateway.history[history]).toMatchObject({ direction: 'receive', result: 'completed' });
          const verdict = await verifiedOrSourceBroken(destination, path.join(tmp, 'flood-leg.mig'), /WORKLOAD VERIFY OK round=\d+ pages=\d+/);
          if (!verdict) break;
          if (attempt > 1) throw new Error(`repeated: ${verdict.detail}`);
          console.log(`flood: the destination guest failed and ${verdict.detail}: repeating the leg once`);
          await destination.dispose();
          await resumeSource(guest, /WORKLOAD VERIFY OK round=\d+ pages=\d+/);
        }
        console.log(`flood: a real QEMU ${release} guest migrated A → B through it and verified at B (${flood.stats.connects} connects so far)`);
      }
    } finally {
      await flood.stop();
    }
    expect(fs.readdirSync(b.data).filter((n) => !n.startsWith('.'))).toEqual(['vm1']);
  }, 300_000);
});
