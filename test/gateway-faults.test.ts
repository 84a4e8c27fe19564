/**
 * Failures through a real gateway pair on loopback, with synthetic QEMU streams standing in for
 * QEMU: every failure ends that one migration, resets the source's connection (a real source QEMU
 * then reports a failed migration), hands the destination no wrong byte, and the next migration works.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import type { Gateway } from '../src/gateway/gateway';
import type { MigrationReport } from '../src/gateway/session';
import { StreamHash } from '../src/digest';
import { StreamParts } from '../src/proxy/stream-parts';
import { StreamParser } from '../src/qemu/parser';
import { encodeFrame, encodeJson, FrameType } from '../src/wire/frames';
import { rawPeer, startPair, stopPair, type TestSite as Site, waitFor } from '../src/lab/harness/gateway-pair';
import { destinationStandIn as destination, sourceStandIn as migrate } from '../src/lab/harness/qemu-standins';
import { guestMemory, migrationStream, PAGE } from '../src/lab/harness/migration-stream';
import { suiteTempDir } from './temp-dir';

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
    tmp = suiteTempDir('bfmig-faults-');
    [a, b] = await startPair(tmp);
  });

  afterAll(() => stopPair([a, b]));

  test('a first leg, then a retained page corrupted on disk: the back leg fails before the bad page leaves, and the next one succeeds', async () => {
    // A → B: nothing to reuse.
    let dest = await destination(b.destPort);
    expect(await migrate(a.routePort, stream)).toBe('closed');
    let got = await dest.received;
    expect(got.bytes.equals(stream)).toBe(true);
    expect(await lastReport(a.gateway, 1)).toMatchObject({ result: 'completed', mode: 'none' });
    await lastReport(b.gateway, 1);
    const firstLeg = snapshotOf(a);
    expect(firstLeg).not.toBeNull();
    expect(snapshotOf(b)).toBe(firstLeg);

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

    // The sender put back the snapshot of the first leg; the receiver, having found a corrupted page,
    // claims none. So the stores share no snapshot, and the next B → A reuses what A still holds
    // through the digest-table exchange, sends what it must and completes.
    await lastReport(a.gateway, 2);
    expect(snapshotOf(b)).toBe(firstLeg);
    expect(snapshotOf(a)).toBeNull();
    dest = await destination(a.destPort);
    expect(await migrate(b.routePort, stream)).toBe('closed');
    got = await dest.received;
    expect(got.bytes.equals(stream)).toBe(true);
    const retried = await lastReport(b.gateway, 3);
    expect(retried).toMatchObject({ result: 'completed', mode: 'digest-table' });
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
    const receivedBefore = b.gateway.history.length;
    expect(await migrate(a.routePort, stream.subarray(0, stream.length - 100))).toBe('reset');
    // The destination never gets the device-state tail (held back until a check passes) and is reset.
    const cutShort = await truncated.received;
    expect(cutShort.reset).toBe(true);
    expect(cutShort.bytes.length).toBeLessThanOrEqual(tailStartOf(stream));
    expect(cutShort.bytes.equals(stream.subarray(0, cutShort.bytes.length))).toBe(true);
    expect((await lastReport(a.gateway, a.gateway.history.length)).error).toMatch(/TRUNCATED/);
    // Both stores went back to the snapshot they held before the failed migration: still restorable.
    await lastReport(b.gateway, receivedBefore + 1);
    expect([snapshotOf(a), snapshotOf(b)]).toEqual(claimed);

    const next = await destination(b.destPort);
    expect(await migrate(a.routePort, stream)).toBe('closed');
    expect((await next.received).bytes.equals(stream)).toBe(true);
  });

  test('a stream relayed verbatim that its destination refuses after taking every byte fails at both gateways, and the stores stay as they were', async () => {
    const claimed = [snapshotOf(a), snapshotOf(b)];
    // A QEMU that refused the stream exits with bytes unread: its connection resets. This one has taken
    // every byte, and the gateway's end, before it does: the gateway must wait for it.
    let taken = 0;
    // Half open, as QEMU is: the gateway's end does not close this side.
    const server = net.createServer({ allowHalfOpen: true }, (s) => {
      server.close();
      s.on('data', (chunk: Buffer) => (taken += chunk.length));
      s.on('end', () => setTimeout(() => s.resetAndDestroy(), 300));
      s.on('error', () => undefined);
    });
    await new Promise<void>((r) => server.listen(b.destPort, '127.0.0.1', () => r()));
    const odd = Buffer.concat([stream.subarray(0, 8), Buffer.alloc(5000, 0xee)]);
    const counts = [a.gateway.history.length, b.gateway.history.length];
    expect(await migrate(a.routePort, odd)).toBe('reset');
    expect(taken).toBe(odd.length);
    const received = await lastReport(b.gateway, counts[1] + 1);
    expect(received).toMatchObject({ direction: 'receive', result: 'failed', verbatim: { code: 'section-type' } });
    expect(received.error).toMatch(/refused the stream relayed verbatim \(.*ECONNRESET/);
    expect(await lastReport(a.gateway, counts[0] + 1)).toMatchObject({ direction: 'send', result: 'failed' });
    expect([snapshotOf(a), snapshotOf(b)]).toEqual(claimed);
  });

  test.each([
    [0, 'completed'],
    [1, 'failed'],
  ] as const)('with QEMU\'s return path open, the destination\'s SHUT %d decides the receiving side\'s account: %s', async (shut, result) => {
    const dest = await countingDestination();
    const peer = await rawPeer(b.peerPort);
    const count = b.gateway.history.length;
    const claimed = snapshotOf(b);
    peer.hello('vm1', `127.0.0.1:${b.destPort}`);
    await waitFor(() => peer.frames.some((f) => f.type === FrameType.Offer));
    peer.socket.write(encodeFrame(FrameType.Literal, original));
    peer.socket.write(encodeJson(FrameType.Seal, { streamBytes: original.length, streamCheck: check.digest() }));
    await waitFor(() => dest.given() === original.length);
    // Loaded (or not): QEMU says so on its return path before it closes, and the source closes after that.
    const said = Buffer.from([0, 1, 0, 4, 0, 0, 0, shut]);
    (await dest.socket).write(said);
    await waitFor(() => peer.frames.some((f) => f.type === FrameType.Return));
    peer.socket.write(encodeJson(FrameType.End, { streamBytes: original.length, streamCheck: check.digest(), snapshotId: `shut-${shut}` }));
    await peer.closed;
    const report = await lastReport(b.gateway, count + 1);
    expect(report).toMatchObject({ direction: 'receive', result });
    if (shut === 0) {
      expect(peer.frames.some((f) => f.type === FrameType.Done)).toBe(true);
      expect(snapshotOf(b)).toBe('shut-0');
    } else {
      expect(peer.abortText()).toMatch(/could not load the stream \(its return path's SHUT said 1\)/);
      expect(snapshotOf(b)).toBe(claimed);
    }
  });

  test('an unreachable destination fails the migration at the source', async () => {
    // Nothing listens on B's destination port now.
    expect(await migrate(a.routePort, stream)).toBe('reset');
    const report = await lastReport(a.gateway, a.gateway.history.length);
    expect(report).toMatchObject({ direction: 'send', result: 'failed' });
    expect(report.error).toMatch(/destination/);
  });

  /** Where the stream's device-state tail starts: the receiver holds everything from there on back. */
  function tailStartOf(bytes: Buffer): number {
    const parts = new StreamParts();
    const parser = new StreamParser((record) => parts.record(record));
    parts.feed(bytes);
    parser.push(bytes);
    return parts.tailStart;
  }

  /**
   * A destination that counts what it has been given and can talk back like QEMU's return path; `cut`
   * once its connection is gone, `reset` if it went with an error rather than an end.
   */
  async function countingDestination(): Promise<{ given: () => number; cut: () => boolean; reset: () => boolean; socket: Promise<net.Socket> }> {
    let given = 0;
    let cut = false;
    let reset = false;
    let accepted!: (s: net.Socket) => void;
    const socket = new Promise<net.Socket>((r) => (accepted = r));
    const server = net.createServer((s) => {
      server.close();
      s.on('data', (chunk: Buffer) => (given += chunk.length));
      s.on('end', () => s.end());
      s.on('error', () => (cut = reset = true));
      s.on('close', () => (cut = true));
      accepted(s);
    });
    await new Promise<void>((r) => server.listen(b.destPort, '127.0.0.1', () => r()));
    return { given: () => given, cut: () => cut, reset: () => reset, socket };
  }

  const original = migrationStream(guestMemory([['pc.ram', 64]], 31), []);
  const check = new StreamHash();
  check.update(original);
  const tailStart = tailStartOf(original);

  test.each([
    ['in a page', original.length >> 1],
    ['in the device state', tailStart + 40],
    ['in the vmdesc trailer', original.length - 2],
  ])('a byte damaged between the gateways %s: the destination never gets the stream\'s device-state tail, so it never finishes loading it', async (_where, at) => {
    expect(tailStart).toBeGreaterThan(0);
    // One byte flipped on the way, in a Literal frame: no page digest covers it, only the stream check.
    const damaged = Buffer.from(original);
    damaged[at] ^= 0x01;
    const dest = await countingDestination();
    const peer = await rawPeer(b.peerPort);
    peer.hello('vm1', `127.0.0.1:${b.destPort}`);
    await waitFor(() => peer.frames.some((f) => f.type === FrameType.Offer));
    peer.socket.write(encodeFrame(FrameType.Literal, damaged));
    // Everything before the device state reaches the destination, which waits for the rest...
    await waitFor(() => dest.given() === tailStart);
    expect(dest.cut()).toBe(false);
    // ...until the End shows the damage: then the destination is cut off, the tail never sent (the
    // gateway handles frames in order, so the whole Literal was handled before the End).
    peer.socket.write(encodeJson(FrameType.End, { streamBytes: original.length, streamCheck: check.digest(), snapshotId: 'damaged-on-the-way' }));
    await waitFor(() => dest.cut());
    expect(dest.given()).toBe(tailStart);
    await peer.closed;
    expect(peer.abortText()).toMatch(/XXH3-64 .* bytes were damaged between the gateways/);
  });

  test('with QEMU\'s return path open, the tail waits for the sender\'s Seal; a Seal that does not match cuts the destination off before its EOF', async () => {
    const damaged = Buffer.from(original);
    damaged[tailStart + 40] ^= 0x01;
    const dest = await countingDestination();
    const peer = await rawPeer(b.peerPort);
    peer.hello('vm1', `127.0.0.1:${b.destPort}`);
    await waitFor(() => peer.frames.some((f) => f.type === FrameType.Offer));
    peer.socket.write(encodeFrame(FrameType.Literal, damaged.subarray(0, 64)));
    await waitFor(() => dest.given() === 64);
    // The destination opens its return path (a PONG, as QEMU answers the source's first PING).
    const pong = Buffer.from([0, 2, 0, 4, 0, 0, 0, 1]);
    (await dest.socket).write(pong);
    await waitFor(() => peer.frames.some((f) => f.type === FrameType.Return));
    expect(Buffer.concat(peer.frames.filter((f) => f.type === FrameType.Return).map((f) => f.payload)).equals(pong)).toBe(true);
    peer.socket.write(encodeFrame(FrameType.Literal, damaged.subarray(64)));
    // Current framing: the tail is held although the return path is open, waiting for the Seal (which
    // the gateway handles after the whole Literal).
    await waitFor(() => dest.given() === tailStart);
    peer.socket.write(encodeJson(FrameType.Seal, { streamBytes: original.length, streamCheck: check.digest() }));
    await waitFor(() => dest.cut());
    expect(dest.given()).toBe(tailStart);
    await peer.closed;
    expect(peer.abortText()).toMatch(/bytes were damaged between the gateways/);
  });

  test('with QEMU\'s return path open, a matching Seal lets the tail go before the source closes', async () => {
    const dest = await countingDestination();
    const peer = await rawPeer(b.peerPort);
    peer.hello('vm1', `127.0.0.1:${b.destPort}`);
    await waitFor(() => peer.frames.some((f) => f.type === FrameType.Offer));
    peer.socket.write(encodeFrame(FrameType.Literal, original.subarray(0, 64)));
    await waitFor(() => dest.given() === 64);
    (await dest.socket).write(Buffer.from([0, 2, 0, 4, 0, 0, 0, 1]));
    peer.socket.write(encodeFrame(FrameType.Literal, original.subarray(64)));
    await waitFor(() => dest.given() === tailStart);
    peer.socket.write(encodeJson(FrameType.Seal, { streamBytes: original.length, streamCheck: check.digest() }));
    await waitFor(() => dest.given() === original.length);
    expect(dest.cut()).toBe(false);
    peer.socket.destroy();
    await waitFor(() => dest.cut());
  });

  describe('postcopy', () => {
    const postcopy = migrationStream(guestMemory([['pc.ram', 64]], 33), [[3, 4]], { machine: 'pc-i440fx-10.0', postcopyAt: 0 });
    /** Where the package (LISTEN, the device state, RUN) ends: the destination runs the guest once it has loaded it. */
    const packageEnd = ((): number => {
      const packaged = postcopy.indexOf(Buffer.of(8, 0, 7, 0, 4)); // QEMU_VM_COMMAND, MIG_CMD_PACKAGED, 4 bytes of length
      return packaged + 9 + postcopy.readUInt32BE(packaged + 5);
    })();

    /** A raw sending peer hands the receiving gateway `stream[0, upTo)` (Sealed, when `seal`), then vanishes. */
    async function failAfter(upTo: number, seal: boolean): Promise<Awaited<ReturnType<typeof countingDestination>>> {
      const dest = await countingDestination();
      const peer = await rawPeer(b.peerPort);
      peer.hello('vm1', `127.0.0.1:${b.destPort}`);
      await waitFor(() => peer.frames.some((f) => f.type === FrameType.Offer));
      peer.socket.write(encodeFrame(FrameType.Literal, postcopy.subarray(0, upTo)));
      if (seal) {
        const sealed = new StreamHash();
        sealed.update(postcopy.subarray(0, upTo));
        peer.socket.write(encodeJson(FrameType.Seal, { streamBytes: upTo, streamCheck: sealed.digest() }));
      }
      await waitFor(() => dest.given() === upTo);
      expect(dest.cut()).toBe(false);
      peer.socket.destroy();
      await waitFor(() => dest.cut());
      return dest;
    }

    test('a migration that fails once the checked package has gone ends the destination\'s connection: it reads all it was handed (it would run the guest, then pause for recovery)', async () => {
      expect(postcopy.subarray(packageEnd - 5, packageEnd).equals(Buffer.of(8, 0, 5, 0, 0))).toBe(true); // the package ends with RUN
      // A reset would have thrown away whatever of the package the destination had not read yet.
      const dest = await failAfter(packageEnd + 100, true);
      expect({ given: dest.given(), reset: dest.reset() }).toEqual({ given: packageEnd + 100, reset: false });
    });

    test('a migration that fails before the package resets the destination\'s connection', async () => {
      const dest = await failAfter(postcopy.length >> 2, false);
      expect(dest.reset()).toBe(true);
    });
  });
});
