/**
 * The `limits:` of a real gateway pair on loopback: connections that do not say who they are in time
 * are cut, a migration that stops moving fails on both sides, and connections above the limits are
 * turned away or make way; each is logged and counted, and none touches a store.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { FrameType } from '../src/wire/frames';
import { rawPeer, refusals, startPair, stopPair, type TestSite, waitFor } from '../src/lab/harness/gateway-pair';
import { destinationStandIn, sourceStandIn } from '../src/lab/harness/qemu-standins';
import { treeListing } from '../src/lab/harness/stores';
import { guestMemory, migrationStream } from '../src/lab/harness/migration-stream';
import { suiteTempDir } from './temp-dir';

const LIMITS = 'limits:\n  handshakeSeconds: 1\n  idleSeconds: 2\n  maxConnections: 6\n';

/** Connects and reports when the gateway closed the connection, in ms after connecting (or trying to). */
function openIdle(port: number, drip = false, localAddress = '127.0.0.1'): Promise<{ socket: net.Socket; closedAfterMs: Promise<number> }> {
  return new Promise((resolve) => {
    const socket = net.connect({ host: '127.0.0.1', port, localAddress });
    const t0 = Date.now();
    socket.on('error', () => undefined);
    socket.resume();
    let timer: NodeJS.Timeout | null = null;
    const closedAfterMs = new Promise<number>((r) =>
      socket.once('close', () => {
        if (timer) clearInterval(timer);
        r(Date.now() - t0);
      }),
    );
    // A gateway that refuses at once may reset the connection before 'connect' is seen here.
    socket.once('close', () => resolve({ socket, closedAfterMs }));
    socket.once('connect', () => {
      // A slow drip of bytes does not extend the handshake deadline.
      if (drip) timer = setInterval(() => socket.write(Buffer.from([0])), 200);
      resolve({ socket, closedAfterMs });
    });
  });
}

describe('gateway limits', () => {
  let tmp = '';
  let a: TestSite;
  let b: TestSite;
  const memory = guestMemory([['pc.ram', 300]], 9);
  const stream = migrationStream(memory, []);

  beforeAll(async () => {
    tmp = suiteTempDir('bfmig-limits-');
    [a, b] = await startPair(tmp, [LIMITS, LIMITS]);
  });

  afterAll(() => stopPair([a, b]));

  test.each([
    ['peer', false],
    ['peer', true],
    ['source', false],
  ])('a silent or dripping %s connection (drip %s) is cut at limits.handshakeSeconds', async (listener, drip) => {
    const before = treeListing(tmp);
    const logged = refusals(b).length;
    // A drip that extended the deadline would keep the connection open until the test times out.
    const { closedAfterMs } = await openIdle(listener === 'peer' ? b.peerPort : b.routePort, drip);
    await closedAfterMs;
    await waitFor(() => refusals(b).length > logged);
    // The log names where the connection came from, although its socket is closed by then.
    expect(refusals(b).slice(logged)).toEqual(expect.arrayContaining([expect.objectContaining({ listener, reason: 'handshake-timeout', remote: expect.stringMatching(/^127\.0\.0\.1:\d+$/) })]));
    expect(treeListing(tmp)).toEqual(before);
  });

  test('a source that does not start with QEMU\'s stream magic opens nothing and dials no one', async () => {
    const before = treeListing(tmp);
    const logged = refusals(b).length;
    const historyA = a.gateway.history.length;
    expect(await sourceStandIn(b.routePort, Buffer.from('GET / HTTP/1.1\r\n\r\n'))).toBe('reset');
    await waitFor(() => refusals(b).length > logged);
    expect(refusals(b)[logged]).toMatchObject({ listener: 'source', reason: 'not-qemu' });
    expect(b.gateway.history).toHaveLength(0);
    expect(a.gateway.history).toHaveLength(historyA);
    expect(treeListing(tmp)).toEqual(before);
  });

  test('a migration that stops moving fails on both sides at limits.idleSeconds and is counted', async () => {
    // A source that sends the start of a real stream and then stalls without closing.
    const dest = await destinationStandIn(b.destPort);
    const source = net.connect({ host: '127.0.0.1', port: a.routePort });
    source.on('error', () => undefined);
    source.resume();
    const reset = new Promise<boolean>((r) => {
      let error = false;
      source.on('error', () => (error = true));
      source.on('close', () => r(error));
    });
    source.write(stream.subarray(0, 64 * 1024));
    expect(await reset).toBe(true);
    await waitFor(() => a.gateway.history.length === 1 && b.gateway.history.length === 1);
    expect(a.gateway.history[0]).toMatchObject({ direction: 'send', result: 'failed' });
    expect(a.gateway.history[0].error).toMatch(/no bytes moved for 2 s/);
    expect(b.gateway.history[0]).toMatchObject({ direction: 'receive', result: 'failed' });
    // The destination was dialled, given at most what the source sent, and reset.
    const got = await dest.received;
    expect(got.reset).toBe(true);
    expect(got.bytes.equals(stream.subarray(0, got.bytes.length))).toBe(true);
    expect(got.bytes.length).toBeLessThanOrEqual(64 * 1024);
    // Both sides watch the same silence; whichever checks first fails the migration (the other then
    // sees an Abort or a closed connection), so exactly one side counts an idle timeout.
    const sendIdle = /bfmig_idle_timeouts_total\{direction="send"\} 1/.test(await a.metrics.text());
    const receiveIdle = /bfmig_idle_timeouts_total\{direction="receive"\} 1/.test(await b.metrics.text());
    expect(sendIdle || receiveIdle).toBe(true);
    expect([...a.logs, ...b.logs].some((l) => l.msg === 'migration idle too long')).toBe(true);
  });

  test('an authenticated-looking peer that stalls after its Hello is cut by the idle limit', async () => {
    const dest = await destinationStandIn(b.destPort);
    const peer = await rawPeer(b.peerPort);
    const history = b.gateway.history.length;
    peer.hello('vm1', `127.0.0.1:${b.destPort}`);
    await waitFor(() => peer.frames.some((f) => f.type === FrameType.Offer));
    await peer.closed;
    await waitFor(() => b.gateway.history.length > history);
    expect(b.gateway.history[history].error).toMatch(/no bytes moved/);
    expect((await dest.received).bytes.length).toBe(0);
    expect(await b.metrics.text()).toMatch(/bfmig_idle_timeouts_total\{direction="receive"\} [1-9]/);
  });

  test('silent connections: one address is held to limits.maxPendingPerAddress, others take their place; all are cut in time', async () => {
    // Six silent connections fill the gateway (maxConnections 6) until the handshake limit cuts them (1 s).
    const held = await Promise.all(Array.from({ length: 6 }, () => openIdle(b.peerPort)));
    await waitFor(() => b.gateway.openConnections === 6, 800);
    expect(await b.metrics.text()).toMatch(/bfmig_connections_open\{listener="peer"\} 6/);
    // A seventh from the same address is refused at once: that address holds its share of strangers.
    let logged = refusals(b).length;
    const extra = await openIdle(b.routePort);
    await extra.closedAfterMs; // refused at once: a handshake timeout would be logged as such
    expect(refusals(b)[logged]).toMatchObject({ listener: 'source', reason: 'per-address-limit' });
    expect(await b.metrics.text()).toMatch(/bfmig_connections_refused_total\{listener="source",reason="per-address-limit"\} 1/);
    // The metrics port is held to the same share, and its refused connections are reset too.
    logged = refusals(b).length;
    const metricsPort = b.gateway.bound.get('metrics')?.port ?? 0;
    const metricsExtra = await new Promise<string>((resolve) => {
      const socket = net.connect({ host: '127.0.0.1', port: metricsPort });
      socket.on('error', (err: NodeJS.ErrnoException) => resolve(err.code ?? err.message));
      socket.on('close', () => resolve('closed'));
    });
    expect(metricsExtra).toBe('ECONNRESET');
    expect(refusals(b)[logged]).toMatchObject({ listener: 'metrics', reason: 'per-address-limit' });
    // One from another address gets in, in the place of the oldest silent one: none has said who it
    // is, and only connections that have can make a gateway refuse for maxConnections.
    logged = refusals(b).length;
    const other = await openIdle(b.routePort, false, '127.0.0.2');
    await held[0].closedAfterMs;
    expect(refusals(b)[logged]).toMatchObject({ listener: 'peer', reason: 'pending-limit', error: expect.stringMatching(/limits\.maxConnections/) });
    expect(b.gateway.openConnections).toBe(6);
    await Promise.all([...held, other].map((h) => h.closedAfterMs));
    await waitFor(() => b.gateway.openConnections === 0);
    // Room again: a whole migration goes through.
    const dest = await destinationStandIn(a.destPort);
    expect(await sourceStandIn(b.routePort, stream)).toBe('closed');
    expect((await dest.received).bytes.equals(stream)).toBe(true);
  });

  test('the metrics port: absurd headers are answered 431, clients without whole headers in time are cut, each logged and counted; /metrics still works', async () => {
    const port = b.gateway.bound.get('metrics')?.port ?? 0;
    const before = refusals(b).length;
    const absurd = await new Promise<string>((resolve) => {
      const socket = net.connect({ host: '127.0.0.1', port }, () => socket.write(`GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(100_000)}\r\n\r\n`));
      let text = '';
      socket.on('data', (d: Buffer) => (text += d.toString()));
      socket.on('error', () => undefined);
      socket.on('close', () => resolve(text));
    });
    expect(absurd).toMatch(/^HTTP\/1\.1 431/);
    expect(refusals(b)[before]).toMatchObject({ listener: 'metrics', reason: 'protocol' });
    let logged = refusals(b).length;
    const idle = await openIdle(port);
    await idle.closedAfterMs;
    await waitFor(() => refusals(b).length > logged);
    expect(refusals(b)[logged]).toMatchObject({ listener: 'metrics', reason: 'handshake-timeout', remote: expect.stringMatching(/^127\.0\.0\.1:\d+$/) });
    expect(await b.metrics.text()).toMatch(/bfmig_connections_refused_total\{listener="metrics",reason="handshake-timeout"\} 1/);
    // Headers that never end are refused as well, and counted.
    logged = refusals(b).length;
    const partial = await openIdle(port);
    partial.socket.write('GET /metrics HTTP/1.1\r\nHost: x\r\n');
    await partial.closedAfterMs;
    await waitFor(() => refusals(b).length > logged);
    expect(refusals(b)[logged]).toMatchObject({ listener: 'metrics', reason: 'handshake-timeout' });
    const res = await fetch(`http://127.0.0.1:${port}/metrics`);
    expect(res.status).toBe(200);
    expect(await res.text()).toMatch(/bfmig_connections_refused_total/);
  });
});

describe('limits.maxGuestRam', () => {
  let tmp = '';
  let a: TestSite;
  let b: TestSite;
  // 300 pages (1.2 MB): more than site-b's 1 MiB.
  const stream = migrationStream(guestMemory([['pc.ram', 300]], 4), []);

  beforeAll(async () => {
    tmp = suiteTempDir('bfmig-maxram-');
    [a, b] = await startPair(tmp, ['', 'limits:\n  maxGuestRam: 1MiB\n']);
  });

  afterAll(() => stopPair([a, b]));

  const storeBytes = (site: TestSite): number => {
    const pages = path.join(site.data, 'vm1', 'pages');
    return fs.existsSync(pages) ? fs.statSync(pages).size : 0;
  };

  test.each([
    ['receiving', () => [a, b] as const],
    ['sending', () => [b, a] as const],
  ])('a stream declaring more guest RAM than the %s gateway allows fails there before its store grows', async (_role, sites) => {
    const [from, to] = sites();
    const limited = b;
    const counts = [from.gateway.history.length, to.gateway.history.length];
    const dest = await destinationStandIn(to.destPort);
    expect(await sourceStandIn(from.routePort, stream)).toBe('reset');
    await waitFor(() => from.gateway.history.length > counts[0] && limited.gateway.history.length > (limited === from ? counts[0] : counts[1]));
    const report = limited.gateway.history[limited.gateway.history.length - 1];
    expect(report.result).toBe('failed');
    expect(report.error).toMatch(/300 pages .* more than the 256 allowed \(limits\.maxGuestRam\)/);
    expect(storeBytes(limited)).toBe(0);
    dest.close();
  });
});
