/**
 * WAN bandwidth caps (`wan: { maxMbit: N }` under a peer and under a route): what a sending gateway
 * writes to a peer socket is charged to a token bucket per capped peer and per capped route. A session
 * whose bucket is in debt stops reading its source QEMU until the bucket has refilled: backpressure to
 * QEMU, never a queue here. The sessions sharing one peer's bucket take turns fairly: when it refills,
 * those that have been charged least go first, and one that has got a quantum ahead of another one
 * waiting waits for it.
 *
 * And the link's rate where the operator knows it (`wan: { linkMbit: N }` under a peer): what the
 * sending connections to that peer price a byte saved at, instead of measuring it (WanRate), each at an
 * equal share of the link with the others open at the time.
 */
import { describe, type Fail, isMapping } from './config-schema';

/** A `wan:` block's cap. */
export interface WanCapConfig {
  /** Megabits (10^6 bits) per second on the WAN, frames included. */
  maxMbit: number;
}

/**
 * A link to a peer of a rate the operator stated: the sending connections on it (a session, each of its
 * extra channels) share it equally, except a migration's main channel while multifd channels of it are
 * open: it carries QEMU's setup, device state and sync points while they carry the pages, and counted
 * as one more connection it took a share they then lacked (each of 4 channels worked with a fifth of
 * the link). It works with a channel's share meanwhile.
 */
export class WanLink {
  private readonly members = new Set<WanShare>();
  /** Main channels with multifd channels open beside them, and how many. */
  private readonly beside = new Map<WanShare, number>();

  constructor(readonly bytesPerSecond: number) {}

  /** `share` joins, as a multifd channel of the migration whose main channel holds `main` (null: any other connection). */
  join(share: WanShare, main: WanShare | null = null): void {
    this.members.add(share);
    if (main !== null) this.beside.set(main, (this.beside.get(main) ?? 0) + 1);
  }

  leave(share: WanShare, main: WanShare | null = null): void {
    if (!this.members.delete(share)) return;
    if (main === null) return;
    const open = (this.beside.get(main) ?? 0) - 1;
    if (open > 0) this.beside.set(main, open);
    else this.beside.delete(main);
  }

  /** One connection's share of the link now. */
  get shareBytesPerSecond(): number {
    let counted = this.members.size;
    for (const main of this.beside.keys()) if (this.members.has(main)) counted--;
    return this.bytesPerSecond / Math.max(1, counted);
  }
}

/** How far a bucket may fill while no one writes: a short burst, so the cap holds over short windows too. */
const BURST_SECONDS = 0.1;
const MIN_BURST_BYTES = 64 * 1024;
/** How far ahead (bytes charged) one waiting session may get of another before it waits for it. */
const FAIR_QUANTUM_BYTES = 256 * 1024;

/** One cap: a token bucket in bytes, and the sessions waiting for it to refill. */
export class WanCap {
  readonly bytesPerSecond: number;
  private readonly burst: number;
  /** Bytes that may be written now; negative: the debt to wait off. */
  private tokens: number;
  private refilledAt = performance.now();
  private readonly waiting = new Set<WanShare>();
  /** The sessions on this cap, for where a newcomer starts in the fair order. */
  private readonly members = new Set<WanShare>();
  private timer: NodeJS.Timeout | null = null;

  constructor(config: WanCapConfig) {
    this.bytesPerSecond = (config.maxMbit * 1_000_000) / 8;
    this.burst = Math.max(MIN_BURST_BYTES, this.bytesPerSecond * BURST_SECONDS);
    this.tokens = this.burst;
  }

  /**
   * Bytes written: taken from the bucket (it may go into debt: a write is never split). Negative: bytes
   * charged ahead of their write (a batch on the thread pool) handed back.
   */
  charge(bytes: number): void {
    this.tokens -= bytes;
  }

  /** In debt: writers wait. */
  inDebt(): boolean {
    this.refill();
    return this.tokens < 0;
  }

  join(share: WanShare): number {
    let least = Infinity;
    for (const m of this.members) least = Math.min(least, m.charged);
    this.members.add(share);
    return least === Infinity ? 0 : least;
  }

  leave(share: WanShare): void {
    this.members.delete(share);
    this.waiting.delete(share);
    this.release();
  }

  wait(share: WanShare): void {
    this.waiting.add(share);
    this.release();
  }

  private refill(): void {
    const now = performance.now();
    this.tokens = Math.min(this.burst, this.tokens + ((now - this.refilledAt) / 1000) * this.bytesPerSecond);
    this.refilledAt = now;
  }

  /** Lets waiting sessions go once the bucket is out of debt, least charged first; else sets a timer for then. */
  private release(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    if (this.waiting.size === 0) return;
    if (this.inDebt()) return this.releaseIn(-this.tokens);

    let least = Infinity;
    for (const s of this.waiting) least = Math.min(least, s.charged);
    for (const s of [...this.waiting]) {
      if (s.charged > least + FAIR_QUANTUM_BYTES) continue;
      this.waiting.delete(s);
      s.released();
    }
    // Those left waiting are ahead of the others: they go once the others had time for a quantum, so
    // that one whose source has gone quiet does not hold them back for good.
    if (this.waiting.size > 0) this.releaseIn(FAIR_QUANTUM_BYTES);
  }

  /** release() again once the bucket has had time to refill `bytes`. */
  private releaseIn(bytes: number): void {
    this.timer = setTimeout(() => {
      this.timer = null;
      this.release();
    }, Math.ceil((bytes / this.bytesPerSecond) * 1000));
    this.timer.unref();
  }
}

/**
 * One sending session's part of the caps that apply to it (its route's, its peer's; none when
 * uncapped): charged with every byte it writes to the peer, asked before it reads its source again.
 */
export class WanShare {
  /** Bytes charged while on the caps, counted from where the share joined the fair order. */
  charged = 0;
  private resume: (() => void) | null = null;

  constructor(
    private readonly caps: readonly WanCap[],
    private readonly link: WanLink | null = null,
    /** For a multifd channel of a migration: its main channel's share (WanLink). */
    private readonly main: WanShare | null = null,
  ) {
    for (const cap of caps) this.charged = Math.max(this.charged, cap.join(this));
    link?.join(this, main);
  }

  /** This connection's share of its peer's link where the operator stated its rate (`wan.linkMbit`), bytes a second; -1: not stated. */
  get linkBytesPerSecond(): number {
    return this.link === null ? -1 : this.link.shareBytesPerSecond;
  }

  /** Waiting for a cap to refill (the source is not read meanwhile). */
  get held(): boolean {
    return this.resume !== null;
  }

  charge(bytes: number): void {
    if (this.caps.length === 0) return;
    this.charged += bytes;
    for (const cap of this.caps) cap.charge(bytes);
  }

  /** When a cap is in debt: true, and `resume` is called once it may write again. False: write on now. */
  hold(resume: () => void): boolean {
    if (this.resume) return true;
    const cap = this.caps.find((c) => c.inDebt());
    if (!cap) return false;
    this.resume = resume;
    cap.wait(this);
    return true;
  }

  /** Called by the cap it waited on: any other cap in debt is waited on next. */
  released(): void {
    const resume = this.resume;
    this.resume = null;
    if (resume && !this.hold(resume)) resume();
  }

  /** The session is over: it leaves the caps' fair order. */
  close(): void {
    this.resume = null;
    for (const cap of this.caps) cap.leave(this);
    this.link?.leave(this, this.main);
  }
}

/**
 * Every cap of a gateway: one per capped peer (shared by all its routes) and one per capped route; and
 * the links of the peers whose rate the operator stated.
 */
export class WanCaps {
  private readonly peers = new Map<string, WanCap>();
  private readonly routes = new Map<string, WanCap>();
  private readonly links = new Map<string, WanLink>();

  constructor(config: {
    peers: readonly { peer: string; wan: WanCapConfig | null; linkMbit?: number | null }[];
    routes: readonly { vm: string; peerKey: string; wan: WanCapConfig | null }[];
  }) {
    for (const p of config.peers) {
      if (p.wan) this.peers.set(p.peer, new WanCap(p.wan));
      if (p.linkMbit) this.links.set(p.peer, new WanLink((p.linkMbit * 1_000_000) / 8));
    }
    for (const r of config.routes) if (r.wan) this.routes.set(r.vm, new WanCap(r.wan));
  }

  /** A new share for one connection of a migration of `vm` to the peer `peerKey`; `main`: the main channel's, for a multifd channel. */
  share(vm: string, peerKey: string, main: WanShare | null = null): WanShare {
    return new WanShare([this.routes.get(vm), this.peers.get(peerKey)].filter((c): c is WanCap => c !== undefined), this.links.get(peerKey) ?? null, main);
  }
}

/** Megabits a second in a `wan:` block: a finite number in 0.1..1000000. */
function mbitIn(value: Record<string, unknown>, name: string, key: string, fail: Fail): number {
  const mbit = value[name];
  if (typeof mbit !== 'number' || !Number.isFinite(mbit)) return fail(`${key}.${name}`, `must be a number of megabits per second, not ${describe(mbit)}`);
  if (mbit < 0.1 || mbit > 1_000_000) return fail(`${key}.${name}`, `${mbit} is out of range (0.1..1000000)`);
  return mbit;
}

/** A route's `wan:` block, or null when absent. */
export function parseWanCap(value: unknown, key: string, fail: Fail): WanCapConfig | null {
  if (value === undefined || value === null) return null;
  if (!isMapping(value)) return fail(key, `must be a mapping with maxMbit, not ${describe(value)}`);
  const unknown = Object.keys(value).filter((k) => k !== 'maxMbit');
  if (unknown.length > 0) fail(`${key}.${unknown[0]}`, `unknown key "${key}.${unknown[0]}" (expected maxMbit)`);
  return { maxMbit: mbitIn(value, 'maxMbit', key, fail) };
}

/** A peer's `wan:` block: its cap (maxMbit) and its link's rate (linkMbit), each null when absent. */
export function parsePeerWan(value: unknown, key: string, fail: Fail): { wan: WanCapConfig | null; linkMbit: number | null } {
  if (value === undefined || value === null) return { wan: null, linkMbit: null };
  if (!isMapping(value)) return fail(key, `must be a mapping with maxMbit and/or linkMbit, not ${describe(value)}`);
  const unknown = Object.keys(value).filter((k) => k !== 'maxMbit' && k !== 'linkMbit');
  if (unknown.length > 0) fail(`${key}.${unknown[0]}`, `unknown key "${key}.${unknown[0]}" (expected maxMbit, linkMbit)`);
  if (value.maxMbit === undefined && value.linkMbit === undefined) fail(key, 'must give maxMbit, linkMbit or both');
  return {
    wan: value.maxMbit === undefined ? null : { maxMbit: mbitIn(value, 'maxMbit', key, fail) },
    linkMbit: value.linkMbit === undefined ? null : mbitIn(value, 'linkMbit', key, fail),
  };
}
