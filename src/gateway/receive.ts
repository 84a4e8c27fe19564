/**
 * One incoming migration, as phases (each move is listed in RECEIVE_MOVES; transition() checks it):
 *
 *   awaiting-hello ─▶ dialling ─▶ streaming ─▶ committing ─▶ completed
 *        │               │            │             │
 *        ▼               └────────────┴─────────────┴──────▶ failed
 *     refused
 *
 * awaiting-hello: a peer connection, nothing opened; a bad Hello (or none in time) refuses it.
 * dialling: the Hello was accepted (the VM is busy here), the store opened, the destination dialled.
 * streaming: the destination answered and the peer was offered the migration; Literal, Run, Seal and
 *   the digest table's request are taken. The decoder holds the device-state tail until a check passes.
 * committing: End was checked; the destination is being handed its last bytes (a stream relayed verbatim
 *   also waits for the destination's close: its verdict), then the store commits and the peer hears Done.
 */
import type { Socket } from 'node:net';
import { TLSSocket } from 'node:tls';
import { type Endpoint, parseEndpoint } from './address';
import type { StreamDecoder } from '../proxy/decoder';
import { DELTA_AHEAD_BYTES, SIBLING_DELTA_LEAD_BYTES } from '../proxy/page-delta';
import type { DeltaMode } from './config';
import { MultifdMigration } from '../proxy/multifd-migration';
import type { PageLayout } from '../proxy/retained';
import { validateVmName } from '../store';
import {
  decodeAbort,
  decodeEnd,
  decodeHello,
  decodeSeal,
  encodeFrame,
  encodeJson,
  FrameParser,
  frameHeader,
  FrameType,
  type HelloMessage,
  MAX_HANDSHAKE_PAYLOAD,
  PROTOCOL_VERSION,
  Feature,
  SINGLE_CHANNEL_PROTOCOL,
} from '../wire/frames';
import { BatchesAhead, chooseCompression, LiteralInflater } from '../wire/compression';
import { Refusal, type RefusalReason } from './limits';
import { laterDownstream, PooledReads } from './pooled-reads';
import { errorMessage } from '../common/errors';
import { IdleWatch, peerText, type SessionObserver, TABLE_FRAME_BYTES } from './session';
import { checkedMove, type PhaseMoves, SessionLifecycle } from './session-lifecycle';
import { DestinationWriter } from './destination-writer';
import { decodePayload, ProtocolViolation, refusalReason } from './protocol-violation';
import type { ChannelGroup, MainChannel } from './migration-channels';
import { PinnedSiblings } from './siblings';
import type { VmClaims } from './vm-claims';

/** The digest table is queued for the peer no further ahead than this. */
const TABLE_QUEUE_BYTES = 2 * 1024 * 1024;
/**
 * A Hello waiting for the last migration of its VM to settle gives up this long before the handshake's
 * deadline: refused as 'busy', saying why, rather than as a handshake that never finished.
 */
const SETTLE_WAIT_MARGIN_MS = 500;

type ReceivePhase = 'awaiting-hello' | 'dialling' | 'streaming' | 'committing' | 'completed' | 'failed' | 'refused';

const RECEIVE_MOVES: PhaseMoves<ReceivePhase> = {
  'awaiting-hello': ['dialling', 'refused'],
  dialling: ['streaming', 'failed'],
  streaming: ['committing', 'failed'],
  committing: ['completed', 'failed'],
  completed: [],
  failed: [],
  refused: [],
};

export interface ReceiveOptions {
  site: string;
  storeRoot: string;
  observer: SessionObserver;
  /** Whether this gateway may dial the destination a peer names (no open relay). */
  targetAllowed: (target: Endpoint) => boolean;
  /** Why this peer may not migrate `vm` here (config peerVms), or null; asked before any store is opened. */
  vmRefused: (vm: string) => string | null;
  /** The Hello was accepted: the connection has said who it is (it leaves the gateway's pending pool). */
  identified: () => void;
  /** VMs migrating through this gateway now, in either direction: one migration per VM at a time. */
  claims: VmClaims;
  /** When (Date.now() time) a valid Hello must have arrived: the connection was accepted before. */
  handshakeDeadline: number;
  /** A migration whose connections move no byte this long fails. */
  idleMs: number;
  /** Largest frame accepted once the Hello is; before it only MAX_HANDSHAKE_PAYLOAD. */
  maxFrameBytes: number;
  /** Largest guest a stream may declare, in pages (limits.maxGuestRam). */
  maxGuestPages: number;
  /** A connection turned away before its migration began (the observer logs and counts it). */
  refused: (reason: RefusalReason, detail: string) => void;
  /** Accept a sender's offer of zstd compression (config `compression`). */
  compression: boolean;
  /** Take Delta frames (config `deltas`, not `off`). */
  deltas: DeltaMode;
  /** Groups the extra channels of the migration a (protocol 5) Hello names with this, its main channel. */
  openGroup: (migration: string, vm: string, target: string, main: MainChannel) => ChannelGroup;
}

/**
 * One incoming migration: a peer gateway's frames, rebuilt into the exact QEMU stream for the
 * destination. Any failure resets the destination's connection before a wrong byte could reach it (once
 * a postcopy package has gone, ends it instead: DestinationWriter.hangUpRunning),
 * and the store puts back the snapshot it started from (SessionLifecycle.rollBack).
 */
export class ReceiveSession {
  private phase: ReceivePhase = 'awaiting-hello';
  /** The Hello was taken and waits for the last migration of its VM to settle (see VmClaims). */
  private helloWaits = false;
  private readonly life: SessionLifecycle;
  private readonly frames: FrameParser;
  /** From the accepted Hello on. */
  private destination: DestinationWriter | null = null;
  /** Set when the Offer chose compression: Compressed frames back into Literal bytes. */
  private inflater: LiteralInflater | null = null;
  /** CompressedFrames batches inflated as they arrive, so that the Deltas they carry have their bases read ahead. */
  private readonly batches = new BatchesAhead(() => this.inflater);
  /** How far the digest table has been queued for the peer (it asks at most once per migration). */
  private table: 'not-asked' | 'queuing' | 'sent' = 'not-asked';
  /** Bytes of the digest table queued for the peer so far. */
  private tableQueued = 0;
  private readonly handshakeTimer: NodeJS.Timeout;
  private readonly idle: IdleWatch;
  /** The migration's extra channels, when its Hello named it (a version-4 sender's has none). */
  private group: ChannelGroup | null = null;
  /** The Hello's siblings this site holds at the same snapshot, pinned for the migration (null: the Hello named none). */
  private siblings: PinnedSiblings | null = null;

  /** The peer gateway's connection as this session reads it (plain TCP: adopted by PooledReads). */
  readonly peer: Socket;

  constructor(
    accepted: Socket,
    private readonly options: ReceiveOptions,
  ) {
    this.life = new SessionLifecycle('receive', '?', options, () => this.progress());
    this.handshakeTimer = setTimeout(
      () => this.fail('no valid Hello from the peer in time', 'handshake-timeout'),
      Math.max(0, options.handshakeDeadline - Date.now()),
    );
    this.idle = new IdleWatch(options.idleMs);
    // Literal bytes pass through as they arrive; only control frames and Runs are assembled.
    // The Deltas of a chunk are looked at before it is rebuilt: their bases are read all at once.
    this.frames = new FrameParser(
      (type, payload, carried) => this.onFrame(type, payload, carried),
      (type) => type === FrameType.Literal,
      {
        headBytes: SIBLING_DELTA_LEAD_BYTES + DELTA_AHEAD_BYTES,
        wants: (type) => type === FrameType.Delta || type === FrameType.SiblingDelta,
        look: (type, head, length) => void this.lookAtDelta(type, head, 0, length),
        looked: () => this.decoder?.prefetchAhead(),
        wantsWhole: (type) => type === FrameType.CompressedFrames,
        lookWhole: (_type, payload) => this.batches.arrived(payload, this.lookAtDelta),
      },
    );
    // A peer that has not said who it is gets no more than a Hello's worth of buffer.
    this.frames.maxPayload = MAX_HANDSHAKE_PAYLOAD;
    // Plain TCP is read into reused buffers (a TLS socket decrypts into buffers of its own). Literal bytes
    // reach the destination as views of them: a buffer is read into again only once the destination has
    // written them (PooledReads), and the frame parser and decoder copy what they keep past a chunk.
    let pooled = false;
    let peer = accepted;
    if (!(accepted instanceof TLSSocket)) {
      const reads = new PooledReads(accepted, laterDownstream(() => this.destination?.socket ?? null), (chunk) => this.onPeerData(chunk, reads.pooled), false);
      pooled = reads.pooled;
      peer = reads.socket;
      const early = reads.takeEarly();
      if (early !== null) queueMicrotask(() => this.onPeerData(early, false));
    } else {
      peer.on('data', (chunk: Buffer) => this.onPeerData(chunk, false));
    }
    this.peer = peer;
    peer.setNoDelay(true);
    peer.on('drain', () => this.pumpTable());
    peer.on('error', (err) => this.fail(`peer: ${err.message}`, 'closed'));
    peer.on('close', () => this.fail('the peer gateway closed the connection', 'closed'));
    if (pooled || peer.readableFlowing === false) peer.resume();
  }

  get done(): Promise<void> {
    return this.life.done;
  }

  private transition(to: ReceivePhase): void {
    this.phase = checkedMove('receive', RECEIVE_MOVES, this.phase, to);
  }

  private get over(): boolean {
    return this.phase === 'completed' || this.phase === 'failed' || this.phase === 'refused';
  }

  /** The Hello was accepted: this is a migration of a valid VM name, which this session holds busy. */
  private get holdsVm(): boolean {
    return this.phase !== 'awaiting-hello' && this.phase !== 'refused';
  }

  private get decoder(): StreamDecoder | null {
    return this.destination?.decoder ?? null;
  }

  /** reused: the chunk's buffer is read into again after this returns. */
  private onPeerData(chunk: Buffer, reused: boolean): void {
    this.life.wanIn += chunk.length;
    // What this chunk rebuilds reaches the destination in one writev.
    this.destination?.socket.cork();
    try {
      this.frames.push(chunk);
      if (reused) {
        this.frames.ownRetained();
        this.decoder?.releaseInput();
      }
    } catch (err) {
      this.framesFailed(err);
    } finally {
      this.destination?.socket.uncork();
    }
    if (this.frames.isPaused) this.peer.pause();
  }

  /** What the frames did wrong (a ProtocolViolation, a Refusal, an oversized frame, a store error) ends the session. */
  private framesFailed(err: unknown): void {
    this.storeError(err);
    this.fail(errorMessage(err), refusalReason(err));
  }

  /** `carried`: the frame came in a CompressedFrames batch (checkCarriedFrames let only stream data in). */
  private onFrame(type: FrameType, payload: Buffer, carried: boolean): void {
    if (this.over) return;
    if (this.phase === 'awaiting-hello' && type !== FrameType.Hello) throw new ProtocolViolation('unexpected-frame', `frame type ${type} before Hello`);
    // A Literal frame sent raw restarts the zstd stream of Compressed frames (wire/compression.ts).
    if (type === FrameType.Literal && !carried) this.inflater?.rawLiteral();
    switch (type) {
      case FrameType.Hello:
        this.onHello(payload);
        return;
      case FrameType.Literal: {
        const decoder = this.requireDecoder();
        decoder.literal(payload);
        this.life.noteVerbatim(decoder);
        return;
      }
      case FrameType.Compressed: {
        const decoder = this.requireDecoder();
        if (!this.inflater) throw new ProtocolViolation('unexpected-frame', 'a Compressed frame, but compression was not chosen');
        if (this.inflater.framed) throw new ProtocolViolation('unexpected-frame', 'a Compressed frame after CompressedFrames');
        decoder.literal(this.inflater.inflate(payload));
        this.life.noteVerbatim(decoder);
        return;
      }
      case FrameType.CompressedFrames:
        this.onCompressedFrames(payload);
        return;
      case FrameType.Run:
        this.requireDecoder().run(payload);
        return;
      case FrameType.Delta:
        this.requireDecoder().delta(payload);
        return;
      case FrameType.SiblingDelta:
        this.requireDecoder().siblingDelta(payload);
        return;
      case FrameType.KeepVersion:
        this.requireDecoder().keepVersion(payload);
        return;
      case FrameType.TableRequest:
        this.sendTable();
        return;
      case FrameType.Seal: {
        const seal = decodePayload(decodeSeal, payload);
        this.requireDecoder().seal(seal.streamBytes, seal.streamCheck);
        this.life.event('stream sealed', { streamBytes: seal.streamBytes });
        return;
      }
      case FrameType.End: {
        const end = decodePayload(decodeEnd, payload);
        this.onEnd(end.streamBytes, end.streamCheck, end.snapshotId, end.channels ?? 0);
        return;
      }
      case FrameType.Abort:
        this.fail(`the sending gateway aborted: ${peerText(decodePayload(decodeAbort, payload).error)}`);
        return;
      default:
        throw new ProtocolViolation('unexpected-frame', `unexpected frame type ${type}`);
    }
  }

  /**
   * A batch of whole frames: checked whole and its Deltas' bases read ahead as it arrived (BatchesAhead),
   * then its frames delivered one by one before the frames after it (FrameParser.nest), pausing as those do.
   */
  private onCompressedFrames(payload: Buffer): void {
    const decoder = this.requireDecoder();
    if (!this.inflater) throw new ProtocolViolation('unexpected-frame', 'a CompressedFrames frame, but compression was not chosen');
    if (this.batches.nest(this.inflater, payload, this.frames, this.lookAtDelta)) decoder.prefetchAhead();
  }

  /**
   * Shows the decoder a Delta or SiblingDelta that will be rebuilt soon (its base is read ahead): its
   * payload is bytes[at, at + length). False for a frame of another type.
   */
  private readonly lookAtDelta = (type: FrameType, bytes: Buffer, at: number, length: number): boolean => {
    if (type === FrameType.Delta) this.decoder?.aheadOfDelta(bytes, at, at + length, -1);
    else if (type === FrameType.SiblingDelta) this.decoder?.aheadOfDelta(bytes, at + SIBLING_DELTA_LEAD_BYTES, at + length, length > 0 ? bytes[at] : -1);
    else return false;
    return true;
  };

  /** Stream data is taken only while streaming. */
  private requireDecoder(): StreamDecoder {
    const decoder = this.decoder;
    if (this.phase !== 'streaming' || !decoder) throw new ProtocolViolation('unexpected-frame', 'stream data outside a migration');
    return decoder;
  }

  private onHello(payload: Buffer): void {
    if (this.phase !== 'awaiting-hello' || this.helloWaits) throw new ProtocolViolation('unexpected-frame', 'a second Hello');
    const hello = decodePayload(decodeHello, payload);
    if (hello.protocol !== PROTOCOL_VERSION && hello.protocol !== SINGLE_CHANNEL_PROTOCOL) {
      throw new Refusal('protocol', `protocol ${hello.protocol}; this gateway speaks ${SINGLE_CHANNEL_PROTOCOL} and ${PROTOCOL_VERSION}`);
    }
    if (hello.channel) throw new Refusal('protocol', 'an extra channel where a migration begins');
    let vm: string;
    let target: Endpoint;
    try {
      vm = validateVmName(hello.vm);
    } catch (err) {
      throw new Refusal('bad-vm-name', errorMessage(err));
    }
    try {
      target = parseEndpoint(hello.target);
    } catch (err) {
      throw new Refusal('target-not-allowed', `destination: ${errorMessage(err)}`);
    }
    if (!this.options.targetAllowed(target)) throw new Refusal('target-not-allowed', `destination ${hello.target} is not in allowTargets`);
    const vmRefused = this.options.vmRefused(vm);
    if (vmRefused !== null) throw new Refusal('vm-not-allowed', vmRefused);
    if (this.options.claims.has(vm)) {
      // A migration of this VM whose stream is over may still be ending (its stores settling): this one
      // waits for it, short of the handshake's deadline, and takes nothing meanwhile (a second Hello is refused).
      this.helloWaits = true;
      void this.options.claims.whenFree(vm, this.options.handshakeDeadline - SETTLE_WAIT_MARGIN_MS).then(
        () => this.guardHello(() => this.acceptHello(hello, vm, target)),
        (err: unknown) => this.fail(errorMessage(err), refusalReason(err)),
      );
      return;
    }
    this.acceptHello(hello, vm, target);
  }

  /** Runs a step of the Hello taken after a wait: what it throws ends the session as a frame's would. */
  private guardHello(step: () => void): void {
    if (this.over) return;
    try {
      step();
    } catch (err) {
      this.framesFailed(err);
    }
  }

  /** The Hello names a VM no migration holds here now: the migration begins. */
  private acceptHello(hello: HelloMessage, vm: string, target: Endpoint): void {
    if (this.options.claims.has(vm)) throw new Refusal('busy', `VM ${vm} is already migrating through this gateway`);
    // Accepted: from here on this is a migration of a valid VM name, reported as one.
    this.life.vm = vm;
    this.options.claims.add(vm);
    this.transition('dialling');
    this.options.identified();
    clearTimeout(this.handshakeTimer);
    this.frames.maxPayload = this.options.maxFrameBytes;
    const compression = chooseCompression(hello, this.options.compression);
    if (compression !== null) {
      const inflater = new LiteralInflater();
      this.inflater = inflater;
      this.life.compressionSaved = () => inflater.savedBytes + (this.group?.compressionSavedBytes ?? 0);
    }
    this.life.event('migration offered', { peerSite: hello.site, target: hello.target, compression });
    if (hello.migration !== undefined) {
      this.group = this.options.openGroup(hello.migration, vm, hello.target, { abort: (reason) => this.fail(reason), postcopyAdvised: () => false, compression: () => compression });
    }
    // Without retention (its filesystem is full) the store is left as it is and the peer is offered nothing.
    this.life.openStore();
    const store = this.life.store;
    const meta = store?.meta() ?? null;
    // Sibling references rebuild pages as Deltas do: only where Deltas are taken.
    if (hello.siblings !== undefined && store && this.options.deltas !== 'off') this.pinSiblings(hello.siblings);
    this.destination = new DestinationWriter(target, hello.target, this.life.retained, {
      connected: () => {
        if (this.phase !== 'dialling') return;
        this.transition('streaming');
        this.group?.ready();
        if (this.siblings && this.decoder) this.decoder.siblings = this.siblings.stores;
        const deltas = store !== null && this.options.deltas !== 'off';
        this.writeFrame(
          encodeJson(FrameType.Offer, {
            site: this.options.site,
            snapshotId: store?.snapshotId() ?? null,
            layoutId: meta?.layoutId ?? null,
            pageCount: meta?.pageCount ?? 0,
            presentPages: meta?.presentPages ?? 0,
            compression,
            // Deltas patch pages this store holds: without a store there is nothing to patch.
            features: [
              Feature.ChannelChecks,
              ...(deltas ? [Feature.Delta, Feature.BasesAhead, Feature.ChannelDeltas, Feature.ChannelSiblings, Feature.ChannelMatches, Feature.ChannelEarlierBases] : []),
              // A PacketHeader frame is a header compressed: not where compression is off (bytes as they are).
              ...(compression !== null ? [Feature.CompressedFrames, Feature.ChannelCompressedFrames, Feature.ChannelPacketHeaders] : []),
            ],
            ...(this.siblings ? { siblings: this.siblings.names } : {}),
          }),
        );
      },
      failed: (reason) => this.fail(reason),
      pause: () => this.frames.pause(),
      resume: () => this.resumeFrames(),
      returned: (chunk) => this.onReturnPath(chunk),
      layout: (layout) => this.onLayout(layout),
    });
  }

  /** The stream's RAM layout is known: the store grows, and the migration's multifd channels may read on. */
  private onLayout(layout: PageLayout): void {
    this.life.storeGrows();
    const decoder = this.destination?.decoder;
    if (!this.group || !decoder) return;
    const multifd = new MultifdMigration(this.life.retained);
    multifd.begin(layout);
    // A channel's SiblingDeltas name the siblings the main channel's do, and report damage to its list.
    multifd.siblingPages = decoder.siblings;
    multifd.damagedSiblings = decoder.damagedSiblings;
    decoder.multifd = multifd;
    this.group.useMultifd(multifd);
  }

  /** Pins the siblings the Hello names that this site holds at the same snapshot (see siblings.ts). */
  private pinSiblings(named: NonNullable<HelloMessage['siblings']>): void {
    const note = (message: string, fields: Record<string, unknown>): void => this.life.event(message, fields);
    this.siblings = new PinnedSiblings(named, this.options.storeRoot, (vm) => this.options.vmRefused(vm) === null, this.options.claims, note);
    this.life.event('siblings confirmed', { siblings: this.siblings.names });
  }

  /**
   * What the destination sends back goes to the source only as QEMU return-path messages, each checked
   * whole, and only once the destination has been handed the stream's header: a QEMU only ever answers
   * a stream. Anything else (a banner, a reply of some other service) ends the migration, so a peer can
   * never use this gateway to talk to whatever listens at an allowed address.
   */
  private onReturnPath(chunk: Buffer): void {
    const destination = this.destination;
    if (this.over || !destination) return;
    try {
      const bytes = destination.returnMessages(chunk);
      if (bytes === null) return;
      this.writeFrame(frameHeader(FrameType.Return, bytes.length));
      this.writeFrame(bytes);
    } catch (err) {
      this.fail(`destination: ${errorMessage(err)}`);
    }
  }

  private resumeFrames(): void {
    if (this.over) return;
    // Frames held back while paused are delivered now, outside the 'data' handler: a bad one must
    // fail this migration here too, never escape as an uncaught exception.
    this.destination?.socket.cork();
    try {
      this.frames.resume();
    } catch (err) {
      this.framesFailed(err);
      return;
    } finally {
      this.destination?.socket.uncork();
    }
    if (!this.frames.isPaused) this.peer.resume();
  }

  private sendTable(): void {
    if (this.table !== 'not-asked') throw new ProtocolViolation('unexpected-frame', 'a second digest table request');
    if (!this.life.store || !this.decoder?.layout) throw new ProtocolViolation('unexpected-frame', 'digest table requested before the RAM layout');
    this.table = 'queuing';
    this.pumpTable();
  }

  /**
   * Queues the digest table (16 bytes a page: a gigabyte for the largest guest) a piece at a time, only
   * while the peer reads it: a peer that stops reading holds no more than TABLE_QUEUE_BYTES of it here.
   */
  private pumpTable(): void {
    const store = this.life.store;
    if (!store || this.table !== 'queuing' || this.over) return;
    const table = store.digests;
    while (this.tableQueued < table.length) {
      if (this.peer.writableLength >= TABLE_QUEUE_BYTES) return; // 'drain' goes on
      const length = Math.min(TABLE_FRAME_BYTES, table.length - this.tableQueued);
      this.writeFrame(frameHeader(FrameType.TableData, length));
      // A copy: the table changes as the migration goes on, the socket may send later.
      this.writeFrame(Buffer.from(table.subarray(this.tableQueued, this.tableQueued + length)));
      this.tableQueued += length;
    }
    this.writeFrame(encodeFrame(FrameType.TableEnd));
    this.table = 'sent';
    this.life.event('digest table sent', { bytes: table.length });
  }

  private onEnd(streamBytes: number, streamCheck: string, snapshotId: string, channels: number): void {
    const decoder = this.requireDecoder();
    const destination = this.destination as DestinationWriter; // streaming: dialled
    decoder.end(streamBytes, streamCheck);
    this.transition('committing');
    if (channels > 0 && !this.group) throw new ProtocolViolation('bad-payload', `End names ${channels} extra channels of a migration that has none`);
    // Not before every extra channel the sender had has joined, and every multifd channel has ended with
    // its pages kept (the idle limit bounds the wait).
    if (this.group && this.group.joined < channels) this.life.event('waiting for extra channels', { joined: this.group.joined, channels });
    (this.group?.whenSettled(channels) ?? Promise.resolve()).then(() => this.commit(decoder, destination, streamBytes, snapshotId), (err: unknown) => this.fail(errorMessage(err)));
  }

  /** Commits once the destination has been handed every byte and has not refused them (DestinationWriter.end). */
  private commit(decoder: StreamDecoder, destination: DestinationWriter, streamBytes: number, snapshotId: string): void {
    if (this.over) return;
    if (decoder.fallback) this.life.event('waiting for the destination to close: a stream relayed verbatim completes on its verdict');
    destination.end(() => {
      if (this.over) return;
      this.options.observer.settling(this.life.vm, this.life.done);
      void this.life.syncStoreInBackground().then(() => {
        // A failure while the pages were synced (the peer gone, the idle limit) rolled the store back.
        if (this.over) return;
        // Pages that crossed on extra channels and were not all kept: the store keeps the snapshot it held.
        const claimed = this.life.settle(decoder, this.group && !this.group.keepsSnapshot ? null : snapshotId);
        this.writeFrame(encodeJson(FrameType.Done, { snapshotId, streamBytes }));
        this.finish('completed', null, claimed);
        this.peer.end();
      }).catch((err: unknown) => this.life.event('settling the completed migration failed', { error: errorMessage(err) }));
    });
  }

  private writeFrame(bytes: Buffer): void {
    if (this.peer.destroyed) return;
    this.life.wanOut += bytes.length;
    this.peer.write(bytes);
  }

  private progress(): void {
    const moving = this.phase === 'dialling' || this.phase === 'streaming' || this.phase === 'committing';
    if (moving && this.idle.stalled(this.life.wanIn + this.life.wanOut + (this.decoder?.counts.streamBytes ?? 0))) {
      this.options.observer.idleTimeout(this.life.vm, 'receive');
      this.fail(`no bytes moved for ${this.options.idleMs / 1000} s (limits.idleSeconds)`);
      return;
    }
    // Before its Hello is accepted a connection is not a migration yet.
    if (this.holdsVm) this.life.tellProgress(this.phase, this.decoder);
  }

  /** A store write that failed for lack of space turns retention off for this VM until there is room. */
  private storeError(err: unknown): void {
    if (this.holdsVm) this.life.storeError(err, this.decoder);
  }

  /** Ends the migration; before the Hello was accepted, `refusal` says why the connection was refused. */
  private fail(reason: string, refusal: RefusalReason = 'protocol'): void {
    if (this.over) return;
    if (this.phase === 'awaiting-hello') {
      this.refuse(refusal, reason);
      return;
    }
    this.life.event('migration failed', { error: reason });
    if (this.destination?.decoder?.guestRunsAtDestination) this.destination.hangUpRunning();
    else this.destination?.reset();
    this.life.abortPeer(this.peer, reason, true);
    this.life.rollBack();
    this.finish('failed', reason, null);
  }

  /** Nothing was opened or dialled yet: tell the peer why, close, and report a refusal, not a migration. */
  private refuse(reason: RefusalReason, detail: string): void {
    this.transition('refused');
    clearTimeout(this.handshakeTimer);
    this.life.abortPeer(this.peer, detail, false);
    this.options.refused(reason, detail);
    this.life.endUnreported();
  }

  private finish(result: 'completed' | 'failed', error: string | null, snapshotId: string | null): void {
    this.transition(result);
    clearTimeout(this.handshakeTimer);
    this.options.claims.delete(this.life.vm);
    this.siblings?.release(this.decoder?.damagedSiblings ?? [], (message, fields) => this.life.event(message, fields));
    const decoder = this.decoder;
    this.life.report(decoder, {
      result,
      error,
      mode: this.table === 'sent' ? 'digest-table' : (decoder?.counts.pagesReused ?? 0) > 0 ? 'shared-snapshot' : 'none',
      snapshotId,
    });
    decoder?.release();
    this.group?.mainEnded(result === 'completed', error);
  }
}
