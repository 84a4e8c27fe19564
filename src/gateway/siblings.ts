/**
 * Siblings (routes[].siblings): VMs booted from the same image, whose retained snapshots both sites hold
 * since each last migrated between them. A migrating VM's page whose content a sibling's snapshot holds
 * crosses as a reference to it (SiblingDelta, proxy/sibling-match.ts). Here, what each gateway does
 * around its session: the sender reads the siblings' digest tables from its own store and names their
 * snapshots in its Hello; the receiver pins those it holds at the same snapshot and confirms them in
 * its Offer. A peer of the previous release neither names nor confirms any: no references, no harm.
 */
import type { VmClaims } from './vm-claims';
import type { SiblingPages } from '../proxy/retained';
import { SiblingMatch } from '../proxy/sibling-match';
import type { PageStore } from '../store';
import { openRetainedSnapshot, readRetainedDigests } from '../store/retained-snapshot';
import { MAX_SIBLINGS, type OfferMessage, type SiblingSnapshot } from '../wire/frames';
import { ProtocolViolation } from './protocol-violation';
import { peerText } from './session';
import { errorMessage } from '../common/errors';

type Note = (message: string, fields: Record<string, unknown>) => void;

/** The sender's side: the siblings' digest tables its store holds, named in the Hello. */
export class SentSiblings {
  /** What the Hello names (empty: no `siblings` field). */
  readonly hello: SiblingSnapshot[] = [];
  private readonly tables = new Map<string, Uint8Array>();

  /** Reads the tables of `names` from this site's stores (a store in use or without a snapshot is passed over). */
  constructor(storeRoot: string, names: readonly string[], note: Note) {
    for (const vm of names) {
      const read = readRetainedDigests(storeRoot, vm);
      if (typeof read === 'string') {
        note('sibling not used', { sibling: vm, why: read });
        continue;
      }
      this.hello.push({ vm, snapshotId: read.snapshotId });
      this.tables.set(vm, read.digests);
    }
  }

  /** What the encoder matches against: the siblings the Offer confirmed, in its order; null for none. */
  confirmed(offer: OfferMessage): SiblingMatch | null {
    const names = offer.siblings ?? [];
    const tables = names.map((vm) => {
      const table = this.tables.get(vm);
      if (!table || names.indexOf(vm) !== names.lastIndexOf(vm)) throw new ProtocolViolation('bad-payload', `Offer confirms sibling ${peerText(vm)}, which the Hello did not name once`);
      return table;
    });
    this.tables.clear();
    return tables.length > 0 ? new SiblingMatch(tables) : null;
  }
}

/** The receiver's side: the Hello's siblings held here at the same snapshot, pinned until release(). */
export class PinnedSiblings {
  /** In the Offer's order: what SiblingDelta frames name. */
  readonly stores: SiblingPages[] = [];
  private readonly opened: PageStore[] = [];

  /**
   * Pins each named sibling this peer may migrate here (`allowed`), not migrating through this gateway
   * (`claims`, which then holds it until release()) and whose store claims the named snapshot and is not
   * in use (its lock, against other processes). Others are passed over.
   */
  constructor(
    named: readonly SiblingSnapshot[],
    storeRoot: string,
    allowed: (vm: string) => boolean,
    private readonly claims: Pick<VmClaims, 'has' | 'add' | 'delete'>,
    note: Note,
  ) {
    for (const { vm, snapshotId } of named.slice(0, MAX_SIBLINGS)) {
      if (claims.has(vm) || !allowed(vm) || this.stores.some((s) => s.vm === vm)) {
        note('sibling not used', { sibling: peerText(vm), why: claims.has(vm) ? 'migrating' : 'not allowed or named twice' });
        continue;
      }
      const store = openRetainedSnapshot(storeRoot, vm, snapshotId);
      if (typeof store === 'string') {
        note('sibling not used', { sibling: peerText(vm), why: peerText(store) });
        continue;
      }
      claims.add(vm);
      this.opened.push(store);
      this.stores.push(store);
    }
  }

  get names(): string[] {
    return this.stores.map((s) => s.vm);
  }

  /**
   * The migration is over: the siblings' stores are closed and free to migrate. One in `damaged` (a page
   * did not match its digest) is verified first: its damaged pages are dropped, and with them its claim
   * to the snapshot, so no later migration is offered it.
   */
  release(damaged: readonly SiblingPages[], note: Note): void {
    for (const store of this.opened.splice(0)) {
      this.claims.delete(store.vm);
      try {
        if (damaged.includes(store)) note('sibling store verified after a damaged page', { sibling: store.vm, damagedPages: store.verify().length });
        store.close();
      } catch (err) {
        note('sibling store close failed', { sibling: store.vm, error: errorMessage(err) });
      }
    }
    this.stores.length = 0;
  }
}
