/**
 * Minimal QMP (QEMU Machine Protocol) client over a unix socket, for tests.
 *
 * Protocol: QEMU sends a greeting `{"QMP": {...}}`; the client must send
 * `qmp_capabilities` before anything else; each command may carry an `id` that QEMU
 * echoes in its `{"return": ...}` or `{"error": {"class","desc"}}` reply. Asynchronous
 * `{"event": ...}` messages can arrive at any time; they are kept (bounded) but never
 * treated as replies. Messages are JSON objects separated by CRLF.
 */
import * as net from 'node:net';

export type JsonValue = null | boolean | number | string | JsonValue[] | { [key: string]: JsonValue };

export interface QmpEvent {
  event: string;
  data?: { [key: string]: JsonValue };
  timestamp?: { seconds: number; microseconds: number };
}

export interface QmpGreeting {
  version: { qemu: { major: number; minor: number; micro: number }; package: string };
  capabilities: string[];
}

/** A command QEMU answered with `{"error": ...}`. */
export class QmpError extends Error {
  constructor(
    readonly command: string,
    readonly errorClass: string,
    readonly desc: string,
  ) {
    super(`QMP ${command} failed: ${errorClass}: ${desc}`);
    this.name = 'QmpError';
  }
}

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export class QmpClient {
  private socket: net.Socket | null = null;
  private buffer = '';
  private nextId = 1;
  private readonly pending = new Map<string, Pending>();
  private greetingWaiter: { resolve: (g: QmpGreeting) => void; reject: (e: Error) => void } | null = null;
  private closedError: Error | null = null;
  /** The most recent events, oldest first (at most `maxEvents`). */
  readonly events: QmpEvent[] = [];
  greeting: QmpGreeting | null = null;
  /** Out-of-band execution was negotiated. */
  private oob = false;

  constructor(
    readonly socketPath: string,
    private readonly maxEvents = 500,
  ) {}

  /**
   * Connects (retrying while the socket does not exist yet), reads the greeting and
   * negotiates capabilities. `alive` is polled between attempts so a QEMU that died
   * during startup fails fast instead of after the timeout.
   */
  async connect(timeoutMs: number, alive: () => boolean = () => true): Promise<QmpGreeting> {
    const deadline = Date.now() + timeoutMs;
    let lastErr: Error | null = null;
    for (;;) {
      if (!alive()) throw new Error(`QMP ${this.socketPath}: QEMU exited before QMP was ready`);
      try {
        await this.connectOnce(Math.max(100, Math.min(2000, deadline - Date.now())));
        break;
      } catch (e) {
        lastErr = e instanceof Error ? e : new Error(String(e));
        if (Date.now() >= deadline) {
          throw new Error(`QMP ${this.socketPath}: could not connect within ${timeoutMs} ms: ${lastErr.message}`);
        }
        await sleep(50);
      }
    }
    if (!this.greeting) throw new Error('QMP: no greeting');
    // Out-of-band execution where QEMU offers it: a postcopy destination's main thread can block on a
    // page that has not arrived, and only OOB commands (migrate-recover, migrate-pause) still answer.
    this.oob = this.greeting.capabilities.includes('oob');
    await this.execute('qmp_capabilities', this.oob ? { enable: ['oob'] } : undefined, Math.max(1000, deadline - Date.now()));
    return this.greeting;
  }

  private connectOnce(timeoutMs: number): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const sock = net.createConnection(this.socketPath);
      let settled = false;
      const fail = (err: Error): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        this.greetingWaiter = null;
        sock.destroy();
        reject(err);
      };
      const timer = setTimeout(() => fail(new Error('timed out waiting for the QMP greeting')), timeoutMs);
      sock.setEncoding('utf8');
      sock.once('error', fail);
      sock.on('data', (chunk: string) => this.onData(chunk));
      this.greetingWaiter = {
        resolve: () => {
          if (settled) return;
          settled = true;
          clearTimeout(timer);
          sock.removeListener('error', fail);
          sock.on('error', (err) => this.onClose(err));
          sock.on('close', () => this.onClose(new Error('QMP connection closed')));
          this.socket = sock;
          this.closedError = null;
          resolve();
        },
        reject: fail,
      };
    });
  }

  private onData(chunk: string): void {
    this.buffer += chunk;
    let nl: number;
    while ((nl = this.buffer.indexOf('\n')) >= 0) {
      const line = this.buffer.slice(0, nl).trim();
      this.buffer = this.buffer.slice(nl + 1);
      if (line.length > 0) this.onMessage(line);
    }
  }

  private onMessage(line: string): void {
    let msg: unknown;
    try {
      msg = JSON.parse(line);
    } catch {
      return; // not JSON: ignore rather than tear the session down
    }
    if (!isObject(msg)) return;
    if ('QMP' in msg) {
      this.greeting = msg.QMP as QmpGreeting;
      const w = this.greetingWaiter;
      this.greetingWaiter = null;
      w?.resolve(this.greeting);
      return;
    }
    if (typeof msg.event === 'string') {
      this.events.push(msg as unknown as QmpEvent);
      if (this.events.length > this.maxEvents) this.events.splice(0, this.events.length - this.maxEvents);
      return;
    }
    const id = typeof msg.id === 'string' ? msg.id : undefined;
    if (id === undefined) return; // a reply to something we did not send with an id
    const p = this.pending.get(id);
    if (!p) return;
    this.pending.delete(id);
    clearTimeout(p.timer);
    if ('return' in msg) {
      p.resolve(msg.return);
    } else if (isObject(msg.error)) {
      const cls = typeof msg.error.class === 'string' ? msg.error.class : 'GenericError';
      const desc = typeof msg.error.desc === 'string' ? msg.error.desc : JSON.stringify(msg.error);
      p.reject(new QmpError(p.command, cls, desc));
    } else {
      p.reject(new Error(`QMP ${p.command}: malformed reply ${line}`));
    }
  }

  private onClose(err: Error): void {
    if (!this.closedError) this.closedError = err;
    this.socket = null;
    for (const [id, p] of this.pending) {
      clearTimeout(p.timer);
      this.pending.delete(id);
      p.reject(new Error(`QMP ${p.command}: ${this.closedError.message}`));
    }
  }

  get connected(): boolean {
    return this.socket !== null;
  }

  /** Sends one command and resolves with its `return` value (typed by the caller). */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, timeoutMs = 30_000): Promise<T> {
    return this.send('execute', command, args, timeoutMs);
  }

  /**
   * Sends a command out of band (QEMU runs it even while its main thread is blocked); only commands
   * QEMU marks OOB-capable, and only when it offered the capability.
   */
  executeOob<T = unknown>(command: string, args?: Record<string, unknown>, timeoutMs = 30_000): Promise<T> {
    if (!this.oob) return Promise.reject(new Error(`QMP ${command}: this QEMU offers no out-of-band execution`));
    return this.send('exec-oob', command, args, timeoutMs);
  }

  private send<T>(verb: 'execute' | 'exec-oob', command: string, args: Record<string, unknown> | undefined, timeoutMs: number): Promise<T> {
    const sock = this.socket;
    if (!sock) {
      const why = this.closedError ? ` (${this.closedError.message})` : '';
      return Promise.reject(new Error(`QMP ${command}: not connected${why}`));
    }
    const id = `bfmig-${this.nextId++}`;
    const msg: Record<string, unknown> = { [verb]: command, id };
    if (args !== undefined) msg.arguments = args;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`QMP ${command}: no reply within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { command, resolve: (v) => resolve(v as T), reject, timer });
      sock.write(`${JSON.stringify(msg)}\n`);
    });
  }

  /** Events named `name` received so far. */
  eventsNamed(name: string): QmpEvent[] {
    return this.events.filter((e) => e.event === name);
  }

  close(): void {
    const sock = this.socket;
    this.onClose(new Error('QMP client closed'));
    sock?.destroy();
  }
}
