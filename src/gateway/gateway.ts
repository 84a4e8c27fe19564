import type { StreamFallback } from '../qemu/records';
import { randomUUID } from 'node:crypto';
import * as fs from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import * as path from 'node:path';
import { type Endpoint, formatEndpoint, parseEndpoint } from './address';
import { X86_PAGE_SIZE } from '../qemu/constants';
import { RECENT_PAGES } from '../proxy/recent-pages';
import { RESEMBLANCE_CACHE_PAGES } from '../proxy/resemblance-cache';
import { pageBuffers } from '../proxy/reused-buffers';
import { holdsNothing, removeStore, removeUnclaimedStores, scanStores, StoreBudget, type UndoableStore, validateVmName } from '../store';
import { storeBytes } from '../store/budget';
import { type GatewayConfig, type RouteConfig, targetAllowed } from './config';
import { type Admission, awaitChannelHead, ConnectionGate, type Listener, peekHello, Refusal, type RefusalReason } from './limits';
import { ChannelReceiver, ChannelSender } from './channel-relay';
import { type TunnelContext, tunnelFromSource, tunnelToDestination } from './encrypted-tunnel';
import { type ChannelGroup, type GroupEvent, MigrationChannels } from './migration-channels';
import { type ChannelName, PROTOCOL_VERSION } from '../wire/frames';
import type { Logger } from './log';
import type { GatewayMetrics } from './metrics';
import { ReceiveSession } from './receive';
import { SendSession } from './send';
import { StoreSpace } from './store-space';
import { errorMessage } from '../common/errors';
import { VmClaims } from './vm-claims';
import { type Direction, type MigrationReport, type ProgressTick, type SessionObserver } from './session';
import { peerVmError } from './security-config';
import { certificateNames, PeerTransport, peerNameOf, peerNamesOf } from './transport';
import { LiveMigrations, type MigrationStatus } from './progress';
import { WanCaps } from './wan-cap';

interface Totals {
  streamBytes: number;
  wanBytes: number;
  sent: number;
  reused: number;
  zero: number;
  delta: number;
  matched: number;
  sibling: number;
  storeRead: number;
  storeWritten: number;
}

/**
 * A site's gateway: listens for source QEMUs on each route and for peer gateways on peerListen,
 * and runs one session per migration. Sessions report to the log and the metrics.
 */
export class Gateway implements SessionObserver {
  private readonly servers: Server[] = [];
  private readonly sessions = new Set<{ done: Promise<void>; socket: Socket }>();
  /** VMs migrating through this gateway now, in either direction. */
  private readonly claims = new VmClaims();
  private readonly totals = new Map<string, Totals>();
  /** Addresses actually bound, by role: "peer", "metrics", "route:<vm>". */
  readonly bound = new Map<string, Endpoint>();
  /** Reports of finished migrations, newest last (bounded). */
  readonly history: MigrationReport[] = [];
  private stopping = false;
  private readonly budget: StoreBudget | null;
  private readonly space: StoreSpace;
  private readonly transport: PeerTransport;
  private readonly gate: ConnectionGate;
  /** Connections already refused: one that is also cut for a newer one, or fails again, is logged and counted once. */
  private readonly refusedOnce = new WeakSet<Socket>();
  /** HOST:PORT of each accepted connection's far end, for the refusal log. */
  private readonly remotes = new WeakMap<Socket, string>();
  /** Accepted sockets whose connection a session reads through another Socket object (PooledReads). */
  private readonly adopted = new WeakMap<Socket, Socket>();
  /** Migrations in flight: GET /status, progress lines, stalls. */
  private readonly live: LiveMigrations;
  private readonly wanCaps: WanCaps;
  /** Migrations going out, by route VM, and coming in, by migration id: their channels join them. */
  private readonly sending: MigrationChannels;
  private readonly receiving: MigrationChannels;
  /** Connections under QEMU's own TLS, carried as they are (encrypted-tunnel.ts). */
  private readonly tunnels: TunnelContext;

  constructor(
    private readonly config: GatewayConfig,
    private readonly log: Logger,
    private readonly metrics: GatewayMetrics | null,
  ) {
    this.budget = config.storeBudget !== null ? new StoreBudget(config.data, config.storeBudget) : null;
    this.space = new StoreSpace(config.data);
    this.transport = new PeerTransport(config.tls, (peer) => metrics?.certificateExpires('peer', certificateNames(peer).join(','), new Date(peer.valid_to)));
    metrics?.watchStore(() => storeBytes(config.data), config.storeBudget);
    if (config.tls) {
      metrics?.certificateExpires('own', '', config.tls.validTo);
      metrics?.certificateExpires('ca', '', config.tls.caValidTo);
    }
    this.live = new LiveMigrations(config.progress);
    this.wanCaps = new WanCaps({
      peers: config.peers.map((p) => ({ peer: formatEndpoint(p.peer), wan: p.wan, linkMbit: p.linkMbit })),
      routes: config.routes.map((r) => ({ vm: r.vm, peerKey: formatEndpoint(r.peer), wan: r.wan })),
    });
    this.sending = new MigrationChannels(config.limits.maxChannels);
    this.receiving = new MigrationChannels(config.limits.maxChannels);
    this.tunnels = { observer: this, storeRoot: config.data, maxFrameBytes: config.limits.maxFrameBytes, event: (vm, direction) => this.groupEvent(vm, direction) };
    this.gate = new ConnectionGate(
      config.limits,
      (socket, listener, reason, detail) => {
        this.refused(listener, socket, reason, detail);
        this.cut(socket);
      },
      (listener, open) => metrics?.connectionsOpenNow(listener, open),
    );
  }

  /** Open connections across all listeners (limits.maxConnections bounds it). */
  get openConnections(): number {
    return this.gate.openConnections;
  }

  async start(): Promise<void> {
    const c = this.config;
    // Stores of migrations that never completed (or an accepted Hello that never got further) hold
    // nothing a later migration can use: they go, unless another process is using them.
    for (const gone of removeUnclaimedStores(c.data)) this.log.info({ vm: gone.vm, bytes: gone.bytes }, 'removed a store that holds nothing');
    // With deltas on, a sending session's resemblance cache and a receiving one's recent pages each hold
    // 32 MiB of pages. Touched now, while no stream waits: a process's first migration would otherwise
    // pay a page fault a 4 KiB (130-150 ms a side on a 1 Gbit/s first leg of a 256 MiB guest).
    if (c.deltas !== 'off') pageBuffers.prefill([RESEMBLANCE_CACHE_PAGES * X86_PAGE_SIZE, RECENT_PAGES * X86_PAGE_SIZE]);
    this.bound.set('peer', await this.listen(c.peerListen, 'peer', (socket) => this.acceptPeer(socket)));
    for (const route of c.routes) {
      this.metrics?.startSeries(route.vm, 'send');
      this.bound.set(`route:${route.vm}`, await this.listen(route.listen, 'source', (socket) => this.acceptSource(socket, route.vm)));
    }
    if (c.metrics && this.metrics) {
      // A metrics client never proves who it is (any request is answered), so its connection stays
      // pending for its whole life: scrapers can never crowd out a migration, only each other.
      const admit = (socket: Socket): boolean => this.admit(socket, 'metrics');
      const { handshakeSeconds, idleSeconds } = c.limits;
      const refused = (socket: Socket, reason: RefusalReason, detail: string): void => this.refused('metrics', socket, reason, detail);
      const status = (): GatewayStatus => this.status();
      this.bound.set('metrics', await this.metrics.serve(c.metrics, { admit, refused, status, headersTimeoutMs: handshakeSeconds * 1000, idleTimeoutMs: idleSeconds * 1000 }));
    }
    this.log.info(
      { site: c.name, listening: Object.fromEntries([...this.bound].map(([k, v]) => [k, formatEndpoint(v)])), tls: this.transport.secure, limits: c.limits, ...(c.tls ? { certValidTo: c.tls.validTo.toISOString(), allowPeers: c.tls.allowPeers } : {}) },
      'gateway started',
    );
  }

  /** Stops accepting, lets running migrations finish within the grace period, then cuts the rest. */
  async stop(graceSeconds = this.config.shutdownGraceSeconds): Promise<void> {
    if (this.stopping) return;
    this.stopping = true;
    // A server's close completes only once its connections have: awaited last, after the grace period.
    const closed = Promise.all(this.servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve()))));
    for (const socket of this.gate.pendingSockets()) this.cut(socket);
    const running = [...this.sessions];
    if (running.length > 0) {
      this.log.info({ running: running.length, graceSeconds }, 'waiting for running migrations');
      let timer: NodeJS.Timeout | undefined;
      const grace = new Promise<'timeout'>((resolve) => (timer = setTimeout(() => resolve('timeout'), graceSeconds * 1000)));
      const outcome = await Promise.race([Promise.all(running.map((s) => s.done)).then(() => 'done' as const), grace]);
      clearTimeout(timer);
      if (outcome === 'timeout') {
        for (const s of running) s.socket.destroy();
        await Promise.all(running.map((s) => s.done));
      }
    }
    await closed;
    await this.metrics?.close();
    this.log.info('gateway stopped');
  }

  private listen(endpoint: Endpoint, listener: Listener, onConnection: (socket: Socket) => void): Promise<Endpoint> {
    const admit = (socket: Socket): void => {
      if (this.stopping) return void socket.destroy();
      if (this.admit(socket, listener)) onConnection(socket);
    };
    return new Promise((resolve, reject) => {
      const server = createServer({ noDelay: true, pauseOnConnect: true }, admit);
      server.once('error', reject);
      server.listen(endpoint.port, endpoint.host, () => {
        server.off('error', reject);
        server.on('error', (err) => this.log.error({ err, endpoint: formatEndpoint(endpoint) }, 'listener error'));
        this.servers.push(server);
        const address = server.address();
        if (address === null || typeof address === 'string') return reject(new Error('no TCP address'));
        resolve({ host: address.address, port: address.port });
      });
    });
  }

  /** Counts a new connection in (see ConnectionGate), or refuses and resets it. */
  private admit(socket: Socket, listener: Listener): boolean {
    // Kept now: a socket forgets its peer's address once it is closed, before a late refusal is logged.
    this.remotes.set(socket, `${socket.remoteAddress}:${socket.remotePort}`);
    const admission: Admission = this.gate.admit(socket, listener);
    if (admission.admitted) return true;
    this.refused(listener, socket, admission.reason, admission.detail);
    socket.resetAndDestroy();
    return false;
  }

  /**
   * A source connection: nothing is opened or dialled until it has said what it is, within
   * limits.handshakeSeconds: QEMU's stream magic (a migration's main channel, which claims the VM) or a
   * multifd channel's initial packet (which joins the migration on this route, see
   * migration-channels.ts). A connection with no magic is the postcopy-preempt channel only when the
   * route's migration has advised postcopy, comes from the same address and has none yet: QEMU sends
   * nothing on that channel until a page is urgent, so it is taken before any byte arrives.
   */
  private acceptSource(socket: Socket, vm: string): void {
    const route = this.config.routes.find((r) => r.vm === vm);
    if (!route) return void socket.destroy();
    const { limits } = this.config;
    const remote = socket.remoteAddress ?? '?';
    const migrating = this.sending.find(vm);
    if (migrating?.awaitsPreempt && remote === migrating.origin) {
      this.handshake(socket, 'source', Promise.resolve(), () => this.relaySourceChannel(socket, route, migrating, { kind: 'preempt', index: 0 }, null));
      return;
    }
    const channel = awaitChannelHead(socket).then(async (head) => {
      // A new migration of a VM whose last one is ending (its stream over, its stores settling) waits for it.
      if (head.kind === 'main') await this.claims.whenFree(vm, this.mainWait());
      if (head.kind === 'main' || head.kind === 'encrypted') return { head, group: null };
      // A whole multifd initial packet says what it is: QEMU may open all its channels before the main
      // channel's first bytes come, and they must not fill the pending pools meanwhile (awaitGroup bounds them).
      this.gate.identified(socket);
      return { head, group: await this.sending.awaitGroup(vm, this.mainWait()) };
    });
    this.handshake(socket, 'source', channel, ({ head, group }) => {
      if (head.kind === 'encrypted') {
        if (!route.encrypted) throw new Refusal('not-qemu', `the source started QEMU's own TLS (tls-creds), which route ${vm} refuses (routes[].encrypted: refuse)`);
        this.gate.identified(socket);
        tunnelFromSource(socket, route, this.config.name, this.transport, this.tunnels).start(this.wanCaps.share(vm, formatEndpoint(route.peer)));
        return;
      }
      if (head.kind === 'multifd') {
        this.relaySourceChannel(socket, route, group as ChannelGroup, { kind: 'multifd', index: head.init.id }, head.init.uuid);
        return;
      }
      this.gate.identified(socket);
      if (this.claims.has(vm)) throw new Refusal('busy', `VM ${vm} is already migrating through this gateway`);
      this.claims.add(vm);
      const migration = randomUUID();
      const session = new SendSession(socket, {
        site: this.config.name,
        route,
        storeRoot: this.config.data,
        observer: this,
        transport: this.transport,
        idleMs: limits.idleSeconds * 1000,
        maxFrameBytes: limits.maxFrameBytes,
        maxGuestPages: Math.floor(limits.maxGuestRamBytes / X86_PAGE_SIZE),
        wan: this.wanCaps.share(vm, formatEndpoint(route.peer)),
        compression: this.config.compression,
        compressOffLoop: this.config.compressOffLoop,
        deltas: this.config.deltas,
        migration,
        openGroup: (main) => this.sending.open(vm, { migration, vm, target: formatEndpoint(route.target), origin: remote, main, event: this.groupEvent(vm, 'send'), graceMs: limits.idleSeconds * 1000 }),
      });
      this.track(session.done, session.qemu, () => this.claims.delete(vm));
    });
  }

  /** An extra channel of the route's migration: joins its group (or is refused) and relays to the peer. */
  private relaySourceChannel(socket: Socket, route: RouteConfig, group: ChannelGroup, channel: ChannelName, uuid: string | null): void {
    const relay = new ChannelSender(socket, {
      site: this.config.name,
      route,
      transport: this.transport,
      group,
      channel,
      maxFrameBytes: this.config.limits.maxFrameBytes,
      compressOffLoop: this.config.compressOffLoop,
    });
    group.join(channel, socket.remoteAddress ?? '?', uuid, relay);
    this.gate.identified(socket);
    // A multifd channel's share is taken beside its main channel's (WanLink); a postcopy preempt channel
    // carries the pages the destination asks for while the main channel goes on with the rest: one more.
    relay.start(this.wanCaps.share(route.vm, formatEndpoint(route.peer), channel.kind === 'multifd' ? group.mainWanShare : null));
  }

  /**
   * A peer connection: the TLS handshake (when configured) and a valid Hello must both be done within
   * limits.handshakeSeconds of the TCP accept; the receive session checks the Hello (and peerVms),
   * and the connection stays pending (see ConnectionGate) until it has accepted it. A Hello that names
   * an extra channel of a migration (protocol 5) joins that migration's group instead.
   */
  private acceptPeer(raw: Socket): void {
    const { limits } = this.config;
    const deadline = Date.now() + limits.handshakeSeconds * 1000;
    const linked = this.transport.accept(raw).then(async (socket) => {
      const hello = await peekHello(socket);
      const migration = hello?.channel && hello.channel.kind !== 'encrypted' ? hello.migration : undefined;
      return { socket, hello, group: migration !== undefined ? await this.receiving.awaitGroup(migration, this.mainWait()) : null };
    });
    this.handshake(raw, 'peer', linked, ({ socket, hello, group }) => {
      const peerName = peerNameOf(socket);
      const peerNames = peerNamesOf(socket);
      if (hello?.channel?.kind === 'encrypted') {
        // A connection under QEMU's own TLS: checked as a migration's Hello is, then carried as it is.
        if (hello.protocol !== PROTOCOL_VERSION) throw new Refusal('protocol', `an encrypted connection in protocol ${hello.protocol}, not ${PROTOCOL_VERSION}`);
        let target: Endpoint;
        try {
          validateVmName(hello.vm);
          target = parseEndpoint(hello.target);
        } catch (err) {
          throw new Refusal('bad-vm-name', errorMessage(err));
        }
        if (!targetAllowed(this.config, target)) throw new Refusal('target-not-allowed', `destination ${hello.target} is not in allowTargets`);
        const vmRefused = peerVmError(this.config.peerVms, peerNames, hello.vm);
        if (vmRefused !== null) throw new Refusal('vm-not-allowed', vmRefused);
        const relay = tunnelToDestination(socket, hello.vm, hello.target, peerKey(raw, peerNames), this.tunnels);
        this.gate.identified(raw);
        if (socket !== raw) this.adopted.set(raw, socket);
        relay.start();
        return;
      }
      if (group && hello?.channel) {
        if (hello.protocol !== PROTOCOL_VERSION) throw new Refusal('protocol', `an extra channel in protocol ${hello.protocol}, not ${PROTOCOL_VERSION}`);
        if (hello.vm !== group.vm || hello.target !== group.target) throw new Refusal('channel-mismatch', `a channel for VM ${hello.vm} to ${hello.target}, but its migration is of ${group.vm} to ${group.target}`);
        const relay = new ChannelReceiver(socket, { group, channel: hello.channel, channels: hello.channels, checked: hello.channelChecks === true, maxFrameBytes: limits.maxFrameBytes });
        group.join(hello.channel, peerKey(raw, peerNames), null, relay);
        this.gate.identified(raw);
        if (socket !== raw) this.adopted.set(raw, socket);
        relay.start();
        return;
      }
      const session = new ReceiveSession(socket, {
        site: this.config.name,
        storeRoot: this.config.data,
        observer: this,
        targetAllowed: (target) => targetAllowed(this.config, target),
        vmRefused: (vm) => peerVmError(this.config.peerVms, peerNames, vm),
        identified: () => this.gate.identified(raw),
        claims: this.claims,
        handshakeDeadline: deadline,
        idleMs: limits.idleSeconds * 1000,
        maxFrameBytes: limits.maxFrameBytes,
        maxGuestPages: Math.floor(limits.maxGuestRamBytes / X86_PAGE_SIZE),
        compression: this.config.compression,
        deltas: this.config.deltas,
        refused: (reason, detail) => this.refused('peer', raw, reason, detail, peerName),
        openGroup: (migration, vm, target, main) =>
          this.receiving.open(migration, { migration, vm, target, origin: peerKey(raw, peerNames), main, event: this.groupEvent(vm, 'receive'), graceMs: limits.idleSeconds * 1000 }),
      });
      if (session.peer !== socket) this.adopted.set(raw, session.peer);
      this.track(session.done, session.peer, () => undefined);
    });
  }

  /**
   * Until when a channel that has said what it is may wait for its migration's main channel: half of
   * limits.handshakeSeconds, so that it is refused for that ('no-migration') and not for a handshake
   * timeout. QEMU opens the main channel first; the wait covers its first bytes arriving later.
   */
  private mainWait(): number {
    return Date.now() + (this.config.limits.handshakeSeconds * 1000) / 2;
  }

  private groupEvent(vm: string, direction: Direction): GroupEvent {
    return (message, fields) => this.event(vm, direction, message, fields);
  }

  /** Resets an accepted connection, through the Socket that now holds it if a session adopted it. */
  private cut(socket: Socket): void {
    (this.adopted.get(socket) ?? socket).resetAndDestroy();
  }

  /** Runs a connection's first step under the handshake timeout; a failure refuses the connection. */
  private handshake<T>(socket: Socket, listener: Listener, step: Promise<T>, then: (value: T) => void): void {
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      socket.destroy();
    }, this.config.limits.handshakeSeconds * 1000);
    socket.on('error', () => undefined); // reported through the step's refusal
    step
      .then((value) => {
        if (this.stopping) throw new Refusal('closed', 'the gateway is stopping');
        then(value);
      })
      .catch((err: unknown) => {
        const refusal = timedOut
          ? new Refusal('handshake-timeout', `not done within ${this.config.limits.handshakeSeconds} s (limits.handshakeSeconds)`)
          : err instanceof Refusal
            ? err
            : new Refusal('protocol', errorMessage(err));
        this.refused(listener, socket, refusal.reason, refusal.message);
        socket.resetAndDestroy();
      })
      .finally(() => clearTimeout(timer));
  }

  /** Logs and counts a connection turned away before any migration began. */
  private refused(listener: Listener, socket: Socket, reason: RefusalReason, detail: string, peerName: string | null = null): void {
    if (this.refusedOnce.has(socket)) return;
    this.refusedOnce.add(socket);
    this.metrics?.connectionRefused(listener, reason);
    this.log.warn({ listener, reason, remote: this.remotes.get(socket) ?? `${socket.remoteAddress}:${socket.remotePort}`, ...(peerName ? { peerName } : {}), error: detail }, 'connection refused');
  }

  private track(done: Promise<void>, socket: Socket, cleanup: () => void): void {
    const entry = { done, socket };
    this.sessions.add(entry);
    void done.then(() => {
      this.sessions.delete(entry);
      cleanup();
    });
  }

  // SessionObserver ------------------------------------------------------------------------------

  storeGrows(vm: string, retained: UndoableStore | null): void {
    if (!this.budget || !retained) return;
    const need = retained.needBytes();
    const room = this.budget.makeRoom(vm, need);
    for (const evicted of room.evicted) {
      this.log.warn({ vm: evicted.vm, bytes: evicted.bytes, budget: this.budget.budgetBytes, for: vm }, 'retained snapshot evicted to stay within storeBudget');
      this.metrics?.storeEvicted(evicted.vm);
    }
    if (room.fits) return;
    const outcome = retained.overBudget();
    this.log.warn(
      { vm, needBytes: need, budget: this.budget.budgetBytes, outcome },
      outcome === 'withheld' ? 'storeBudget has no room for this store: this migration retains nothing' : 'storeBudget has no room for the undo journal: a failed migration will not restore the old snapshot',
    );
  }

  retains(vm: string, direction: Direction): boolean {
    if (!this.space.retains(vm)) {
      this.metrics?.migrationUnretained(vm, direction);
      this.log.warn({ vm, direction, data: this.config.data, needBytes: this.space.waiting.get(vm) }, 'store has no room: this migration retains nothing');
      return false;
    }
    if (this.roomForStore(vm)) return true;
    this.metrics?.migrationUnretained(vm, direction);
    this.log.warn({ vm, direction, data: this.config.data, maxStores: this.config.limits.maxStores }, 'limits.maxStores stores exist: this new VM migrates without retention');
    return false;
  }

  /** Whether `vm` has a store, or a new one may be created within limits.maxStores. */
  private roomForStore(vm: string): boolean {
    const root = this.config.data;
    if (fs.existsSync(path.join(root, vm))) return true;
    const max = this.config.limits.maxStores;
    if (scanStores(root).length < max) return true;
    removeUnclaimedStores(root);
    return scanStores(root).length < max;
  }

  storeFull(vm: string, direction: Direction, needBytes: number, error: string): void {
    this.space.exhausted(vm, needBytes);
    this.metrics?.storeWriteNoSpace(vm, direction);
    this.log.error({ vm, direction, data: this.config.data, needBytes, error }, 'store ran out of space: retention off for this VM until the filesystem has room');
  }

  idleTimeout(vm: string, direction: Direction): void {
    this.metrics?.idleTimeout(direction);
    this.log.warn({ vm, direction, idleSeconds: this.config.limits.idleSeconds }, 'migration idle too long');
  }

  relayedVerbatim(vm: string, direction: Direction, at: StreamFallback): void {
    // Never silent, and said as it happens (a migration may go on for hours): from here on the stream
    // crosses the WAN whole and nothing of it is retained. The metric counts it when the migration ends.
    this.log.warn(
      { vm, direction, reason: at.code, streamOffset: at.streamOffset, detail: at.reason },
      'stream relayed verbatim: bfmig could not parse it past this point, so nothing after it is reused or retained',
    );
  }

  event(vm: string, direction: Direction, message: string, fields?: Record<string, unknown>): void {
    this.log.info({ vm, direction, ...fields }, message);
  }

  /** What GET /status serves: the migrations in flight now. */
  status(): GatewayStatus {
    return { site: this.config.name, time: new Date().toISOString(), migrations: this.live.all() };
  }

  progress(vm: string, direction: Direction, now: ProgressTick): void {
    this.watch(vm, direction, now);
    const key = `${vm}\u0000${direction}`;
    const before = this.totals.get(key) ?? { streamBytes: 0, wanBytes: 0, sent: 0, reused: 0, zero: 0, delta: 0, matched: 0, sibling: 0, storeRead: 0, storeWritten: 0 };
    const m = this.metrics;
    if (m) {
      m.addStreamBytes(vm, direction, now.streamBytes - before.streamBytes);
      m.addWanBytes(vm, direction, now.wanBytes - before.wanBytes);
      m.addPages(vm, direction, 'sent', now.counts.pagesSent - before.sent);
      m.addPages(vm, direction, 'reused', now.counts.pagesReused - before.reused);
      m.addPages(vm, direction, 'zero', now.counts.pagesZero - before.zero);
      m.addPages(vm, direction, 'delta', now.counts.pagesDelta - before.delta);
      m.addPages(vm, direction, 'matched', now.counts.pagesMatched - before.matched);
      m.addPages(vm, direction, 'sibling', now.counts.pagesSibling - before.sibling);
      m.addStoreIo(vm, direction, now.storeIo.readBytes - before.storeRead, now.storeIo.writtenBytes - before.storeWritten);
    }
    this.totals.set(key, {
      streamBytes: now.streamBytes,
      wanBytes: now.wanBytes,
      sent: now.counts.pagesSent,
      reused: now.counts.pagesReused,
      zero: now.counts.pagesZero,
      delta: now.counts.pagesDelta,
      matched: now.counts.pagesMatched,
      sibling: now.counts.pagesSibling,
      storeRead: now.storeIo.readBytes,
      storeWritten: now.storeIo.writtenBytes,
    });
  }

  /** A migration's tick as the live view sees it: a progress line when due, a stall as it starts and ends. */
  private watch(vm: string, direction: Direction, tick: ProgressTick): void {
    const outcome = this.live.tick(vm, direction, tick);
    if (outcome.change !== null) {
      const stalled = outcome.change === 'stalled';
      this.metrics?.stalledNow(vm, direction, stalled);
      const fields = { vm, direction, phase: tick.phase, streamBytes: tick.streamBytes, wanBytes: tick.wanBytes };
      if (stalled) this.log.warn({ ...fields, stallSeconds: this.config.progress.stallSeconds }, 'migration stalled: no bytes moved');
      else this.log.info(fields, 'migration moving again');
    }
    if (!outcome.logDue) return;
    const s = this.live.status(vm, direction);
    if (s) this.log.info(s, 'migration progress');
  }

  settling(vm: string, settled: Promise<void>): void {
    this.claims.settling(vm, settled);
  }

  finished(report: MigrationReport): void {
    // A store left claiming nothing (a failed first migration, or one that retained nothing) is removed:
    // otherwise every accepted Hello could leave a store directory behind for good.
    try {
      if (removeStore(this.config.data, report.vm, holdsNothing)) this.log.info({ vm: report.vm }, 'removed a store that holds nothing');
    } catch (err) {
      this.log.warn({ vm: report.vm, error: errorMessage(err) }, 'could not remove a store that claims no snapshot');
    }
    this.totals.delete(`${report.vm}\u0000${report.direction}`);
    if (this.live.finished(report.vm, report.direction)) this.metrics?.stalledNow(report.vm, report.direction, false);
    const wanBytes = report.direction === 'send' ? report.wanBytesOut : report.wanBytesIn;
    this.metrics?.migrationFinished(report.vm, report.direction, { result: report.result, seconds: report.seconds, qemuBytes: report.streamBytes, wanBytes, verbatimReason: report.verbatim?.code ?? null, compressionSavedBytes: report.compressionSavedBytes });

    this.history.push(report);
    if (this.history.length > 100) this.history.shift();
    const fields = {
      vm: report.vm,
      direction: report.direction,
      result: report.result,
      seconds: report.seconds,
      streamBytes: report.streamBytes,
      wanBytes,
      ...(report.compressionSavedBytes !== 0 ? { compressionSavedBytes: report.compressionSavedBytes } : {}),
      storeReadBytes: report.storeIo.readBytes,
      storeWrittenBytes: report.storeIo.writtenBytes,
      pagesSent: report.counts.pagesSent,
      pagesReused: report.counts.pagesReused,
      pagesZero: report.counts.pagesZero,
      ...(report.counts.pagesUnordered > 0 ? { pagesUnordered: report.counts.pagesUnordered } : {}),
      ...(report.counts.deltaBytes > 0 ? { pagesDelta: report.counts.pagesDelta, pagesMatched: report.counts.pagesMatched, pagesSibling: report.counts.pagesSibling, deltaBytes: report.counts.deltaBytes } : {}),
      mode: report.mode,
      snapshotId: report.snapshotId,
      ...(report.postcopy ? { postcopy: true } : {}),
      ...(report.verbatim ? { verbatim: report.verbatim.code, verbatimFrom: report.verbatim.streamOffset } : {}),
      ...(report.error ? { error: report.error } : {}),
      memoryMiB: memoryMiB(),
    };
    if (report.result === 'completed') this.log.info(fields, 'migration completed');
    else this.log.warn(fields, 'migration failed');
  }
}

/** What GET /status serves. */
export interface GatewayStatus {
  site: string;
  time: string;
  migrations: MigrationStatus[];
}

/**
 * Who a peer connection is, for telling whether an extra channel comes from its migration's sender:
 * the names its certificate gives (TLS), or its address (plain TCP).
 */
function peerKey(raw: Socket, names: string[]): string {
  return names.length > 0 ? names.join(',') : (raw.remoteAddress ?? '?');
}

/** The process's memory now, in MiB, for the log line of each finished migration. */
function memoryMiB(): Record<string, number> {
  const m = process.memoryUsage();
  const mib = (n: number): number => Math.round(n / 104857.6) / 10;
  return { rss: mib(m.rss), heapUsed: mib(m.heapUsed), external: mib(m.external), arrayBuffers: mib(m.arrayBuffers) };
}
