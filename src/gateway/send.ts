/**
 * One outgoing migration, as phases (each move is listed in SEND_MOVES; transition() checks it):
 *
 *   connecting ─▶ awaiting-offer ─▶ streaming ─▶ awaiting-done ─▶ completed
 *        │              │               │              │
 *        └──────────────┴───────────────┴──────────────┴──────▶ failed
 *
 * connecting: the source QEMU's stream magic has arrived (the gateway waited for it); the peer gateway
 *   is being dialled and the source is not read.
 * awaiting-offer: the store is open and Hello sent; the peer has HANDSHAKE_TIMEOUT_MS to offer.
 * streaming: the source is read and encoded. When the receiver's digest table is needed, the source is
 *   paused while it arrives (`table` is set until TableEnd).
 * awaiting-done: the source ended its stream and End was sent; the peer's Done completes the migration.
 */
import { randomUUID } from 'node:crypto';
import type { Socket } from 'node:net';
import { formatEndpoint } from './address';
import { afterTimeAndReads } from './after-reads';
import { DIGEST_BYTES } from '../digest';
import { DELTA_READ_BUDGET_US, StreamEncoder } from '../proxy/encoder';
import { X86_PAGE_SIZE } from '../qemu/constants';
import { MultifdMigration } from '../proxy/multifd-migration';
import type { PageLayout } from '../proxy/retained';
import {
  decodeAbort,
  decodeDone,
  decodeOffer,
  encodeFrame,
  frameHeader,
  encodeJson,
  FrameParser,
  FrameType,
  MAX_HANDSHAKE_PAYLOAD,
  type OfferMessage,
  Feature,
  offers,
  SINGLE_CHANNEL_PROTOCOL,
} from '../wire/frames';
import { helloCompression, LiteralFrames, offeredCompression, type WriteDone, ZSTD } from '../wire/compression';
import type { DeltaMode, RouteConfig } from './config';
import { ReturnPathMessages } from './return-path-relay';
import { heldDownstream, PooledReads } from './pooled-reads';
import { corked, tuneSourceConnection, tuneWanConnection } from './socket-tuning';
import type { PeerTransport } from './transport';
import { errorMessage } from '../common/errors';
import { CONNECT_TIMEOUT_MS, HANDSHAKE_TIMEOUT_MS, IdleWatch, peerText, type ReuseMode, type SessionObserver } from './session';
import { checkedMove, type PhaseMoves, SessionLifecycle } from './session-lifecycle';
import { decodePayload, ProtocolViolation } from './protocol-violation';
import type { WanShare } from './wan-cap';
import type { ChannelGroup, MainChannel } from './migration-channels';
import { SentSiblings } from './siblings';
import { WanPace } from './wan-pace';

/** A link slower than this takes longer for a page than the store read a delta or a content match costs. */
const READS_PAY_BELOW_BYTES_PER_S = X86_PAGE_SIZE / (DELTA_READ_BUDGET_US / 1e6);
/**
 * To a receiver that reads bases ahead: a link slower than this (about 2 Gbit/s) takes longer for a page
 * than the work a match or a delta against a page alike costs this gateway (a copy into the resemblance
 * cache, a lookup, an encode now and then: a few µs). Faster (loopback, a LAN) they cost more time than
 * the bytes they save, on guests whose pages resemble nothing most of all.
 */
const RECEIVER_READS_PAY_BELOW_BYTES_PER_S = X86_PAGE_SIZE / 16e-6;

/**
 * A source that sends nothing for this long in its device-state tail, without closing, is taken to have
 * sent its whole stream (see seal()); in the QEMU 2.0 framing with the return path on it delays the
 * destination's start by this much.
 */
const QUIET_SEAL_MS = 50;

type SendPhase = 'connecting' | 'awaiting-offer' | 'streaming' | 'awaiting-done' | 'completed' | 'failed';

const SEND_MOVES: PhaseMoves<SendPhase> = {
  connecting: ['awaiting-offer', 'failed'],
  'awaiting-offer': ['streaming', 'failed'],
  streaming: ['awaiting-done', 'failed'],
  'awaiting-done': ['completed', 'failed'],
  completed: [],
  failed: [],
};

export interface SendOptions {
  site: string;
  route: RouteConfig;
  storeRoot: string;
  observer: SessionObserver;
  /** How the peer gateway is dialled (TCP or mutual TLS). */
  transport: PeerTransport;
  /** A migration whose connections move no byte this long fails. */
  idleMs: number;
  /** Largest frame accepted from the peer. */
  maxFrameBytes: number;
  /** Largest guest a stream may declare, in pages (limits.maxGuestRam). */
  maxGuestPages: number;
  /** This migration's part of the WAN caps on its route and peer: charged for every byte to the peer. */
  wan: WanShare;
  /** Offer the peer zstd compression of Literal bytes (config `compression`). */
  compression: boolean;
  /** Compress on libuv's thread pool, not on the event loop (config `compressionRunsOn: thread-pool`; default false). */
  compressOffLoop?: boolean;
  /** Send changed pages as deltas (config `deltas`): when they pay, always, or never. */
  deltas: DeltaMode;
  /** The migration's id, which its extra channels name (migration-channels.ts). */
  migration: string;
  /** Groups the migration's extra channels with this, its main channel. */
  openGroup: (main: MainChannel) => ChannelGroup;
}

/**
 * One outgoing migration: the source QEMU's connection, relayed to the far gateway as Literal and
 * Run frames. Any failure destroys the QEMU connection, so the source sees a failed migration and
 * its VM keeps running; the local store puts back the snapshot it started from (SessionLifecycle.rollBack).
 */
export class SendSession {
  private phase: SendPhase = 'connecting';
  private readonly life: SessionLifecycle;
  private readonly peer: Socket;
  private readonly frames: FrameParser;
  /** The snapshot the local store held when the migration began. */
  private localSnapshot: string | null = null;
  /** From the peer's Offer on. */
  private encoder: StreamEncoder | null = null;
  /** Literal bytes on their way to the peer, compressed when the Offer chose it (from the Offer on). */
  private literals: LiteralFrames | null = null;
  private mode: ReuseMode = 'none';
  /** The receiver's digest table as it arrives: set while the source waits for it (until TableEnd). */
  private table: Uint8Array | null = null;
  private tableFilled = 0;
  private readonly returnPath = new ReturnPathMessages();
  /** Told of each source chunk: whether the WAN held the session back, the loop's load, the link's rate. */
  private readonly pace = new WanPace();
  /** How fast the WAN takes this session's frames: whether a page crosses slower than a store read. */
  private readonly wanRate = this.pace.rate;
  /** The receiver's Offer lists `bases-ahead`: it reads Delta bases ahead, in parallel or from memory. */
  private receiverReadsAhead = false;
  /** Stream bytes the last Seal covered. */
  private sealedBytes = 0;
  /** Fires when the source has sent nothing for QUIET_SEAL_MS (re-armed by every read). */
  private quietTimer: NodeJS.Timeout | null = null;
  /** The source read held back (onSourceData), and the turn of the event loop that encodes it if no read comes first. */
  private heldRead: Buffer | null = null;
  private heldReadTurn: NodeJS.Immediate | null = null;
  /** The snapshot both stores commit, from the source's end on. */
  private snapshotId: string | null = null;
  /** The snapshot the store claims once the migration completed (null: none). */
  private claimed: string | null = null;
  /** From the Hello to the Offer: a deadline, not an inactivity timeout a trickling peer could keep resetting. */
  private offerTimer: NodeJS.Timeout | null = null;
  private readonly idle: IdleWatch;
  private readonly reads: PooledReads;
  private readonly resumeLater = (): void => this.resumeSource();
  private readonly group: ChannelGroup;
  /** The receiver takes CompressedFrames on the extra channels (its Offer listed Feature.ChannelCompressedFrames). */
  private channelFramesBatched = false;
  /** The route's siblings this site holds snapshots of (from the Hello to the Offer). */
  private siblings: SentSiblings | null = null;

  /** The source QEMU's connection. */
  readonly qemu: Socket;

  constructor(
    accepted: Socket,
    private readonly options: SendOptions,
  ) {
    this.life = new SessionLifecycle('send', options.route.vm, options, () => this.progress());
    this.group = options.openGroup({ abort: (reason) => this.fail(reason), postcopyAdvised: () => this.encoder?.postcopyAdvised ?? false, compression: () => (this.literals?.compressing ? ZSTD : null), channelFramesBatched: () => this.channelFramesBatched, wanShare: () => this.options.wan });
    accepted.pause();
    this.frames = new FrameParser((type, payload) => this.onFrame(type, payload));
    // Until the peer's Offer, only small frames: a peer cannot make us buffer (or log) megabytes of it.
    this.frames.maxPayload = MAX_HANDSHAKE_PAYLOAD;
    this.idle = new IdleWatch(options.idleMs);
    this.life.event('migration accepted', { source: `${accepted.remoteAddress}:${accepted.remotePort}`, peer: formatEndpoint(options.route.peer), tls: options.transport.secure });
    this.peer = options.transport.connect(options.route.peer, () => this.onPeerConnect());
    // Source bytes reach the WAN socket as views of the read buffers: PooledReads reuses a buffer only
    // once the WAN socket has written them, and the encoder copies what it keeps across reads.
    // The source's end of its stream is not ours: QEMU's return path stays open until the session ends it.
    // Bytes held back behind a batch on the thread pool are still on their way to the socket.
    this.reads = new PooledReads(accepted, heldDownstream(this.peer, () => this.literals), (chunk) => this.onSourceData(chunk), true);
    const qemu = this.reads.socket;
    this.qemu = qemu;
    qemu.pause();
    qemu.setNoDelay(true);
    tuneSourceConnection(qemu);
    this.peer.setTimeout(CONNECT_TIMEOUT_MS, () => this.fail('the peer gateway did not answer in time'));
    this.peer.on('data', (chunk: Buffer) => {
      this.life.wanIn += chunk.length;
      try {
        this.frames.push(chunk);
      } catch (err) {
        // A ProtocolViolation, an oversized frame: the peer broke the protocol.
        this.fail(`peer: ${errorMessage(err)}`);
      }
    });
    this.peer.on('drain', () => this.resumeSource());
    this.peer.on('error', (err) => this.fail(`peer ${formatEndpoint(options.route.peer)}: ${err.message}`));
    this.peer.on('close', () => this.fail('the peer gateway closed the connection'));
    qemu.on('end', () => this.onSourceEnd());
    qemu.on('error', (err) => {
      // After the source's stream ended, only the return path can fail: the migration goes on.
      if (this.sourceEnded) this.life.event('source connection error after its stream ended', { error: err.message });
      else this.fail(`source: ${err.message}`);
    });
    qemu.on('close', () => {
      if (!this.sourceEnded) this.fail('the source closed the connection');
    });
  }

  get done(): Promise<void> {
    return this.life.done;
  }

  private transition(to: SendPhase): void {
    this.phase = checkedMove('send', SEND_MOVES, this.phase, to);
  }

  private get over(): boolean {
    return this.phase === 'completed' || this.phase === 'failed';
  }

  /** The peer has offered: frames flow both ways. */
  private get answered(): boolean {
    return this.phase === 'streaming' || this.phase === 'awaiting-done';
  }

  /** The source has ended its stream ('end' was emitted). */
  private get sourceEnded(): boolean {
    return this.qemu.readableEnded;
  }

  private onPeerConnect(): void {
    if (this.phase !== 'connecting') return;
    this.transition('awaiting-offer');
    this.peer.setTimeout(HANDSHAKE_TIMEOUT_MS);
    this.offerTimer = setTimeout(() => {
      if (this.phase === 'awaiting-offer') this.fail(`the peer gateway sent no Offer within ${HANDSHAKE_TIMEOUT_MS / 1000} s`);
    }, HANDSHAKE_TIMEOUT_MS);
    tuneWanConnection(this.peer);
    try {
      // Without retention (its filesystem is full) the store is left as it is: every page is sent.
      this.life.openStore();
      this.localSnapshot = this.life.store?.snapshotId() ?? null;
    } catch (err) {
      this.storeError(err);
      this.fail(`store: ${errorMessage(err)}`);
      return;
    }
    this.writeFrame(
      encodeJson(FrameType.Hello, {
        protocol: SINGLE_CHANNEL_PROTOCOL,
        site: this.options.site,
        vm: this.life.vm,
        target: formatEndpoint(this.options.route.target),
        compression: helloCompression(this.options.compression),
        migration: this.options.migration,
        ...this.siblingsHello(),
      }),
    );
  }

  /** The Hello's `siblings`: the route's siblings this site retains a snapshot of (none with deltas off). */
  private siblingsHello(): { siblings?: SentSiblings['hello'] } {
    const names = this.options.deltas === 'off' ? [] : this.options.route.siblings;
    if (names.length === 0) return {};
    this.siblings = new SentSiblings(this.options.storeRoot, names, (message, fields) => this.life.event(message, fields));
    return this.siblings.hello.length > 0 ? { siblings: this.siblings.hello } : {};
  }

  private onFrame(type: FrameType, payload: Buffer): void {
    switch (type) {
      case FrameType.Offer:
        this.onOffer(payload);
        return;
      case FrameType.TableData: {
        const table = this.table;
        if (!table || this.tableFilled + payload.length > table.length) throw new ProtocolViolation('unexpected-frame', 'unexpected digest table data');
        table.set(payload, this.tableFilled);
        this.tableFilled += payload.length;
        return;
      }
      case FrameType.TableEnd: {
        // One TableEnd per TableRequest.
        const table = this.table;
        if (!table) throw new ProtocolViolation('unexpected-frame', 'unexpected TableEnd');
        if (this.tableFilled !== table.length) throw new ProtocolViolation('bad-payload', `digest table of ${this.tableFilled} bytes, expected ${table.length}`);
        if (this.encoder) this.encoder.reference = table;
        this.table = null;
        this.startMultifd();
        this.life.event('digest table received', { bytes: this.tableFilled });
        this.resumeSource();
        return;
      }
      case FrameType.Return: {
        // Only whole, well-formed return-path messages reach the source QEMU, whatever the peer sends.
        const messages = this.returnPath.check(payload);
        // Once the source has closed its side there is no one left to tell.
        if (messages === null || this.sourceEnded || !this.qemu.writable) return;
        // A source that does not read its return path pauses the peer; one 'drain' listener at a time,
        // however many Return frames the peer had already sent.
        if (!this.qemu.write(messages) && !this.peer.isPaused()) {
          this.peer.pause();
          this.qemu.once('drain', () => this.peer.resume());
        }
        return;
      }
      case FrameType.Done: {
        const done = decodePayload(decodeDone, payload);
        // Before End there is no snapshot: a Done then never matches.
        if (done.snapshotId !== this.snapshotId) throw new ProtocolViolation('bad-payload', `Done for snapshot ${peerText(done.snapshotId)}, not ${this.snapshotId}`);
        this.complete();
        return;
      }
      case FrameType.Abort:
        this.fail(`the peer gateway aborted: ${peerText(decodePayload(decodeAbort, payload).error)}`);
        return;
      default:
        throw new ProtocolViolation('unexpected-frame', `unexpected frame type ${type}`);
    }
  }

  private onOffer(payload: Buffer): void {
    if (this.phase !== 'awaiting-offer') throw new ProtocolViolation('unexpected-frame', 'a second Offer');
    const offer = decodePayload(decodeOffer, payload);
    const compression = offeredCompression(offer, helloCompression(this.options.compression));
    this.transition('streaming');
    this.frames.maxPayload = this.options.maxFrameBytes;
    this.peer.setTimeout(0);
    const { site, snapshotId } = offer;
    const literals = new LiteralFrames((bytes, done) => this.toWire(bytes, done), compression, this.options.compressOffLoop ?? false, (writes) => corked(this.peer, writes));
    const compressionRunsOn = compression === null ? null : literals.offThread ? 'thread-pool' : 'event-loop';
    this.life.event('peer offered', { peerSite: peerText(site), snapshotId: snapshotId === null ? null : peerText(snapshotId), presentPages: offer.presentPages, localSnapshot: this.localSnapshot, compression, compressionRunsOn });
    literals.onWritten = () => this.afterHeldWrites();
    literals.onReserve = (bytes) => this.options.wan.charge(bytes);
    literals.onError = (err) => this.fail(errorMessage(err));
    if (offers(offer, Feature.CompressedFrames)) literals.carryFrames();
    this.channelFramesBatched = literals.carriesFrames && offers(offer, Feature.ChannelCompressedFrames);
    this.literals = literals;
    this.life.compressionSaved = () => literals.savedBytes + this.group.compressionSavedBytes;
    this.encoder = new StreamEncoder(
      {
        literal: (bytes) => literals.literal(bytes),
        run: (run) => this.dataFrame(FrameType.Run, run),
        delta: (delta) => this.dataFrame(FrameType.Delta, delta),
        siblingDelta: (delta) => this.dataFrame(FrameType.SiblingDelta, delta),
        keepVersion: (page) => this.dataFrame(FrameType.KeepVersion, page),
      },
      this.life.retained,
      (layout) => this.chooseReference(layout, offer),
      this.reads.pooled,
    );
    this.encoder.deltas = this.options.deltas !== 'off' && offers(offer, Feature.Delta);
    this.receiverReadsAhead = offers(offer, Feature.BasesAhead);
    if (this.encoder.deltas) this.encoder.siblings = this.siblings?.confirmed(offer) ?? null;
    this.siblings = null;
    this.group.ready();
    this.resumeSource();
  }

  /** The RAM layout is known: decide what the receiver is known to hold. */
  private chooseReference(layout: PageLayout, offer: OfferMessage): void {
    this.life.storeGrows();
    const encoder = this.encoder;
    const store = this.life.store;
    if (!encoder || !store || offer.layoutId !== layout.layoutId) {
      this.mode = 'none';
    } else if (offer.snapshotId !== null && offer.snapshotId === this.localSnapshot) {
      // Both sides committed the same snapshot: our digest table is theirs.
      encoder.reference = store.digests;
      this.mode = 'shared-snapshot';
    } else if (offer.presentPages > 0) {
      this.table = new Uint8Array(layout.pageCount * DIGEST_BYTES);
      this.tableFilled = 0;
      this.qemu.pause();
      this.writeFrame(encodeFrame(FrameType.TableRequest));
      this.mode = 'digest-table';
    } else {
      this.mode = 'none';
    }
    if (this.mode === 'none' && encoder && offers(offer, Feature.Delta)) {
      // The receiver holds nothing of this layout yet, but will hold every page it is sent: a page whose
      // content came earlier in this migration can still go as a reference to it.
      encoder.reference = new Uint8Array(layout.pageCount * DIGEST_BYTES);
    }
    this.life.event('reuse decided', { mode: this.mode, pages: layout.pageCount });
    if (encoder) {
      const multifd = new MultifdMigration(this.life.retained);
      multifd.wakeAfter = (ms, step) => {
        afterTimeAndReads(ms, () => {
          if (this.over) return;
          try {
            step();
          } catch (err) {
            this.group.fail(`multifd channels: ${errorMessage(err)}`);
          }
        });
      };
      encoder.multifd = multifd;
      multifd.channelDeltas = encoder.deltas && offers(offer, Feature.ChannelDeltas);
      multifd.channelChecks = offers(offer, Feature.ChannelChecks);
      multifd.packetHeaders = offers(offer, Feature.ChannelPacketHeaders);
      if (encoder.deltas && offers(offer, Feature.ChannelMatches)) {
        multifd.elsewhere = encoder;
        multifd.earlierBases = offers(offer, Feature.ChannelEarlierBases);
      }
      if (offers(offer, Feature.ChannelSiblings)) {
        multifd.siblings = encoder.siblings;
        multifd.siblingsPay = () => encoder.siblingsPay;
      }
      multifd.begin(layout);
      if (!this.table) this.startMultifd();
    }
  }

  /** The reference is decided (and received): the migration's multifd channels may read on. */
  private startMultifd(): void {
    const multifd = this.encoder?.multifd;
    if (!multifd) return;
    multifd.receiverTable = this.encoder?.receiverTable ?? null;
    this.group.useMultifd(multifd);
  }

  /**
   * A source read: held back until the next one comes or the event loop turns (at most one is), so that
   * its changed pages' held versions are read from the store while the read before it is encoded
   * (StreamEncoder.lookAhead; docs/design.md, "Reading a chunk ahead"). A read that came while this
   * session waits (the digest table, the WAN) stays held until it goes on.
   */
  private onSourceData(chunk: Buffer): void {
    const encoder = this.encoder;
    if (!encoder || this.over) return;
    const held = this.heldRead;
    encoder.lookAhead(chunk, held);
    if (held !== null && this.waiting) {
      // Paused for the table or the WAN, yet a read came (the one in flight as it paused): both wait.
      this.heldRead = Buffer.concat([held, chunk]);
      this.reads.hold(null);
      return;
    }
    if (held !== null) {
      this.heldRead = null;
      this.reads.hold(null);
      this.encode(held);
      if (this.over) return;
    }
    if (!encoder.readsAhead) {
      this.encode(chunk);
      return;
    }
    // Walked only now if the walk was lost before the held read's records put it right.
    encoder.lookAhead(chunk, null);
    this.heldRead = chunk;
    this.reads.hold(chunk);
    this.heldReadTurn ??= setImmediate(() => {
      this.heldReadTurn = null;
      if (!this.waiting) this.encodeHeldRead();
    });
  }

  /** Whether this session waits before encoding more: for the digest table, the WAN (its drain, its cap), or batches on the thread pool. */
  private get waiting(): boolean {
    return this.table !== null || this.peer.writableNeedDrain || this.options.wan.held || this.literals?.backlogged === true;
  }

  /** Encodes the read held back, if any. */
  private encodeHeldRead(): void {
    const held = this.heldRead;
    if (held === null || this.over) return;
    this.heldRead = null;
    this.reads.hold(null);
    this.encode(held);
  }

  private encode(chunk: Buffer): void {
    if (!this.encoder || this.over) return;
    // Whether the WAN held this session back since the last chunk (the peer socket still holds what that
    // chunk produced, or the source was paused for it), how busy the event loop was meanwhile, and the
    // link's rate: from them the policy judges whether the WAN, the source or this gateway's CPU sets the pace.
    const policy = this.literals?.policy ?? null;
    this.pace.observe(policy, this.peer.writableLength, this.life.wanOut, chunk.length, performance.now(), this.options.wan.linkBytesPerSecond);
    policy?.observeWanRate(this.wanRate.savedByteRate);
    this.encoder.resemblanceWorth.observeWanRate(this.wanRate.bytesPerSecond);
    // A delta costs store reads here and at the receiver, a content match one there: paid whatever they
    // take only while the WAN, not the gateways, sets the pace, and the link is slow enough that a page
    // takes longer to cross than such a read. A match, a delta against a page alike or a sibling's page,
    // read ahead by the receiver, costs both gateways a lookup, a copy or a read from memory, about what
    // the page's bytes cost their sockets: paid on a link slow enough, whatever the pace. Matches and
    // deltas against pages alike used to wait, as compression does, for saving to pay (sixth session,
    // when their copies went into memory touched for the first time); at 1 Gbit/s that stopped them with
    // compression, and single-channel first legs of the guest of real files carried 54–198 MiB instead
    // of 53–75, in no less time (docs/benchmarks.md, "Twenty-fourth session").
    this.encoder.pageWanUs = this.options.deltas === 'always' ? 0 : this.wanRate.pageMicros(X86_PAGE_SIZE, policy?.wanIsBottleneck ?? false);
    this.encoder.deltaReadsFree = this.options.deltas === 'always' || ((policy?.wanIsBottleneck ?? true) && this.wanRate.slowerThan(READS_PAY_BELOW_BYTES_PER_S));
    this.encoder.receiverReadsAhead = this.receiverReadsAhead && !this.wanRate.fasterThan(RECEIVER_READS_PAY_BELOW_BYTES_PER_S);
    // Every frame this chunk produces leaves in one writev.
    this.peer.cork();
    try {
      this.encoder.push(chunk);
      // The batch holds views of the chunk, which is read into again once the WAN socket has it.
      this.literals?.flush();
    } catch (err) {
      this.storeError(err);
      this.fail(`source stream: ${errorMessage(err)}`);
      return;
    } finally {
      this.peer.uncork();
    }
    this.life.noteVerbatim(this.encoder);
    if (this.encoder.sealPoint > this.sealedBytes) this.seal(this.encoder);
    else (this.quietTimer ??= setTimeout(() => this.onQuiet(), QUIET_SEAL_MS).unref()).refresh();
    this.backpressure();
  }

  /**
   * Stops reading the source for the peer socket's backpressure or a WAN cap in debt (resumed once it has
   * refilled), or for batches waiting for the thread pool; returns whether it did.
   */
  private backpressure(): boolean {
    const wanFull = this.peer.writableNeedDrain || this.options.wan.hold(this.resumeLater);
    if (wanFull) this.literals?.policy.pausedForWan();
    if (!wanFull && this.literals?.backlogged !== true) return false;
    this.qemu.pause();
    return true;
  }

  /** Bytes held behind a batch on the thread pool were written (and charged to the WAN caps). */
  private afterHeldWrites(): void {
    if (this.over || this.encoder === null) return;
    if (!this.backpressure()) this.resumeSource();
  }

  /**
   * The receiver holds the stream's device-state tail back until a check covers it. The source closes
   * its side only after the destination has loaded when QEMU's return path is on, so End would come too
   * late: the stream is sealed as soon as its end has been read (current framing), or, where nothing
   * marks the end (the QEMU 2.0 framing, a stream relayed verbatim), once the source has gone quiet;
   * and a postcopy package as soon as it has been sent (the destination needs it to run the guest).
   */
  private seal(encoder: StreamEncoder): void {
    const streamBytes = encoder.sentBytes;
    if (streamBytes === this.sealedBytes) return;
    this.sealedBytes = streamBytes;
    this.writeFrame(encodeJson(FrameType.Seal, { streamBytes, streamCheck: encoder.streamCheck }));
    this.life.event('stream sealed', { streamBytes });
  }

  private onQuiet(): void {
    const encoder = this.encoder;
    if (this.over || this.sourceEnded || !encoder) return;
    // Quiet because this session stopped reading is not the source's doing.
    if (this.waiting) return void this.quietTimer?.refresh();
    this.encodeHeldRead();
    if (this.over || encoder.counts.streamBytes === this.sealedBytes) return;
    corked(this.peer, () => {
      if (encoder.flush()) this.seal(encoder);
      this.literals?.flush();
    });
  }

  private onSourceEnd(): void {
    const encoder = this.encoder;
    if (this.phase !== 'streaming' || !encoder) {
      this.fail('the source ended before the peer answered');
      return;
    }
    this.encodeHeldRead();
    if (this.over) return;
    try {
      encoder.end();
    } catch (err) {
      this.storeError(err);
      this.fail(`source stream: ${errorMessage(err)}`);
      return;
    }
    this.snapshotId = randomUUID();
    this.writeFrame(encodeJson(FrameType.End, { streamBytes: encoder.sentBytes, streamCheck: encoder.streamCheck, snapshotId: this.snapshotId, channels: this.group.joined }));
    this.transition('awaiting-done');
    this.life.event('source stream ended', { streamBytes: encoder.counts.streamBytes, ...this.wanRate.linkReport });
    // Its source has sent it all and may see it complete before the receiver's Done (that waits for the
    // far store's commit): a migration of the VM begun meanwhile waits for this one to end, and its
    // channels for that migration's group.
    this.group.endJoins();
    this.options.observer.settling(this.life.vm, this.life.done);
  }

  private resumeSource(): void {
    const ready = (): boolean => !this.over && this.encoder !== null && this.table === null && !this.peer.writableNeedDrain && this.literals?.backlogged !== true;
    if (!ready() || this.options.wan.hold(this.resumeLater)) return;
    const early = this.reads.takeEarly();
    if (early) this.onSourceData(early);
    if (ready()) this.encodeHeldRead();
    if (ready() && !this.options.wan.held) this.qemu.resume();
  }

  /** A Run or a Delta: into the Literal bytes' batch when the receiver takes CompressedFrames, else after them. */
  private dataFrame(type: FrameType, payload: Buffer): void {
    const literals = this.literals;
    if (literals?.carriesFrames) {
      literals.frame(frameHeader(type, payload.length), payload);
    } else {
      this.writeFrame(frameHeader(type, payload.length));
      this.writeFrame(payload);
    }
  }

  /** A frame other than Literal bytes: the Literal bytes before it leave first. */
  private writeFrame(bytes: Buffer): void {
    const literals = this.literals;
    if (literals === null) return this.toWire(bytes);
    literals.flush();
    literals.inOrder(bytes);
  }

  private toWire(bytes: Buffer, done?: WriteDone): void {
    this.life.wanOut += bytes.length;
    this.options.wan.charge(bytes.length);
    this.peer.write(bytes, done);
  }

  private progress(): void {
    if (this.answered && this.idle.stalled(this.life.wanIn + this.life.wanOut + (this.encoder?.counts.streamBytes ?? 0))) {
      this.options.observer.idleTimeout(this.life.vm, 'send');
      this.fail(`no bytes moved for ${this.options.idleMs / 1000} s (limits.idleSeconds)`);
      return;
    }
    this.life.tellProgress(this.phase, this.encoder);
  }

  private complete(): void {
    if (this.over) return;
    this.transition('completed');
    // Completed from here on: nothing fails it while the store's pages are synced in the background.
    void this.life.syncStoreInBackground().then(() => {
      // Reported is what the store now claims: not the migration's id when the stream was relayed
      // verbatim or the store could not keep it.
      // Pages that crossed on extra channels and were not all kept: the store keeps the snapshot it held.
      this.claimed = this.life.settle(this.encoder, this.group.keepsSnapshot ? this.snapshotId : null);
      this.peer.end();
      this.qemu.end();
      this.report('completed', null);
    }).catch((err: unknown) => this.life.event('settling the completed migration failed', { error: errorMessage(err) }));
  }

  /** A store write that failed for lack of space turns retention off for this VM until there is room. */
  private storeError(err: unknown): void {
    this.life.storeError(err, this.encoder);
  }

  private fail(reason: string): void {
    if (this.over) return;
    // Before the Offer the peer has nothing to abort: the connection is just closed.
    const answered = this.answered;
    this.transition('failed');
    this.literals?.close();
    this.life.event('migration failed', { error: reason });
    if (answered) this.life.abortPeer(this.peer, reason, true);
    else this.peer.destroy();
    // Resetting the connection makes the source QEMU fail the migration; its VM keeps running.
    this.qemu.resetAndDestroy();
    this.life.rollBack();
    this.report('failed', reason);
  }

  private report(result: 'completed' | 'failed', error: string | null): void {
    if (this.offerTimer) clearTimeout(this.offerTimer);
    if (this.quietTimer) clearTimeout(this.quietTimer);
    if (this.heldReadTurn) clearImmediate(this.heldReadTurn);
    this.heldRead = null;
    this.reads.hold(null);
    this.options.wan.close();
    this.life.report(this.encoder, { result, error, mode: this.mode, snapshotId: result === 'completed' ? this.claimed : null });
    this.encoder?.release();
    this.group.mainEnded(result === 'completed', error);
  }
}
