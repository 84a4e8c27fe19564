/**
 * A migration's extra channels (multifd, postcopy-preempt) across the WAN: one peer connection per
 * channel, whose Hello names the migration and the channel (protocol 5). The sending side reads the
 * source QEMU's channel through a ChannelEncoder into Literal frames and ends with End (the channel's
 * length and XXH3-64); the receiving side dials the destination QEMU once the main channel's
 * destination has answered (QEMU takes the main channel first), writes what its ChannelDecoder
 * rebuilds, checks End, and returns what the destination sends back as Return frames (passed on as
 * they are). Anything wrong on one channel fails its whole migration (ChannelGroup.fail).
 */
import { connect, type Socket } from 'node:net';
import { errorMessage } from '../common/errors';
import { type ChannelDecoder, type ChannelEncoder, VerbatimChannelDecoder, VerbatimChannelEncoder } from '../proxy/channel-codec';
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

export interface ChannelSenderOptions extends RelayOptions {
  site: string;
  route: RouteConfig;
  transport: PeerTransport;
}

/** Bytes a relay lets queue on its outgoing socket before it stops reading the other one. */
const RELAY_QUEUE_BYTES = 1024 * 1024;

/** What both relays share: their group, and how a channel ends (cleanly, or failing its migration). */
abstract class ChannelRelay implements ExtraChannel {
  protected over = false;
  /** The channel ended cleanly on one side (its End was sent or taken): its connections close next. */
  protected ended = false;

  constructor(protected readonly options: RelayOptions) {}

  /** Dials onward once the group's main channel is connected; `dial` sets the relay going. */
  protected whenReady(dial: () => void): void {
    this.options.group.whenReady().then(
      () => {
        if (!this.over) dial();
      },
      (err: unknown) => this.abort(errorMessage(err)),
    );
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
    this.cut();
    this.options.group.left(this);
    this.options.over?.({ completed: false, error: reason, streamBytes: this.streamBytes });
  }

  /** Both connections closed after the channel ended cleanly. */
  protected finish(): void {
    if (this.over) return;
    this.over = true;
    this.options.group.left(this);
    this.options.over?.({ completed: true, error: null, streamBytes: this.streamBytes });
  }

  /** Bytes of QEMU's stream this channel carried towards the destination. */
  protected abstract get streamBytes(): number;

  /**
   * Feeds the peer gateway's bytes to `frames`; a frame it cannot take, an error, or the connection
   * closing before the channel ended fails the migration.
   */
  protected readPeer(peer: Socket, frames: FrameParser, who: string): void {
    peer.on('data', (chunk: Buffer) => {
      try {
        frames.push(chunk);
      } catch (err) {
        this.fail(`peer ${this.label}: ${errorMessage(err)}`);
      }
    });
    peer.on('error', (err) => this.fail(`peer ${this.label}: ${err.message}`));
    peer.on('close', () => {
      if (this.ended) this.finish();
      else this.fail(`${who} closed ${this.label} before its end`);
    });
  }

  /** Resets both of the channel's connections. */
  protected abstract cut(): void;

  protected get label(): string {
    return channelLabel(this.options.channel);
  }
}

/** Sending side: the source QEMU's channel → the peer gateway. */
export class ChannelSender extends ChannelRelay {
  private peer: Socket | null = null;
  private readonly frames: FrameParser;
  private readonly encoder: ChannelEncoder;

  constructor(
    /** The source QEMU's channel, paused, its first bytes put back. */
    private readonly source: Socket,
    private readonly sender: ChannelSenderOptions,
  ) {
    super(sender);
    this.frames = new FrameParser((type, payload) => this.onFrame(type, payload));
    this.frames.maxPayload = sender.maxFrameBytes;
    this.encoder = new VerbatimChannelEncoder({
      literal: (bytes) => {
        const peer = this.peer as Socket;
        peer.write(frameHeader(FrameType.Literal, bytes.length));
        peer.write(bytes);
      },
    });
  }

  /** Dials the peer once the main channel's peer has offered, then relays. Called once the channel has joined its group. */
  start(): void {
    this.source.on('error', (err) => this.fail(`source ${this.label}: ${err.message}`));
    this.source.on('close', () => {
      if (!this.ended) this.fail(`the source closed ${this.label} before its end`);
    });
    this.whenReady(() => this.dial());
  }

  private dial(): void {
    const { group, channel, route, transport, site } = this.sender;
    const peer = transport.connect(route.peer, () => {
      peer.setTimeout(0);
      const hello: HelloMessage = { protocol: PROTOCOL_VERSION, site, vm: group.vm, target: formatEndpoint(route.target), migration: group.migration, channel };
      peer.write(encodeJson(FrameType.Hello, hello));
      this.source.on('data', (chunk: Buffer) => {
        if (this.ended) return; // the destination has closed the channel: nobody reads on
        peer.cork();
        this.encoder.push(chunk);
        peer.uncork();
        if (peer.writableLength >= RELAY_QUEUE_BYTES) this.source.pause();
      });
      this.source.on('end', () => this.onSourceEnd());
      this.source.resume();
    });
    this.peer = peer;
    peer.setNoDelay(true);
    peer.setTimeout(CONNECT_TIMEOUT_MS, () => this.fail(`${this.label}: the peer gateway did not answer in time`));
    peer.on('drain', () => {
      if (!this.over) this.source.resume();
    });
    this.readPeer(peer, this.frames, 'the peer gateway');
  }

  private onFrame(type: FrameType, payload: Buffer): void {
    if (type === FrameType.Return) {
      if (this.source.writable) this.source.write(payload);
      return;
    }
    if (type === FrameType.End) {
      // The destination closed the channel (QEMU does once it is done with it): so does the source's.
      this.ended = true;
      this.source.end();
      this.peer?.end();
      return;
    }
    if (type === FrameType.Abort) return this.fail(`the peer gateway aborted ${this.label}: ${peerText(decodePayload(decodeAbort, payload).error)}`);
    throw new ProtocolViolation('unexpected-frame', `unexpected frame type ${type} on an extra channel`);
  }

  /** QEMU closed the channel: the peer hears how long it was and its check, then the connection closes. */
  private onSourceEnd(): void {
    const peer = this.peer;
    if (this.over || this.ended || !peer) return;
    this.ended = true;
    peer.end(encodeJson(FrameType.End, { streamBytes: this.encoder.streamBytes, streamCheck: this.encoder.streamCheck }));
    this.source.end();
  }

  protected cut(): void {
    this.source.resetAndDestroy();
    this.peer?.destroy();
  }

  protected get streamBytes(): number {
    return this.encoder.streamBytes;
  }
}

/** Receiving side: the peer gateway's channel → the destination QEMU. */
export class ChannelReceiver extends ChannelRelay {
  private destination: Socket | null = null;
  private readonly frames: FrameParser;
  private readonly decoder: ChannelDecoder;

  constructor(
    /** The peer gateway's connection, paused, its Hello put back. */
    private readonly peer: Socket,
    options: RelayOptions,
  ) {
    super(options);
    // The Hello (already checked) comes first again; Literal bytes pass through as they arrive.
    let hello = true;
    this.frames = new FrameParser(
      (type, payload) => {
        if (hello && type === FrameType.Hello) hello = false;
        else this.onFrame(type, payload);
      },
      (type) => type === FrameType.Literal,
    );
    this.frames.maxPayload = options.maxFrameBytes;
    this.decoder = new VerbatimChannelDecoder((bytes) => {
      const destination = this.destination as Socket;
      if (destination.writableEnded) return; // the destination closed the channel: nobody reads on
      if (!destination.write(bytes)) {
        this.frames.pause();
        this.peer.pause();
      }
    });
  }

  /** Dials the destination once the main channel's destination has answered, then relays. Called once the channel has joined its group. */
  start(): void {
    this.readPeer(this.peer, this.frames, 'the sending gateway');
    this.whenReady(() => this.dial());
  }

  private dial(): void {
    const { group } = this.options;
    const target = parseEndpoint(group.target);
    // Half-open: a destination that closes its side (QEMU does once it is done with the channel) is told
    // to the sender, and the connection closes once the sender has closed its own.
    const destination = connect({ host: target.host, port: target.port, noDelay: true, allowHalfOpen: true });
    this.destination = destination;
    destination.setTimeout(CONNECT_TIMEOUT_MS, () => this.fail(`${this.label}: destination ${group.target} did not answer in time`));
    destination.once('connect', () => {
      destination.setTimeout(0);
      this.peer.resume();
    });
    destination.on('drain', () => {
      if (this.over) return;
      try {
        this.frames.resume();
      } catch (err) {
        return this.fail(`peer ${this.label}: ${errorMessage(err)}`);
      }
      if (!this.frames.isPaused) this.peer.resume();
    });
    // Verbatim for now: a QEMU sends nothing back on these channels today.
    destination.on('data', (chunk: Buffer) => {
      this.peer.write(frameHeader(FrameType.Return, chunk.length));
      this.peer.write(chunk);
    });
    destination.on('end', () => {
      if (this.over || this.ended) return;
      this.ended = true;
      this.peer.end(encodeJson(FrameType.End, { streamBytes: this.decoder.streamBytes, streamCheck: this.decoder.streamCheck }));
      destination.end();
    });
    destination.on('error', (err) => this.fail(`destination ${this.label}: ${err.message}`));
    destination.on('close', () => {
      if (!this.ended) this.fail(`destination closed ${this.label}`);
    });
  }

  private onFrame(type: FrameType, payload: Buffer): void {
    if (this.over) return;
    switch (type) {
      case FrameType.Literal:
        this.decoder.literal(payload);
        return;
      case FrameType.End:
        this.onEnd(payload);
        return;
      case FrameType.Abort:
        this.fail(`the sending gateway aborted ${this.label}: ${peerText(decodePayload(decodeAbort, payload).error)}`);
        return;
      default:
        throw new ProtocolViolation('unexpected-frame', `unexpected frame type ${type} on an extra channel`);
    }
  }

  protected get streamBytes(): number {
    return this.decoder.streamBytes;
  }

  private onEnd(payload: Buffer): void {
    const end = decodePayload(decodeSeal, payload);
    const { streamBytes, streamCheck } = this.decoder;
    if (end.streamBytes !== streamBytes || end.streamCheck !== streamCheck) {
      throw new ProtocolViolation('bad-payload', `${this.label}: ${streamBytes} bytes (XXH3-64 ${streamCheck}) passed on, the sender read ${end.streamBytes} (${peerText(end.streamCheck)})`);
    }
    if (this.ended) return; // the destination had closed it first
    this.ended = true;
    const destination = this.destination as Socket;
    destination.end(() => this.peer.end());
  }

  protected cut(): void {
    this.destination?.resetAndDestroy();
    this.peer.destroy();
  }
}
