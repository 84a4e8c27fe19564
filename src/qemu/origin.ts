/**
 * What a migration stream tells about the QEMU that sent it. The stream carries no QEMU version; a
 * versioned machine type (`pc-i440fx-7.2`, `pc-q35-7.2`, `virt-7.2`) is the closest it comes: that
 * machine type first shipped with that QEMU release, so the sender was that release or later and
 * a destination needs at least that release to load it.
 */
export interface StreamOrigin {
  /** The configuration section's machine type; null in the legacy framing (QEMU < 2.4 compat), which omits it. */
  machineType: string | null;
  /** The QEMU release that introduced machineType (a lower bound on the sender's version), when it names one. */
  minQemuRelease: string | null;
  /** Legacy (no configuration, no section footers) or current framing. */
  framing: 'legacy' | 'current';
}

const VERSIONED_MACHINE = /-(\d+)\.(\d+)$/;

export function streamOrigin(machineType: string | null, footers: boolean): StreamOrigin {
  const m = machineType === null ? null : VERSIONED_MACHINE.exec(machineType);
  return {
    machineType,
    minQemuRelease: m === null ? null : `${Number(m[1])}.${Number(m[2])}`,
    framing: footers || machineType !== null ? 'current' : 'legacy',
  };
}

/** "pc-i440fx-7.2, QEMU ≥ 7.2" or "legacy framing, QEMU version unknown", for humans. */
export function describeOrigin(o: StreamOrigin): string {
  const machine = o.machineType ?? `${o.framing} framing`;
  return o.minQemuRelease === null ? `${machine}, QEMU version unknown` : `${machine}, QEMU ≥ ${o.minQemuRelease}`;
}
