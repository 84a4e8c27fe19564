/**
 * Hostile connections against a gateway pair: two `bfmig gateway` processes with mutual TLS, N
 * connections of random hostile kinds spread over every port of the pair, both gateways' RSS sampled
 * throughout; then a real migration through the same pair. bench/hostile-load.ts runs the full count and
 * prints the figures; test/gateway-hostile.e2e.test.ts runs a smaller one and checks them.
 */
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import * as tls from 'node:tls';
import { issueCerts } from '../../cli/certs';
import { disposeAllVms, QemuVm } from '../vm/qemu-vm';
import { ensureGuestBuilt } from '../vm/guest-image';
import { freePort } from '../vm/ports';
import { encodeJson, FrameType, frameHeader, PROTOCOL_VERSION } from '../../wire/frames';
import { type SiteGateway, startSiteGateway } from './site-gateway';
import { treeListing } from './stores';
import { syntheticStream } from './synthetic-stream';

export type PortRole = 'source' | 'peer' | 'metrics';
export type HostileKind = 'random' | 'truncated' | 'absurd' | 'idle';
/** How a hostile connection ended, seen from the client. */
export type Outcome = 'closed-by-gateway' | 'reset' | 'client-gave-up' | 'connect-failed';

export interface GatewayProcess {
  name: string;
  gateway: SiteGateway;
  data: string;
  ports: Record<PortRole, number>;
  peakRssKiB: number;
}

export interface LoadFigures {
  connections: number;
  seconds: number;
  perSecond: number;
  outcomes: Record<Outcome, number>;
  byKind: Record<HostileKind, number>;
  byRole: Record<PortRole, number>;
  /** Refusals the gateways logged, by reason. */
  refusals: Record<string, number>;
  peakRssMiB: Record<string, number>;
  idleRssMiB: Record<string, number>;
  alive: boolean;
  storesUntouched: boolean;
}

const VERIFIED = /WORKLOAD VERIFY OK round=\d+ pages=\d+/;

function rssKiB(pid: number): number {
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) : 0;
  } catch {
    return 0;
  }
}

/** The pair: site-a and site-b route vm1 to each other over mutual TLS; destination QEMUs listen on qemuPorts. */
export async function startHostilePair(tmp: string, qemuPorts: { a: number; b: number }): Promise<[GatewayProcess, GatewayProcess]> {
  const certs = path.join(tmp, 'certs');
  issueCerts(certs, ['site-a', 'site-b'], 30);
  const ports = await Promise.all(Array.from({ length: 6 }, () => freePort()));
  const spec = {
    a: { peer: ports[0], route: ports[1], metrics: ports[2] },
    b: { peer: ports[3], route: ports[4], metrics: ports[5] },
  };
  const start = async (name: 'site-a' | 'site-b'): Promise<GatewayProcess> => {
    const me = name === 'site-a' ? spec.a : spec.b;
    const far = name === 'site-a' ? spec.b : spec.a;
    const farQemu = name === 'site-a' ? qemuPorts.b : qemuPorts.a;
    const data = path.join(tmp, name);
    const yaml = [
      `name: ${name}`,
      `data: ${data}`,
      `peerListen: 127.0.0.1:${me.peer}`,
      `metrics: 127.0.0.1:${me.metrics}`,
      'routes:',
      '  - vm: vm1',
      `    listen: 127.0.0.1:${me.route}`,
      `    peer: 127.0.0.1:${far.peer}`,
      `    target: 127.0.0.1:${farQemu}`,
      'allowTargets:',
      `  - 127.0.0.1:${name === 'site-a' ? qemuPorts.a : qemuPorts.b}`,
      'tls:',
      `  cert: ${certs}/${name}.crt`,
      `  key: ${certs}/${name}.key`,
      `  ca: ${certs}/ca.crt`,
      `  allowPeers: [${name === 'site-a' ? 'site-b' : 'site-a'}]`,
      'limits:',
      '  handshakeSeconds: 2',
      '  idleSeconds: 60',
      '  maxConnections: 64',
      '',
    ].join('\n');
    const gateway = await startSiteGateway(tmp, name, yaml, 'child-process');
    return { name, gateway, data, ports: { source: me.route, peer: me.peer, metrics: me.metrics }, peakRssKiB: 0 };
  };
  return [await start('site-a'), await start('site-b')];
}

export function stopGateway(gw: GatewayProcess): Promise<void> {
  return gw.gateway.stop();
}

/** Bytes a hostile client of `kind` sends to a port of `role`. `null`: the kind does its own thing. */
function hostileBytes(kind: HostileKind, role: PortRole, samples: { qemu: Buffer; frames: Buffer }): Buffer | null {
  const pick = <T>(xs: T[]): T => xs[Math.floor(Math.random() * xs.length)];
  switch (kind) {
    case 'random':
      return randomBytes(1 + Math.floor(Math.random() * 65536));
    case 'truncated': {
      if (role === 'peer') return samples.frames.subarray(0, 1 + Math.floor(Math.random() * samples.frames.length));
      if (role === 'metrics') return Buffer.from('GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/pl');
      // A stretch from the middle of a real QEMU stream: no magic, so not a migration.
      const from = 8 + Math.floor(Math.random() * (samples.qemu.length / 2));
      return samples.qemu.subarray(from, from + 1 + Math.floor(Math.random() * 200_000));
    }
    case 'absurd':
      if (role === 'peer') {
        return pick([
          frameHeader(FrameType.Hello, 0).fill(0xff, 1, 5), // a Hello of 4 GiB
          Buffer.from([0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0xff, 0xff, 0xff]), // a TLS record and ClientHello of absurd length
          Buffer.concat([Buffer.from([0x16, 0x03, 0x03, 0x40, 0x00]), randomBytes(16384)]),
        ]);
      }
      return Buffer.from(`GET /metrics HTTP/1.1\r\nHost: x\r\nX-Absurd: ${'a'.repeat(100_000)}\r\n\r\n`);
    case 'idle':
      return null;
  }
}

/**
 * One hostile connection from `localAddress`; resolves with how it ended. Idle clients wait for the
 * gateway (at most `idleWaitMs`).
 */
function hostileConnection(port: number, kind: HostileKind, role: PortRole, samples: { qemu: Buffer; frames: Buffer }, idleWaitMs: number, localAddress: string): Promise<Outcome> {
  return new Promise((resolve) => {
    let outcome: Outcome | null = null;
    let connected = false;
    const done = (o: Outcome): void => {
      if (outcome === null) outcome = o;
    };
    // Half of the 'truncated' clients on a peer port give up a real TLS handshake half-way.
    const abandonTls = kind === 'truncated' && role === 'peer' && Math.random() < 0.5;
    const socket: net.Socket = abandonTls ? tls.connect({ socket: net.connect({ host: '127.0.0.1', port, localAddress }), rejectUnauthorized: false }) : net.connect({ host: '127.0.0.1', port, localAddress });
    const giveUp = setTimeout(() => {
      done('client-gave-up');
      socket.destroy();
    }, abandonTls ? 5 + Math.random() * 20 : idleWaitMs);
    socket.on('error', (err: NodeJS.ErrnoException) => done(connected ? 'reset' : err.code === 'ECONNREFUSED' ? 'connect-failed' : 'reset'));
    socket.on('data', () => undefined);
    socket.on('close', () => {
      clearTimeout(giveUp);
      done('closed-by-gateway');
      resolve(outcome as Outcome);
    });
    socket.once('connect', () => {
      connected = true;
      if (abandonTls) return;
      const bytes = hostileBytes(kind, role, samples);
      if (bytes) socket.write(bytes, () => socket.end());
    });
  });
}

/** Runs `count` hostile connections over every port of the pair with at most `concurrency` at once. */
export async function hostileFlood(gateways: GatewayProcess[], count: number, concurrency: number): Promise<LoadFigures> {
  const { stream } = syntheticStream(0.01);
  const frames = Buffer.concat([
    encodeJson(FrameType.Hello, { protocol: PROTOCOL_VERSION, site: 'site-a', vm: 'vm1', target: '127.0.0.1:4444' }),
    frameHeader(FrameType.Literal, 65536),
    stream.subarray(0, 65536),
  ]);
  const samples = { qemu: stream, frames };
  const targets = gateways.flatMap((g) => (['source', 'peer', 'metrics'] as PortRole[]).map((role) => ({ g, role, port: g.ports[role] })));
  const kinds: HostileKind[] = ['random', 'truncated', 'absurd', 'idle'];
  const before = gateways.map((g) => treeListing(g.data));
  const idleRss = Object.fromEntries(gateways.map((g) => [g.name, rssKiB(g.gateway.pid ?? 0) / 1024]));
  const sampler = setInterval(() => {
    for (const g of gateways) g.peakRssKiB = Math.max(g.peakRssKiB, rssKiB(g.gateway.pid ?? 0));
  }, 50);
  const outcomes: Record<Outcome, number> = { 'closed-by-gateway': 0, reset: 0, 'client-gave-up': 0, 'connect-failed': 0 };
  const byKind: Record<HostileKind, number> = { random: 0, truncated: 0, absurd: 0, idle: 0 };
  const byRole: Record<PortRole, number> = { source: 0, peer: 0, metrics: 0 };
  const logged = gateways.map((g) => g.gateway.logLines.length);
  const t0 = process.hrtime.bigint();
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < count) {
      const i = next++;
      const target = targets[i % targets.length];
      const kind = kinds[Math.floor(i / targets.length) % kinds.length];
      byKind[kind]++;
      byRole[target.role]++;
      // From 250 loopback addresses, so that the gateways' per-address limit does not turn nearly all
      // away at accept and the hostile bytes reach the TLS, frame and stream checks behind it.
      outcomes[await hostileConnection(target.port, kind, target.role, samples, 15_000, `127.0.2.${1 + (i % 250)}`)]++;
    }
  };
  await Promise.all(Array.from({ length: concurrency }, () => worker()));
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  // Let the gateways finish with what they were refusing.
  await new Promise((r) => setTimeout(r, 2500));
  clearInterval(sampler);
  const refusals: Record<string, number> = {};
  gateways.forEach((g, i) => {
    for (const line of g.gateway.logLines.slice(logged[i])) {
      if (!line.includes('"connection refused"')) continue;
      const reason = (JSON.parse(line) as { reason: string }).reason;
      refusals[reason] = (refusals[reason] ?? 0) + 1;
    }
  });
  return {
    connections: count,
    seconds,
    perSecond: count / seconds,
    outcomes,
    byKind,
    byRole,
    refusals,
    peakRssMiB: Object.fromEntries(gateways.map((g) => [g.name, g.peakRssKiB / 1024])),
    idleRssMiB: idleRss,
    alive: gateways.every((g) => g.gateway.alive()),
    storesUntouched: gateways.every((g, i) => JSON.stringify(treeListing(g.data)) === JSON.stringify(before[i])),
  };
}

/** A real guest migrates A → B through the pair; resolves once the destination guest verified its memory. */
export async function migrateThroughPair(a: GatewayProcess, qemuPortB: number): Promise<{ seconds: number; serial: string }> {
  ensureGuestBuilt();
  const options = { machine: 'pc-i440fx-7.2', memMiB: 128, workload: { mib: 32, seed: 3, rewritePct: 0, intervalMs: 500 } };
  const source = new QemuVm({ ...options, name: 'hostile-src' });
  const dest = new QemuVm({ ...options, name: 'hostile-dst', incoming: `tcp:127.0.0.1:${qemuPortB}` });
  try {
    await source.start();
    await source.waitForSerial(/WORKLOAD READY/, 180_000);
    await dest.start();
    const t0 = Date.now();
    await source.migrate(`tcp:127.0.0.1:${a.ports.source}`);
    const info = await source.waitForMigration({ timeoutMs: 300_000 });
    if (info.status !== 'completed') throw new Error(`migration ${info.status}`);
    await dest.waitForStatus('running', 60_000);
    await dest.waitForSerial(VERIFIED, 60_000);
    return { seconds: (Date.now() - t0) / 1000, serial: dest.serial.split('\n').filter((l) => VERIFIED.test(l)).slice(-1)[0] ?? '' };
  } finally {
    await disposeAllVms();
  }
}
