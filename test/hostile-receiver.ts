/**
 * A hostile receiving peer for the sending gateway: site A's route dials a switch that either relays
 * to a real receiving gateway (an honest migration) or answers the sender itself with crafted frames.
 * Each hostile migration is checked for what must hold whatever the receiver does: the sender reports
 * it and keeps serving, the source's connection is cut and never left hanging, only whole return-path
 * messages reach the source, the sender's store keeps the snapshot it had, and its log lines stay short.
 */
import * as net from 'node:net';
import * as path from 'node:path';
import { loopbackSiteYaml } from '../src/lab/harness/loopback-config';
import type { Gateway } from '../src/gateway/gateway';
import type { MigrationReport } from '../src/gateway/session';
import { ReturnPathParser, returnPathBytes } from '../src/qemu/return-path';
import { scanStores } from '../src/store';
import { freePort } from '../src/lab/vm/ports';
import { decodeEnd, type EndMessage, FrameParser, FrameType, MAX_FRAME_PAYLOAD } from '../src/wire/frames';
import { startLoggedGateway, startPair, type TestSite, waitFor } from '../src/lab/harness/gateway-pair';
import { destinationStandIn } from '../src/lab/harness/qemu-standins';
import { suiteTempDir } from './temp-dir';

export interface Frame {
  type: FrameType;
  payload: Buffer;
}

/** What a hostile receiver sees of the sender, and how it answers. */
export interface HostileConnection {
  socket: net.Socket;
  /** Every frame the sender sent so far. */
  received: Frame[];
  /** The End frame, once the sender sent it. */
  end: EndMessage | null;
}

/** Called for every frame the sender sends (Hello first); writes whatever it likes to `c.socket`. */
export type Hostile = (c: HostileConnection, frame: Frame) => void;

/** A frame as bytes, with any type and length, whatever the payload. */
export function rawFrame(type: number, payload: Buffer | string = Buffer.alloc(0), length?: number): Buffer {
  const body = typeof payload === 'string' ? Buffer.from(payload) : payload;
  const header = Buffer.alloc(5);
  header[0] = type;
  header.writeUInt32BE(length ?? body.length, 1);
  return Buffer.concat([header, body]);
}

export const json = (type: number, message: unknown): Buffer => rawFrame(type, JSON.stringify(message));

/** What a source stand-in saw of one migration. */
export interface SourceOutcome {
  ending: 'closed' | 'reset' | 'hanging';
  /** Bytes the gateway sent back to the source. */
  back: Buffer;
}

export class HostileReceiverRig {
  a!: TestSite;
  /** The real receiving gateway honest migrations reach through the switch. */
  private b!: Gateway;
  private bPeerPort = 0;
  private destPort = 0;
  private server!: net.Server;
  private readonly open = new Set<net.Socket>();
  /** Null: relay to the real receiving gateway. */
  hostile: Hostile | null = null;
  /** The frames the real receiving gateway sent in the last honest migration. */
  honestFrames: Frame[] = [];

  /** The directory of both sites' stores and configs, made by start(), which runs in a beforeAll. */
  private tmp = '';

  constructor(private readonly tmpPrefix: string) {}

  async start(): Promise<void> {
    this.tmp = suiteTempDir(this.tmpPrefix);
    const [a, b] = await startPair(this.tmp);
    this.a = a;
    this.destPort = b.destPort;
    await b.gateway.stop(1);
    // The real receiver listens elsewhere; site A's route reaches it only through the switch.
    this.bPeerPort = await freePort();
    const yaml = loopbackSiteYaml({ name: 'site-b', data: b.data, peerPort: this.bPeerPort, vm: 'vm1', routePort: await freePort(), farPeerPort: a.peerPort, targetPort: a.destPort });
    this.b = (await startLoggedGateway('site-b', yaml, path.join(this.tmp, 'site-b2.yaml'))).gateway;
    this.server = net.createServer((socket) => this.accept(socket));
    await new Promise<void>((r) => this.server.listen(b.peerPort, '127.0.0.1', () => r()));
  }

  async stop(): Promise<void> {
    for (const s of this.open) s.destroy();
    await new Promise<void>((r) => this.server.close(() => r()));
    await this.a.gateway.stop(1);
    await this.b.stop(1);
  }

  private accept(socket: net.Socket): void {
    this.open.add(socket);
    socket.on('close', () => this.open.delete(socket));
    socket.on('error', () => undefined);
    const hostile = this.hostile;
    if (!hostile) {
      const far = net.connect({ host: '127.0.0.1', port: this.bPeerPort });
      this.open.add(far);
      far.on('close', () => this.open.delete(far));
      far.on('error', () => socket.destroy());
      socket.on('close', () => far.destroy());
      far.on('close', () => socket.destroy());
      this.honestFrames = [];
      const sniff = new FrameParser((type, payload) => this.honestFrames.push({ type, payload: Buffer.from(payload) }));
      far.on('data', (chunk: Buffer) => {
        try {
          sniff.push(chunk);
        } catch {
          // Only a record of what passed.
        }
      });
      socket.pipe(far);
      far.pipe(socket);
      return;
    }
    const c: HostileConnection = { socket, received: [], end: null };
    const frames = new FrameParser((type, payload) => {
      const frame = { type, payload: Buffer.from(payload) };
      c.received.push(frame);
      if (type === FrameType.End) c.end = decodeEnd(frame.payload);
      if (!socket.destroyed) hostile(c, frame);
    }, (type) => type === FrameType.Literal);
    frames.maxPayload = MAX_FRAME_PAYLOAD;
    socket.on('data', (chunk: Buffer) => {
      try {
        frames.push(chunk);
      } catch {
        socket.destroy();
      }
    });
  }

  /** The snapshot site A's store claims for vm1 (null: none). */
  senderSnapshot(): string | null {
    return scanStores(this.a.data).find((e) => e.vm === 'vm1')?.snapshotId ?? null;
  }

  /** The sender's newest report, once it is not `before`. */
  async nextReport(before: MigrationReport | undefined, timeoutMs = 10_000): Promise<MigrationReport> {
    const last = (): MigrationReport | undefined => this.a.gateway.history[this.a.gateway.history.length - 1];
    await waitFor(() => last() !== before, timeoutMs);
    return last() as MigrationReport;
  }

  lastReport(): MigrationReport | undefined {
    return this.a.gateway.history[this.a.gateway.history.length - 1];
  }

  /** A source stand-in that writes `stream`, ends it, and keeps what comes back; 'hanging' after `timeoutMs`. */
  source(stream: Buffer, timeoutMs = 8_000): Promise<SourceOutcome> {
    return new Promise((resolve) => {
      const back: Buffer[] = [];
      let reset = false;
      let settled = false;
      const socket = net.connect({ host: '127.0.0.1', port: this.a.routePort }, () => {
        socket.write(stream);
        socket.end();
      });
      const timer = setTimeout(() => {
        settled = true;
        socket.destroy();
        resolve({ ending: 'hanging', back: Buffer.concat(back) });
      }, timeoutMs);
      socket.on('data', (chunk: Buffer) => back.push(chunk));
      socket.on('error', () => (reset = true));
      socket.on('close', () => {
        clearTimeout(timer);
        if (!settled) resolve({ ending: reset ? 'reset' : 'closed', back: Buffer.concat(back) });
      });
    });
  }

  /**
   * A source stand-in that writes `stream` a MiB at a time, as fast as the gateway reads it, and keeps
   * count of the bytes the gateway's side took (a write's callback: handed to the kernel).
   */
  pushingSource(stream: Buffer): { taken: () => number; ending: Promise<'closed' | 'reset'> } {
    let taken = 0;
    const socket = net.connect({ host: '127.0.0.1', port: this.a.routePort });
    let reset = false;
    socket.on('error', () => (reset = true));
    socket.resume();
    const ending = new Promise<'closed' | 'reset'>((r) => socket.on('close', () => r(reset ? 'reset' : 'closed')));
    const push = (at: number): void => {
      while (at < stream.length && !socket.destroyed) {
        const piece = stream.subarray(at, at + 1024 * 1024);
        at += piece.length;
        const more = socket.write(piece, (err) => {
          if (!err) taken += piece.length;
        });
        if (!more) return void socket.once('drain', () => push(at));
      }
      if (at >= stream.length) socket.end();
    };
    socket.on('connect', () => push(0));
    return { taken: () => taken, ending };
  }

  /** An honest migration through the real receiving gateway: true when it completed byte for byte. */
  async honest(stream: Buffer): Promise<{ identical: boolean; ending: SourceOutcome['ending']; report: MigrationReport }> {
    this.hostile = null;
    const before = this.lastReport();
    const dest = await destinationStandIn(this.destPort);
    const { ending } = await this.source(stream);
    // A migration that failed before the destination was dialled leaves the stand-in waiting.
    const got = ending === 'closed' ? await dest.received : (dest.close(), { bytes: Buffer.alloc(0) });
    const report = await this.nextReport(before);
    return { identical: got.bytes.equals(stream), ending, report };
  }
}

/** The return-path messages `bytes` is made of, or null when it is anything else (or ends mid-message). */
export function wholeReturnPathMessages(bytes: Buffer): number | null {
  const out: Buffer[] = [];
  const parser = new ReturnPathParser((m) => out.push(returnPathBytes(m)));
  try {
    parser.push(bytes);
  } catch {
    return null;
  }
  return Buffer.concat(out).equals(bytes) ? out.length : null;
}

/** The longest log line the site wrote from `from` on, in characters. */
export function longestLogLine(site: TestSite, from: number): number {
  return Math.max(0, ...site.logs.slice(from).map((l) => JSON.stringify(l).length));
}

/** When a scripted frame goes out: in answer to the Hello, the TableRequest or the End. */
export type Phase = 0 | 1 | 2;
const PHASE_OF: Partial<Record<FrameType, Phase>> = { [FrameType.Hello]: 0, [FrameType.TableRequest]: 1, [FrameType.End]: 2 };

export interface ScriptFrame {
  phase: Phase;
  make: (c: HostileConnection) => Buffer;
  /** Close the connection once this frame is out. */
  close?: boolean;
}

/** One change to a receiver's script (see mutateScript). */
export type ScriptMutation =
  | { op: 'drop' | 'dup' | 'close'; at: number }
  | { op: 'swap'; at: number; other: number }
  | { op: 'phase'; at: number; phase: Phase }
  | { op: 'type'; at: number; type: number }
  | { op: 'flip'; at: number; byte: number; bit: number }
  | { op: 'cut'; at: number; keep: number }
  | { op: 'field'; at: number; key: string; value: unknown }
  | { op: 'junk'; at: number; bytes: number[] };

/**
 * What an honest receiver answers: an Offer (of nothing, or of the sender's layout, so that it asks for
 * the digest table), the table in pieces, a PONG on the return path and Done for the End's snapshot.
 */
export function honestScript(offer: { layoutId: string; pageCount: number } | null): ScriptFrame[] {
  const script: ScriptFrame[] = [
    {
      phase: 0,
      make: () =>
        json(FrameType.Offer, offer ? { site: 'site-b', snapshotId: 'held', layoutId: offer.layoutId, pageCount: offer.pageCount, presentPages: offer.pageCount } : { site: 'site-b', snapshotId: null, layoutId: null, pageCount: 0, presentPages: 0 }),
    },
  ];
  if (offer) {
    const bytes = offer.pageCount * 16;
    const half = Math.floor(bytes / 32) * 16;
    script.push({ phase: 1, make: () => rawFrame(FrameType.TableData, Buffer.alloc(half, 0x5a)) });
    script.push({ phase: 1, make: () => rawFrame(FrameType.TableData, Buffer.alloc(bytes - half, 0xa5)) });
    script.push({ phase: 1, make: () => rawFrame(FrameType.TableEnd) });
  }
  script.push({ phase: 2, make: () => rawFrame(FrameType.Return, Buffer.from([0, 2, 0, 4, 0, 0, 0, 7])) });
  script.push({ phase: 2, make: (c) => json(FrameType.Done, { snapshotId: c.end?.snapshotId, streamBytes: c.end?.streamBytes }) });
  return script;
}

/** The script with `mutations` applied in order (indexes wrap around the script's length). */
export function mutateScript(base: readonly ScriptFrame[], mutations: readonly ScriptMutation[]): ScriptFrame[] {
  const s = [...base];
  for (const m of mutations) {
    if (s.length === 0) break;
    const i = m.at % s.length;
    const f = s[i];
    const map = (change: (b: Buffer) => Buffer): ScriptFrame => ({ ...f, make: (c) => change(f.make(c)) });
    switch (m.op) {
      case 'drop':
        s.splice(i, 1);
        break;
      case 'dup':
        s.splice(i, 0, f);
        break;
      case 'close':
        s[i] = { ...f, close: true };
        break;
      case 'swap': {
        const j = m.other % s.length;
        [s[i], s[j]] = [s[j], s[i]];
        break;
      }
      case 'phase':
        s[i] = { ...f, phase: m.phase };
        break;
      case 'type':
        s[i] = map((b) => Buffer.concat([Buffer.from([m.type]), b.subarray(1)]));
        break;
      case 'flip':
        s[i] = map((b) => {
          const out = Buffer.from(b);
          if (out.length > 0) out[m.byte % out.length] ^= 1 << m.bit;
          return out;
        });
        break;
      case 'cut':
        s[i] = map((b) => b.subarray(0, m.keep % (b.length + 1)));
        break;
      case 'field':
        s[i] = map((b) => {
          let message: unknown;
          try {
            message = JSON.parse(b.subarray(5).toString());
          } catch {
            return b;
          }
          if (typeof message !== 'object' || message === null) return b;
          return json(b[0], { ...message, [m.key]: m.value });
        });
        break;
      case 'junk':
        s.splice(i, 0, { phase: f.phase, make: () => Buffer.from(m.bytes) });
        break;
    }
  }
  return s;
}

/**
 * A hostile receiver that plays `script`: each phase's frames go out in answer to the sender's frame
 * that opens it. It closes the connection itself after `lifeMs`, so that a script that never says
 * Done cannot hold the migration until limits.idleSeconds.
 */
export function scripted(script: readonly ScriptFrame[], lifeMs: number): Hostile {
  return (c, frame) => {
    const phase = PHASE_OF[frame.type];
    if (phase === 0) setTimeout(() => c.socket.destroy(), lifeMs).unref();
    if (phase === undefined) return;
    for (const f of script) {
      if (f.phase !== phase || c.socket.destroyed || c.socket.writableEnded) continue;
      c.socket.write(f.make(c));
      if (f.close) c.socket.end();
    }
  };
}
