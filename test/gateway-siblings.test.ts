/**
 * Siblings between two real gateways on loopback: vm1..vm3 were booted from vm0's image; once vm0 has
 * migrated site-a → site-b, their first legs there send vm0's pages as references to vm0's retained
 * snapshot. A sibling whose snapshot changed or that is in use is passed over, a peer that knows no
 * siblings still migrates, and a hostile reference ends only its own migration.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { StreamEncoder } from '../src/proxy/encoder';
import { SiblingMatch } from '../src/proxy/sibling-match';
import { DIGEST_BYTES, digestWords } from '../src/digest';
import { PageStore } from '../src/store';
import { readRetainedDigests } from '../src/store/retained-snapshot';
import { decodeOffer, encodeFrame, encodeJson, FrameParser, FrameType, frameHeader, PROTOCOL_VERSION } from '../src/wire/frames';
import { migrateThroughPair, rawPeer, startLoggedGateway, startPair, stopPair, type TestSite, waitFor } from '../src/lab/harness/gateway-pair';
import { loopbackMultiRouteYaml } from '../src/lab/harness/loopback-config';
import { dirty, guestMemory, type GuestMemory, migrationStream, PAGE } from '../src/lab/harness/migration-stream';
import { destinationStandIn, sourceStandIn } from '../src/lab/harness/qemu-standins';
import { freePort } from '../src/lab/vm/ports';
import { SIBLING_DELTA_LEAD_BYTES } from '../src/proxy/page-delta';
import { SentSiblings } from '../src/gateway/siblings';
import { ProtocolViolation } from '../src/gateway/protocol-violation';
import { suiteTempDir } from './temp-dir';

const LAYOUT: [string, number][] = [['pc.ram', 3000]];
/** Both sites route vm0 (the image's first guest) and three guests booted from the same image. */
const ROUTES = [{ vm: 'vm0' }, ...['vm1', 'vm2', 'vm3', 'vm5', 'vm6'].map((vm) => ({ vm, siblings: ['vm0'] }))];

/** A guest of the image: 30% of its pages rewritten since boot (`seed`); `kept`: a non-zero page it kept. */
function guestOf(image: GuestMemory, seed: number): { stream: Buffer; sameIndex: number; fresh: number; kept: number } {
  const memory: GuestMemory = { blocks: image.blocks, pages: image.pages.map((p) => Buffer.from(p)) };
  dirty(memory, 0.3, seed);
  const nonZero = (p: Buffer): boolean => p.some((x) => x !== 0);
  return {
    stream: migrationStream(memory, []),
    sameIndex: memory.pages.filter((p, i) => nonZero(p) && p.equals(image.pages[i])).length,
    fresh: memory.pages.filter((p, i) => nonZero(p) && !p.equals(image.pages[i])).length,
    kept: memory.pages.findIndex((p, i) => nonZero(p) && p.equals(image.pages[i])),
  };
}

const lines = (site: TestSite, msg: string, vm: string): Array<Record<string, unknown>> => site.logs.filter((l) => l.msg === msg && l.vm === vm);

describe('siblings through a gateway pair', () => {
  let tmp = '';
  let a: TestSite;
  let b: TestSite;
  const image = guestMemory(LAYOUT, 41);

  beforeAll(async () => {
    tmp = suiteTempDir('bfmig-siblings-');
    // `deltas: always`: on loopback the WAN never sets the pace (see gateway-deltas.test.ts).
    [a, b] = await startPair(tmp, ['deltas: always\n', 'deltas: always\n'], undefined, ROUTES);
    const leg = await migrateThroughPair(a, b, migrationStream(image, []), 'vm0');
    expect(leg.got.result).toBe('completed');
  });

  afterAll(async () => {
    await stopPair([a, b]);
  });

  /** A first leg of `vm` (workload `seed`) that verifies without vm0, which site-b passed over for `why`. */
  async function passedOver(vm: string, seed: number, why: string): Promise<void> {
    const guest = guestOf(image, seed);
    const leg = await migrateThroughPair(a, b, guest.stream, vm);
    expect(leg.received.equals(guest.stream)).toBe(true);
    expect(leg.got.result).toBe('completed');
    expect(leg.sent.counts.pagesSibling).toBe(0);
    expect(lines(b, 'sibling not used', vm)).toEqual([expect.objectContaining({ sibling: 'vm0', why })]);
  }

  test("a first leg sends the pages vm0's retained snapshot holds as references to it, rebuilt byte for byte", async () => {
    const guest = guestOf(image, 17);
    const leg = await migrateThroughPair(a, b, guest.stream, 'vm1');
    expect(leg.received.equals(guest.stream)).toBe(true);
    expect(leg.got.result).toBe('completed');
    expect(leg.sent.counts.pagesSibling).toBe(guest.sameIndex);
    expect(leg.got.counts.pagesSibling).toBe(guest.sameIndex);
    expect(leg.sent.counts.pagesSent).toBe(guest.fresh);
    // What crossed: the rewritten pages whole, about 60 bytes for each of the others.
    expect(leg.sent.wanBytesOut).toBeLessThan((guest.fresh + 0.05 * guest.sameIndex) * PAGE + 0.02 * guest.stream.length);
    expect(lines(b, 'siblings confirmed', 'vm1')[0]?.siblings).toEqual(['vm0']);
    expect(lines(a, 'migration completed', 'vm1')[0]?.pagesSibling).toBe(guest.sameIndex);
    expect(await a.metrics.registry.metrics()).toMatch(/bfmig_pages_total\{vm="vm1",direction="send",kind="sibling"\} [1-9]/);
  });

  test('a sibling whose snapshot at the far site changed since is passed over; the migration still verifies', async () => {
    // vm0 came to site-b from elsewhere since: its store there holds another snapshot than site-a's.
    const store = PageStore.open(b.data, 'vm0');
    const meta = store.meta();
    if (!meta) throw new Error('vm0 holds nothing at site-b');
    store.begin(meta);
    store.commit('from-elsewhere');
    store.close();
    await passedOver('vm2', 18, 'another snapshot');
    // vm0 there again, at one snapshot on both sides.
    expect((await migrateThroughPair(a, b, migrationStream(image, []), 'vm0')).got.result).toBe('completed');
  });

  test('a sibling in use at the far site is passed over; the migration still verifies', async () => {
    const held = PageStore.open(b.data, 'vm0'); // as another process or migration would hold it
    try {
      await passedOver('vm3', 19, 'in use');
    } finally {
      held.close();
    }
  });

  test('a sibling migrating through the far gateway is passed over; the migration still verifies', async () => {
    // A migration of vm0 into site-b has begun (its Hello accepted, its destination dialled).
    const dest = await destinationStandIn(b.destPort);
    const peer = await rawPeer(b.peerPort);
    peer.hello('vm0', `127.0.0.1:${b.destPort}`);
    await waitFor(() => peer.frames.some((f) => f.type === FrameType.Offer));
    try {
      await passedOver('vm5', 23, 'migrating');
    } finally {
      peer.socket.destroy();
      await peer.closed;
      dest.close();
    }
  });

  test('a sender that names no siblings is offered none; a receiver that confirms none is sent no references', async () => {
    const snapshotId = (readRetainedDigests(a.data, 'vm0') as { snapshotId: string }).snapshotId;
    const offerTo = async (siblings: unknown): Promise<Record<string, unknown>> => {
      const dest = await destinationStandIn(b.destPort); // the Offer comes once the destination answered
      const peer = await rawPeer(b.peerPort);
      peer.socket.write(encodeJson(FrameType.Hello, { protocol: PROTOCOL_VERSION, site: 'raw', vm: 'vm9', target: `127.0.0.1:${b.destPort}`, ...(siblings ? { siblings } : {}) }));
      await waitFor(() => peer.frames.some((f) => f.type === FrameType.Offer));
      peer.socket.destroy();
      await peer.closed;
      dest.close();
      return JSON.parse((peer.frames.find((f) => f.type === FrameType.Offer) as { payload: Buffer }).payload.toString()) as Record<string, unknown>;
    };
    // A sender of the previous release: its Offer is as it was.
    expect(await offerTo(undefined)).not.toHaveProperty('siblings');
    expect(await offerTo([{ vm: 'vm0', snapshotId }])).toHaveProperty('siblings', ['vm0']);
    expect(await offerTo([{ vm: 'vm0', snapshotId: 'not-this-one' }])).toHaveProperty('siblings', []);

    // A receiver of the previous release: a relay drops `siblings` from its Offer, and counts what passes.
    const relay = await offerRelay(b.peerPort);
    const dataA2 = path.join(tmp, 'site-a2');
    fs.mkdirSync(dataA2);
    fs.cpSync(path.join(a.data, 'vm0'), path.join(dataA2, 'vm0'), { recursive: true });
    const routePort = await freePort();
    const yaml = loopbackMultiRouteYaml({ name: 'site-a2', data: dataA2, peerPort: await freePort(), farPeerPort: relay.port, routes: [{ vm: 'vm4', routePort, targetPort: b.destPort, siblings: ['vm0'] }] });
    const a2 = await startLoggedGateway('site-a2', yaml + 'deltas: always\n', path.join(tmp, 'site-a2.yaml'));
    try {
      const guest = guestOf(image, 20);
      const received = await destinationStandIn(b.destPort);
      await sourceStandIn(routePort, guest.stream);
      await waitFor(() => a2.gateway.history.length > 0);
      received.close();
      expect((await received.received).bytes.equals(guest.stream)).toBe(true);
      expect(a2.gateway.history[0].result).toBe('completed');
      expect(relay.helloSiblings()).toEqual([{ vm: 'vm0', snapshotId }]);
      expect(relay.siblingDeltas()).toBe(0);
      expect(a2.gateway.history[0].counts.pagesSibling).toBe(0);
    } finally {
      await a2.gateway.stop(1);
      relay.close();
    }
  });

  test.each([
    ['a sibling the Offer did not confirm', (p: Buffer) => void (p[0] = 2), /sibling 2, but 1 were confirmed/],
    ['a page outside the sibling', (p: Buffer) => void p.writeUInt32BE(LAYOUT[0][1] + 5, SIBLING_DELTA_LEAD_BYTES + 4), /outside the RAM layout/],
  ])('a reference to %s ends only that migration', async (_what, tamper, message) => {
    const dest = await destinationStandIn(b.destPort);
    const sibling = readRetainedDigests(a.data, 'vm0') as { snapshotId: string; digests: Uint8Array };
    const peer = await rawPeer(b.peerPort);
    peer.socket.on('error', () => undefined); // the gateway hangs up mid-stream
    peer.socket.write(encodeJson(FrameType.Hello, { protocol: PROTOCOL_VERSION, site: 'raw', vm: 'vm8', target: `127.0.0.1:${b.destPort}`, siblings: [{ vm: 'vm0', snapshotId: sibling.snapshotId }] }));
    await waitFor(() => peer.frames.some((f) => f.type === FrameType.Offer));
    expect(decodeOffer((peer.frames.find((f) => f.type === FrameType.Offer) as { payload: Buffer }).payload).siblings).toEqual(['vm0']);
    // An honest encoder's frames, but its first SiblingDelta changed.
    let tampered = false;
    const send = (type: FrameType, payload: Buffer): void => void peer.socket.write(Buffer.concat([frameHeader(type, payload.length), payload]));
    const encoder = new StreamEncoder(
      {
        literal: (bytes) => send(FrameType.Literal, bytes),
        run: (payload) => send(FrameType.Run, payload),
        siblingDelta: (payload) => {
          const copy = Buffer.from(payload);
          if (!tampered) tamper(copy);
          tampered = true;
          send(FrameType.SiblingDelta, copy);
        },
      },
      null,
      (layout) => {
        encoder.reference = new Uint8Array(layout.pageCount * DIGEST_BYTES);
        encoder.deltas = true;
        encoder.siblings = new SiblingMatch([sibling.digests]);
      },
    );
    encoder.push(guestOf(image, 21).stream);
    encoder.end();
    expect(tampered).toBe(true);
    await waitFor(() => peer.abortText() !== null);
    expect(peer.abortText()).toMatch(message);
    await peer.closed;
    dest.close();
    expect(b.gateway.history[b.gateway.history.length - 1]).toEqual(expect.objectContaining({ vm: 'vm8', result: 'failed' }));
    // vm0 was released: it migrates again, and so does a sibling leg.
    expect((await migrateThroughPair(a, b, migrationStream(image, []), 'vm0')).got.result).toBe('completed');
    const guest = guestOf(image, 22);
    const leg = await migrateThroughPair(a, b, guest.stream, 'vm1');
    expect(leg.received.equals(guest.stream)).toBe(true);
    expect(leg.got.result).toBe('completed');
  });

  test("a sibling's page damaged on disk at the far site fails that leg only; the sibling is dropped, and the next leg goes without it", async () => {
    const guest = guestOf(image, 24);
    const fd = fs.openSync(path.join(b.data, 'vm0', 'pages'), 'r+');
    try {
      const byte = Buffer.alloc(1);
      fs.readSync(fd, byte, 0, 1, guest.kept * PAGE);
      byte[0] ^= 0xff;
      fs.writeSync(fd, byte, 0, 1, guest.kept * PAGE);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    const damaged = await migrateThroughPair(a, b, guest.stream, 'vm6');
    expect(damaged.got.result).toBe('failed');
    expect(damaged.got.error).toMatch(/page \d+ of sibling vm0 does not match its digest/);
    expect(lines(b, 'sibling store verified after a damaged page', 'vm6')).toEqual([expect.objectContaining({ sibling: 'vm0', damagedPages: 1 })]);
    await passedOver('vm6', 24, 'no complete snapshot');
  });
});

/**
 * A relay to a receiving gateway that drops `siblings` from its Offer, as a gateway of the previous
 * release would never send it, and records the sender's Hello and the SiblingDelta frames it sees.
 */
async function offerRelay(farPort: number): Promise<{ port: number; helloSiblings: () => unknown; siblingDeltas: () => number; close: () => void }> {
  let hello: Record<string, unknown> = {};
  let siblingDeltas = 0;
  const sockets = new Set<net.Socket>();
  const server = net.createServer((near) => {
    const far = net.connect({ host: '127.0.0.1', port: farPort });
    sockets.add(near).add(far);
    for (const s of [near, far]) s.on('error', () => undefined);
    near.on('close', () => far.destroy());
    far.on('close', () => near.destroy());
    const forward = new FrameParser((type, payload) => {
      if (type === FrameType.Hello) hello = JSON.parse(payload.toString()) as Record<string, unknown>;
      if (type === FrameType.SiblingDelta) siblingDeltas++;
      far.write(encodeFrame(type, Buffer.from(payload)));
    });
    const back = new FrameParser((type, payload) => {
      if (type !== FrameType.Offer) return void near.write(encodeFrame(type, Buffer.from(payload)));
      const { siblings: _dropped, ...offer } = JSON.parse(payload.toString()) as Record<string, unknown>;
      near.write(encodeJson(FrameType.Offer, offer));
    });
    near.on('data', (chunk: Buffer) => forward.push(chunk));
    far.on('data', (chunk: Buffer) => back.push(chunk));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return {
    port: (server.address() as net.AddressInfo).port,
    helloSiblings: () => hello.siblings,
    siblingDeltas: () => siblingDeltas,
    close: () => {
      for (const s of sockets) s.destroy();
      server.close();
    },
  };
}

describe("the sender's siblings", () => {
  test('names only siblings whose store claims a snapshot; an Offer confirming one it did not name is a violation', () => {
    const root = suiteTempDir('bfmig-sent-siblings-');
    const store = PageStore.open(root, 'vm0');
    store.begin({ pageSize: PAGE, pageCount: 4, layoutId: 'layout', layout: {} });
    store.writePage(1, Buffer.alloc(PAGE, 7), 0, Buffer.alloc(DIGEST_BYTES, 9), 0);
    store.commit('snap-0');
    store.close();
    const notes: Array<Record<string, unknown>> = [];
    const sent = new SentSiblings(root, ['vm0', 'vm7'], (_message, fields) => notes.push(fields));
    expect(sent.hello).toEqual([{ vm: 'vm0', snapshotId: 'snap-0' }]);
    expect(notes).toEqual([{ sibling: 'vm7', why: 'no complete snapshot' }]);
    const offer = { site: 'b', snapshotId: null, layoutId: null, pageCount: 0, presentPages: 0 };
    expect(() => sent.confirmed({ ...offer, siblings: ['vm7'] })).toThrow(ProtocolViolation);
    expect(() => sent.confirmed({ ...offer, siblings: ['vm0', 'vm0'] })).toThrow(/did not name once/);
    expect(new SentSiblings(root, ['vm0'], () => undefined).confirmed(offer)).toBeNull();
    const match = new SentSiblings(root, ['vm0'], () => undefined).confirmed({ ...offer, siblings: ['vm0'] });
    expect(match?.find(1, digestWords(Buffer.alloc(DIGEST_BYTES, 9)), 0)).toBe(true);
    expect([match?.sibling, match?.page]).toEqual([0, 1]);
  });
});
