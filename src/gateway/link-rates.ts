import type { MigrationReport } from './session';

/** A migration must move this many WAN bytes for its rate to say something about the link. */
export const LINK_SAMPLE_MIN_BYTES = 16 * 1024 * 1024;
/** VMs whose rate is remembered (the oldest is forgotten first). */
const MAX_VMS = 10_000;

/**
 * The rate each VM's last sizeable migration through this gateway moved WAN bytes at, either way: a
 * lower bound of what the WAN path to the far site carries (the leg may have been held back by QEMU or
 * either gateway, never sped up). A VM goes back and forth between the same two gateways, so its next
 * migration, outgoing or not, crosses the same path: its sending session gives the rate to the compression
 * policy, which then knows whether zstd saves bytes faster than the link would carry them
 * (CompressionPolicy.linkFloorBytesPerS). In memory only: a restarted gateway starts without.
 */
export class LinkRates {
  private readonly rates = new Map<string, number>();

  /** A finished migration: a completed one that moved LINK_SAMPLE_MIN_BYTES or more replaces the VM's rate. */
  observe(report: MigrationReport): void {
    const bytes = Math.max(report.wanBytesOut, report.wanBytesIn);
    if (report.result !== 'completed' || bytes < LINK_SAMPLE_MIN_BYTES || !(report.seconds > 0)) return;
    this.rates.delete(report.vm);
    this.rates.set(report.vm, bytes / report.seconds);
    if (this.rates.size > MAX_VMS) this.rates.delete(this.rates.keys().next().value as string);
  }

  /** Bytes/s the VM's last sizeable migration moved at; 0 when none is known. */
  floor(vm: string): number {
    return this.rates.get(vm) ?? 0;
  }
}
