/**
 * Failures through a real gateway pair on loopback, with synthetic QEMU streams standing in for
 * QEMU: every failure ends that one migration, resets the source's connection (a real source QEMU
 * then reports a failed migration), hands the destination no wrong byte, and the next migration works.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import type { Gateway } from '../src/gateway/gateway';
import type { MigrationReport } from '../src/gateway/session';
import { StreamHash } from '../src/digest';
import { encodeFrame, encodeJson, FrameType } from '../src/wire/frames';
import { destinationStandIn as destination, rawPeer, sourceStandIn as migrate, startPair, type TestSite as Site, waitFor } from './gateway-pair';
import { guestMemory, migrationStream, PAGE } from './migration-stream';

function snapshotOf(site: Site): string | null {
  return (JSON.parse(fs.readFileSync(path.join(site.data, 'vm1', 'meta.json'), 'utf8')) as { snapshotId: string | null }).snapshotId;
}

async function lastReport(gateway: Gateway, count: number): Promise<MigrationReport> {
  for (let i = 0; i < 200 && gateway.history.length < count; i++) await new Promise((r) => setTimeout(r, 10));
  return gateway.history[count - 1];
}

describe('gateway failures', () => {
  let tmp = '';
  let a: Site;
  let b: Site;
  const memory = guestMemory(
    [
      ['pc.ram', 600],
      ['vga', 40],
    ],
    21,
  );
  const stream = migrationStream(memory, []);

  beforeAll(async () => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'bfmig-faults-'));
    [a, b] = await startPair(tmp);
  });

  afterAll(async () => {
    await a.gateway.stop(1);
    await b.gateway.stop(1);
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  test('a first leg, then a retained page corrupted on disk: the back leg fails before the bad page leaves, and the next one succeeds', async () => {
    // A → B: nothing to reuse.
    let dest = await destination(b.destPort);
    expect(await migrate(a.routePort, stream)).toBe('closed');
    let got = await dest.received;
    expect(got.bytes.equals(stream)).toBe(true);
    expect(await lastReport(a.gateway, 1)).toMatchObject({ result: 'completed', mode: 'none' });

    // Corrupt one retained page at A, behind its digest.
    const pages = path.join(a.data, 'vm1', 'pages');
    const fd = fs.openSync(pages, 'r+');
    const victim = memory.pages.findIndex((page, i) => i >= 300 && !page.every((v) => v === 0));
    const original = memory.pages[victim];
    fs.writeSync(fd, Buffer.from([original[100] ^ 0x55]), 0, 1, victim * PAGE + 100);
    fs.closeSync(fd);

    // B → A: the run holding the corrupted page fails its digest check at A.
    dest = await destination(a.destPort);
    expect(await migrate(b.routePort, stream)).toBe('reset');
    got = await dest.received;
    expect(got.bytes.equals(stream.subarray(0, got.bytes.length))).toBe(true);
    expect(got.bytes.length).toBeLessThan(stream.indexOf(original));
    const failed = await lastReport(b.gateway, 2);
    expect(failed).toMatchObject({ direction: 'send', result: 'failed' });
    expect(failed.error).toMatch(/do not match the sender's digest/);

    // Neither store claims a snapshot now; the next B → A sends what it must and completes.
    dest = await destination(a.destPort);
    expect(await migrate(b.routePort, stream)).toBe('closed');
    got = await dest.received;
    expect(got.bytes.equals(stream)).toBe(true);
    const retried = await lastReport(b.gateway, 3);
    expect(retried).toMatchObject({ result: 'completed' });
    expect(retried.mode).not.toBe('shared-snapshot');
  });

  test('a stream the codec does not understand is relayed verbatim and leaves the stores as they were', async () => {
    const metaOf = (site: Site): string => fs.readFileSync(path.join(site.data, 'vm1', 'meta.json'), 'utf8');
    const before = [metaOf(a), metaOf(b)];
    const dest = await destination(b.destPort);
    const odd = Buffer.concat([stream.subarray(0, 8), Buffer.alloc(5000, 0xee)]);
    expect(await migrate(a.routePort, odd)).toBe('closed');
    expect((await dest.received).bytes.equals(odd)).toBe(true);
    const report = await lastReport(a.gateway, a.gateway.history.length);
    expect(report).toMatchObject({ direction: 'send', result: 'completed' });
    // It carried no RAM the codec could follow, so neither store changed (nor claims anything new).
    expect([metaOf(a), metaOf(b)]).toEqual(before);

    // Truncated input (no EOF) is bad input: that migration fails, the next one works.
    const claimed = [snapshotOf(a), snapshotOf(b)];
    expect(claimed[0]).not.toBeNull();
    const truncated = await destination(b.destPort);
    expect(await migrate(a.routePort, stream.subarray(0, stream.length - 100))).toBe('reset');
    // The destination never sees a stream that parses to the end (it is reset, or cut short).
    expect((await truncated.received).bytes.length).toBeLessThanOrEqual(stream.length - 100);
    expect((await lastReport(a.gateway, a.gateway.history.length)).error).toMatch(/TRUNCATED/);
    // Both stores went back to the snapshot they held before the failed migration: still restorable.
    for (let i = 0; i < 100 && snapshotOf(b) !== claimed[1]; i++) await new Promise((r) => setTimeout(r, 10));
    expect([snapshotOf(a), snapshotOf(b)]).toEqual(claimed);

    const next = await destination(b.destPort);
    expect(await migrate(a.routePort, stream)).toBe('closed');
    expect((await next.received).bytes.equals(stream)).toBe(true);
  });

  test('an unreachable destination fails the migration at the source', async () => {
    // Nothing listens on B's destination port now.
    expect(await migrate(a.routePort, stream)).toBe('reset');
    const report = await lastReport(a.gateway, a.gateway.history.length);
    expect(report).toMatchObject({ direction: 'send', result: 'failed' });
    expect(report.error).toMatch(/destination/);
  });

  test('a page damaged between the gateways: the destination never gets the last byte of the stream, so it never finishes loading it', async () => {
    const original = migrationStream(guestMemory([['pc.ram', 64]], 31), []);
    const check = new StreamHash();
    check.update(original);
    // One byte of one page flipped on the way, in a Literal frame: no page digest covers it, only the
    // stream check in the sender's End.
    const damaged = Buffer.from(original);
    damaged[original.length >> 1] ^= 0x01;
    // A destination that counts what it has been given.
    let given = 0;
    let cut = false;
    const server = net.createServer((socket) => {
      server.close();
      socket.on('data', (chunk: Buffer) => (given += chunk.length));
      socket.on('error', () => (cut = true));
      socket.on('close', () => (cut = true));
    });
    await new Promise<void>((r) => server.listen(b.destPort, '127.0.0.1', () => r()));
    const peer = await rawPeer(b.peerPort);
    peer.hello('vm1', `127.0.0.1:${b.destPort}`);
    await waitFor(() => peer.frames.some((f) => f.type === FrameType.Offer));
    peer.socket.write(encodeFrame(FrameType.Literal, damaged));
    // Everything but the last byte reaches the destination, which waits for it...
    await waitFor(() => given === original.length - 1);
    await new Promise((r) => setTimeout(r, 200));
    expect(given).toBe(original.length - 1);
    expect(cut).toBe(false);
    // ...until the End shows the damage: then the destination is cut off, the last byte never sent.
    peer.socket.write(encodeJson(FrameType.End, { streamBytes: original.length, streamCheck: check.digest(), snapshotId: 'damaged-on-the-way' }));
    await waitFor(() => cut);
    expect(given).toBe(original.length - 1);
    await peer.closed;
    expect(peer.abortText()).toMatch(/XXH3-64 .* bytes were damaged between the gateways/);
  });
});
