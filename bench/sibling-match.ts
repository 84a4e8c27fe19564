/**
 * What content matching across VMs would save on a first leg: two guests booted from one image (the
 * same kernel and initrd, the files corpus; different workload seeds, so different data), each migrated
 * whole into a file by real QEMU; then, of the second guest's non-zero pages, how many hold content the
 * first guest (a sibling whose snapshot the far site retains) holds somewhere, beyond those that repeat
 * content earlier in the second guest's own stream (today's within-VM content match gets those already).
 * Usage: node dist/bench/sibling-match.js [--qemu 10.0] [--mem-mib 256] [--workload-mib 128] [--seeds 5,6] [--keep DIR]
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { RecordKind, StreamParser, type StreamRecord } from '../src/qemu';
import { makeTempDir, removeTempDir } from '../src/lab/harness/temp-dir';
import { QemuVm } from '../src/lab/vm/qemu-vm';
import { QEMU_RELEASES, type QemuRelease, qemuBinary } from '../src/lab/vm/qemu-releases';
import { benchOptions } from './command-line';

/** Each page's last content in a stream, as a digest (hex), by page index; and the normal pages' digests in stream order. */
function pageDigests(stream: Buffer): { last: Map<number, string>; order: string[] } {
  const last = new Map<number, string>();
  const order: string[] = [];
  const parser = new StreamParser((r: StreamRecord) => {
    if (r.kind === RecordKind.RamZero) last.delete(r.pageIndex);
    if (r.kind !== RecordKind.RamPage) return;
    const digest = createHash('sha256').update(r.data.subarray(r.dataStart, r.dataStart + r.dataLength)).digest('hex');
    last.set(r.pageIndex, digest);
    order.push(digest);
  });
  parser.push(stream);
  parser.end();
  return { last, order };
}

async function capture(qemu: QemuRelease, memMiB: number, workloadMiB: number, seed: number, file: string): Promise<void> {
  const vm = new QemuVm({ name: `sibling-${seed}`, machine: qemu === '10.0' ? 'pc-i440fx-10.0' : 'pc-i440fx-7.2', memMiB, qemuBinary: qemuBinary(qemu), workload: { mib: workloadMiB, seed, content: 'files' } });
  try {
    await vm.start();
    await vm.waitForSerial(/WORKLOAD READY/, 300_000);
    await vm.waitForSerial(/WORKLOAD VERIFY OK/, 120_000);
    await vm.migrate(`exec:cat > ${file}`);
    await vm.waitForMigration({ timeoutMs: 300_000 });
  } finally {
    await vm.dispose();
  }
}

async function main(): Promise<void> {
  const { values } = benchOptions({ qemu: { type: 'string' }, 'mem-mib': { type: 'string' }, 'workload-mib': { type: 'string' }, seeds: { type: 'string' }, keep: { type: 'string' } });
  const qemu = (values.qemu ?? '10.0') as QemuRelease;
  if (!(QEMU_RELEASES as readonly string[]).includes(qemu)) throw new Error(`--qemu takes ${QEMU_RELEASES.join(' or ')}`);
  const memMiB = Number(values['mem-mib'] ?? 256);
  const workloadMiB = Number(values['workload-mib'] ?? 128);
  const [seedA, seedB] = (values.seeds ?? '5,6').split(',').map(Number);
  const dir = values.keep ?? makeTempDir('bfmig-sibling-');
  fs.mkdirSync(dir, { recursive: true });
  try {
    const [fileA, fileB] = [path.join(dir, `sibling-${seedA}.mig`), path.join(dir, `sibling-${seedB}.mig`)];
    if (!fs.existsSync(fileA)) await capture(qemu, memMiB, workloadMiB, seedA, fileA);
    if (!fs.existsSync(fileB)) await capture(qemu, memMiB, workloadMiB, seedB, fileB);
    const a = pageDigests(fs.readFileSync(fileA));
    const b = pageDigests(fs.readFileSync(fileB));
    const held = new Set(a.last.values());
    // B's first leg in stream order: a page whose content came earlier in B's stream is matched today.
    const seen = new Set<string>();
    let withinVm = 0;
    let crossVm = 0;
    for (const d of b.order) {
      if (seen.has(d)) withinVm++;
      else if (held.has(d)) crossVm++;
      seen.add(d);
    }
    const sameIndex = [...b.last].filter(([page, d]) => a.last.get(page) === d).length;
    const MiB = 2 ** 20;
    const pct = (n: number): string => `${((n / b.order.length) * 100).toFixed(1)}%`;
    console.log(`QEMU ${qemu}, ${memMiB} MiB guests, ${workloadMiB} MiB workload of file pages, seeds ${seedA} (retained at the far site) and ${seedB} (migrating)`);
    console.log(`sibling ${seedA}: ${a.last.size} non-zero pages, ${held.size} distinct contents`);
    console.log(`guest ${seedB}: ${b.order.length} normal page records (${b.last.size} non-zero pages at the end, ${seen.size} distinct contents)`);
    console.log(`  repeat content earlier in its own stream (content match today): ${withinVm} (${pct(withinVm)})`);
    console.log(`  content the sibling holds, not earlier in its own stream (cross-VM match would add): ${crossVm} (${pct(crossVm)}), ${((crossVm * 4096) / MiB).toFixed(1)} MiB of pages`);
    console.log(`  pages with the same content at the same index in both guests: ${sameIndex} of ${b.last.size}`);
    console.log(`  neither: ${b.order.length - withinVm - crossVm} (${pct(b.order.length - withinVm - crossVm)})`);
  } finally {
    if (!values.keep) removeTempDir(dir);
  }
}

if (require.main === module) {
  main().catch((err: unknown) => {
    console.error(err);
    process.exitCode = 1;
  });
}
