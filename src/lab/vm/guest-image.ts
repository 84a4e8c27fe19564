/**
 * The bfmig test guest (scripts/build-guest.sh): a kernel and an initramfs whose init runs the
 * self-verifying workload. Where it lives, what it is, and building it on demand.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { PACKAGE_ROOT } from '../../digest/package-root';

export const REPO_ROOT = PACKAGE_ROOT;
export const BUILD_GUEST_SCRIPT = path.join(REPO_ROOT, 'scripts', 'build-guest.sh');

/** Where scripts/build-guest.sh puts the guest (same BFMIG_GUEST_OUT override). */
export function defaultGuestDir(): string {
  return process.env.BFMIG_GUEST_OUT ?? path.join(REPO_ROOT, '.cache', 'guest');
}

export interface GuestImage {
  dir: string;
  kernel: string;
  initrd: string;
  /** The initrd with the corpus of real files under /corpus (workload.content=files), or null in an older build. */
  initrdWithFiles: string | null;
  /** Kernel command line without workload parameters, e.g. `console=ttyS0 quiet panic=-1`. */
  baseCmdline: string;
  kernelVersion: string;
}

interface GuestJson {
  kernel: string;
  initrd: string;
  initrdWithFiles?: string;
  baseCmdline: string;
  kernelVersion: string;
}

export function readGuestImage(dir: string): GuestImage | null {
  try {
    const meta = JSON.parse(fs.readFileSync(path.join(dir, 'guest.json'), 'utf8')) as GuestJson;
    const img: GuestImage = {
      dir,
      kernel: path.join(dir, meta.kernel),
      initrd: path.join(dir, meta.initrd),
      initrdWithFiles: meta.initrdWithFiles === undefined ? null : path.join(dir, meta.initrdWithFiles),
      baseCmdline: meta.baseCmdline,
      kernelVersion: meta.kernelVersion,
    };
    return fs.existsSync(img.kernel) && fs.existsSync(img.initrd) ? img : null;
  } catch {
    return null;
  }
}

/**
 * Runs scripts/build-guest.sh (a no-op when up to date) and returns the image.
 * Throws with the script's output, which names the missing apt packages if any.
 */
export function ensureGuestBuilt(dir: string = defaultGuestDir()): GuestImage {
  const res = spawnSync('bash', [BUILD_GUEST_SCRIPT], {
    env: { ...process.env, BFMIG_GUEST_OUT: dir },
    encoding: 'utf8',
    timeout: 300_000,
  });
  if (res.error) throw new Error(`build-guest.sh could not run: ${res.error.message}`);
  if (res.status !== 0) {
    throw new Error(`build-guest.sh failed (exit ${res.status}):\n${res.stdout}${res.stderr}`);
  }
  const img = readGuestImage(dir);
  if (!img) throw new Error(`build-guest.sh succeeded but ${dir} has no usable guest.json/kernel/initrd`);
  return img;
}

