/**
 * A migration under QEMU's own TLS through a gateway pair: a real TLS client (the source) and a real TLS
 * server (the destination) talk through both gateways, both ways, and every byte arrives as it was sent;
 * the gateways say the stream was relayed as it is (log, metric, report, the VM's store note), and a
 * route set to `encrypted: refuse` turns it away.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as tls from 'node:tls';
import { createHash } from 'node:crypto';
import { type Server } from 'node:net';
import { startLoggedGateway, startPair, stopPair, type TestSite, waitFor } from '../src/lab/harness/gateway-pair';
import { loopbackSiteYaml } from '../src/lab/harness/loopback-config';
import { freePort } from '../src/lab/vm/ports';
import { makeQemuTlsCredentials, QEMU_TLS_HOSTNAME } from '../src/lab/vm/qemu-tls';
import { readMigrationRecord } from '../src/store/migration-record';
import { PageStore } from '../src/store';
import { suiteTempDir } from './temp-dir';

const tmp = suiteTempDir('bfmig-encrypted-');
let a: TestSite;
let b: TestSite;
let creds: { ca: Buffer; cert: Buffer; key: Buffer };

beforeAll(async () => {
  const dir = path.join(tmp, 'qemu-tls');
  makeQemuTlsCredentials(dir);
  creds = { ca: fs.readFileSync(path.join(dir, 'ca-cert.pem')), cert: fs.readFileSync(path.join(dir, 'server-cert.pem')), key: fs.readFileSync(path.join(dir, 'server-key.pem')) };
  [a, b] = await startPair(tmp, ['', '']);
});

afterAll(() => stopPair([a, b]));

/**
 * A TLS destination at `port`: once it has `expect` bytes it answers with their SHA-256 (as a destination
 * QEMU answers on its return path while the stream is open), and closes when the source does.
 */
function tlsDestination(port: number, expect: number): Promise<{ server: Server; received: Promise<Buffer> }> {
  return new Promise((resolve) => {
    let done: (b: Buffer) => void = () => undefined;
    const received = new Promise<Buffer>((r) => (done = r));
    const server = tls.createServer({ cert: creds.cert, key: creds.key, ca: creds.ca, requestCert: true, rejectUnauthorized: true }, (socket) => {
      const parts: Buffer[] = [];
      let got = 0;
      socket.on('data', (c: Buffer) => {
        parts.push(c);
        got += c.length;
        if (got === expect) socket.write(createHash('sha256').update(Buffer.concat(parts)).digest());
      });
      socket.on('end', () => {
        done(Buffer.concat(parts));
        socket.end();
      });
    });
    server.listen(port, '127.0.0.1', () => resolve({ server, received }));
  });
}

/** A TLS source: sends `payload` through the route, waits for the 32-byte answer, closes, and resolves with the answer. */
function tlsSource(port: number, payload: Buffer): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const socket = tls.connect({ host: '127.0.0.1', port, servername: QEMU_TLS_HOSTNAME, ca: creds.ca, cert: creds.cert, key: creds.key }, () => socket.write(payload));
    const parts: Buffer[] = [];
    let got = 0;
    socket.on('data', (c: Buffer) => {
      parts.push(c);
      got += c.length;
      if (got >= 32) socket.end();
    });
    socket.on('close', () => (got >= 32 ? resolve(Buffer.concat(parts)) : reject(new Error(`closed after ${got} bytes back`))));
    socket.on('error', reject);
  });
}

test('an encrypted stream crosses both ways, byte for byte, and both gateways say it was relayed as it is', async () => {
  // The VM has a store at A from an earlier migration: its note says what became of this one.
  PageStore.open(a.data, 'vm1').close();
  const payload = Buffer.alloc(3 * 2 ** 20);
  for (let i = 0; i < payload.length; i += 4) payload.writeUInt32LE((i * 2654435761) >>> 0, i);
  const dest = await tlsDestination(b.destPort, payload.length);
  const before = [a.gateway.history.length, b.gateway.history.length];
  const answer = await tlsSource(a.routePort, payload);
  expect((await dest.received).equals(payload)).toBe(true);
  expect(answer.equals(createHash('sha256').update(payload).digest())).toBe(true);
  await waitFor(() => a.gateway.history.length > before[0] && b.gateway.history.length > before[1]);
  dest.server.close();
  for (const [site, direction] of [[a, 'send'], [b, 'receive']] as const) {
    const report = site.gateway.history[site.gateway.history.length - 1];
    expect(report).toMatchObject({ vm: 'vm1', direction, result: 'completed', verbatim: { code: 'encrypted', streamOffset: 0 }, snapshotId: null });
    // The TLS records: more than the payload, as the source sent them.
    expect(report.streamBytes).toBeGreaterThan(payload.length);
    expect(site.logs.some((l) => l.msg?.toString().startsWith('stream relayed verbatim') && l.reason === 'encrypted')).toBe(true);
    expect(await site.metrics.text()).toMatch(new RegExp(`bfmig_streams_relayed_verbatim_total\\{vm="vm1",direction="${direction}",reason="encrypted"\\} 1`));
  }
  expect(readMigrationRecord(path.join(a.data, 'vm1'))).toMatchObject({ direction: 'send', result: 'completed', verbatim: { code: 'encrypted' } });
});

test('a route set to encrypted: refuse turns an encrypted stream away, saying why', async () => {
  const [routePort, peerPort] = await Promise.all([freePort(), freePort()]);
  const yaml = loopbackSiteYaml({ name: 'site-c', data: path.join(tmp, 'site-c'), peerPort, vm: 'vm1', routePort, farPeerPort: b.peerPort, targetPort: b.destPort }).replace(
    /(\n    target: [^\n]+)/,
    '$1\n    encrypted: refuse',
  );
  const c = await startLoggedGateway('site-c', yaml);
  try {
    const before = b.gateway.history.length;
    await expect(tlsSource(routePort, Buffer.from('hello'))).rejects.toThrow();
    await waitFor(() => c.logs.some((l) => String(l.error ?? '').includes('routes[].encrypted: refuse')));
    expect(c.logs.find((l) => String(l.error ?? '').includes('routes[].encrypted: refuse'))).toMatchObject({ reason: 'not-qemu' });
    expect(b.gateway.history.length).toBe(before);
  } finally {
    await c.gateway.stop(1);
  }
});

test("an encrypted stream is held to its route's WAN cap", async () => {
  const MBIT = 16;
  const [routePort, peerPort] = await Promise.all([freePort(), freePort()]);
  const yaml = loopbackSiteYaml({ name: 'site-d', data: path.join(tmp, 'site-d'), peerPort, vm: 'vm1', routePort, farPeerPort: b.peerPort, targetPort: b.destPort }).replace(
    /(\n    target: [^\n]+)/,
    `$1\n    wan: { maxMbit: ${MBIT} }`,
  );
  const d = await startLoggedGateway('site-d', yaml);
  try {
    const payload = Buffer.alloc(3 * 2 ** 20);
    for (let i = 0; i < payload.length; i += 4) payload.writeUInt32LE((i * 2654435761) >>> 0, i);
    const dest = await tlsDestination(b.destPort, payload.length);
    const startedAt = performance.now();
    const answer = await tlsSource(routePort, payload);
    // A cap only slows: the stream took at least what its bytes take at the cap (uncapped, loopback
    // carries them in tens of milliseconds). The burst a cap allows is a tenth of a second's worth.
    const seconds = (performance.now() - startedAt) / 1000;
    expect(seconds).toBeGreaterThan((0.9 * payload.length * 8) / (MBIT * 1e6));
    expect((await dest.received).equals(payload)).toBe(true);
    expect(answer.equals(createHash('sha256').update(payload).digest())).toBe(true);
    dest.server.close();
  } finally {
    await d.gateway.stop(1);
  }
});
