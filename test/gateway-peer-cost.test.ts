/**
 * What a peer can make a receiving gateway hold is bounded: requests and frames a peer can repeat
 * cost the gateway no more memory than it states. Measured on a `bfmig gateway` child process (its
 * peak RSS), against a hand-driven peer that never reads what it asked for.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { loopbackMultiRouteYaml } from '../src/lab/harness/loopback-config';
import { type SiteGateway, startSiteGateway } from '../src/lab/harness/site-gateway';
import { freePort } from '../src/lab/vm/ports';
import { StreamHash } from '../src/digest';
import { encodeFrame, encodeJson, FrameType, PROTOCOL_VERSION } from '../src/wire/frames';
import { rawPeer, waitFor } from '../src/lab/harness/gateway-pair';
import { guestMemory, migrationStream, streamStart } from '../src/lab/harness/migration-stream';
import { suiteTempDir } from './temp-dir';

const GiB = 1024 * 1024 * 1024;

/** A receiving `bfmig gateway` child process, and a destination behind it that takes whatever it is given. */
interface Receiver {
  tmp: string;
  gateway: SiteGateway;
  peerPort: number;
  destPort: number;
  stop: () => Promise<void>;
}

async function startReceiver(): Promise<Receiver> {
  const tmp = suiteTempDir('bfmig-peercost-');
  // The peer port is read from the config by the test; the route's (never used here) is any free one.
  const [peerPort, farPeer] = await Promise.all(Array.from({ length: 2 }, () => freePort()));
  const destination = net.createServer((s) => {
    s.resume();
    s.on('error', () => undefined);
  });
  // Bound before its port goes into the config: no other process can take it in between.
  await new Promise<void>((r) => destination.listen(0, '127.0.0.1', () => r()));
  const destPort = (destination.address() as net.AddressInfo).port;
  const data = path.join(tmp, 'site-b');
  fs.mkdirSync(data);
  const yaml = loopbackMultiRouteYaml({ name: 'site-b', data, peerPort, farPeerPort: farPeer, routes: [{ vm: 'vm1', routePort: 0, targetPort: destPort }] });
  const gateway = await startSiteGateway(tmp, 'site-b', yaml, 'child-process');
  return {
    tmp,
    gateway,
    peerPort,
    destPort,
    stop: async () => {
      await gateway.stop();
      destination.close();
    },
  };
}

describe('a peer costs the receiving gateway a bounded amount', () => {
  let receiver: Receiver;

  beforeAll(async () => {
    receiver = await startReceiver();
  });

  afterAll(async () => receiver?.stop());

  test('20 digest table requests for a 16 GiB guest from a peer that does not read: the table is queued once, a little at a time, and the second request ends the migration', async () => {
    const before = receiver.gateway.peakRssMiB() ?? 0;
    const peer = await rawPeer(receiver.peerPort);
    peer.hello('vm1', `127.0.0.1:${receiver.destPort}`);
    await waitFor(() => peer.frames.some((f) => f.type === FrameType.Offer));
    // The stream's start declares one 16 GiB block: its digest table is 64 MiB.
    peer.socket.write(encodeFrame(FrameType.Literal, streamStart([['pc.ram', 16 * GiB]])));
    // Stop reading: whatever the gateway writes for this peer now stays queued on its side.
    peer.socket.pause();
    for (let i = 0; i < 20; i++) peer.socket.write(encodeFrame(FrameType.TableRequest));
    await waitFor(() => receiver.gateway.reports.length > 0, 30_000);
    expect(receiver.gateway.reports[0]).toMatchObject({ direction: 'receive', result: 'failed' });
    const log = fs.readFileSync(path.join(receiver.tmp, 'site-b.log'), 'utf8');
    expect(log).toMatch(/a second digest table request/);
    const peak = receiver.gateway.peakRssMiB() ?? Infinity;
    console.log(`receiving gateway peak RSS: ${before.toFixed(1)} MiB before, ${peak.toFixed(1)} MiB after 20 table requests (16 GiB guest, 64 MiB table)`);
    // The store's own table (64 MiB) and what is queued for the peer (a few MiB) — not 20 copies of it.
    expect(peak - before).toBeLessThan(64 + 48);
    peer.socket.destroy();
  });
});

describe('every frame a sending peer can repeat has a bound', () => {
  let receiver: Receiver;
  const start = streamStart([['pc.ram', 64 * 4096]]);
  const whole = migrationStream(guestMemory([['pc.ram', 64]], 9), []);

  beforeAll(async () => {
    receiver = await startReceiver();
  });

  afterAll(async () => receiver?.stop());

  test.each<[string, (peer: net.Socket) => void, RegExp]>([
    ['a second Hello', (s) => s.write(encodeJson(FrameType.Hello, { protocol: PROTOCOL_VERSION, site: 'raw', vm: 'vm1', target: `127.0.0.1:${receiver.destPort}` })), /a second Hello/],
    ['a Seal that does not match, after one that did', (s) => s.write(encodeJson(FrameType.Seal, { streamBytes: start.length, streamCheck: '0000000000000000' })), /damaged between the gateways/],
    ['stream bytes after the sealed end of the stream', (s) => s.write(encodeFrame(FrameType.Literal, Buffer.alloc(16))), /after the sealed end/],
    ['an unknown frame type, 10,000 times', (s) => s.write(Buffer.concat(Array.from({ length: 10_000 }, () => encodeFrame(99 as FrameType)))), /unexpected frame type 99/],
  ])('%s ends the migration, and the gateway serves the next one', async (what, repeat, error) => {
    const reports = receiver.gateway.reports.length;
    const peer = await rawPeer(receiver.peerPort);
    peer.hello('vm1', `127.0.0.1:${receiver.destPort}`);
    await waitFor(() => peer.frames.some((f) => f.type === FrameType.Offer));
    // A whole stream for the sealed-end case (a Seal seals the end only once the stream has one).
    const sent = what.startsWith('stream bytes') ? whole : start;
    peer.socket.write(encodeFrame(FrameType.Literal, sent));
    const check = new StreamHash();
    check.update(sent);
    if (!what.startsWith('a second Hello') && !what.startsWith('an unknown')) {
      peer.socket.write(encodeJson(FrameType.Seal, { streamBytes: sent.length, streamCheck: check.digest() }));
    }
    repeat(peer.socket);
    await waitFor(() => receiver.gateway.reports.length > reports, 30_000);
    expect(receiver.gateway.reports[reports]).toMatchObject({ direction: 'receive', result: 'failed' });
    await peer.closed;
    expect(peer.abortText()).toMatch(error);
  });
});
