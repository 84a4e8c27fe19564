/**
 * Whether this host can run the test guest under KVM: /dev/kvm usable, and a guest that really boots
 * (some nested hosts open /dev/kvm and then hang), probed once per host boot. And the guard that makes
 * a QEMU die with its parent.
 */
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { GuestImage } from './guest-image';

let kvmUsable: boolean | null = null;
/** /dev/kvm exists and we may open it read-write (it may still not boot a guest: see kvmBootsGuest). */
export function kvmAvailable(): boolean {
  if (kvmUsable === null) {
    try {
      fs.accessSync('/dev/kvm', fs.constants.R_OK | fs.constants.W_OK);
      kvmUsable = true;
    } catch {
      kvmUsable = false;
    }
  }
  return kvmUsable;
}

/** How long a KVM guest may take to reach its init before KVM is judged unusable here. */
const KVM_PROBE_TIMEOUT_MS = 15_000;
const KVM_PROBE_MARKER = 'GUEST INIT';

interface KvmProbeRecord {
  bootId: string;
  qemu: string;
  kernelVersion: string;
  boots: boolean;
}

let kvmProbe: Promise<boolean> | null = null;

function hostBootId(): string {
  try {
    return fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    return 'unknown';
  }
}

/**
 * Whether a guest actually boots under KVM. QEMU's own `-accel kvm -accel tcg` fallback only covers
 * KVM failing to open; on some nested hosts /dev/kvm opens but the guest hangs before its kernel
 * prints anything, so this boots the test guest once and waits for its init. The verdict is cached
 * per host boot (in the guest directory), so a test run pays for the probe once.
 */
export function kvmBootsGuest(qemu: string, img: GuestImage, guestDir: string): Promise<boolean> {
  if (!kvmAvailable()) return Promise.resolve(false);
  if (kvmProbe) return kvmProbe;
  const cacheFile = path.join(guestDir, 'kvm-probe.json');
  const key = { bootId: hostBootId(), qemu, kernelVersion: img.kernelVersion };
  try {
    const cached = JSON.parse(fs.readFileSync(cacheFile, 'utf8')) as Partial<KvmProbeRecord>;
    if (cached.bootId === key.bootId && cached.qemu === key.qemu && cached.kernelVersion === key.kernelVersion) {
      kvmProbe = Promise.resolve(cached.boots === true);
      return kvmProbe;
    }
  } catch {
    // no verdict yet
  }
  kvmProbe = new Promise<boolean>((resolve) => {
    const args = [
      ...deathSignalPrefix(),
      qemu,
      '-nodefaults',
      '-no-user-config',
      '-accel',
      'kvm',
      '-m',
      '128',
      '-display',
      'none',
      '-no-reboot',
      '-serial',
      'stdio',
      '-kernel',
      img.kernel,
      '-initrd',
      img.initrd,
      '-append',
      `${img.baseCmdline} workload.mib=1`,
    ];
    const child = spawn(args[0], args.slice(1), { stdio: ['ignore', 'pipe', 'ignore'] });
    let seen = '';
    let settled = false;
    const finish = (boots: boolean): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      child.kill('SIGKILL');
      const record: KvmProbeRecord = { ...key, boots };
      try {
        fs.writeFileSync(cacheFile, JSON.stringify(record, null, 2) + '\n');
      } catch {
        // a read-only guest dir only costs a probe per process
      }
      resolve(boots);
    };
    const timer = setTimeout(() => finish(false), KVM_PROBE_TIMEOUT_MS);
    child.stdout?.setEncoding('latin1');
    child.stdout?.on('data', (chunk: string) => {
      seen = (seen + chunk).slice(-4096);
      if (seen.includes(KVM_PROBE_MARKER)) finish(true);
    });
    child.once('error', () => finish(false));
    child.once('exit', () => finish(false));
  });
  return kvmProbe;
}


let pdeathsigPrefix: string[] | null = null;
/** `setpriv --pdeathsig KILL` (util-linux) so QEMU dies with its parent, when supported. */
export function deathSignalPrefix(): string[] {
  if (pdeathsigPrefix === null) {
    const r = spawnSync('setpriv', ['--pdeathsig', 'KILL', 'true'], { stdio: 'ignore' });
    pdeathsigPrefix = r.status === 0 ? ['setpriv', '--pdeathsig', 'KILL'] : [];
  }
  return pdeathsigPrefix;
}

