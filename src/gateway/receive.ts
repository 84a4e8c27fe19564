import type { Socket } from 'node:net';
import { TLSSocket } from 'node:tls';
import { type Endpoint, parseEndpoint } from './address';
import { StreamDecoder } from '../proxy/decoder';
import { PageStore, UndoableStore, validateVmName } from '../store';
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
  MAX_HANDSHAKE_PAYLOAD,
  PROTOCOL_VERSION,
} from '../wire/frames';
import { ReturnPathMessages, STREAM_HEADER_BYTES } from './return-path-relay';
import { Refusal, type RefusalReason } from './limits';
import { type PooledDownstream, PooledReads } from './pooled-reads';
import { errorMessage } from '../common/errors';
import { decodePayload, ProtocolViolation, refusalReason } from './protocol-violation';
import { CONNECT_TIMEOUT_MS, IdleWatch, migrationReport, peerText, PROGRESS_INTERVAL_MS, type SessionObserver, settleStore, TABLE_FRAME_BYTES } from './session';
import { connectWithQueue } from './socket-tuning';
import { noteStoreError } from './store-space';
import { OutputSlabs } from './output-slabs';

/**
 * The destination's write queue may hold this much before the frame parser pauses. Node's default
 * (16 KiB) paused it within nearly every read from the peer (256 KiB), and a paused parser copies the
 * rest of that read out of the reused read buffer.
 */
const DEST_QUEUE_BYTES = 1024 * 1024;
/** The digest table is queued for the peer no further ahead than this. */
const TABLE_QUEUE_BYTES = 2 * 1024 * 1024;

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
  busy: Set<string>;
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
}

/**
 * One incoming migration: a peer gateway's frames, rebuilt into the exact QEMU stream for the
 * destination. Any failure resets the destination's connection before a wrong byte could reach it,
 * and leaves the store claiming no snapshot.
 */
export class ReceiveSession {
  readonly done: Promise<void>;
  private resolveDone!: () => void;
  private vm = '?';
  private readonly started = Date.now();
  private readonly frames: FrameParser;
  private dest: Socket | null = null;
  private store: PageStore | null = null;
  /** The store as the codec writes it: a failed migration puts back the snapshot it started from. */
  private retained: UndoableStore | null = null;
  private decoder: StreamDecoder | null = null;
  private holdsVm = false;
  private tableSent = false;
  /** Stream bytes handed to the destination's socket. */
  private destGiven = 0;
  private readonly returnPath = new ReturnPathMessages();
  /** Bytes of the digest table queued for the peer so far; -1 until it asks (once per migration). */
  private tableQueued = -1;
  /** Buffers for rebuilt Runs, reused once the destination socket has written them. */
  private readonly outputs = new OutputSlabs();
  private destClosed = false;
  private ending = false;
  private finished = false;
  private wanOut = 0;
  private wanIn = 0;
  private readonly timer: NodeJS.Timeout;
  private readonly handshakeTimer: NodeJS.Timeout;
  private readonly idle: IdleWatch;

  /** The peer gateway's connection as this session reads it (plain TCP: adopted by PooledReads). */
  readonly peer: Socket;

  constructor(
    accepted: Socket,
    private readonly options: ReceiveOptions,
  ) {
    this.done = new Promise((resolve) => (this.resolveDone = resolve));
    this.handshakeTimer = setTimeout(
      () => this.fail('no valid Hello from the peer in time', 'handshake-timeout'),
      Math.max(0, options.handshakeDeadline - Date.now()),
    );
    this.idle = new IdleWatch(options.idleMs);
    // Literal bytes pass through as they arrive; only control frames and Runs are assembled.
    this.frames = new FrameParser(
      (type, payload) => this.onFrame(type, payload),
      (type) => type === FrameType.Literal,
    );
    // A peer that has not said who it is gets no more than a Hello's worth of buffer.
    this.frames.maxPayload = MAX_HANDSHAKE_PAYLOAD;
    // Plain TCP is read into reused buffers (a TLS socket decrypts into buffers of its own). Literal bytes
    // reach the destination as views of them: a buffer is read into again only once the destination has
    // written them (PooledReads), and the frame parser and decoder copy what they keep past a chunk.
    let pooled = false;
    let peer = accepted;
    if (!(accepted instanceof TLSSocket)) {
      const session = this;
      // Before the destination is dialled nothing is written to it: its queue is empty, every buffer
      // free, and no marker is written (PooledReads writes one only behind queued bytes).
      const destination: PooledDownstream = {
        get writableLength(): number {
          return session.dest?.writableLength ?? 0;
        },
        get writableEnded(): boolean {
          return session.dest?.writableEnded ?? false;
        },
        get destroyed(): boolean {
          return session.dest?.destroyed ?? false;
        },
        write: (chunk, callback) => (session.dest as Socket).write(chunk, callback),
      };
      const reads = new PooledReads(accepted, destination, (chunk) => this.onPeerData(chunk, reads.pooled), false);
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
    this.timer = setInterval(() => this.progress(), PROGRESS_INTERVAL_MS);
    if (pooled || peer.readableFlowing === false) peer.resume();
  }

  /** reused: the chunk's buffer is read into again after this returns. */
  private onPeerData(chunk: Buffer, reused: boolean): void {
    this.wanIn += chunk.length;
    // What this chunk rebuilds reaches the destination in one writev.
    this.dest?.cork();
    try {
      this.frames.push(chunk);
      if (reused) {
        this.frames.ownRetained();
        this.decoder?.releaseInput();
      }
    } catch (err) {
      this.framesFailed(err);
    } finally {
      this.dest?.uncork();
    }
    if (this.frames.isPaused) this.peer.pause();
  }

  /** What the frames did wrong (a ProtocolViolation, a Refusal, an oversized frame, a store error) ends the session. */
  private framesFailed(err: unknown): void {
    this.storeError(err);
    this.fail(errorMessage(err), refusalReason(err));
  }

  private event(message: string, fields?: Record<string, unknown>): void {
    this.options.observer.event(this.vm, 'receive', message, fields);
  }

  private onFrame(type: FrameType, payload: Buffer): void {
    if (this.finished) return;
    if (!this.dest && type !== FrameType.Hello) throw new ProtocolViolation('unexpected-frame', `frame type ${type} before Hello`);
    switch (type) {
      case FrameType.Hello:
        this.onHello(payload);
        return;
      case FrameType.Literal:
        this.requireDecoder().literal(payload);
        return;
      case FrameType.Run:
        this.requireDecoder().run(payload);
        return;
      case FrameType.TableRequest:
        this.sendTable();
        return;
      case FrameType.Seal: {
        const seal = decodePayload(decodeSeal, payload);
        this.requireDecoder().seal(seal.streamBytes, seal.streamCheck);
        this.event('stream sealed', { streamBytes: seal.streamBytes });
        return;
      }
      case FrameType.End: {
        const end = decodePayload(decodeEnd, payload);
        this.onEnd(end.streamBytes, end.streamCheck, end.snapshotId);
        return;
      }
      case FrameType.Abort:
        this.fail(`the sending gateway aborted: ${peerText(decodePayload(decodeAbort, payload).error)}`);
        return;
      default:
        throw new ProtocolViolation('unexpected-frame', `unexpected frame type ${type}`);
    }
  }

  private requireDecoder(): StreamDecoder {
    if (!this.decoder || this.ending) throw new ProtocolViolation('unexpected-frame', 'stream data outside a migration');
    return this.decoder;
  }

  private onHello(payload: Buffer): void {
    if (this.dest) throw new ProtocolViolation('unexpected-frame', 'a second Hello');
    const hello = decodePayload(decodeHello, payload);
    if (hello.protocol !== PROTOCOL_VERSION) throw new Refusal('protocol', `protocol ${hello.protocol}; this gateway speaks ${PROTOCOL_VERSION}`);
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
    if (this.options.busy.has(vm)) throw new Refusal('busy', `VM ${vm} is already migrating through this gateway`);
    // Accepted: from here on this is a migration of a valid VM name, reported as one.
    this.vm = vm;
    this.options.busy.add(vm);
    this.holdsVm = true;
    this.options.identified();
    clearTimeout(this.handshakeTimer);
    this.frames.maxPayload = this.options.maxFrameBytes;
    this.event('migration offered', { peerSite: hello.site, target: hello.target });
    // Without retention (its filesystem is full) the store is left as it is and the peer is offered nothing.
    if (this.options.observer.retains(vm, 'receive')) {
      this.store = PageStore.open(this.options.storeRoot, this.vm, { maxPages: this.options.maxGuestPages });
      this.retained = new UndoableStore(this.store);
    }
    const meta = this.store?.meta() ?? null;
    const dest = connectWithQueue({ ...target, noDelay: true }, DEST_QUEUE_BYTES);
    this.dest = dest;
    dest.setTimeout(CONNECT_TIMEOUT_MS, () => this.fail(`destination ${hello.target} did not answer in time`));
    // The decoder holds the stream's device-state tail back until the sender's Seal or End check has
    // passed: a destination that closes before it has been handed the whole stream is a failure.
    const delivered = (): boolean => this.decoder?.delivered === true;
    dest.on('error', (err) => {
      if (!delivered()) this.fail(`destination ${hello.target}: ${err.message}`);
    });
    dest.on('close', () => {
      this.destClosed = true;
      if (!this.finished && !delivered()) this.fail(`destination ${hello.target} closed the connection`);
    });
    dest.on('drain', () => this.resumeFrames());
    dest.on('data', (chunk: Buffer) => this.onReturnPath(chunk));
    dest.on('connect', () => {
      dest.setTimeout(0);
      this.decoder = new StreamDecoder(
        (bytes) => {
          if (bytes.length === 0) return;
          this.destGiven += bytes.length;
          const slab = this.outputs.owner(bytes);
          const release = slab ? () => this.outputs.release(slab) : undefined;
          if (!dest.write(bytes, release)) {
            this.frames.pause(); // 'drain' resumes
          } else if (this.outputs.exhausted) {
            // The socket took it all, but its buffers are not free yet: let the event loop run first.
            this.frames.pause();
            setImmediate(() => this.resumeFrames());
          }
        },
        this.retained,
        () => this.options.observer.storeGrows(this.vm, this.retained),
        (size) => this.outputs.take(size),
      );
      this.writeFrame(
        encodeJson(FrameType.Offer, {
          site: this.options.site,
          snapshotId: this.store?.snapshotId() ?? null,
          layoutId: meta?.layoutId ?? null,
          pageCount: meta?.pageCount ?? 0,
          presentPages: meta?.presentPages ?? 0,
        }),
      );
    });
  }

  /**
   * What the destination sends back goes to the source only as QEMU return-path messages, each checked
   * whole, and only once the destination has been handed the stream's header: a QEMU only ever answers
   * a stream. Anything else (a banner, a reply of some other service) ends the migration, so a peer can
   * never use this gateway to talk to whatever listens at an allowed address.
   */
  private onReturnPath(chunk: Buffer): void {
    if (this.finished) return;
    try {
      if (this.destGiven < STREAM_HEADER_BYTES) throw new Error(`the destination sent ${chunk.length} bytes before the stream began: not a QEMU waiting for a migration`);
      const bytes = this.returnPath.check(chunk);
      if (bytes === null) return;
      this.writeFrame(frameHeader(FrameType.Return, bytes.length));
      this.writeFrame(bytes);
    } catch (err) {
      this.fail(`destination: ${errorMessage(err)}`);
    }
  }

  private resumeFrames(): void {
    if (this.finished) return;
    // Frames held back while paused are delivered now, outside the 'data' handler: a bad one must
    // fail this migration here too, never escape as an uncaught exception.
    this.dest?.cork();
    try {
      this.frames.resume();
    } catch (err) {
      this.framesFailed(err);
      return;
    } finally {
      this.dest?.uncork();
    }
    if (!this.frames.isPaused) this.peer.resume();
  }

  private sendTable(): void {
    if (this.tableQueued >= 0) throw new ProtocolViolation('unexpected-frame', 'a second digest table request');
    if (!this.store || !this.decoder?.layout) throw new ProtocolViolation('unexpected-frame', 'digest table requested before the RAM layout');
    this.tableQueued = 0;
    this.pumpTable();
  }

  /**
   * Queues the digest table (16 bytes a page: a gigabyte for the largest guest) a piece at a time, only
   * while the peer reads it: a peer that stops reading holds no more than TABLE_QUEUE_BYTES of it here.
   */
  private pumpTable(): void {
    const store = this.store;
    if (!store || this.tableSent || this.tableQueued < 0 || this.finished) return;
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
    this.tableSent = true;
    this.event('digest table sent', { bytes: table.length });
  }

  private onEnd(streamBytes: number, streamCheck: string, snapshotId: string): void {
    const decoder = this.requireDecoder();
    const dest = this.dest;
    if (!dest) throw new Error('End before the destination was reached');
    decoder.end(streamBytes, streamCheck);
    this.ending = true;
    // Commit once the destination has been handed every byte.
    const commit = (): void => {
      if (this.finished) return;
      const claimed = settleStore(this.store, this.retained, decoder, snapshotId, (what, err) => {
        this.storeError(err);
        this.event(what, { error: errorMessage(err) });
      });
      this.writeFrame(encodeJson(FrameType.Done, { snapshotId, streamBytes }));
      this.finish('completed', null, claimed);
      this.peer.end();
    };
    if (this.destClosed) commit();
    else dest.end(commit);
  }

  private writeFrame(bytes: Buffer): void {
    if (this.peer.destroyed) return;
    this.wanOut += bytes.length;
    this.peer.write(bytes);
  }

  private progress(): void {
    if (this.holdsVm && !this.finished && this.idle.stalled(this.wanIn + this.wanOut + (this.decoder?.counts.streamBytes ?? 0))) {
      this.options.observer.idleTimeout(this.vm, 'receive');
      this.fail(`no bytes moved for ${this.options.idleMs / 1000} s (limits.idleSeconds)`);
      return;
    }
    if (!this.decoder) return;
    this.options.observer.progress(this.vm, 'receive', { streamBytes: this.decoder.counts.streamBytes, wanBytes: this.wanIn, counts: this.decoder.counts });
  }

  /** A store write that failed for lack of space turns retention off for this VM until there is room. */
  private storeError(err: unknown): void {
    if (this.holdsVm) noteStoreError(this.options.observer, this.vm, 'receive', this.decoder?.layout, err);
  }

  /** Ends the migration; before the Hello was accepted, `refusal` says why the connection was refused. */
  private fail(reason: string, refusal: RefusalReason = 'protocol'): void {
    if (this.finished) return;
    if (!this.holdsVm) {
      this.refuse(refusal, reason);
      return;
    }
    this.event('migration failed', { error: reason });
    // Reset, not end: the destination must see a broken stream, never a short one that parses.
    this.dest?.resetAndDestroy();
    if (!this.peer.destroyed && this.peer.writable) {
      this.peer.end(encodeJson(FrameType.Abort, { error: reason }));
      // Read on (a paused socket never sees the peer's FIN), and never wait long for a peer's close.
      this.peer.resume();
      setTimeout(() => this.peer.destroy(), 1000).unref();
    } else {
      this.peer.destroy();
    }
    const corrupted = this.retained?.corruptionFound ?? false;
    try {
      this.retained?.rollback();
    } catch (err) {
      this.event('store rollback failed', { error: errorMessage(err) });
    }
    // One corrupted page makes the whole store suspect: every present page is checked now, so that the
    // next migration is offered only pages that match their digests instead of failing on the next one.
    if (corrupted && this.store) {
      try {
        const dropped = this.store.verify();
        this.event('store verified after a corrupted page', { furtherCorruptPages: dropped.length });
      } catch (err) {
        this.event('store verify failed', { error: errorMessage(err) });
      }
    }
    this.finish('failed', reason, null);
  }

  /** Nothing was opened or dialled yet: tell the peer why, close, and report a refusal, not a migration. */
  private refuse(reason: RefusalReason, detail: string): void {
    this.finished = true;
    clearInterval(this.timer);
    clearTimeout(this.handshakeTimer);
    if (!this.peer.destroyed && this.peer.writable) {
      this.peer.end(encodeJson(FrameType.Abort, { error: detail }));
      // A peer that does not read its Abort does not keep the connection.
      setTimeout(() => this.peer.destroy(), 1000).unref();
    } else {
      this.peer.destroy();
    }
    this.options.refused(reason, detail);
    this.resolveDone();
  }

  private finish(result: 'completed' | 'failed', error: string | null, snapshotId: string | null): void {
    this.finished = true;
    clearInterval(this.timer);
    clearTimeout(this.handshakeTimer);
    this.progress();
    if (this.holdsVm) this.options.busy.delete(this.vm);
    try {
      this.store?.close();
    } catch (err) {
      // The files are closed anyway and the store claims nothing; its next open() recovers it.
      this.storeError(err);
      this.event('store close failed', { error: errorMessage(err) });
    }
    this.options.observer.finished(
      migrationReport(
        { vm: this.vm, direction: 'receive', startedAt: this.started, wanBytesOut: this.wanOut, wanBytesIn: this.wanIn },
        this.decoder?.counts,
        { result, error, mode: this.tableSent ? 'digest-table' : (this.decoder?.counts.pagesReused ?? 0) > 0 ? 'shared-snapshot' : 'none', snapshotId },
      ),
    );
    this.resolveDone();
  }
}
