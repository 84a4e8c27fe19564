/**
 * A hostile receiving peer for the sending gateway: site A's route dials a switch that either relays
 * to a real receiving gateway (an honest migration) or answers the sender itself with crafted frames.
 * Each hostile migration is checked for what must hold whatever the receiver does: the sender reports
 * it and keeps serving, the source's connection is cut and never left hanging, only whole return-path
 * messages reach the source, the sender's store keeps the snapshot it had, and its log lines stay short.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { Writable } from 'node:stream';
import { loopbackSiteYaml } from '../src/demo/loopback-config';
import { parseConfig } from '../src/gateway/config';
import { Gateway } from '../src/gateway/gateway';
import { createLogger } from '../src/gateway/log';
import type { MigrationReport } from '../src/gateway/session';
import { ReturnPathParser, returnPathBytes } from '../src/qemu/return-path';
import { scanStores } from '../src/store';
import { freePort } from '../src/vm/qemu-vm';
import { decodeEnd, type EndMessage, FrameParser, FrameType, MAX_FRAME_PAYLOAD } from '../src/wire/frames';
import { destinationStandIn, startPair, type TestSite, waitFor } from './gateway-pair';

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

  constructor(private readonly tmp: string) {}

  async start(): Promise<void> {
    const [a, b] = await startPair(this.tmp);
    this.a = a;
    this.destPort = b.destPort;
    await b.gateway.stop(1);
    // The real receiver listens elsewhere; site A's route reaches it only through the switch.
    this.bPeerPort = await freePort();
    const yaml = loopbackSiteYaml({ name: 'site-b', data: b.data, peerPort: this.bPeerPort, vm: 'vm1', routePort: await freePort(), farPeerPort: a.peerPort, targetPort: a.destPort });
    const sink = new Writable({ write: (_c, _e, cb) => cb() });
    this.b = new Gateway(parseConfig(yaml, path.join(this.tmp, 'site-b2.yaml')), createLogger({ name: 'site-b', destination: sink }), null);
    await this.b.start();
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
    const got = await dest.received;
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

export function rmTmp(tmp: string): void {
  fs.rmSync(tmp, { recursive: true, force: true });
}
