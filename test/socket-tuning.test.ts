import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { issueCerts } from '../src/cli/certs';
import type { TlsConfig } from '../src/gateway/security-config';
import { tuneSocket, WAN_QUEUE_BYTES } from '../src/gateway/socket-tuning';
import { PeerTransport } from '../src/gateway/transport';

describe('tuneSocket', () => {
  test('applies the options to a connected TCP socket, and says when it cannot', async () => {
    const server = net.createServer((s) => s.resume());
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
    const socket = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
    await new Promise((r) => socket.once('connect', r));
    expect(tuneSocket(socket, { recvBufferBytes: 256 * 1024, notSentBytes: 256 * 1024 })).toBe(true);
    socket.destroy();
    await new Promise((r) => socket.once('close', r));
    // A closed socket has no descriptor left to tune.
    expect(tuneSocket(socket, { recvBufferBytes: 256 * 1024 })).toBe(false);
    await new Promise((r) => server.close(r));
  });
});

describe('the WAN queue', () => {
  let tmp = '';
  let server: net.Server;
  let port = 0;

  beforeAll(async () => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'bfmig-wan-queue-'));
    // A listener that never answers: the dialled socket's queue is set before any handshake.
    server = net.createServer((s) => s.on('error', () => undefined));
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
    port = (server.address() as net.AddressInfo).port;
  });

  afterAll(async () => {
    await new Promise((r) => server.close(r));
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  function dialledQueue(tls: TlsConfig | null): number {
    const socket = new PeerTransport(tls).connect({ host: '127.0.0.1', port }, () => undefined);
    socket.on('error', () => undefined);
    const bytes = socket.writableHighWaterMark;
    socket.destroy();
    return bytes;
  }

  test('a dialled peer link queues WAN_QUEUE_BYTES before it asks the sender to wait, over TCP and over TLS alike', () => {
    expect(WAN_QUEUE_BYTES).toBe(256 * 1024);
    expect(dialledQueue(null)).toBe(WAN_QUEUE_BYTES);
    issueCerts(tmp, ['site-a'], 30);
    const read = (name: string): Buffer => fs.readFileSync(path.join(tmp, name));
    const tls: TlsConfig = {
      certFile: 'site-a.crt',
      keyFile: 'site-a.key',
      caFile: 'ca.crt',
      cert: read('site-a.crt'),
      key: read('site-a.key'),
      ca: read('ca.crt'),
      allowPeers: null,
      validTo: new Date(Date.now() + 86_400_000),
      caValidTo: new Date(Date.now() + 86_400_000),
    };
    expect(dialledQueue(tls)).toBe(WAN_QUEUE_BYTES);
  });
});
