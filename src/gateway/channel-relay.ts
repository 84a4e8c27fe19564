/**
 * A migration's extra channels (multifd, postcopy-preempt) across the WAN: one peer connection per
 * channel, whose Hello names the migration and the channel (protocol 5). The sending side reads the
 * source QEMU's channel through a ChannelEncoder into Literal and Run frames and ends with End (the
 * channel's length and XXH3-64, once the encoder has let everything go); the receiving side dials the
 * destination QEMU once the main channel's destination has answered (QEMU takes the main channel
 * first), writes what its ChannelDecoder rebuilds, checks End, and returns what the destination sends
 * back as Return frames (passed on as they are). A multifd channel's changed pages may cross as Delta
 * frames against the version both sides hold (Feature.ChannelDeltas). Literal bytes cross compressed when the main channel's
 * handshake chose compression, each channel with a zstd stream of its own. A multifd channel's codec is made once the main
 * channel has given the RAM block list (ChannelGroup.whenMultifd); while the codec is parked at the
 * SYNC barrier the relay stops reading its input. Anything wrong on one channel fails its whole
 * migration (ChannelGroup.fail).
 */
import { connect, type Socket } from 'node:net';
import { TLSSocket } from 'node:tls';
import { errorMessage } from '../common/errors';
import { CHANNEL_AHEAD_BYTES, type ChannelDecoder, type ChannelEncoder, channelDecoder, channelEncoder } from '../proxy/channel-codec';
import type { MultifdMigration } from '../proxy/multifd-migration';
import { PACKET_HEADER_BYTES } from '../proxy/packet-header';
import { X86_PAGE_SIZE } from '../qemu/constants';
import { MULTIFD_SLOTS } from '../qemu/multifd';
import { BatchesAhead, LiteralFrames, LiteralInflater, type WriteDone } from '../wire/compression';
import {
  type ChannelName,
  decodeAbort,
  decodeSeal,
  encodeJson,
  FrameParser,
  frameHeader,
  FrameType,
  type HelloMessage,
  PROTOCOL_VERSION,
} from '../wire/frames';
import { formatEndpoint, parseEndpoint } from './address';
import type { RouteConfig } from './config';
import { channelLabel, type ChannelGroup, type ExtraChannel } from './migration-channels';
import { OutputSlabs } from './output-slabs';
import { heldDownstream, laterDownstream, PooledReads } from './pooled-reads';
import { corked, tuneSourceConnection, tuneWanConnection, WAN_QUEUE_BYTES } from './socket-tuning';
import { WanShare } from './wan-cap';
import { WanPace } from './wan-pace';
import { decodePayload, ProtocolViolation } from './protocol-violation';
import { CONNECT_TIMEOUT_MS, peerText } from './session';
import type { PeerTransport } from './transport';

/** What both relays need of the gateway. */
interface RelayOptions {
  group: ChannelGroup;
  channel: ChannelName;
  /** Largest frame accepted from the peer. */
  maxFrameBytes: number;
  /** Told once how the channel ended, with the bytes of QEMU's stream it carried towards the destination. */
  over?: (outcome: { completed: boolean; error: string | null; streamBytes: number }) => void;
}

export interface ChannelReceiverOptions extends RelayOptions {
  /** The multifd channels the sender had when it opened this one (its Hello). */
  channels?: number;
  /** The sender checks the channel after every SYNC packet (its Hello): SYNC packets wait for their check. */
  checked?: boolean;
}

export interface ChannelSenderOptions extends RelayOptions {
  site: string;
  /** Compress on libuv's thread pool, not on the event loop (config `compressionRunsOn: thread-pool`; default false). */
  compressOffLoop?: boolean;
  route: RouteConfig;
  transport: PeerTransport;
}

/** What a sender is on until start(): no cap, no link. */
const UNCAPPED = new WanShare([]);

/**
 * Keeps a channel's peer connection open for writing once the other gateway has ended its side: each
 * side sends its End when its own end of the channel is done (the sender once the source closed and its
 * codec let everything go, the receiver once the destination closed), in either order, and a codec
 * parked at a SYNC may hold its End back until after the other side's FIN. Node's default would end
 * this side at that FIN, and the End written later would fail the migration ("write after end").
 */
function halfOpen(peer: Socket): void {
  peer.allowHalfOpen = true;
}

/**
 * A multifd packet rebuilt: its header and offsets (from a PacketHeader frame) and its pages (Runs, pages
 * rebuilt from Deltas), 128 on x86 (QEMU's 512 KiB packets); larger pieces get a buffer of their own. Sized
 * for the pages alone, each header's 1,344 bytes took a slab and its Run the next, so that two packets
 * held all four slabs and the next Runs went into fresh buffers (docs/benchmarks.md, "Thirty-ninth
 * session").
 */
export const RUN_SLAB_BYTES = PACKET_HEADER_BYTES + MULTIFD_SLOTS * X86_PAGE_SIZE;
/** Slabs a receiving channel keeps: 2 MiB a channel, 32 MiB for 16 channels. */
export const RUN_SLABS = 4;

/** What both relays share: their group, and how a channel ends (cleanly, or failing its migration). */
abstract class ChannelRelay implements ExtraChannel {
  protected over = false;
  /** The channel ended cleanly on one side (its End was sent or taken): its connections close next. */
  protected ended = false;
  /** The peer's End came, and waits for the codec (parked at a SYNC) before it is taken. */
  protected endPending = false;
  /** The peer closed while its frames were held back: they are read first, and must end with End. */
  protected peerGone = false;
  /** The channel has a multifd codec whose end the group has not been told of yet. */
  private multifdOpen = false;

  constructor(protected readonly options: RelayOptions) {}

  /**
   * Dials onward once the group's main channel is connected and, for a multifd channel, has given the
   * block list; `dial` sets the relay going with the migration's MultifdMigration (null: verbatim).
   */
  protected whenReady(dial: (multifd: MultifdMigration | null) => void): void {
    const { group, channel } = this.options;
    group
      .whenReady()
      .then(() => (channel.kind === 'multifd' ? group.whenMultifd() : null))
      .then(
        (multifd) => {
          if (this.over) return;
          if (multifd) this.multifdOpen = true;
          else if (channel.kind === 'multifd') group.multifdEnded(false); // relayed verbatim: its pages are not kept
          dial(multifd);
        },
        (err: unknown) => this.abort(errorMessage(err)),
      );
  }

  /** The channel's multifd codec is done with: `complete` if it ended having kept every page. */
  protected multifdEnded(complete: boolean): void {
    if (!this.multifdOpen) return;
    this.multifdOpen = false;
    this.options.group.multifdEnded(complete);
  }

  /** Runs `step`; anything it throws fails the migration. */
  protected guard(what: string, step: () => void): void {
    try {
      step();
    } catch (err) {
      this.fail(`${what} ${this.label}: ${errorMessage(err)}`);
    }
  }

  /** Something went wrong on this channel: the whole migration fails. */
  protected fail(reason: string): void {
    if (this.over) return;
    this.options.group.fail(reason);
    this.abort(reason);
  }

  abort(reason: string): void {
    if (this.over) return;
    this.over = true;
    this.closed();
    this.cut();
    this.multifdEnded(false);
    this.options.group.left(this);
    this.options.over?.({ completed: false, error: reason, streamBytes: this.streamBytes });
  }

  /** Both connections closed after the channel ended cleanly. */
  protected finish(): void {
    if (this.over) return;
    this.over = true;
    this.closed();
    // Closed by the destination before the sender's End: its pages may not all have been kept.
    this.multifdEnded(false);
    this.options.group.left(this);
    this.options.over?.({ completed: true, error: null, streamBytes: this.streamBytes });
  }

  /** Bytes of QEMU's stream this channel carried towards the destination. */
  protected abstract get streamBytes(): number;

  /** Feeds a chunk of the peer gateway's bytes to `frames`; a frame it cannot take fails the migration. */
  protected fromPeer(frames: FrameParser, chunk: Buffer): void {
    try {
      frames.push(chunk);
    } catch (err) {
      this.fail(`peer ${this.label}: ${errorMessage(err)}`);
    }
  }

  /**
   * Watches the peer gateway's connection (its bytes go to fromPeer): an error, or the connection closing
   * before the channel ended, fails the migration.
   */
  protected watchPeer(peer: Socket, frames: FrameParser, who: string): void {
    peer.on('error', (err) => this.fail(`peer ${this.label}: ${err.message}`));
    peer.on('close', () => {
      if (this.ended) this.finish();
      else if (this.endPending || frames.isPaused) this.peerGone = true;
      else this.fail(`${who} closed ${this.label} before its end`);
    });
  }

  /** Resets both of the channel's connections. */
  protected abstract cut(): void;

  /** The channel is over, cleanly or not: what it held of the gateway's lets go. */
  protected closed(): void {}

  protected get label(): string {
    return channelLabel(this.options.channel);
  }
}

/** Sending side: the source QEMU's channel → the peer gateway. */
export class ChannelSender extends ChannelRelay {
  private peer: Socket | null = null;
  private readonly frames: FrameParser;
  /** From the dial on. */
  private encoder: ChannelEncoder | null = null;
  /** Literal bytes on their way to the peer (compressed as the main channel's handshake chose); from the dial on. */
  private literals: LiteralFrames | null = null;
  /** Told of each source chunk: whether the WAN held the channel back, the loop's load, the channel's share of the link. */
  private readonly pace = new WanPace();
  /**
   * The channel's part of the WAN caps on its route and peer (from start() on), a share of its own beside
   * the main channel's: a multifd channel carries most of a migration's bytes, an encrypted connection
   * all of them.
   */
  private wan = UNCAPPED;
  /** Frame bytes written to the peer. */
  private wanBytes = 0;
  /**
   * The source QEMU's channel: as accepted until start(), then as this relay reads it (adopted by
   * PooledReads where it can be). Adopted only once the channel has joined its group, so that a channel
   * refused is closed through the socket the gateway holds.
   */
  private source: Socket;
  private reads: PooledReads | null = null;

  constructor(
    /** The source QEMU's channel, paused, its first bytes put back. */
    accepted: Socket,
    private readonly sender: ChannelSenderOptions,
  ) {
    super(sender);
    this.source = accepted;
    this.frames = new FrameParser((type, payload) => this.onFrame(type, payload));
    this.frames.maxPayload = sender.maxFrameBytes;
  }

  /**
   * Dials the peer once the main channel's peer has offered, then relays, on the WAN caps through `wan`
   * (let go when the channel is over). Called once the channel has joined its group: a channel refused
   * never holds a share.
   */
  start(wan: WanShare): void {
    if (this.over) return wan.close();
    this.wan = wan;
    // Read into reused buffers, as the main channel is: the source's bytes reach the peer socket as views
    // of them, a buffer is read into again only once the peer socket has written them, and the codec
    // copies what it keeps past a chunk (releaseInput). Nothing is read before the peer is dialled.
    const reads = new PooledReads(this.source, heldDownstream(laterDownstream(() => this.peer), () => this.literals), (chunk) => this.onSourceData(chunk, reads.pooled), false);
    this.reads = reads;
    this.source = reads.socket;
    this.source.pause();
    // A channel queues as little as the main channel does, for the same reason (socket-tuning.ts): its
    // source's receive buffer here, its WAN socket's unsent bytes once dialled, WAN_QUEUE_BYTES in Node.
    // With Linux's defaults and 1 MiB in Node each channel of a 4-channel first leg at 100 Mbit/s took
    // 6–10 MiB before the WAN held it back, and the guest stayed paused for 3.0–4.0 s (direct QEMU
    // 1.2–2.1 s); tuned, 1.4–2.4 s (docs/benchmarks.md, "Twenty-third session").
    tuneSourceConnection(this.source);
    this.source.on('error', (err) => this.fail(`source ${this.label}: ${err.message}`));
    this.source.on('close', () => {
      if (!this.ended) this.fail(`the source closed ${this.label} before its end`);
    });
    this.whenReady((multifd) => this.dial(multifd));
  }

  private dial(multifd: MultifdMigration | null): void {
    const { group, channel, route, transport, site } = this.sender;
    const peer = transport.connect(route.peer, () => {
      peer.setTimeout(0);
      tuneWanConnection(peer);
      const hello: HelloMessage = { protocol: PROTOCOL_VERSION, site, vm: group.vm, target: formatEndpoint(route.target), migration: group.migration, channel };
      // The receiver's codecs wait at the first SYNC until as many channels have joined there.
      if (multifd) hello.channels = group.multifdChannels;
      if (multifd?.channelChecks) hello.channelChecks = true;
      peer.write(encodeJson(FrameType.Hello, hello));
      this.source.on('end', () => this.onSourceEnd());
      // The bytes read before the source was adopted (its head) go first.
      const early = this.reads?.takeEarly() ?? null;
      if (early !== null) this.onSourceData(early, false);
      this.readSource();
    });
    const literals = new LiteralFrames((bytes, done) => this.toPeer(bytes, done), group.compression, this.sender.compressOffLoop ?? false, (writes) => corked(peer, writes));
    literals.policy.startsAtFullRate();
    if (group.channelFramesBatched) literals.carryFrames();
    literals.onWritten = () => this.readSource();
    // A batch on the thread pool is charged its raw size until it comes back (LiteralFrames.onReserve).
    literals.onReserve = (bytes) => this.wan.charge(bytes);
    literals.onError = (err) => this.fail(`${this.label}: ${err.message}`);
    this.literals = literals;
    /**
     * A payload of the encoder's own (a slab it does not write again, a Run's buffer): inside the batch
     * when the receiver takes CompressedFrames on channels, else after the Literal bytes before it.
     */
    const frameOf =
      (type: FrameType) =>
      (payload: Buffer): void => {
        const header = frameHeader(type, payload.length);
        if (literals.carriesFrames) return literals.frame(header, payload);
        literals.flush();
        literals.inOrder(header);
        literals.inOrder(payload);
      };
    const encoder = channelEncoder(
      {
        literal: (bytes) => literals.literal(bytes),
        run: frameOf(FrameType.Run),
        delta: frameOf(FrameType.Delta),
        siblingDelta: frameOf(FrameType.SiblingDelta),
        keepVersion: frameOf(FrameType.KeepVersion),
        packetHeader: frameOf(FrameType.PacketHeader),
        // Never inside a batch: the receiver takes a check only in order, between the frames around it.
        check: (streamBytes, streamCheck) => {
          literals.flush();
          literals.inOrder(encodeJson(FrameType.Seal, { streamBytes, streamCheck }));
        },
      },
      multifd,
    );
    encoder.onReadOn = () => {
      // Unparked from within another channel's codec: what it let go leaves now.
      literals.flush();
      this.readSource();
    };
    this.encoder = encoder;
    this.peer = peer;
    halfOpen(peer);
    peer.setNoDelay(true);
    peer.setTimeout(CONNECT_TIMEOUT_MS, () => this.fail(`${this.label}: the peer gateway did not answer in time`));
    peer.on('drain', () => this.readSource());
    peer.on('data', (chunk: Buffer) => this.fromPeer(this.frames, chunk));
    this.watchPeer(peer, this.frames, 'the peer gateway');
  }

  /** Writes frame bytes to the peer (LiteralFrames does, in order). */
  private toPeer(bytes: Buffer, done?: WriteDone): void {
    this.wan.charge(bytes.length);
    (this.peer as Socket).write(bytes, done);
    this.wanBytes += bytes.length;
  }

  /** reused: the chunk's buffer is read into again once this returns. */
  private onSourceData(chunk: Buffer, reused: boolean): void {
    const { encoder, peer, literals } = this;
    // Nothing is read before the dial; after the destination closed the channel nobody reads on.
    if (this.ended || this.over || !encoder || !peer || !literals) return;
    // Whether the WAN held the channel back since the last chunk, the event loop's load, and the rate the
    // channel's connection takes while held back (WanPace, CompressionPolicy): a drained stretch the
    // gateway took in at least that fast keeps compression on. No rate to price a batch's saving at, so
    // every batch that shrinks pays: priced at the rate of all the channels together, 4-channel first
    // legs at 1 Gbit/s compressed less and took longer (docs/benchmarks.md, "Tenth session").
    this.pace.observe(literals.policy, peer.writableLength, this.wanBytes, chunk.length, performance.now(), this.wan.linkBytesPerSecond);
    encoder.savingPays = literals.policy.savingPays;
    peer.cork();
    try {
      this.guard('source', () => {
        encoder.push(chunk);
        literals.flush();
        if (reused) encoder.releaseInput();
      });
    } finally {
      peer.uncork();
    }
    // The peer socket's backpressure or a WAN cap in debt, the codec waiting at a SYNC for the other
    // channels, or batches waiting for the thread pool.
    const wanFull = peer.writableLength >= WAN_QUEUE_BYTES || this.wan.hold(this.readSourceLater);
    if (wanFull || encoder.parked || literals.backlogged) this.source.pause();
    if (wanFull) literals.policy.pausedForWan();
  }

  /** Reads the source again once neither the peer socket, a WAN cap in debt nor the codec holds it back. */
  private readSource(): void {
    if (this.over || !this.peer || this.encoder?.parked || this.peer.writableLength >= WAN_QUEUE_BYTES || this.literals?.backlogged) return;
    if (this.wan.hold(this.readSourceLater)) return;
    this.source.resume();
  }

  /** readSource once a WAN cap has refilled. */
  private readonly readSourceLater = (): void => this.readSource();

  private onFrame(type: FrameType, payload: Buffer): void {
    if (type === FrameType.Return) {
      if (this.source.writable) this.source.write(payload);
      return;
    }
    if (type === FrameType.End) {
      // The destination closed the channel (QEMU does once it is done with it): so does the source's,
      // and the peer hears what was read so far. The source is read on (what it still sends is dropped)
      // so that its FIN is seen and the connection closes, though the codec may have paused it.
      this.source.end();
      this.source.resume();
      this.endChannel();
      return;
    }
    if (type === FrameType.Abort) return this.fail(`the peer gateway aborted ${this.label}: ${peerText(decodePayload(decodeAbort, payload).error)}`);
    throw new ProtocolViolation('unexpected-frame', `unexpected frame type ${type} on an extra channel`);
  }

  /** QEMU closed the channel: the peer hears how long it was and its check, then the connection closes. */
  private onSourceEnd(): void {
    this.endChannel();
    this.source.end();
  }

  /** Ends the channel once: its End goes once the encoder has let every byte go, then the connection closes. */
  private endChannel(): void {
    const { peer, encoder } = this;
    if (this.over || this.ended || !peer || !encoder) return;
    this.ended = true;
    this.guard('source', () =>
      encoder.end(() => {
        this.multifdEnded(true);
        const literals = this.literals as LiteralFrames;
        literals.flush();
        const { streamBytes, streamCheck } = encoder;
        literals.inOrder(encodeJson(FrameType.End, { streamBytes, streamCheck }));
        // Once the batches on the thread pool have gone, and what waited behind them.
        literals.afterHeld(() => {
          peer.end();
          // A PacketHeader frame's saving is compression's too: the same bytes, coded otherwise.
          const { earlierBaseDeltas, versionsKept, headerSavedBytes } = encoder;
          this.sender.group.compressionSavedBytes += literals.savedBytes + (headerSavedBytes ?? 0);
          this.sender.group.event('channel ended', { channel: this.label, streamBytes, wanBytes: this.wanBytes, framesBatched: literals.carriesFrames, earlierBaseDeltas, versionsKept, headerSavedBytes, ...this.pace.rate.linkReport });
        });
      }),
    );
  }

  protected cut(): void {
    this.literals?.close();
    this.source.resetAndDestroy();
    this.peer?.destroy();
  }

  protected override closed(): void {
    this.wan.close();
  }

  protected get streamBytes(): number {
    return this.encoder?.streamBytes ?? 0;
  }
}

/** Receiving side: the peer gateway's channel → the destination QEMU. */
export class ChannelReceiver extends ChannelRelay {
  private destination: Socket | null = null;
  private readonly frames: FrameParser;
  /** From the dial on. */
  private decoder: ChannelDecoder | null = null;
  /** Compressed frames back into Literal bytes, when the main channel's handshake chose compression. */
  private readonly inflater: LiteralInflater | null;
  /** CompressedFrames batches inflated as they arrive, so that the Runs they carry are read ahead. */
  private readonly batches: BatchesAhead;
  /**
   * The peer gateway's connection: as accepted until start(), then as this relay reads it (plain TCP:
   * adopted by PooledReads). Adopted only once the channel has joined its group, so that a channel
   * refused is closed through the socket the gateway holds.
   */
  private peer: Socket;
  /** Bytes read before the connection was adopted (its Hello): taken first, once the destination answers. */
  private early: Buffer | null = null;

  constructor(
    /** The peer gateway's connection, paused, its Hello put back. */
    accepted: Socket,
    private readonly receiver: ChannelReceiverOptions,
  ) {
    super(receiver);
    this.peer = accepted;
    this.inflater = receiver.group.compression === null ? null : new LiteralInflater();
    this.batches = new BatchesAhead(() => this.inflater);
    // The Hello (already checked) comes first again; Literal bytes pass through as they arrive. The Runs
    // and Deltas of a chunk are shown to the codec before it is rebuilt, those inside its compressed
    // batches too: their pages are read all at once.
    let hello = true;
    this.frames = new FrameParser(
      (type, payload, carried) => {
        if (hello && type === FrameType.Hello) hello = false;
        else this.onFrame(type, payload, carried);
      },
      (type) => type === FrameType.Literal,
      {
        headBytes: CHANNEL_AHEAD_BYTES,
        wants: (type) => type === FrameType.Run || type === FrameType.Delta || type === FrameType.SiblingDelta,
        look: (type, head, length) => this.lookAhead(type, head, length),
        looked: () => this.decoder?.prefetchAhead?.(),
        wantsWhole: (type) => type === FrameType.CompressedFrames,
        lookWhole: (_type, payload) => this.batches.arrived(payload, this.lookIntoBatch),
      },
    );
    this.frames.maxPayload = receiver.maxFrameBytes;
  }

  /** Dials the destination once the main channel's destination has answered, then relays. Called once the channel has joined its group. */
  start(): void {
    // Plain TCP is read into reused buffers, as the main channel is (a TLS socket decrypts into buffers of
    // its own): Literal bytes reach the destination as views of them, a buffer is read into again only
    // once the destination has written them, and the frame parser and codec copy what they keep.
    // Nothing is read before the destination answers.
    const accepted = this.peer;
    if (accepted instanceof TLSSocket) {
      accepted.pause();
      accepted.on('data', (chunk: Buffer) => this.onPeerData(chunk, false));
    } else {
      const reads = new PooledReads(accepted, laterDownstream(() => this.destination), (chunk) => this.onPeerData(chunk, reads.pooled), true);
      this.peer = reads.socket;
      this.peer.pause();
      this.early = reads.takeEarly();
    }
    halfOpen(this.peer);
    this.watchPeer(this.peer, this.frames, 'the sending gateway');
    this.whenReady((multifd) => this.dial(multifd));
  }

  /** reused: the chunk's buffer is read into again once this returns. */
  private onPeerData(chunk: Buffer, reused: boolean): void {
    this.rebuildCorked(() => this.fromPeer(this.frames, chunk));
    if (reused) {
      this.frames.ownRetained();
      this.decoder?.releaseInput();
    }
  }

  /**
   * Runs `rebuild` with the destination corked, so that what it rebuilds leaves in one writev, as on the
   * main channel: written one by one, a 4-channel first leg at 1 Gbit/s spent 0.66 s of the receiving
   * gateway's main thread in write calls (docs/benchmarks.md, "Twenty-sixth session"), and 0.6 s more
   * for frames resumed after a pause ("Twenty-seventh session").
   */
  private rebuildCorked(rebuild: () => void): void {
    const destination = this.destination;
    if (destination === null) rebuild();
    else corked(destination, rebuild);
  }

  private dial(multifd: MultifdMigration | null): void {
    const { group } = this.options;
    const target = parseEndpoint(group.target);
    // Half-open: a destination that closes its side (QEMU does once it is done with the channel) is told
    // to the sender, and the connection closes once the sender has closed its own.
    const destination = connect({ host: target.host, port: target.port, noDelay: true, allowHalfOpen: true });
    this.destination = destination;
    if (multifd && this.receiver.channels !== undefined) multifd.expectChannels(this.receiver.channels);
    // Rebuilt Runs are laid out in a few reused slabs, each free again once its pieces are written.
    const outputs = new OutputSlabs(RUN_SLAB_BYTES, RUN_SLABS);
    const decoder = channelDecoder(
      (bytes) => {
        if (destination.writableEnded) return; // the destination closed the channel: nobody reads on
        if (!destination.write(bytes, outputs.releaser(bytes))) {
          this.holdPeer();
        } else if (outputs.exhausted) {
          // The socket took it all, but its slabs are not free yet: let the event loop run first.
          this.holdPeer();
          setImmediate(() => this.readPeerOn());
        }
      },
      multifd,
      (size) => outputs.take(size),
      this.receiver.checked === true,
    );
    // Let go from within another channel's codec: read on outside it.
    decoder.onReadOn = () => setImmediate(() => this.readPeerOn());
    this.decoder = decoder;
    destination.setTimeout(CONNECT_TIMEOUT_MS, () => this.fail(`${this.label}: destination ${group.target} did not answer in time`));
    destination.once('connect', () => {
      destination.setTimeout(0);
      const early = this.early;
      this.early = null;
      if (early !== null) this.onPeerData(early, false);
      this.readPeerOn();
    });
    destination.on('drain', () => this.readPeerOn());
    // Verbatim for now: a QEMU sends nothing back on these channels today.
    destination.on('data', (chunk: Buffer) => {
      this.peer.write(frameHeader(FrameType.Return, chunk.length));
      this.peer.write(chunk);
    });
    destination.on('end', () => {
      if (this.over || this.ended) return;
      this.ended = true;
      this.peer.end(encodeJson(FrameType.End, { streamBytes: decoder.streamBytes, streamCheck: decoder.streamCheck }));
      destination.end();
    });
    destination.on('error', (err) => this.fail(`destination ${this.label}: ${err.message}`));
    destination.on('close', () => {
      if (!this.ended) this.fail(`destination closed ${this.label}`);
    });
  }

  /** Stops taking the peer's frames: the destination's backpressure, or the codec parked. */
  private holdPeer(): void {
    this.frames.pause();
    this.peer.pause();
  }

  /**
   * A batch of whole frames (Feature.ChannelCompressedFrames): checked whole and its Runs' and Deltas'
   * pages read ahead as it arrived (BatchesAhead), then its frames delivered one by one before the
   * frames after it.
   */
  private onCompressedFrames(payload: Buffer): void {
    if (!this.inflater) throw new ProtocolViolation('unexpected-frame', 'a CompressedFrames frame, but compression was not chosen');
    if (this.batches.nest(this.inflater, payload, this.frames, this.lookIntoBatch)) this.decoder?.prefetchAhead?.();
  }

  /** Shows the codec a frame a batch carries, if it is a Run or a Delta (see lookAhead). */
  private readonly lookIntoBatch = (type: FrameType, bytes: Buffer, at: number, length: number): boolean => {
    if (type !== FrameType.Run && type !== FrameType.Delta && type !== FrameType.SiblingDelta) return false;
    this.lookAhead(type, bytes.subarray(at, at + Math.min(length, CHANNEL_AHEAD_BYTES)), length);
    return true;
  };

  /** Shows the codec a Run or a Delta it will rebuild soon (`head`: its payload's first bytes, `length`: the payload's): its pages are read ahead. */
  private lookAhead(type: FrameType, head: Buffer, length: number): void {
    if (type === FrameType.Run) this.decoder?.aheadOfRun?.(head, length);
    else if (type === FrameType.Delta) this.decoder?.aheadOfDelta?.(head, length);
    else this.decoder?.aheadOfSibling?.(head, length);
  }

  /** Takes the peer's frames again once neither the destination nor the codec holds them back. */
  private readPeerOn(): void {
    if (this.over || this.parked || this.destination?.writableNeedDrain) return;
    try {
      // The frames held back are rebuilt here, outside onPeerData: corked as there.
      this.rebuildCorked(() => this.frames.resume());
    } catch (err) {
      return this.fail(`peer ${this.label}: ${errorMessage(err)}`);
    }
    if (this.frames.isPaused) return;
    this.peer.resume();
    if (this.peerGone && !this.ended && !this.endPending) this.fail(`the sending gateway closed ${this.label} before its end`);
  }

  /** `carried`: the frame came in a CompressedFrames batch (checkCarriedFrames let only stream data in). */
  private onFrame(type: FrameType, payload: Buffer, carried: boolean): void {
    if (this.over) return;
    const decoder = this.decoder as ChannelDecoder; // frames are read from the dial on
    switch (type) {
      case FrameType.Literal:
        // A raw Literal frame restarts the stream only where batches are of Literal bytes (Compressed).
        if (!carried) this.inflater?.rawLiteral();
        decoder.literal(payload);
        break;
      case FrameType.Compressed:
        if (!this.inflater) throw new ProtocolViolation('unexpected-frame', 'a Compressed frame, but compression was not chosen');
        if (this.inflater.framed) throw new ProtocolViolation('unexpected-frame', `a Compressed frame on ${this.label} after CompressedFrames`);
        decoder.literal(this.inflater.inflate(payload));
        break;
      case FrameType.CompressedFrames:
        this.onCompressedFrames(payload);
        break;
      case FrameType.Run:
        decoder.run(payload);
        break;
      case FrameType.Delta:
        // Offered (Feature.ChannelDeltas) wherever this gateway keeps a store; a verbatim channel takes none.
        if (!decoder.delta) throw new ProtocolViolation('unexpected-frame', `a Delta frame on ${this.label}, which is relayed as it is`);
        decoder.delta(payload);
        break;
      case FrameType.SiblingDelta:
        // Offered (Feature.ChannelSiblings) where this gateway pinned siblings; a verbatim channel takes none.
        if (!decoder.siblingDelta) throw new ProtocolViolation('unexpected-frame', `a SiblingDelta frame on ${this.label}, which is relayed as it is`);
        decoder.siblingDelta(payload);
        break;
      case FrameType.KeepVersion:
        // Offered (Feature.ChannelEarlierBases) wherever this gateway keeps a store; a verbatim channel takes none.
        if (!decoder.keepVersion) throw new ProtocolViolation('unexpected-frame', `a KeepVersion frame on ${this.label}, which is relayed as it is`);
        decoder.keepVersion(payload);
        break;
      case FrameType.PacketHeader:
        // Offered (Feature.ChannelPacketHeaders) where the handshake chose compression; a verbatim channel takes none.
        if (!decoder.packetHeader) throw new ProtocolViolation('unexpected-frame', `a PacketHeader frame on ${this.label}, which is relayed as it is`);
        decoder.packetHeader(payload);
        break;
      case FrameType.Seal: {
        const seal = decodePayload(decodeSeal, payload);
        decoder.check(seal.streamBytes, peerText(seal.streamCheck));
        break;
      }
      case FrameType.End:
        this.onEnd(decoder, payload);
        return;
      case FrameType.Abort:
        this.fail(`the sending gateway aborted ${this.label}: ${peerText(decodePayload(decodeAbort, payload).error)}`);
        return;
      default:
        throw new ProtocolViolation('unexpected-frame', `unexpected frame type ${type} on an extra channel`);
    }
    if (this.parked) this.holdPeer();
  }

  /** The codec takes no frame now: parked at a SYNC, unless the check of that SYNC packet is due (it comes next). */
  private get parked(): boolean {
    const decoder = this.decoder;
    return decoder !== null && decoder.parked && decoder.checkDue !== true;
  }

  protected get streamBytes(): number {
    return this.decoder?.streamBytes ?? 0;
  }

  private onEnd(decoder: ChannelDecoder, payload: Buffer): void {
    const end = decodePayload(decodeSeal, payload);
    this.endPending = true;
    decoder.end(end.streamBytes, peerText(end.streamCheck), () => {
      this.endPending = false;
      this.options.group.compressionSavedBytes += (this.inflater?.savedBytes ?? 0) + (decoder.headerSavedBytes ?? 0);
      this.multifdEnded(true);
      if (!this.ended) {
        // Else the destination had closed it first.
        this.ended = true;
        const destination = this.destination as Socket;
        destination.end(() => this.peer.end());
      }
      // The sender may have closed its connection while the End waited.
      if (this.peer.destroyed) this.finish();
    });
  }

  protected cut(): void {
    this.destination?.resetAndDestroy();
    this.peer.destroy();
  }
}
