import type { Socket } from 'node:net';
import type { Endpoint } from './address';
import { StreamDecoder } from '../proxy/decoder';
import type { PageLayout } from '../proxy/retained';
import type { UndoableStore } from '../store';
import { OutputSlabs } from './output-slabs';
import { ReturnPathMessages, STREAM_HEADER_BYTES } from './return-path-relay';
import { CONNECT_TIMEOUT_MS } from './session';
import { connectWithQueue } from './socket-tuning';

/**
 * The destination's write queue may hold this much before the frame parser pauses. Node's default
 * (16 KiB) paused it within nearly every read from the peer (256 KiB), and a paused parser copies the
 * rest of that read out of the reused read buffer.
 */
const DEST_QUEUE_BYTES = 1024 * 1024;
/** How long a postcopy destination has to read what it was handed once the migration failed. */
const HANG_UP_MS = 30_000;

/** What the destination writer tells its receiving session. */
export interface DestinationEvents {
  /** The destination answered: the decoder is ready, the peer may be offered the migration. */
  connected(): void;
  /** The destination failed, or closed, before it had been handed the whole stream. */
  failed(reason: string): void;
  /** Stop feeding frames: the destination's queue is full, or every output slab is out. */
  pause(): void;
  /** Frames may flow again. */
  resume(): void;
  /** Bytes the destination sent back, unchecked (see returnMessages()). */
  returned(chunk: Buffer): void;
  /** The decoder knows the RAM layout: the store has begun the migration. */
  layout(layout: PageLayout): void;
}

/**
 * The receiving side's connection to the destination QEMU and the StreamDecoder that feeds it. The
 * decoder holds the stream's device-state tail back until the sender's Seal or End check has passed,
 * so a destination that closes before it has been handed the whole stream is a failure, and one that
 * closes after it is not. Rebuilt Runs and pages are laid out in reused slabs, each free again once its
 * pieces are written.
 */
export class DestinationWriter {
  readonly socket: Socket;
  /** Rebuilds the stream from the peer's frames; null until the destination has answered. */
  decoder: StreamDecoder | null = null;
  /** Stream bytes handed to the socket. */
  private given = 0;
  private closed = false;
  /** Why the connection broke once the stream was delivered (a reset, mostly), else null. */
  private brokeAfterDelivery: string | null = null;
  /** Called once the destination has closed its side: a stream relayed verbatim waits for that. */
  private whenClosed: (() => void) | null = null;
  private readonly outputs = new OutputSlabs();
  private readonly returnPath = new ReturnPathMessages();

  constructor(
    target: Endpoint,
    /** The destination as the peer named it, for messages. */
    private readonly name: string,
    retained: UndoableStore | null,
    private readonly events: DestinationEvents,
  ) {
    const socket = connectWithQueue({ ...target, noDelay: true }, DEST_QUEUE_BYTES);
    this.socket = socket;
    socket.setTimeout(CONNECT_TIMEOUT_MS, () => events.failed(`destination ${name} did not answer in time`));
    socket.on('error', (err) => {
      if (!this.delivered) events.failed(`destination ${name}: ${err.message}`);
      else this.brokeAfterDelivery ??= err.message;
    });
    socket.on('close', () => {
      this.closed = true;
      if (!this.delivered) events.failed(`destination ${name} closed the connection`);
      else this.whenClosed?.();
    });
    socket.on('drain', () => events.resume());
    socket.on('data', (chunk: Buffer) => events.returned(chunk));
    socket.on('connect', () => {
      socket.setTimeout(0);
      this.decoder = new StreamDecoder(
        (bytes) => this.write(bytes),
        retained,
        (layout) => events.layout(layout),
        (size) => this.outputs.take(size),
      );
      events.connected();
    });
  }

  /** The decoder has handed over the whole stream, checked. */
  get delivered(): boolean {
    return this.decoder?.delivered === true;
  }

  private write(bytes: Buffer): void {
    if (bytes.length === 0) return;
    this.given += bytes.length;
    if (!this.socket.write(bytes, this.outputs.releaser(bytes))) {
      this.events.pause(); // 'drain' resumes
    } else if (this.outputs.exhausted) {
      // The socket took it all, but its buffers are not free yet: let the event loop run first.
      this.events.pause();
      setImmediate(() => this.events.resume());
    }
  }

  /**
   * The whole return-path messages among what the destination sent (null while none is complete). A
   * QEMU only ever answers a stream: bytes before it has been handed the stream's header throw.
   */
  returnMessages(chunk: Buffer): Buffer | null {
    if (this.given < STREAM_HEADER_BYTES) throw new Error(`the destination sent ${chunk.length} bytes before the stream began: not a QEMU waiting for a migration`);
    return this.returnPath.check(chunk);
  }

  /**
   * Calls `accepted` once the destination has every byte and has not refused them, else tells the
   * session it failed. A stream parsed whole was checked end to end, so the destination having every
   * byte is enough. A stream relayed verbatim was not: the gateways cannot tell a whole stream from a
   * garbled or cut one, and its socket takes megabytes before QEMU has read the first bad byte. Its
   * destination's own verdict decides: a QEMU that loaded it closes its side, and one that refused it
   * exits with bytes unread, which resets the connection. Where QEMU's return path is on, its SHUT says
   * the same of any stream.
   */
  end(accepted: () => void): void {
    const verdict = (): void => {
      const refusal = this.refusal();
      if (refusal === null) accepted();
      else this.events.failed(refusal);
    };
    if (this.closed) verdict();
    else if (this.decoder?.fallback) {
      this.whenClosed = verdict;
      this.socket.end();
    } else this.socket.end(verdict);
  }

  /** Why the destination refused what it was handed, as far as it said; null if it did not. */
  private refusal(): string | null {
    const shut = this.returnPath.shutValue;
    if (shut !== null && shut !== 0) return `destination ${this.name} could not load the stream (its return path's SHUT said ${shut})`;
    if (this.brokeAfterDelivery !== null && this.decoder?.fallback) {
      return `destination ${this.name} refused the stream relayed verbatim (${this.brokeAfterDelivery})`;
    }
    return null;
  }

  /** Reset, not end: the destination must see a broken stream, never a short one that parses. */
  reset(): void {
    this.socket.resetAndDestroy();
  }

  /**
   * The migration failed after the destination was handed a checked postcopy package: it runs the
   * guest, and the source cannot take it back. A reset would throw away whatever of the package the
   * destination had not read yet (a peer's reset discards its unread bytes), and a destination that
   * cannot load its package fails the migration for good; an end lets it read all it was handed, run,
   * and pause at the end of its stream for QEMU's postcopy recovery. No short stream can parse here:
   * a postcopy destination that loses its stream before the source's end pauses.
   */
  hangUpRunning(): void {
    this.socket.end();
    // A destination that no longer reads must not hold the socket open.
    setTimeout(() => this.socket.destroy(), HANG_UP_MS).unref();
  }
}
