import * as net from 'node:net';
import { tuneSocket } from '../src/gateway/socket-tuning';

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
