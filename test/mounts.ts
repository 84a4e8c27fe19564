import { execFileSync, spawnSync } from 'node:child_process';
import { makeTempDir, removeTempDir } from '../src/lab/harness/temp-dir';

/**
 * Whether the environment has a capability some tests need. A developer's machine may lack it, and those
 * tests then skip with a warning; CI (CI=true, run as root on a Debian machine) has it, so there a
 * missing one fails instead of letting the tests skip without a word.
 */
export function requireInCi(available: boolean, what: string): boolean {
  if (available) return true;
  if (process.env.CI === 'true') throw new Error(`CI must provide ${what}; the tests that need it would otherwise skip`);
  console.warn(`skipping the tests that need ${what}: not available here`);
  return false;
}

/** Whether `command` runs here (`command --version` exits 0). */
export function onPath(command: string): boolean {
  return spawnSync(command, ['--version'], { stdio: 'ignore' }).status === 0;
}

/** Whether this process may mount a tmpfs (root with CAP_SYS_ADMIN): the full-disk tests need one. */
export function canMountTmpfs(): boolean {
  return requireInCi(probeTmpfs(), 'a tmpfs mount (root with CAP_SYS_ADMIN)');
}

function probeTmpfs(): boolean {
  if (process.getuid?.() !== 0) return false;
  const probe = makeTempDir('bfmig-mount-probe-');
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', probe], { stdio: 'ignore' });
    execFileSync('umount', [probe], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  } finally {
    removeTempDir(probe);
  }
}
