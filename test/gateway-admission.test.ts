/**
 * Admission that favours the legitimate: connections that have not said who they are yet are held to
 * pools of their own (per listener kind, per remote address) and give way to newer ones (the flood
 * itself is in gateway-admission-flood.test.ts); `peerVms` limits which VMs a peer may send; a peer's
 * Abort text is bounded before it is logged or echoed.
 */
import { EventEmitter } from 'node:events';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import * as tls from 'node:tls';
import { issueCerts } from '../src/cli/certs';
import { addressGroup, ConnectionGate, type Listener, type RefusalReason } from '../src/gateway/limits';
import { PEER_TEXT_CHARS, peerText } from '../src/gateway/session';
import { encodeJson, FrameType } from '../src/wire/frames';
import { rawPeer, refusals, startPair, stopPair, type TestSite, waitFor } from '../src/lab/harness/gateway-pair';
import { destinationStandIn, sourceStandIn } from '../src/lab/harness/qemu-standins';
import { treeListing } from '../src/lab/harness/stores';
import { guestMemory, migrationStream } from '../src/lab/harness/migration-stream';
import { suiteTempDir } from './temp-dir';

/** A stand-in for an accepted socket: what the gate reads of one. */
function fakeSocket(remoteAddress: string): net.Socket & { cut: boolean } {
  const socket = Object.assign(new EventEmitter(), { remoteAddress, cut: false });
  return socket as unknown as net.Socket & { cut: boolean };
}

describe('ConnectionGate', () => {
  const make = (max: number, pending: number, perAddress: number): { gate: ConnectionGate; evicted: Array<{ address: string; listener: Listener; reason: RefusalReason }> } => {
    const evicted: Array<{ address: string; listener: Listener; reason: RefusalReason }> = [];
    const gate = new ConnectionGate({ maxConnections: max, maxPendingConnections: pending, maxPendingPerAddress: perAddress }, (socket, listener, reason) => {
      evicted.push({ address: socket.remoteAddress ?? '', listener, reason });
      (socket as net.Socket & { cut: boolean }).cut = true;
      socket.emit('close');
    });
    return { gate, evicted };
  };

  test('an address at maxPendingPerAddress is refused; identified connections leave the pending pools', () => {
    const { gate } = make(10, 4, 2);
    const [s1, s2, s3] = ['10.0.0.1', '10.0.0.1', '10.0.0.1'].map(fakeSocket);
    expect(gate.admit(s1, 'peer')).toEqual({ admitted: true });
    expect(gate.admit(s2, 'source')).toEqual({ admitted: true });
    expect(gate.admit(s3, 'metrics')).toMatchObject({ admitted: false, reason: 'per-address-limit', detail: expect.stringMatching(/limits\.maxPendingPerAddress/) });
    gate.identified(s1);
    expect(gate.admit(s3, 'metrics')).toEqual({ admitted: true });
    expect(gate.openConnections).toBe(3);
    expect(gate.pendingConnections).toBe(2);
    s1.emit('close');
    expect(gate.openConnections).toBe(2);
  });

  test('IPv6 addresses count by their /64; IPv4 and IPv4-mapped ones as they are', () => {
    expect(addressGroup('2001:db8:0:1::5')).toBe('2001:db8:0:1::/64');
    expect(addressGroup('2001:0db8:0000:0001:ffff:0:0:7')).toBe('2001:db8:0:1::/64');
    expect(addressGroup('fe80::1%eth0')).toBe('fe80:0:0:0::/64');
    expect(addressGroup('::1')).toBe('0:0:0:0::/64');
    expect(addressGroup('127.0.0.1')).toBe('127.0.0.1');
    expect(addressGroup('::ffff:10.0.0.1')).toBe('::ffff:10.0.0.1');
    const { gate } = make(10, 10, 2);
    expect(gate.admit(fakeSocket('2001:db8::1'), 'peer').admitted).toBe(true);
    expect(gate.admit(fakeSocket('2001:db8::2'), 'peer').admitted).toBe(true);
    expect(gate.admit(fakeSocket('2001:db8::3'), 'peer')).toMatchObject({ admitted: false, reason: 'per-address-limit', detail: expect.stringMatching(/^2001:db8:0:0::\/64 already/) });
    expect(gate.admit(fakeSocket('2001:db8:0:1::1'), 'peer').admitted).toBe(true);
  });

  test('a full pending pool makes room by cutting the oldest connection of the address holding the most', () => {
    const { gate, evicted } = make(100, 4, 3);
    const flood = ['10.0.0.9', '10.0.0.9', '10.0.0.9', '10.0.0.8'].map(fakeSocket);
    const legit = fakeSocket('10.0.0.1');
    for (const s of flood) expect(gate.admit(s, 'peer').admitted).toBe(true);
    expect(gate.admit(legit, 'peer').admitted).toBe(true);
    expect(evicted).toEqual([{ address: '10.0.0.9', listener: 'peer', reason: 'pending-limit' }]);
    expect(flood[0].cut).toBe(true);
    // The flood's newcomers keep cutting the flood's own connections, never the address with one.
    for (let i = 0; i < 6; i++) expect(gate.admit(fakeSocket(i % 2 === 0 ? '10.0.0.9' : '10.0.0.8'), 'peer').admitted).toBe(true);
    expect(evicted).toHaveLength(7);
    expect(evicted.every((e) => e.address !== '10.0.0.1')).toBe(true);
    expect(legit.cut).toBe(false);
    // Other listeners' pools are their own.
    expect(gate.admit(fakeSocket('10.0.0.7'), 'source').admitted).toBe(true);
    expect(evicted.filter((e) => e.listener === 'source')).toHaveLength(0);
  });

  test('at maxConnections a pending connection gives way; only identified ones make the gateway refuse', () => {
    const { gate, evicted } = make(3, 3, 3);
    const sockets = ['10.0.0.1', '10.0.0.2', '10.0.0.3'].map(fakeSocket);
    for (const s of sockets) expect(gate.admit(s, 'source').admitted).toBe(true);
    for (const s of sockets.slice(0, 2)) gate.identified(s);
    expect(gate.admit(fakeSocket('10.0.0.4'), 'peer').admitted).toBe(true);
    expect(evicted).toEqual([{ address: '10.0.0.3', listener: 'source', reason: 'pending-limit' }]);
    expect(gate.openConnections).toBe(3);
    gate.identified(gate.pendingSockets()[0]);
    expect(gate.admit(fakeSocket('10.0.0.5'), 'peer')).toMatchObject({ admitted: false, reason: 'connection-limit' });
  });
});

test('peerText strips control characters and bounds the length', () => {
  expect(peerText('disk\u001b[31m full\r\n')).toBe('disk [31m full  ');
  const long = peerText('x'.repeat(4_000_000));
  expect(long.length).toBeLessThan(PEER_TEXT_CHARS + 40);
  expect(long).toMatch(/… \(3999488 more characters\)$/);
});

describe('peerVms and a peer\'s Abort text', () => {
  let tmp = '';
  let a: TestSite;
  let b: TestSite;
  let certs = '';
  const credentials = (site: string): { cert: Buffer; key: Buffer } => ({ cert: fs.readFileSync(path.join(certs, `${site}.crt`)), key: fs.readFileSync(path.join(certs, `${site}.key`)) });

  beforeAll(async () => {
    tmp = suiteTempDir('bfmig-peervms-');
    certs = path.join(tmp, 'certs');
    issueCerts(certs, ['site-a', 'site-b', 'site-c'], 30);
    const block = (site: string, peers: string): string => `tls:\n  cert: ${certs}/${site}.crt\n  key: ${certs}/${site}.key\n  ca: ${certs}/ca.crt\n  allowPeers: [${peers}]\n`;
    [a, b] = await startPair(tmp, [block('site-a', 'site-b'), `${block('site-b', 'site-a, site-c')}peerVms:\n  site-a: ["vm*"]\n  site-c: ["db-?", "web-*"]\n`]);
  });

  afterAll(() => stopPair([a, b]));

  test('a peer not allowed a VM is refused at its Hello before any store directory exists', async () => {
    const before = treeListing(b.data);
    const logged = refusals(b).length;
    const peer = await rawPeer(b.peerPort, credentials('site-c'));
    peer.hello('vm1', `127.0.0.1:${b.destPort}`);
    await peer.closed;
    expect(peer.abortText()).toMatch(/VM vm1 is not among peerVms for "site-c" \(db-\?, web-\*\)/);
    await waitFor(() => refusals(b).length > logged);
    expect(refusals(b)[logged]).toMatchObject({ listener: 'peer', reason: 'vm-not-allowed', peerName: 'site-c' });
    expect(await b.metrics.text()).toMatch(/bfmig_connections_refused_total\{listener="peer",reason="vm-not-allowed"\} 1/);
    expect(treeListing(b.data)).toEqual(before);
    expect(fs.existsSync(path.join(b.data, 'vm1'))).toBe(false);
    expect(b.gateway.history).toHaveLength(0);
  });

  test('a peer allowed a VM migrates it byte-exact', async () => {
    const stream = migrationStream(guestMemory([['pc.ram', 200]], 3), []);
    const dest = await destinationStandIn(b.destPort);
    expect(await sourceStandIn(a.routePort, stream)).toBe('closed');
    expect((await dest.received).bytes.equals(stream)).toBe(true);
  });

  test('a 4 MB Abort is logged and echoed bounded, without its control characters', async () => {
    const dest = await destinationStandIn(b.destPort);
    const peer = await rawPeer(b.peerPort, credentials('site-c'));
    const history = b.gateway.history.length;
    peer.hello('db-1', `127.0.0.1:${b.destPort}`);
    await waitFor(() => peer.frames.some((f) => f.type === FrameType.Offer));
    (peer.socket as tls.TLSSocket).write(encodeJson(FrameType.Abort, { error: `\u001b]0;owned\u0007\n${'A'.repeat(4_000_000)}` }));
    await peer.closed;
    const echoed = peer.abortText() ?? '';
    expect(echoed.length).toBeLessThan(PEER_TEXT_CHARS + 100);
    expect(echoed).toMatch(/^the sending gateway aborted: {2}\]0;owned  A+… \(\d+ more characters\)$/);
    await waitFor(() => b.gateway.history.length > history);
    expect((b.gateway.history[history].error ?? '').length).toBeLessThan(PEER_TEXT_CHARS + 100);
    const logged = b.logs.filter((l) => l.msg === 'migration failed' && l.vm === 'db-1');
    expect(logged.length).toBeGreaterThan(0);
    for (const line of logged) expect(String(line.error).length).toBeLessThan(PEER_TEXT_CHARS + 100);
    dest.close();
  });
});

describe('a receiving peer\'s Abort text at the sending gateway', () => {
  let tmp = '';
  let a: TestSite;
  let b: TestSite;
  let fake: net.Server | null = null;

  beforeAll(async () => {
    tmp = suiteTempDir('bfmig-abort-');
    [a, b] = await startPair(tmp);
    // Site B's gateway gives way to a peer that answers every Hello with an Offer and a 4 MB Abort.
    await b.gateway.stop(1);
    fake = net.createServer((socket) => {
      socket.on('error', () => undefined);
      // After its Offer (before it, a peer gets 4 KiB frames at most, so a 4 MB Abort would be refused unread).
      socket.once('data', () => {
        socket.write(encodeJson(FrameType.Offer, { site: 'site-b', snapshotId: null, layoutId: null, pageCount: 0, presentPages: 0 }));
        socket.end(encodeJson(FrameType.Abort, { error: `\u001b[2J${'B'.repeat(4_000_000)}` }));
      });
    });
    await new Promise<void>((r) => fake?.listen(b.peerPort, '127.0.0.1', () => r()));
  });

  afterAll(async () => {
    await a?.gateway.stop(1);
    await new Promise<void>((r) => (fake ? fake.close(() => r()) : r()));
  });

  test('is logged bounded, without its control characters', async () => {
    expect(await sourceStandIn(a.routePort, migrationStream(guestMemory([['pc.ram', 50]], 2), []))).toBe('reset');
    await waitFor(() => a.gateway.history.length === 1);
    const error = a.gateway.history[0].error ?? '';
    expect(error).toMatch(/^the peer gateway aborted: {2}\[2JB+… \(\d+ more characters\)$/);
    expect(error.length).toBeLessThan(PEER_TEXT_CHARS + 100);
    const lines = a.logs.filter((l) => typeof l.error === 'string' && (l.error as string).includes('BBBB'));
    expect(lines.length).toBeGreaterThan(0);
    for (const line of lines) expect(String(line.error).length).toBeLessThan(PEER_TEXT_CHARS + 100);
  });
});
