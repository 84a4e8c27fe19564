/**
 * The bfmig test guest as a libvirt domain: the kernel and initramfs QemuVm boots, the same kernel
 * command line, its serial console appended to a file. Domain type `qemu` (TCG): no KVM needed.
 */
import * as fs from 'node:fs';
import type { GuestImage } from '../vm/guest-image';
import { DEFAULT_SERIAL_FAIL, guestKernelCmdline, type WorkloadParams } from '../vm/qemu-vm';

export interface GuestDomain {
  name: string;
  /** Kernel and initramfs, readable by the user whose session daemon runs the domain. */
  image: GuestImage;
  workload: WorkloadParams;
  memMiB: number;
  /** Machine type, e.g. pc-i440fx-7.2: the destination must offer it too. */
  machine: string;
  /**
   * The serial console's file, opened in append mode: a migration's destination QEMU opens the same
   * file, so the console reads on across migrations, in one file.
   */
  consoleFile: string;
}

const escapeXml = (s: string): string => s.replace(/[<>&'"]/g, (c) => `&#${c.charCodeAt(0)};`);

/** The domain XML for `virsh create` (a transient domain; `virsh define` for a persistent one). */
export function guestDomainXml(d: GuestDomain): string {
  return `<domain type='qemu'>
  <name>${escapeXml(d.name)}</name>
  <memory unit='MiB'>${d.memMiB}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='${escapeXml(d.machine)}'>hvm</type>
    <kernel>${escapeXml(d.image.kernel)}</kernel>
    <initrd>${escapeXml(d.image.initrd)}</initrd>
    <cmdline>${escapeXml(guestKernelCmdline(d.image, d.workload))}</cmdline>
  </os>
  <on_reboot>destroy</on_reboot>
  <devices>
    <serial type='file'>
      <source path='${escapeXml(d.consoleFile)}' append='on'/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
`;
}

/** Reading a serial console that QEMU appends to a file. */
export class ConsoleFile {
  constructor(readonly path: string) {}

  /** Where the console ends now: `waitFor(..., since)` looks only after it. */
  mark(): number {
    return fs.statSync(this.path).size;
  }

  /**
   * The first match of `re` in complete lines after `since`; rejects as soon as the guest reports a
   * failure there (QemuVm's DEFAULT_SERIAL_FAIL) or when `timeoutMs` passes.
   */
  async waitFor(pattern: RegExp, timeoutMs: number, since = 0): Promise<RegExpExecArray> {
    const re = new RegExp(pattern.source, pattern.flags.replace('g', ''));
    const until = Date.now() + timeoutMs;
    for (;;) {
      const text = fs.readFileSync(this.path, 'latin1').slice(since);
      const lines = text.slice(0, text.lastIndexOf('\n') + 1);
      const failure = DEFAULT_SERIAL_FAIL.exec(lines);
      if (failure) throw new Error(`${this.path}: the guest reports "${failure[0]}" while waiting for ${re}`);
      const match = re.exec(lines);
      if (match) return match;
      if (Date.now() > until) throw new Error(`${this.path}: ${re} not seen within ${timeoutMs} ms; console tail:\n${text.slice(-1500)}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}
