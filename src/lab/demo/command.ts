import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { formatTable, runBackForth } from './backforth';
import { type ParsedArgs, stringOption } from '../../cli/args';

function numberOption(args: ParsedArgs, name: string, fallback: number): number {
  const text = stringOption(args, name);
  if (text === undefined) return fallback;
  const value = Number(text);
  if (!Number.isFinite(value) || value < 0) throw new Error(`--${name} takes a non-negative number, not "${text}"`);
  return value;
}

/** `bfmig demo`: a back-and-forth migration on this machine, direct versus through bfmig. */
export async function runDemo(args: ParsedArgs): Promise<number> {
  const qemu = spawnSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8' });
  if (qemu.error || qemu.status !== 0) {
    process.stderr.write(
      'bfmig demo needs QEMU and a kernel for its test guest. On Debian or Ubuntu:\n' +
        '  sudo apt-get install -y qemu-system-x86 linux-image-amd64 busybox-static cpio gcc libc6-dev\n' +
        '(or run: bash scripts/install-deps.sh)\n',
    );
    return 3;
  }
  const results = await runBackForth({
    legs: numberOption(args, 'legs', 3),
    memMiB: numberOption(args, 'mem-mib', 256),
    workloadMiB: numberOption(args, 'workload-mib', 64),
    rewritePct: numberOption(args, 'rewrite-pct', 0),
    rateMbit: numberOption(args, 'mbit', 100),
    delayMs: numberOption(args, 'delay-ms', 20),
    machine: stringOption(args, 'machine') ?? 'pc-i440fx-7.2',
    direct: !args.options.has('no-direct'),
    out: process.stdout,
  });
  process.stdout.write('\n' + formatTable(results) + '\n');
  const json = stringOption(args, 'json');
  if (json) writeFileSync(json, JSON.stringify(results, null, 2) + '\n');
  return results.every((r) => r.verified) ? 0 : 1;
}
