import { Refusal } from './limits';

/**
 * The VMs migrating through a gateway now, in either direction: one migration of a VM at a time.
 *
 * A migration whose source has sent its whole stream holds its VM on while it ends: the receiver's
 * commit and the stores' sync (the pages synced, the snapshot committed: a second or more after a large
 * leg). Its source QEMU may see it complete before that and migrate the VM straight back, or on again:
 * such a migration waits for the last one to end (whenFree) instead of being refused, since it needs
 * the snapshot being committed. A migration still in progress refuses another of its VM at once.
 */
export class VmClaims {
  private readonly held = new Set<string>();
  /** VMs whose migration's stream is over, with what resolves once that migration has ended and let the VM go. */
  private readonly settlingBy = new Map<string, Promise<void>>();

  has(vm: string): boolean {
    return this.held.has(vm);
  }

  add(vm: string): void {
    this.held.add(vm);
  }

  delete(vm: string): void {
    this.held.delete(vm);
    this.settlingBy.delete(vm);
  }

  /**
   * The migration holding `vm` is over as its source may see it; `settled` resolves once it has ended,
   * either way, after its holder has let the VM go (delete()).
   */
  settling(vm: string, settled: Promise<void>): void {
    if (this.held.has(vm)) this.settlingBy.set(vm, settled);
  }

  /**
   * Resolves once nothing holds `vm`: at once, or when the migration holding it, its stream over, has
   * ended. Rejects with a 'busy' Refusal while a migration of `vm` is in progress, or when one is still
   * ending at `deadline` (Date.now() time).
   */
  async whenFree(vm: string, deadline: number): Promise<void> {
    for (;;) {
      if (!this.held.has(vm)) return;
      const settled = this.settlingBy.get(vm);
      if (settled === undefined) throw new Refusal('busy', `VM ${vm} is already migrating through this gateway`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Refusal('busy', `VM ${vm}'s last migration was still ending (its stores settling)`);
      let timer: NodeJS.Timeout | undefined;
      const over = await Promise.race([settled.then(() => true), new Promise<false>((resolve) => (timer = setTimeout(() => resolve(false), left)))]);
      clearTimeout(timer);
      // Its holder lets the VM go before `settled` resolves: still held means another migration took it.
      if (over && this.held.has(vm) && this.settlingBy.get(vm) === settled) throw new Refusal('busy', `VM ${vm} is already migrating through this gateway`);
    }
  }
}
