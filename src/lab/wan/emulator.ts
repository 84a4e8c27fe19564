/**
 * A user-space WAN emulator: a TCP relay whose two directions are each shaped to a rate and a
 * one-way delay, for benchmarks and tests of the gateways on one machine without tc/netem or root.
 *
 * Each direction is a delay line followed by a token bucket:
 *   - a chunk read from the source socket becomes eligible `delayMs` after it arrived;
 *   - eligible bytes leave at no more than `rateMbit` (1 Mbit = 1e6 bit), with a burst of
 *     `burstBytes` (default max(128 KiB, 1 ms worth)); a chunk is split when the bucket allows part.
 * The bucket is kept as a virtual clock (GCRA: `tat`, the time the link has paid up to), which is a
 * token bucket whose refill does not depend on when the timer happens to fire: while a direction is
 * backlogged, a timer that fires late releases what was due meanwhile, so the average rate stays at
 * `rateMbit` despite Node's 1 ms timer granularity; after idling, the link has at most one burst.
 * All connections through the emulator share each direction's bucket, as connections share one WAN
 * link (a multifd migration's channels, or a gateway pair's peer connections); `perConnection` gives
 * each connection a link of its own instead.
 *
 * One timer per direction releases every due chunk at once. The queue of a direction is bounded
 * (`queueBytes`, default bandwidth-delay product + max(512 KiB, 4 bursts)): when full, the source
 * socket is paused, and it resumes once the queue has room again. The sink socket's backpressure
 * is honoured: after write() returns false nothing more is released until 'drain'.
 *
 * End of stream is relayed after the queue has drained (half-close works both ways); an error on
 * either socket resets the other, and a socket closing without a clean end destroys the other.
 *
 * Resolution: Node's timers count whole milliseconds, so bytes leave up to about 1 ms after they
 * are due, never before (bench/wan.ts: a 64-byte ping-pong through 2 × 5 ms takes ~11.0 ms).
 */
import { createServer, connect, type Server, type Socket } from 'node:net';
import { performance } from 'node:perf_hooks';
import type { Endpoint } from '../../gateway/address';
import { closeServer, listenServer, watchPair, type Pair } from './net';

export interface WanEmulatorOptions {
  listen: Endpoint;
  target: Endpoint;
  /** Rate of each direction in Mbit/s (1e6 bit/s); 0 or Infinity: unlimited. */
  rateMbit: number;
  /** One-way delay of each direction in milliseconds; 0: none. */
  delayMs: number;
  /** Give each connection the whole rate instead of sharing it (default: shared, one link). */
  perConnection?: boolean;
  /** Token bucket size in bytes; default max(128 KiB, 1 ms worth of the rate). */
  burstBytes?: number;
  /**
   * Bound of each direction's queue in bytes; default bandwidth-delay product + max(512 KiB,
   * 4 bursts), or 16 MiB when the rate is unlimited and there is a delay.
   */
  queueBytes?: number;
}

export interface DirectionStats {
  /** Bytes released to the sink so far (all connections). */
  bytes: number;
  /** Bytes waiting in the queues now (all open connections). */
  queued: number;
  /** How many times a full queue paused the reading socket. */
  pauses: number;
}

export interface WanEmulatorStats {
  /** Connections accepted so far. */
  connections: number;
  /** Connections with at least one socket still open. */
  active: number;
  forward: DirectionStats;
  backward: DirectionStats;
  rateMbit: number;
  delayMs: number;
  burstBytes: number;
  queueBytes: number;
}

/** When the bytes released forward first reached `bytes` (performance.now()); null: not yet. */
export interface ForwardMark {
  readonly bytes: number;
  reachedAt: number | null;
}

/** The shaping parameters of one direction, resolved from the options. */
interface Shape {
  /** Bytes per millisecond; Infinity: unlimited. */
  bytesPerMs: number;
  delayMs: number;
  burst: number;
  /** Pause the source when this many bytes are queued. */
  limit: number;
  /** Resume it when the queue is down to this. */
  resumeAt: number;
  /** Smallest piece the bucket releases by splitting a chunk. */
  minPiece: number;
}

const KiB = 1024;
const MiB = 1024 * KiB;
const EMPTY = Buffer.alloc(0);

export function resolveShape(o: Pick<WanEmulatorOptions, 'rateMbit' | 'delayMs' | 'burstBytes' | 'queueBytes'>): Shape {
  if (!(o.rateMbit >= 0)) throw new Error(`rateMbit must be >= 0, got ${o.rateMbit}`);
  if (!(o.delayMs >= 0) || !Number.isFinite(o.delayMs)) throw new Error(`delayMs must be a finite number >= 0, got ${o.delayMs}`);
  const unlimited = o.rateMbit === 0 || o.rateMbit === Infinity;
  const bytesPerMs = unlimited ? Infinity : (o.rateMbit * 1e6) / 8 / 1000;
  const burst = o.burstBytes ?? (unlimited ? 128 * KiB : Math.max(128 * KiB, Math.ceil(bytesPerMs)));
  if (!(burst >= 1)) throw new Error(`burstBytes must be >= 1, got ${o.burstBytes}`);
  const slack = Math.max(512 * KiB, 4 * burst);
  let limit: number;
  if (o.queueBytes !== undefined) limit = o.queueBytes;
  else if (unlimited) limit = o.delayMs > 0 ? 16 * MiB : slack;
  else limit = Math.ceil(bytesPerMs * o.delayMs) + slack;
  if (!(limit >= 1)) throw new Error(`queueBytes must be >= 1, got ${o.queueBytes}`);
  // Resume while the queue still holds a delay's worth of bytes plus some, so that the link
  // keeps sending during the delay the freshly read bytes must wait out.
  const resumeAt = Math.max(0, limit - Math.max(64 * KiB, Math.floor(slack / 2)));
  return { bytesPerMs, delayMs: o.delayMs, burst, limit, resumeAt, minPiece: Math.min(16 * KiB, burst) };
}

interface Chunk {
  data: Buffer;
  /** performance.now() at which the chunk's delay has passed. */
  due: number;
}

/** One shaped direction of one connection: reads `source`, writes `sink`. */
/** A direction's token bucket as a virtual clock: the time up to which the link has paid for the bytes released (GCRA). */
interface Bucket {
  tat: number;
}

class Link {
  private chunks: Chunk[] = [];
  private head = 0;
  queued = 0;
  /** The source has ended (FIN received). */
  sawEnd = false;
  /** sink.end() has been called. */
  endSent = false;
  private sourcePaused = false;
  private sinkBlocked = false;
  private stopped = false;
  private pumping = false;
  /** When write() last returned false. */
  private blockedAt = 0;
  /**
   * When the sink last drained after blocking for longer than a burst takes to send (a slow
   * consumer, not just a write larger than the socket's high-water mark): the link was idle
   * meanwhile, so the bucket holds at most one burst from then.
   */
  private unblockedAt = -Infinity;
  private timer: NodeJS.Timeout | null = null;
  private timerAt = Infinity;

  constructor(
    private readonly source: Socket,
    private readonly sink: Socket,
    private readonly shape: Shape,
    private readonly stats: DirectionStats,
    private readonly bucket: Bucket,
    /** Told the direction's byte count after each piece it releases (milestones). */
    private readonly released: (bytes: number) => void = () => {},
  ) {
    source.on('data', (chunk: Buffer) => this.push(chunk));
    source.on('end', () => {
      this.sawEnd = true;
      this.pump();
    });
    sink.on('drain', () => {
      if (!this.sinkBlocked) return;
      this.sinkBlocked = false;
      const now = performance.now();
      if (now - this.blockedAt > this.shape.burst / this.shape.bytesPerMs) this.unblockedAt = now;
      this.pump();
    });
  }

  /** Drops the queue and the timer; the sockets are the caller's to destroy. */
  stop(): void {
    if (this.stopped) return;
    this.stopped = true;
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
    this.stats.queued -= this.queued;
    this.queued = 0;
    this.chunks = [];
    this.head = 0;
  }

  private push(chunk: Buffer): void {
    if (this.stopped) return;
    this.chunks.push({ data: chunk, due: performance.now() + this.shape.delayMs });
    this.queued += chunk.length;
    this.stats.queued += chunk.length;
    if (this.queued >= this.shape.limit && !this.sourcePaused) {
      this.sourcePaused = true;
      this.stats.pauses++;
      this.source.pause();
    }
    this.pump();
  }

  private readonly onTimer = (): void => {
    this.timer = null;
    this.timerAt = Infinity;
    this.pump();
  };

  /** Releases every chunk (or part of one) that is due and paid for; arms the timer for the rest. */
  private pump(): void {
    if (this.pumping || this.stopped) return;
    this.pumping = true;
    try {
      const { bytesPerMs, burst, minPiece } = this.shape;
      const now = performance.now();
      let wake = Infinity;
      while (this.head < this.chunks.length && !this.sinkBlocked) {
        const c = this.chunks[this.head];
        if (c.due > now) {
          wake = c.due;
          break;
        }
        let n = c.data.length;
        if (bytesPerMs !== Infinity) {
          const eligible = c.due > this.unblockedAt ? c.due : this.unblockedAt;
          const bucket = this.bucket;
          if (bucket.tat < eligible) bucket.tat = eligible;
          const allowance = Math.floor((now - bucket.tat) * bytesPerMs) + burst;
          const need = n < minPiece ? n : minPiece;
          if (allowance < need) {
            wake = bucket.tat + (need - burst) / bytesPerMs;
            break;
          }
          if (allowance < n) n = allowance;
          bucket.tat += n / bytesPerMs;
        }
        let piece: Buffer;
        if (n === c.data.length) {
          piece = c.data;
          c.data = EMPTY;
          this.head++;
        } else {
          piece = c.data.subarray(0, n);
          c.data = c.data.subarray(n);
        }
        this.queued -= n;
        this.stats.queued -= n;
        this.stats.bytes += n;
        this.released(this.stats.bytes);
        if (!this.sink.write(piece)) {
          this.sinkBlocked = true;
          this.blockedAt = now;
        }
      }
      if (this.head === this.chunks.length) {
        this.chunks.length = 0;
        this.head = 0;
      } else if (this.head >= 256) {
        this.chunks.splice(0, this.head);
        this.head = 0;
      }
      if (this.sourcePaused && this.queued <= this.shape.resumeAt) {
        this.sourcePaused = false;
        this.source.resume();
      }
      if (this.queued === 0 && this.sawEnd && !this.endSent) {
        this.endSent = true;
        this.sink.end();
      }
      if (wake !== Infinity && !this.sinkBlocked) this.arm(wake, now);
    } finally {
      this.pumping = false;
    }
  }

  private arm(wake: number, now: number): void {
    if (this.timer !== null) {
      if (this.timerAt <= wake) return;
      clearTimeout(this.timer);
    }
    this.timerAt = wake;
    this.timer = setTimeout(this.onTimer, Math.max(1, Math.ceil(wake - now)));
  }
}

export class WanEmulator {
  private readonly server: Server;
  private readonly shape: Shape;
  private readonly live = new Set<Pair>();
  private readonly forward: DirectionStats = { bytes: 0, queued: 0, pauses: 0 };
  private readonly backward: DirectionStats = { bytes: 0, queued: 0, pauses: 0 };
  private connections = 0;
  /** Forward byte counts being waited for, and when each was reached (performance.now()). */
  private readonly forwardMarks: ForwardMark[] = [];
  /** Each direction's bucket, shared by every connection unless `perConnection`. */
  private readonly buckets = { forward: { tat: -Infinity }, backward: { tat: -Infinity } };

  constructor(private readonly options: WanEmulatorOptions) {
    this.shape = resolveShape(options);
    this.server = createServer({ allowHalfOpen: true, noDelay: true }, (socket) => this.accept(socket));
  }

  /** Bytes relayed from the accepting side to the target so far. */
  get bytesForward(): number {
    return this.forward.bytes;
  }

  /** Bytes relayed from the target back to the accepting side so far. */
  get bytesBackward(): number {
    return this.backward.bytes;
  }

  /**
   * A mark that notes when the bytes released forward (all connections) first reach `bytes`: the
   * benchmarks time a leg's opening by it (how long its first megabytes took to cross).
   */
  markForward(bytes: number): ForwardMark {
    const mark: ForwardMark = { bytes, reachedAt: this.forward.bytes >= bytes ? performance.now() : null };
    if (mark.reachedAt === null) this.forwardMarks.push(mark);
    return mark;
  }

  private readonly forwardReleased = (bytes: number): void => {
    const marks = this.forwardMarks;
    for (let i = marks.length - 1; i >= 0; i--) {
      if (marks[i].bytes > bytes) continue;
      marks[i].reachedAt = performance.now();
      marks.splice(i, 1);
    }
  };

  stats(): WanEmulatorStats {
    const o = this.options;
    return {
      connections: this.connections,
      active: this.live.size,
      forward: { ...this.forward },
      backward: { ...this.backward },
      rateMbit: o.rateMbit === 0 ? Infinity : o.rateMbit,
      delayMs: o.delayMs,
      burstBytes: this.shape.burst,
      queueBytes: this.shape.limit,
    };
  }

  /** Starts listening; resolves with the bound endpoint (port 0 picks a free one). */
  listen(): Promise<Endpoint> {
    return listenServer(this.server, this.options.listen);
  }

  /** Stops accepting and destroys every open connection; resolves once all their sockets are closed. */
  close(): Promise<void> {
    return closeServer(this.server, this.live);
  }

  private accept(client: Socket): void {
    this.connections++;
    client.setNoDelay(true);
    const target = connect({ host: this.options.target.host, port: this.options.target.port, allowHalfOpen: true, noDelay: true });
    const own = this.options.perConnection === true;
    const forward = new Link(client, target, this.shape, this.forward, own ? { tat: -Infinity } : this.buckets.forward, this.forwardReleased);
    const backward = new Link(target, client, this.shape, this.backward, own ? { tat: -Infinity } : this.buckets.backward);
    const pair = watchPair(
      client,
      target,
      (s) => (s === client ? forward.sawEnd && backward.endSent : backward.sawEnd && forward.endSent) && s.writableFinished,
      () => {
        forward.stop();
        backward.stop();
      },
    );
    this.live.add(pair);
    void pair.closed.then(() => {
      forward.stop();
      backward.stop();
      this.live.delete(pair);
    });
  }
}
