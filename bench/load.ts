/**
 * Many concurrent migrations of different VMs through one gateway pair, against one stream alone
 * measured in the same run.
 *
 * Two `bfmig gateway` processes route VMs solo, vm01 … vmNN to each other (one route per VM). Every
 * VM has a synthetic QEMU 7.2 stream of random pages of its own, so no two VMs share a byte of page
 * content. A source stand-in per VM plays its stream into its route port honouring backpressure; a
 * destination stand-in per VM at the far site hashes what arrives. Pass "first" goes A → B with
 * empty stores (nothing to reuse), pass "back" plays the same memory B → A (all reused). Each pass
 * runs solo alone, then the N VMs at once; every destination must receive exactly its own source's
 * bytes (SHA-256), every migration must complete at both gateways and every VM's store must verify
 * at both sites and claim the snapshot of its last migration. Prints aggregate throughput of the N
 * streams, the one stream's throughput, their ratio (target ≥ 0.8), CPU seconds of each gateway
 * process per phase and each gateway's peak RSS.
 *
 * With --real, every VM's stream is a real QEMU 7.2 migration stream instead: the test guest booted with
 * a workload seed of its own, migrated once to a file (cached under .cache/load-captures) and replayed.
 *
 * Usage: node dist/bench/load.js [vms=16] [MiB per VM=64] [--real]   (BFMIG_BENCH_STORE_DIR: where the stores go)
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { awaitReports, type LoadSite, runPass, startLoadPair, stopLoadPair, vmStream, type VmStream } from '../src/lab/harness/load-pair';
import { checkStores } from '../src/lab/harness/stores';
import { withTempDir } from '../src/lab/harness/temp-dir';
import { syntheticStream } from '../src/lab/harness/synthetic-stream';
import { PACKAGE_ROOT } from '../src/digest/package-root';
import { ensureGuestBuilt } from '../src/lab/vm/guest-image';
import { QemuVm } from '../src/lab/vm/qemu-vm';
import { benchOptions, numberArg } from './command-line';

/**
 * A real QEMU migration stream of a guest of its own: the test guest booted with workload seed `seed`,
 * filling `mib` MiB, migrated by QEMU to a file (`exec:cat`). Cached in `dir` by its parameters.
 */
async function realCapture(dir: string, seed: number, memMiB: number, mib: number): Promise<Buffer> {
  const file = path.join(dir, `guest-m${memMiB}-w${mib}-s${seed}.mig`);
  if (!fs.existsSync(file)) {
    const vm = new QemuVm({ name: `capture-${seed}`, memMiB, workload: { mib, seed, intervalMs: 1000 } });
    try {
      await vm.start();
      await vm.waitForSerial(/WORKLOAD READY/, 180_000);
      vm.setMaxBandwidth(8 * 2 ** 30);
      await vm.migrate(`exec:cat > '${file}.part'`);
      await vm.waitForMigration({ timeoutMs: 120_000 });
      fs.renameSync(`${file}.part`, file);
    } finally {
      await vm.dispose();
    }
  }
  return fs.readFileSync(file);
}

async function main(): Promise<void> {
  const { values, positionals: args } = benchOptions({ real: { type: 'boolean' } }, true);
  const real = values.real === true;
  const vmCount = numberArg(args[0], 16, 'VMs');
  const mib = numberArg(args[1], 64, 'MiB per VM');
  if (!Number.isInteger(vmCount) || vmCount < 1 || !(mib > 0)) throw new Error('usage: node dist/bench/load.js [vms=16] [MiB per VM=64] [--real]');
  const vms = Array.from({ length: vmCount }, (_, i) => `vm${String(i + 1).padStart(2, '0')}`);
  // One stream alone is measured three times, each a VM of its own (a repeat of one VM would reuse
  // everything), and the median taken: a single short run swings with the machine's noise.
  const soloNames = ['solo1', 'solo2', 'solo3'];
  let make: (i: number) => Promise<Buffer> = (_i) => Promise.resolve(syntheticStream(mib / 1024).stream);
  if (real) {
    // Real QEMU streams, replayed: a guest of mib + 128 MiB (its kernel and initramfs need room) filling mib MiB.
    ensureGuestBuilt();
    const cache = path.join(PACKAGE_ROOT, '.cache', 'load-captures');
    fs.mkdirSync(cache, { recursive: true });
    make = (i) => realCapture(cache, 1000 + i, mib + 128, mib);
  }
  const solos: VmStream[] = [];
  for (const [i, vm] of soloNames.entries()) solos.push(vmStream(vm, await make(i)));
  const streams: VmStream[] = [];
  for (const [i, vm] of vms.entries()) streams.push(vmStream(vm, await make(soloNames.length + i)));
  if (new Set([...solos, ...streams].map((s) => s.sha256)).size !== vmCount + solos.length) throw new Error('two VMs got the same stream');
  const MiB = solos[0].stream.length / 2 ** 20;
  const kind = real ? `real QEMU 7.2 stream (a ${mib + 128} MiB guest filling ${mib} MiB with a seed of its own, captured once and replayed)` : 'synthetic QEMU 7.2 stream of its own random pages';
  console.log(`${vmCount} VMs + 3 solo VMs, each a ${MiB.toFixed(1)} MiB ${kind}; 2 bfmig gateway processes on loopback`);
  const allVms = [...solos.map((s) => s.vm), ...vms];

  let failures = 0;
  await withTempDir(
    'bfmig-load-',
    async (dir) => {
      const [a, b] = await startLoadPair(dir, allVms, 'child-process');
      try {
        let finished = 0;
        const ratios: string[] = [];
        for (const [pass, from, to] of [
          ['first', a, b],
          ['back', b, a],
        ] as const) {
          const rates: number[] = [];
          const phases: Array<[string, VmStream[]]> = [...solos.map((s, i): [string, VmStream[]] => [`one stream #${i + 1}`, [s]]), [`${vmCount} streams  `, streams]];
          for (const [phase, group] of phases) {
            const cpuBefore = [from.gateway.cpu()?.cpuSeconds ?? NaN, to.gateway.cpu()?.cpuSeconds ?? NaN];
            const result = await runPass(from, to, group);
            finished += group.length;
            await Promise.all([awaitReports(from, finished), awaitReports(to, finished)]);
            const cpu = [(from.gateway.cpu()?.cpuSeconds ?? NaN) - cpuBefore[0], (to.gateway.cpu()?.cpuSeconds ?? NaN) - cpuBefore[1]];
            const bad = result.outcomes.filter((o) => !o.intact);
            const failed = [from, to].flatMap((s) => s.gateway.reports.slice(-group.length).filter((r) => r.result !== 'completed'));
            const reused = from.gateway.reports.slice(-group.length).reduce((n, r) => n + r.pagesReused, 0);
            const sent = from.gateway.reports.slice(-group.length).reduce((n, r) => n + r.pagesSent, 0);
            failures += bad.length + failed.length;
            const rate = result.bytes / result.seconds / 2 ** 20;
            rates.push(rate);
            console.log(
              `${pass.padEnd(5)} ${phase}  ${(result.bytes / 2 ** 20).toFixed(0).padStart(5)} MiB in ${result.seconds.toFixed(2).padStart(6)} s = ${rate.toFixed(0).padStart(4)} MiB/s` +
                `  pages sent ${sent} reused ${reused}  CPU s ${from.name} ${cpu[0].toFixed(2)} ${to.name} ${cpu[1].toFixed(2)}` +
                `  intact ${group.length - bad.length}/${group.length}  completed ${2 * group.length - failed.length}/${2 * group.length}`,
            );
          }
          const one = [...rates.slice(0, solos.length)].sort((x, y) => x - y)[1];
          const ratio = rates[solos.length] / one;
          ratios.push(`${pass} ${ratio.toFixed(2)}`);
          console.log(`${pass.padEnd(5)} aggregate ${rates[solos.length].toFixed(0)} MiB/s / one stream (median) ${one.toFixed(0)} MiB/s = ${ratio.toFixed(2)} (target >= 0.80)`);
        }
        console.log(`peak RSS MiB: site-a ${(a.gateway.peakRssMiB() ?? NaN).toFixed(0)} site-b ${(b.gateway.peakRssMiB() ?? NaN).toFixed(0)}`);
        const lastSnapshot = (site: LoadSite, vm: string): string | null => [...site.gateway.reports].reverse().find((r) => r.vm === vm)?.snapshotId ?? null;
        for (const site of [a, b]) {
          await site.gateway.stop();
          const checks = checkStores(site.data, allVms);
          const unsound = checks.filter((c) => c.badPages.length > 0 || c.snapshotId === null || c.snapshotId !== lastSnapshot(site, c.vm));
          failures += unsound.length;
          console.log(`stores at ${site.name}: ${checks.length - unsound.length}/${checks.length} verify and claim their last snapshot`);
        }
        console.log(`ratio ${ratios.join(', ')}; ${failures === 0 ? 'all migrations intact and completed' : `${failures} FAILURES`}`);
      } finally {
        await stopLoadPair([a, b]);
      }
    },
    { base: process.env.BFMIG_BENCH_STORE_DIR },
  );
  if (failures > 0) process.exitCode = 1;
}

if (require.main === module) {
  main().catch((err: unknown) => {
    console.error(err);
    process.exitCode = 1;
  });
}
