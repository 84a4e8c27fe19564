/**
 * The QEMU releases the lab runs: Debian 12's own 7.2, and 10.0 from bookworm-backports unpacked
 * beside it by scripts/install-qemu10.sh (a wrapper that gives that build its own module directory).
 * Tests and benchmarks name a release; this says which binary that is and whether it is here.
 */
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';
import { PACKAGE_ROOT } from '../../digest/package-root';

export type QemuRelease = '7.2' | '10.0';
export const QEMU_RELEASES: readonly QemuRelease[] = ['7.2', '10.0'];

/** The binary of `release`: $BFMIG_QEMU72 / $BFMIG_QEMU10 when set, else where the install scripts put it. */
export function qemuBinary(release: QemuRelease): string {
  if (release === '7.2') return process.env.BFMIG_QEMU72 ?? 'qemu-system-x86_64';
  return process.env.BFMIG_QEMU10 ?? path.join(PACKAGE_ROOT, '.cache', 'qemu-10.0', 'qemu-system-x86_64');
}

const versions = new Map<string, string | null>();

/** What `binary --version` says it is ("10.0.2"), or null when it does not run. */
export function qemuVersion(binary: string): string | null {
  let version = versions.get(binary);
  if (version === undefined) {
    const r = spawnSync(binary, ['--version'], { encoding: 'utf8', timeout: 20_000 });
    version = r.status === 0 ? (/version (\d+\.\d+\.\d+)/.exec(r.stdout)?.[1] ?? null) : null;
    versions.set(binary, version);
  }
  return version;
}

/** Whether `release` is installed: its binary runs and reports that release. */
export function qemuInstalled(release: QemuRelease): boolean {
  return qemuVersion(qemuBinary(release))?.startsWith(`${release}.`) ?? false;
}

/**
 * For a test whose subject is not a QEMU release: 10.0 where installed (CI installs it), else 7.2, with
 * its machine type. QEMU 7.2's software emulation now and then panics a guest after a long pre-copy
 * (README, "Known problem"); 10.0's does not.
 */
export function steadiestQemu(): { release: QemuRelease; machine: string; qemuBinary: string } {
  const release: QemuRelease = qemuInstalled('10.0') ? '10.0' : '7.2';
  return { release, machine: release === '10.0' ? 'pc-i440fx-10.0' : 'pc-i440fx-7.2', qemuBinary: qemuBinary(release) };
}
