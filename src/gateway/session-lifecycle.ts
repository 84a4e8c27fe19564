import type { Socket } from 'node:net';
import { errorMessage } from '../common/errors';
import type { StreamFallback } from '../qemu/records';
import { type PageIo, PageStore, UndoableStore } from '../store';
import { saveMigrationRecord } from '../store/migration-record';
import { encodeJson, FrameType } from '../wire/frames';
import { type CountingCodec, type Direction, migrationCounts, migrationFallback, migrationReport, NO_STORE_IO, PROGRESS_INTERVAL_MS, type ReuseMode, type SessionObserver, settleStore } from './session';
import { noteStoreError } from './store-space';

/** The moves a session's phase may make: from each phase, the phases it may go to next. */
export type PhaseMoves<P extends string> = Readonly<Record<P, readonly P[]>>;

/** `to`, when `moves` allows going there from `from`; any other move is a bug in the session. */
export function checkedMove<P extends string>(direction: Direction, moves: PhaseMoves<P>, from: P, to: P): P {
  if (!moves[from].includes(to)) throw new Error(`${direction} session: no move from ${from} to ${to}`);
  return to;
}

/**
 * What a session's codec tells the lifecycle: its counts, the RAM layout once it knows it, whether (and
 * where) it relayed the stream verbatim, whether the migration switched to postcopy.
 */
interface Codec extends CountingCodec {
  readonly layout: { pageCount: number; pageSize: number } | null;
  readonly fallback: StreamFallback | null;
  readonly postcopy: boolean;
}

export interface LifecycleOptions {
  storeRoot: string;
  observer: SessionObserver;
  /** Largest guest a stream may declare, in pages (limits.maxGuestRam). */
  maxGuestPages: number;
}

/**
 * What both directions of a migration do the same way around their protocol: open the VM's store,
 * count the WAN bytes, tick progress, abort the peer with a reason, roll the store back or settle it,
 * close it and report the outcome to the observer once.
 */
export class SessionLifecycle {
  readonly done: Promise<void>;
  private resolveDone!: () => void;
  private readonly started = Date.now();
  private readonly timer: NodeJS.Timeout;
  private ended = false;
  private verbatimTold = false;
  /** The VM's store, while this migration may retain pages (null when retention is off). */
  store: PageStore | null = null;
  /** The store as the codec writes it: a failed migration puts back the snapshot it started from. */
  retained: UndoableStore | null = null;
  /** Bytes sent to and received from the peer gateway, frames included. */
  wanOut = 0;
  wanIn = 0;
  /** What compression kept off the WAN, as the session's LiteralFrames or LiteralInflater counts it. */
  compressionSaved: () => number = () => 0;

  constructor(
    readonly direction: Direction,
    /** The VM migrating; a receiving session learns it from the Hello. */
    public vm: string,
    private readonly options: LifecycleOptions,
    /** Called about once a second until the end, and once more at it. */
    private readonly progress: () => void,
  ) {
    this.done = new Promise((resolve) => (this.resolveDone = resolve));
    this.timer = setInterval(progress, PROGRESS_INTERVAL_MS);
  }

  event(message: string, fields?: Record<string, unknown>): void {
    this.options.observer.event(this.vm, this.direction, message, fields);
  }

  /** Opens the VM's store, unless retention is off for it (its filesystem is full): then it is left as it is. */
  openStore(): void {
    if (!this.options.observer.retains(this.vm, this.direction)) return;
    this.store = PageStore.open(this.options.storeRoot, this.vm, { maxPages: this.options.maxGuestPages });
    this.retained = new UndoableStore(this.store);
    // Correct all the same, only slower: said, so that an operator can raise the limit.
    if (this.store.kernelReadsRefused) this.event('store reads ahead with threads: the kernel refused an AIO context (raise fs.aio-max-nr)');
  }

  /** The store has just begun a migration (the codec knows the layout): the gateway keeps it within budget. */
  storeGrows(): void {
    this.options.observer.storeGrows(this.vm, this.retained);
  }

  /**
   * Tells the observer the totals so far: the codec's counters (zero before it exists) and the WAN
   * bytes this direction moves (out when sending, in when receiving).
   */
  tellProgress(phase: string, codec: Codec | null): void {
    // A copy, once a second: the codecs' counters move on, the tick stays what it was.
    const counts = migrationCounts(codec);
    this.options.observer.progress(this.vm, this.direction, {
      phase,
      startedAt: this.started,
      streamBytes: counts.streamBytes,
      wanBytes: this.direction === 'send' ? this.wanOut : this.wanIn,
      counts,
      layout: codec?.layout ?? null,
      storeIo: this.storeIo(),
    });
  }

  /** Tells the observer, once, as soon as the codec has fallen back to relaying the stream as it is. */
  noteVerbatim(codec: Codec): void {
    if (this.verbatimTold) return;
    const fallback = migrationFallback(codec);
    if (fallback === null) return;
    this.verbatimTold = true;
    this.options.observer.relayedVerbatim(this.vm, this.direction, fallback);
  }

  /** A store write that failed for lack of space turns retention off for this VM until there is room. */
  storeError(err: unknown, codec: Codec | null): void {
    noteStoreError(this.options.observer, this.vm, this.direction, codec?.layout, err);
  }

  /**
   * Tells the peer why with an Abort and closes, or destroys a connection that cannot be written. A peer
   * that does not read its Abort does not keep the connection. `readOn`: read on meanwhile (a paused
   * socket never sees the peer's FIN).
   */
  abortPeer(peer: Socket, reason: string, readOn: boolean): void {
    if (!peer.destroyed && peer.writable) {
      peer.end(encodeJson(FrameType.Abort, { error: reason }));
      if (readOn) peer.resume();
      setTimeout(() => peer.destroy(), 1000).unref();
    } else {
      peer.destroy();
    }
  }

  /** A failed migration: the store puts back the snapshot it started from. */
  rollBack(): void {
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
  }

  /**
   * Before settle(): the store's pages made durable in the thread pool, so that settle()'s synchronous
   * file operations do not hold this gateway's main thread (and every other migration through it) while
   * the file system commits a large write phase. Never rejects: a failure here is met again, and
   * reported, by settle().
   */
  async syncStoreInBackground(): Promise<void> {
    try {
      await this.store?.syncInBackground();
    } catch {
      // settle() fsyncs again and says what failed.
    }
  }

  /** A completed migration: see settleStore(). Returns the snapshot the store now claims, or null. */
  settle(codec: (NonNullable<Parameters<typeof settleStore>[2]> & Codec) | null, snapshotId: string | null): string | null {
    return settleStore(this.store, this.retained, codec, snapshotId, (what, err) => {
      this.storeError(err, codec);
      this.event(what, { error: errorMessage(err) });
    });
  }

  /** The migration is over: a last progress tick, the store closed, the observer told. Once. */
  report(codec: Codec | null, outcome: { result: 'completed' | 'failed'; error: string | null; mode: ReuseMode; snapshotId: string | null }): void {
    // A multifd channel relayed as it is (its packets compressed) is said once, like the main channel.
    if (codec) this.noteVerbatim(codec);
    this.end();
    this.progress();
    try {
      // What `bfmig snapshots` says of this VM's last migration, the stream relayed verbatim included.
      if (this.store) {
        saveMigrationRecord(this.store, {
          at: new Date().toISOString(),
          direction: this.direction,
          result: outcome.result,
          error: outcome.error,
          snapshotId: this.store.snapshotId(),
          kept: outcome.snapshotId !== null,
          verbatim: migrationFallback(codec),
          postcopy: codec?.postcopy ?? false,
        });
      }
    } catch (err) {
      this.event('store note of the migration failed', { error: errorMessage(err) });
    }
    const storeIo = this.storeIo(); // read before the store closes
    try {
      this.store?.close();
    } catch (err) {
      // The files are closed anyway and the store claims nothing; its next open() recovers it.
      this.storeError(err, codec);
      this.event('store close failed', { error: errorMessage(err) });
    }
    this.options.observer.finished(
      migrationReport({ vm: this.vm, direction: this.direction, startedAt: this.started, wanBytesOut: this.wanOut, wanBytesIn: this.wanIn, compressionSavedBytes: this.compressionSaved(), storeIo }, codec, outcome),
    );
    this.resolveDone();
  }

  /** The connection was refused before a migration began: nothing to report to the observer. */
  endUnreported(): void {
    this.end();
    this.resolveDone();
  }

  /** What the VM's store has read and written so far in this migration (open until report() closes it). */
  private storeIo(): PageIo {
    return this.store?.pageIo ?? NO_STORE_IO;
  }

  private end(): void {
    if (this.ended) throw new Error(`${this.direction} session ended twice`);
    this.ended = true;
    clearInterval(this.timer);
  }
}
