import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { type BackForthOptions, formatTable, runBackForth } from './backforth';

/** The demo's settings, as `bfmig demo` parsed them from its options (src/cli/commands.ts). */
export type DemoOptions = Pick<BackForthOptions, 'legs' | 'memMiB' | 'workloadMiB' | 'rewritePct' | 'rateMbit' | 'delayMs' | 'machine' | 'direct'> & { json?: string };

/** `bfmig demo`: a back-and-forth migration on this machine, direct versus through bfmig. */
export async function runDemo(options: DemoOptions): Promise<number> {
  const qemu = spawnSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8' });
  if (qemu.error || qemu.status !== 0) {
    process.stderr.write(
      'bfmig demo needs QEMU and a kernel for its test guest. On Debian or Ubuntu:\n' +
        '  sudo apt-get install -y qemu-system-x86 linux-image-amd64 busybox-static cpio gcc libc6-dev\n' +
        '(or run: bash scripts/install-deps.sh)\n',
    );
    return 3;
  }
  const { json, ...settings } = options;
  const results = await runBackForth({ ...settings, out: process.stdout });
  process.stdout.write('\n' + formatTable(results) + '\n');
  if (json) writeFileSync(json, JSON.stringify(results, null, 2) + '\n');
  return results.every((r) => r.verified) ? 0 : 1;
}
