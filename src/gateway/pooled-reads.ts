import { Socket } from 'node:net';

/** Bytes per read from the source QEMU: 256 KiB reads cost a quarter of the calls of Node's 64 KiB. */
export const SOURCE_READ_BYTES = 256 * 1024;

/**
 * A connection read into a few reused buffers instead of a fresh 64 KiB Buffer per
 * read. Those dead buffers are what pushed a sending gateway's RSS tens of MiB above its live data
 * until V8 got round to collecting them, and what cost the GC time on an all-reused leg.
 *
 * Node offers reads into caller buffers (`onread`) only to sockets it creates itself, not to those a
 * `net.Server` accepts; a Socket built on the accepted socket's handle gets it. The handle is taken
 * before any byte is read (the server must use `pauseOnConnect`), and the accepted Socket object is
 * retired without closing it. Where the handle is not what we expect, the accepted socket is used as
 * it is, with `'data'` events.
 *
 * A chunk handed to `onChunk` is valid only during that call: whatever keeps bytes of it beyond the
 * call must copy them, except writes to `downstream`, which are tracked: a buffer whose bytes may
 * still wait in `downstream`'s write queue is not read into again until that queue has been seen
 * empty, or until an empty write queued behind them has completed (writes complete in order). The
 * marker is what bounds the buffers when the queue never quite empties, as it does with a write
 * high-water mark of a few reads.
 */
/** Where the chunks' bytes are written: a net.Socket or a TLS socket. */
export interface PooledDownstream {
  readonly writableLength: number;
  readonly writableEnded: boolean;
  readonly destroyed: boolean;
  write(chunk: Uint8Array, callback: (err?: Error | null) => void): boolean;
}

/**
 * A downstream socket dialled after the reads were set up: until it exists nothing is written to it (its
 * queue reads as empty, so every buffer is free, and no marker is written: PooledReads writes one only
 * behind queued bytes).
 */
export function laterDownstream(socket: () => Socket | null): PooledDownstream {
  return {
    get writableLength(): number {
      return socket()?.writableLength ?? 0;
    },
    get writableEnded(): boolean {
      return socket()?.writableEnded ?? false;
    },
    get destroyed(): boolean {
      return socket()?.destroyed ?? false;
    },
    write: (chunk, callback) => (socket() as Socket).write(chunk, callback),
  };
}

/** Writes a connection may hold back before they reach its socket (LiteralFrames, behind a batch on the thread pool). */
export interface HeldWrites {
  readonly heldBytes: number;
  inOrder(bytes: Buffer, done?: (err?: Error | null) => void): void;
}

/**
 * `socket` with the bytes `held()` still holds counted as queued, and writes (PooledReads' markers) made
 * behind them: a read buffer whose bytes wait behind a batch on the thread pool is not read into again
 * before they have reached the socket and it has written them.
 */
export function heldDownstream(socket: PooledDownstream, held: () => HeldWrites | null): PooledDownstream {
  return {
    get writableLength(): number {
      return socket.writableLength + (held()?.heldBytes ?? 0);
    },
    get writableEnded(): boolean {
      return socket.writableEnded;
    },
    get destroyed(): boolean {
      return socket.destroyed;
    },
    write: (chunk, callback) => {
      const writes = held();
      if (writes === null) return socket.write(chunk, callback);
      writes.inOrder(Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength), callback);
      return true;
    },
  };
}

/** Lent buffers that make it worth queuing a marker write to get them back. */
const MARK_AFTER_BUFFERS = 2;
const EMPTY = Buffer.alloc(0);

export class PooledReads {
  readonly socket: Socket;
  readonly pooled: boolean;
  private readonly free: Buffer[] = [];
  /** Buffers read into since the downstream queue was last seen empty. */
  private readonly lent: Buffer[] = [];
  private made = 0;
  private early: Buffer | null = null;
  /** An empty write is queued on downstream to free the buffers lent before it. */
  private marking = false;
  /** The buffer of the read its reader holds back (hold()): not read into again until let go. */
  private heldBuffer: ArrayBufferLike | null = null;

  constructor(
    accepted: Socket,
    private readonly downstream: PooledDownstream,
    onChunk: (chunk: Buffer) => void,
    /** Whether the connection stays open for writing once the other side has ended its stream. */
    allowHalfOpen = true,
  ) {
    const holder = accepted as unknown as { _handle?: { readStart?: unknown; useUserBuffer?: unknown } | null };
    const handle = holder._handle;
    if (!handle || typeof handle.readStart !== 'function' || typeof handle.useUserBuffer !== 'function') {
      this.socket = accepted;
      this.pooled = false;
      accepted.on('data', onChunk);
      return;
    }
    // Bytes already read (the stream magic the gateway checked first) go first, at the first resume.
    const early: Buffer[] = [];
    for (let b: unknown = accepted.read(); b !== null; b = accepted.read()) early.push(b as Buffer);
    this.early = early.length > 0 ? Buffer.concat(early) : null;
    holder._handle = null;
    this.pooled = true;
    this.socket = new Socket({
      handle,
      allowHalfOpen,
      pauseOnCreate: true,
      readable: true,
      writable: true,
      onread: {
        buffer: () => this.next(),
        callback: (bytes: number, buffer: Uint8Array) => {
          const owner = buffer as Buffer;
          this.lent.push(owner);
          onChunk(owner.subarray(0, bytes));
        },
      },
    } as ConstructorParameters<typeof Socket>[0]);
    // The accepted Socket has no handle left to close; destroying it when the connection really closes
    // is what tells its server (and the gateway's connection count) that the connection is gone.
    this.socket.once('close', () => accepted.destroy());
  }

  /**
   * Bytes read from the connection before it was adopted, to be passed on before any other; null
   * once taken. (With 'data' events they are still in the socket's buffer and come as a first event.)
   */
  takeEarly(): Buffer | null {
    const early = this.early;
    this.early = null;
    return early;
  }

  /** Buffers this connection has allocated for reads (bounded by the downstream's queue: see the class). */
  get buffers(): number {
    return this.made;
  }

  /**
   * The reader keeps `chunk` (a read it was handed) past its call, to hand on later (null: none now): its
   * buffer is not read into again, whatever the downstream's queue, until the reader lets it go; its bytes
   * are then tracked as any read's.
   */
  hold(chunk: Buffer | null): void {
    this.heldBuffer = chunk === null ? null : chunk.buffer;
  }

  /** The lent buffers, less the one held back, which stays lent. */
  private takeLent(): Buffer[] {
    const taken: Buffer[] = [];
    let kept = 0;
    for (let i = 0; i < this.lent.length; i++) {
      const b = this.lent[i];
      if (b.buffer === this.heldBuffer) this.lent[kept++] = b;
      else taken.push(b);
    }
    this.lent.length = kept;
    return taken;
  }

  private next(): Buffer {
    const downstream = this.downstream;
    if (downstream.writableLength === 0) {
      for (const b of this.takeLent()) this.free.push(b);
    } else if (this.lent.length >= MARK_AFTER_BUFFERS && !this.marking && !downstream.writableEnded && !downstream.destroyed) {
      const written = this.takeLent();
      this.marking = true;
      // Called once every write queued before it has completed (or failed: then nothing holds them either).
      downstream.write(EMPTY, () => {
        this.marking = false;
        for (const b of written) this.free.push(b);
      });
    }
    const reuse = this.free.pop();
    if (reuse) return reuse;
    this.made++;
    return Buffer.allocUnsafeSlow(SOURCE_READ_BYTES);
  }
}
