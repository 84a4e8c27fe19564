/**
 * Hostile connections against every port of a gateway pair (two `bfmig gateway` processes over
 * mutual TLS), then a real QEMU migration through the same pair. The full 2,000-connection run with
 * its figures is `node dist/bench/hostile-load.js`; this test runs a smaller count of the same mix.
 */
import { type GatewayProcess, hostileFlood, migrateThroughPair, startHostilePair, stopGateway } from '../src/lab/harness/hostile-flood';
import { freePort } from '../src/lab/vm/ports';
import { suiteTempDir } from './temp-dir';

const SKIP = process.env.BFMIG_SKIP_E2E === '1';

(SKIP ? describe.skip : describe)('hostile connections against a gateway pair', () => {
  let tmp = '';
  let pair: GatewayProcess[] = [];
  const qemuPorts = { a: 0, b: 0 };

  beforeAll(async () => {
    tmp = suiteTempDir('bfmig-hostile-');
    qemuPorts.a = await freePort();
    qemuPorts.b = await freePort();
    pair = await startHostilePair(tmp, qemuPorts);
  });

  afterAll(async () => {
    for (const g of pair) await stopGateway(g);
  });

  test('every kind on every port is refused cheaply; the gateways live, stores stay empty, and a real migration then verifies', async () => {
    // 240 = 10 of each of 4 kinds on each of 6 ports.
    const figures = await hostileFlood(pair, 240, 32);
    expect(figures.byRole).toEqual({ source: 80, peer: 80, metrics: 80 });
    expect(figures.byKind).toEqual({ random: 60, truncated: 60, absurd: 60, idle: 60 });
    expect(figures.alive).toBe(true);
    expect(figures.storesUntouched).toBe(true);
    // No idle client outlived the gateway's patience: every one was cut by the gateway.
    expect(figures.outcomes['client-gave-up']).toBeLessThanOrEqual(figures.byKind.truncated);
    // Source and peer connections (160) were each refused with a logged reason; metrics clients get HTTP errors instead.
    const refused = Object.values(figures.refusals).reduce((s, n) => s + n, 0);
    expect(refused).toBeGreaterThanOrEqual(160);
    expect(Object.keys(figures.refusals)).toEqual(expect.arrayContaining(['tls', 'not-qemu', 'handshake-timeout']));
    // Bounded memory: no gateway grew by more than 64 MiB over its idle size.
    for (const g of pair) expect(figures.peakRssMiB[g.name] - figures.idleRssMiB[g.name]).toBeLessThan(64);

    const migration = await migrateThroughPair(pair[0], qemuPorts.b);
    expect(migration.serial).toMatch(/WORKLOAD VERIFY OK/);
    // The sender logs its completion once the receiver's Done has crossed back: it may lag the guest.
    const completed = (): number[] => pair.map((g) => g.gateway.logLines.filter((l) => l.includes('"migration completed"')).length);
    for (let i = 0; i < 200 && completed().some((n) => n < 1); i++) await new Promise((r) => setTimeout(r, 50));
    expect(completed()).toEqual([1, 1]);
  }, 600_000);
});
