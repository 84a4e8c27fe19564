/**
 * A gateway is no tunnel: what the destination sends back reaches the sending gateway only as QEMU
 * return-path messages, and only after the destination has been handed the stream's header; what a
 * receiving peer sends back reaches the source QEMU only as such messages too. Anything else ends the
 * migration, and none of it is passed on.
 */
import * as net from 'node:net';
import { encodeFrame, encodeJson, FrameParser, FrameType } from '../src/wire/frames';
import { rawPeer, startPair, stopPair, type TestSite, waitFor } from '../src/lab/harness/gateway-pair';
import { guestMemory, migrationStream } from '../src/lab/harness/migration-stream';
import { suiteTempDir } from './temp-dir';

const BANNER = Buffer.from('SSH-2.0-OpenSSH_9.2p1\r\n');

/** A service at `port` that is not QEMU: it writes `reply` when a client connects, or after `after` bytes from it. */
async function otherService(port: number, reply: Buffer, after = 0): Promise<{ got: () => number; close: () => void }> {
  let got = 0;
  const server = net.createServer((socket) => {
    socket.on('error', () => undefined);
    if (after === 0) socket.write(reply);
    socket.on('data', (chunk: Buffer) => {
      const before = got;
      got += chunk.length;
      if (after > 0 && before < after && got >= after) socket.write(reply);
    });
  });
  await new Promise<void>((r) => server.listen(port, '127.0.0.1', () => r()));
  return { got: () => got, close: () => server.close() };
}

describe('the receiving gateway relays only QEMU return-path messages', () => {
  let tmp = '';
  let a: TestSite;
  let b: TestSite;
  const stream = migrationStream(guestMemory([['pc.ram', 16]], 5), []);

  beforeAll(async () => {
    tmp = suiteTempDir('bfmig-tunnel-');
    [a, b] = await startPair(tmp);
  });

  afterAll(() => stopPair([a, b]));

  test.each([
    ['a banner it sends on connect, before any stream byte', 0, /before the stream began/],
    ['a reply to the stream header that is not a return-path message', 8, /return path: UNKNOWN_TYPE/],
  ])('%s ends the migration and never reaches the peer', async (_what, after, error) => {
    const service = await otherService(b.destPort, BANNER, after);
    const peer = await rawPeer(b.peerPort);
    peer.hello('vm1', `127.0.0.1:${b.destPort}`);
    await waitFor(() => peer.frames.some((f) => f.type === FrameType.Offer || f.type === FrameType.Abort));
    if (after > 0) peer.socket.write(encodeFrame(FrameType.Literal, stream.subarray(0, 64)));
    await peer.closed;
    service.close();
    expect(peer.frames.filter((f) => f.type === FrameType.Return)).toEqual([]);
    for (const f of peer.frames) expect(f.payload.includes(BANNER.subarray(0, 8))).toBe(false);
    expect(peer.abortText()).toMatch(error);
  });
});

describe('the sending gateway passes a receiving peer\'s Return frames to the source only as return-path messages', () => {
  let tmp = '';
  let a: TestSite;
  let b: TestSite;
  let fake: net.Server | null = null;
  const stream = migrationStream(guestMemory([['pc.ram', 16]], 6), []);

  beforeAll(async () => {
    tmp = suiteTempDir('bfmig-tunnel-send-');
    [a, b] = await startPair(tmp);
    // Site B's gateway gives way to a hostile receiver: it offers nothing, then sends a valid PONG and
    // some other service's banner as the destination's "return path".
    await b.gateway.stop(1);
    fake = net.createServer((socket) => {
      socket.on('error', () => undefined);
      const frames = new FrameParser((type) => {
        if (type !== FrameType.Hello) return;
        socket.write(encodeJson(FrameType.Offer, { site: 'site-b', snapshotId: null, layoutId: null, pageCount: 0, presentPages: 0 }));
        socket.write(encodeFrame(FrameType.Return, Buffer.from([0, 2, 0, 4, 0, 0, 0, 1])));
        socket.write(encodeFrame(FrameType.Return, BANNER));
      });
      socket.on('data', (chunk: Buffer) => frames.push(chunk));
    });
    await new Promise<void>((r) => fake?.listen(b.peerPort, '127.0.0.1', () => r()));
  });

  afterAll(async () => {
    await a.gateway.stop(1);
    await new Promise<void>((r) => (fake ? fake.close(() => r()) : r()));
  });

  test('the PONG reaches the source, the banner never does, and the migration fails', async () => {
    const back: Buffer[] = [];
    const outcome = await new Promise<'closed' | 'reset'>((resolve) => {
      let reset = false;
      const socket = net.connect({ host: '127.0.0.1', port: a.routePort }, () => socket.write(stream));
      socket.on('data', (chunk: Buffer) => back.push(chunk));
      socket.on('error', () => (reset = true));
      socket.on('close', () => resolve(reset ? 'reset' : 'closed'));
    });
    await waitFor(() => a.gateway.history.length === 1);
    // The source's connection is cut (a reset, or a close when the reset finds nothing left unread).
    expect(['reset', 'closed']).toContain(outcome);
    expect(a.gateway.history[0].error).toMatch(/return path: UNKNOWN_TYPE/);
    expect(Buffer.concat(back).equals(Buffer.from([0, 2, 0, 4, 0, 0, 0, 1]))).toBe(true);
    expect(a.gateway.history[0]).toMatchObject({ direction: 'send', result: 'failed' });
  });
});
