/**
 * A migration's connections, grouped: its main channel (the stream, carried by SendSession /
 * ReceiveSession) and its extra channels (multifd, postcopy-preempt; channel-relay.ts), which QEMU
 * opens to the same address in whatever order.
 *
 * A channel joins only a migration in progress on the same route (sending side) or named by its peer
 * with the migration's random id (receiving side), from the same remote address as the main channel;
 * a group takes at most `maxChannels` multifd channels with distinct ids and one UUID, and one
 * preempt channel. A channel may wait for its migration's main channel half of limits.handshakeSeconds
 * from the moment it said what it is: QEMU opens the main channel first, but the gateway may see a
 * multifd channel's first bytes before the main channel's.
 *
 * One channel failing fails them all: the main session aborts (its store rolls back, its QEMU
 * connection is reset) and every extra channel is reset.
 *
 * Multifd channels go through the codecs of the migration's MultifdMigration, which the main session
 * hands in once its stream has given the RAM block list (useMultifd); a multifd channel reads nothing
 * before. The store commits the migration's snapshot only when every extra channel was a multifd
 * channel whose every page was kept (keepsSnapshot).
 */
import type { MultifdMigration } from '../proxy/multifd-migration';
import type { ZSTD } from '../wire/compression';
import { type ChannelName } from '../wire/frames';
import { Refusal } from './limits';
import type { WanShare } from './wan-cap';

/** What a group needs of its main channel's session. */
export interface MainChannel {
  /** Fails the migration: the session aborts its peer, resets its QEMU connection, rolls its store back. */
  abort(reason: string): void;
  /** The stream has advised postcopy with postcopy-ram on (POSTCOPY_ADVISE): a preempt channel may come. */
  postcopyAdvised(): boolean;
  /** The compression its handshake chose (known once the sender has the Offer): the extra channels use it too. */
  compression(): typeof ZSTD | null;
  /** The receiver takes CompressedFrames on the extra channels (its Offer said so); a receiving group's main: absent. */
  channelFramesBatched?(): boolean;
  /** The main channel's share of the WAN caps and the stated link (its extra channels' are taken beside it); a receiving group's main: absent. */
  wanShare?(): WanShare;
}

/** An extra channel's relay, as its group sees it. */
export interface ExtraChannel {
  /** Ends the channel at once: both of its connections are reset. */
  abort(reason: string): void;
}

/** How a group's state is told to the log (the gateway's SessionObserver.event). */
export type GroupEvent = (message: string, fields: Record<string, unknown>) => void;

type GroupState = 'starting' | 'ready' | 'failed' | 'ended';

export class ChannelGroup {
  private state: GroupState = 'starting';
  private readonly extras = new Set<ExtraChannel>();
  private readonly ids = new Set<number>();
  private preempt = false;
  private uuid: string | null = null;
  private readonly readyWaiters: { resolve: () => void; reject: (err: Error) => void }[] = [];
  /** Waiting for `count` extra channels to have joined (see whenJoined). */
  private readonly joinWaiters: { count: number; resolve: () => void; reject: (err: Error) => void }[] = [];
  private failure = '';
  /** The multifd channels' shared state, from the main channel's block list on. */
  private multifd: MultifdMigration | null = null;
  private readonly multifdWaiters: { resolve: (multifd: MultifdMigration | null) => void; reject: (err: Error) => void }[] = [];
  /** Multifd channels done with their codec (ended, cleanly or not, or relayed verbatim). */
  private multifdSettled = 0;
  /** A multifd codec was done with before its end (its channel closed early): not every page was kept. */
  private multifdIncomplete = false;
  private readonly endWaiters: (() => void)[] = [];
  /** After the main channel completed, extra channels still open are given this long to end. */
  private graceTimer: NodeJS.Timeout | null = null;

  constructor(
    /** The migration's id: what the peer gateway's extra channels name it by. */
    readonly migration: string,
    readonly vm: string,
    /** HOST:PORT of the destination QEMU, as the receiving gateway reaches it. */
    readonly target: string,
    /** The main channel's remote address: every extra channel must come from it. */
    readonly origin: string,
    readonly maxChannels: number,
    private readonly main: MainChannel,
    /** Tells the log of the migration's channels. */
    readonly event: GroupEvent,
    private readonly graceMs: number,
    private readonly closed: () => void,
  ) {}

  /** Bytes compression kept off the WAN on the extra channels, added as each one ends. */
  compressionSavedBytes = 0;

  /** The compression of the migration's Literal bytes, chosen by the main channel's handshake. */
  get compression(): typeof ZSTD | null {
    return this.main.compression();
  }

  /** The extra channels' Runs and Deltas go inside their compressed batches (Feature.ChannelCompressedFrames). */
  get channelFramesBatched(): boolean {
    return this.main.channelFramesBatched?.() ?? false;
  }

  /** The main channel's WAN share, beside which an extra channel takes its own (null: a receiving group). */
  get mainWanShare(): WanShare | null {
    return this.main.wanShare?.() ?? null;
  }

  /** Multifd channels that joined so far. */
  get multifdChannels(): number {
    return this.ids.size;
  }

  /** Extra channels that joined so far. */
  get joined(): number {
    return this.ids.size + (this.preempt ? 1 : 0);
  }

  /**
   * Whether the store may commit the migration's snapshot: no extra channel joined, or every one was a
   * multifd channel whose codec ended having kept every page it carried. Pages that took a preempt
   * channel or a multifd channel relayed verbatim never reached the store.
   */
  get keepsSnapshot(): boolean {
    if (this.joined === 0) return true;
    return !this.preempt && this.multifd !== null && this.multifdSettled === this.ids.size && !this.multifdIncomplete && this.multifd.retainedAll;
  }

  /** The main channel's stream gave its block list: multifd channels may read on through `multifd`. */
  useMultifd(multifd: MultifdMigration): void {
    this.multifd = multifd;
    for (const w of this.multifdWaiters.splice(0)) w.resolve(multifd);
  }

  /** The migration's MultifdMigration once there is one; null if the main channel ended without one. */
  whenMultifd(): Promise<MultifdMigration | null> {
    if (this.multifd !== null) return Promise.resolve(this.multifd);
    if (this.state === 'ended') return Promise.resolve(null);
    if (!this.open) return Promise.reject(new Error(this.failure || 'the migration has ended'));
    return new Promise((resolve, reject) => this.multifdWaiters.push({ resolve, reject }));
  }

  /**
   * A multifd channel is done with its codec: `complete` when it ended cleanly (its End was sent, or
   * checked); false also for one relayed verbatim.
   */
  multifdEnded(complete: boolean): void {
    if (!complete) this.multifdIncomplete = true;
    this.multifdSettled++;
    if (this.multifdSettled >= this.ids.size) for (const resolve of this.endWaiters.splice(0)) resolve();
  }

  /**
   * Resolves once `count` extra channels have joined (the sender's End says how many it had) and every
   * multifd channel has ended cleanly, so the store holds their pages; rejects if the migration fails first.
   */
  async whenSettled(count: number): Promise<void> {
    await this.whenJoined(count);
    if (this.multifdSettled >= this.ids.size) return;
    if (!this.open) throw new Error(this.failure || 'the migration has ended');
    await new Promise<void>((resolve) => this.endWaiters.push(resolve));
    if (this.state === 'failed') throw new Error(this.failure);
  }

  /** Resolves once `count` extra channels have joined (the sender's End says how many it had); rejects if the migration fails first. */
  whenJoined(count: number): Promise<void> {
    if (this.joined >= count) return Promise.resolve();
    if (!this.open) return Promise.reject(new Error(this.failure || 'the migration has ended'));
    return new Promise((resolve, reject) => this.joinWaiters.push({ count, resolve, reject }));
  }

  /** Whether a connection with no magic from the main channel's address is this migration's postcopy-preempt channel. */
  get awaitsPreempt(): boolean {
    return this.open && !this.preempt && this.main.postcopyAdvised();
  }

  get open(): boolean {
    return this.state === 'starting' || this.state === 'ready';
  }

  /** Whether a channel may still join: open, and its main channel's stream not over yet. */
  get joinable(): boolean {
    return this.open && !this.joinsEnded;
  }

  /**
   * The main channel's stream is over (the sender sent End, naming the channels joined): a channel that
   * comes now belongs to the VM's next migration, which may begin while this one settles, and must wait
   * for that one's group (a sending gateway finds groups by VM).
   */
  endJoins(): void {
    this.joinsEnded = true;
  }

  private joinsEnded = false;

  /**
   * Takes `channel` into the group, or throws the Refusal that says why not. `uuid`: a multifd
   * channel's VM UUID (sending side; the receiving side trusts its authenticated peer's sender).
   */
  join(channel: ChannelName, remote: string, uuid: string | null, relay: ExtraChannel): void {
    if (!this.joinable) throw new Refusal('no-migration', `the migration of VM ${this.vm} has ended`);
    if (remote !== this.origin) throw new Refusal('channel-mismatch', `a channel from ${remote}, but the migration's main channel came from ${this.origin}`);
    if (channel.kind === 'encrypted') {
      if (this.extras.size > 0) throw new Refusal('duplicate-channel', 'a second connection in an encrypted tunnel');
    } else if (channel.kind === 'preempt') {
      if (this.preempt) throw new Refusal('duplicate-channel', 'a second postcopy-preempt channel');
      this.preempt = true;
    } else {
      if (uuid !== null && this.uuid !== null && uuid !== this.uuid) throw new Refusal('channel-mismatch', `multifd channel ${channel.index} names VM UUID ${uuid}, the migration's others ${this.uuid}`);
      if (this.ids.has(channel.index)) throw new Refusal('duplicate-channel', `a second multifd channel ${channel.index}`);
      if (channel.index >= this.maxChannels || this.ids.size >= this.maxChannels) {
        throw new Refusal('channel-limit', `multifd channel ${channel.index}: at most ${this.maxChannels} channels (ids 0..${this.maxChannels - 1}) per migration (limits.maxChannels)`);
      }
      if (uuid !== null) this.uuid = uuid;
      this.ids.add(channel.index);
    }
    this.extras.add(relay);
    this.event('channel joined', { channel: channelLabel(channel), channels: this.joined });
    for (const w of this.joinWaiters.filter((w) => this.joined >= w.count)) {
      this.joinWaiters.splice(this.joinWaiters.indexOf(w), 1);
      w.resolve();
    }
  }

  /** The channel's relay is over (it ended or failed). */
  left(relay: ExtraChannel): void {
    this.extras.delete(relay);
    if (this.state === 'ended' && this.extras.size === 0) this.close();
  }

  /**
   * Resolves once the main channel's link to the far side is up (sending side: the peer offered;
   * receiving side: the destination QEMU answered), so extra channels reach the destination after it.
   */
  whenReady(): Promise<void> {
    if (this.state === 'ready') return Promise.resolve();
    if (!this.open) return Promise.reject(new Error(this.failure || 'the migration has ended'));
    return new Promise((resolve, reject) => this.readyWaiters.push({ resolve, reject }));
  }

  ready(): void {
    if (this.state !== 'starting') return;
    this.state = 'ready';
    for (const w of this.readyWaiters.splice(0)) w.resolve();
  }

  /** One of the migration's channels failed: so does the migration, on every channel. */
  fail(reason: string): void {
    if (!this.open) return;
    this.state = 'failed';
    this.failure = reason;
    for (const w of [...this.readyWaiters.splice(0), ...this.joinWaiters.splice(0), ...this.multifdWaiters.splice(0)]) w.reject(new Error(reason));
    for (const resolve of this.endWaiters.splice(0)) resolve();
    this.main.abort(reason);
    for (const extra of [...this.extras]) extra.abort(reason);
    this.extras.clear();
    this.close();
  }

  /** The main channel's session is over. */
  mainEnded(completed: boolean, error: string | null): void {
    if (!completed) return this.fail(error ?? 'the main channel failed');
    if (!this.open) return;
    this.state = 'ended';
    for (const w of this.readyWaiters.splice(0)) w.reject(new Error('the migration has ended'));
    for (const w of this.multifdWaiters.splice(0)) w.resolve(null);
    if (this.extras.size === 0) return this.close();
    // QEMU closes its extra channels once the migration is over; one that does not is cut.
    this.graceTimer = setTimeout(() => {
      for (const extra of [...this.extras]) extra.abort('the channel was still open after its migration completed');
      this.extras.clear();
      this.close();
    }, this.graceMs).unref();
  }

  private close(): void {
    if (this.graceTimer) clearTimeout(this.graceTimer);
    this.graceTimer = null;
    this.closed();
  }
}

/** "multifd 3", "preempt": a channel as logs name it. */
export function channelLabel(channel: ChannelName): string {
  return channel.kind === 'multifd' ? `multifd ${channel.index}` : channel.kind;
}

/**
 * The groups of one gateway side, by key (sending side: the route's VM; receiving side: the
 * migration's id). A channel that arrives before its group waits, at most until its deadline.
 */
export class MigrationChannels {
  private readonly groups = new Map<string, ChannelGroup>();
  private readonly waiting = new Map<string, Set<(group: ChannelGroup) => void>>();

  constructor(private readonly maxChannels: number) {}

  /** Opens the group of a new migration under `key`; it leaves the registry once closed (see ChannelGroup). */
  open(key: string, m: { migration: string; vm: string; target: string; origin: string; main: MainChannel; event: GroupEvent; graceMs: number }): ChannelGroup {
    // A second migration naming the id of one in progress would take its channels.
    if (this.find(key)) throw new Refusal('duplicate-channel', `migration ${key} is already in progress`);
    const group = new ChannelGroup(m.migration, m.vm, m.target, m.origin, this.maxChannels, m.main, m.event, m.graceMs, () => {
      if (this.groups.get(key) === group) this.groups.delete(key);
    });
    this.groups.set(key, group);
    const waiters = this.waiting.get(key);
    this.waiting.delete(key);
    for (const w of waiters ?? []) w(group);
    return group;
  }

  /** The group under `key` that channels may join now, if any. */
  find(key: string): ChannelGroup | null {
    const group = this.groups.get(key);
    return group?.joinable ? group : null;
  }

  /**
   * The group under `key`, now or as soon as it opens; rejects with a Refusal at `deadline` (a
   * Date.now() time), or at once when more than maxChannels channels already wait for it.
   */
  awaitGroup(key: string, deadline: number): Promise<ChannelGroup> {
    const now = this.find(key);
    if (now) return Promise.resolve(now);
    const waiters = this.waiting.get(key) ?? new Set<(group: ChannelGroup) => void>();
    if (waiters.size >= this.maxChannels) return Promise.reject(new Refusal('channel-limit', `${this.maxChannels} channels already wait for a migration that has not begun (limits.maxChannels)`));
    this.waiting.set(key, waiters);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        waiters.delete(got);
        if (waiters.size === 0 && this.waiting.get(key) === waiters) this.waiting.delete(key);
        reject(new Refusal('no-migration', 'a channel of a migration that did not begin in time (half of limits.handshakeSeconds)'));
      }, Math.max(0, deadline - Date.now()));
      const got = (group: ChannelGroup): void => {
        clearTimeout(timer);
        resolve(group);
      };
      waiters.add(got);
    });
  }
}
