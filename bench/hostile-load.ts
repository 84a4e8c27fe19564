/**
 * Hostile connections against a gateway pair, then a real migration through it.
 *
 * Two `bfmig gateway` processes with mutual TLS (certificates from `bfmig certs`) route vm1 to each
 * other. N connections, spread over every port of the pair (both route listen ports, both
 * peerListen ports, both metrics ports), each of a random hostile kind, run with bounded
 * concurrency: random bytes, pieces of real streams (a QEMU stream's middle on a source port, a
 * gateway's plaintext frames cut short on a peer port, a TLS handshake abandoned half-way), absurd
 * headers (frame lengths of 4 GiB, TLS records of absurd length, 100 KB HTTP headers), and idle
 * sockets that wait for the gateway to cut them. Both gateways' RSS is sampled throughout.
 * Afterwards both processes must be alive, no store may hold a byte, and a real QEMU guest migrates
 * A → B through the pair and verifies its memory.
 *
 * Usage: node dist/bench/hostile-load.js [connections=2000] [concurrency=64]
 */
import { hostileFlood, migrateThroughPair, startHostilePair, stopGateway } from '../src/lab/harness/hostile-flood';
import { withTempDir } from '../src/lab/harness/temp-dir';
import { freePort } from '../src/lab/vm/ports';
import { benchPositionals, numberArg } from './command-line';

async function main(): Promise<void> {
  const argv = benchPositionals();
  const count = numberArg(argv[0], 2000, 'count');
  const concurrency = numberArg(argv[1], 64, 'concurrency');
  await withTempDir('bfmig-hostile-', async (tmp) => {
    const qemuPorts = { a: await freePort(), b: await freePort() };
    const [a, b] = await startHostilePair(tmp, qemuPorts);
    try {
      const f = await hostileFlood([a, b], count, concurrency);
      const mib = (n: number): string => n.toFixed(1);
      console.log(`hostile connections: ${f.connections} in ${f.seconds.toFixed(1)} s (${f.perSecond.toFixed(0)}/s), concurrency ${concurrency}`);
      console.log(`  by kind: ${JSON.stringify(f.byKind)}; by port: ${JSON.stringify(f.byRole)}`);
      console.log(`  client outcomes: ${JSON.stringify(f.outcomes)}`);
      console.log(`  refused by the gateways: ${JSON.stringify(f.refusals)}`);
      console.log(`  RSS MiB before → peak: site-a ${mib(f.idleRssMiB['site-a'])} → ${mib(f.peakRssMiB['site-a'])}, site-b ${mib(f.idleRssMiB['site-b'])} → ${mib(f.peakRssMiB['site-b'])}`);
      console.log(`  gateways alive: ${f.alive}; stores untouched: ${f.storesUntouched}`);
      // A gateway that died or a store that changed is the benchmark failing, not a figure to print.
      if (!f.alive || !f.storesUntouched) throw new Error(`hostile load broke the pair: gateways alive ${f.alive}, stores untouched ${f.storesUntouched}`);
      const m = await migrateThroughPair(a, qemuPorts.b);
      console.log(`real migration A → B through the pair afterwards: completed in ${m.seconds.toFixed(1)} s; guest: ${m.serial.trim()}`);
    } finally {
      await stopGateway(a);
      await stopGateway(b);
    }
  });
}

if (require.main === module) {
  main().catch((err: unknown) => {
    console.error(err);
    process.exit(1);
  });
}
