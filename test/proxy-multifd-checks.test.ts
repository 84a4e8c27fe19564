/**
 * Channel checks (Feature.ChannelChecks): the sending codec checks each multifd channel right after every
 * SYNC packet, and the receiving codec holds each SYNC packet back from its destination until the check
 * after it has passed. A destination QEMU loads the device state only once every channel's last SYNC
 * packet is in, so a byte damaged between the gateways on a channel can fail the migration, but never
 * run: these tests show the SYNC packet after a damaged byte never leaves, and that without the checks
 * it did.
 */
import { guestMemory, type GuestMemory } from '../src/lab/harness/migration-stream';
import { type ChannelFrames, multifdMigration, multifdRoundTrip, type MultifdFormat } from '../src/lab/harness/multifd-stream';
import { MAX_HELD_SYNC_BYTES } from '../src/proxy/multifd-decoder';
import { RebuildError } from '../src/proxy/rebuild-error';
import { layoutOf } from '../src/proxy/retained';
import { MultifdParser, MultifdRecordKind } from '../src/qemu/multifd';
import { stores } from './multifd-stores';

const all = (memory: GuestMemory): number[] => memory.pages.map((_, i) => i);

/** Where each SYNC packet of a channel starts and ends. */
function syncPackets(channel: Buffer): { start: number; end: number }[] {
  const found: { start: number; end: number }[] = [];
  let start = -1;
  const parser = new MultifdParser((record) => {
    if (record.kind === MultifdRecordKind.Packet && record.sync) start = record.streamOffset;
    if (record.kind === MultifdRecordKind.PacketEnd && record.sync) found.push({ start, end: record.streamOffset });
  });
  parser.push(channel);
  return found;
}

/** The channel's frames with one byte flipped at channel offset `at` (in a Literal frame). */
function flipAt(frames: ChannelFrames['frames'], at: number): ChannelFrames['frames'] {
  let offset = 0;
  let flipped = false;
  const out = frames.map((frame) => {
    if (frame.kind !== 'literal') {
      // A Run or Delta stands for bytes too, but none of this test's first leg: it has none.
      return frame;
    }
    const end = offset + frame.payload.length;
    if (!flipped && at >= offset && at < end) {
      const copy = Buffer.from(frame.payload);
      copy[at - offset] ^= 0x40;
      flipped = true;
      offset = end;
      return { kind: frame.kind, payload: copy };
    }
    offset = end;
    return frame;
  });
  if (!flipped) throw new Error(`no Literal byte at ${at}`);
  return out;
}

describe.each<MultifdFormat>(['qemu-7.2', 'qemu-10.0'])('multifd channel checks, %s', (format) => {
  test('every channel is rebuilt byte for byte, with a check after each of its SYNC packets, first leg and back leg', () => {
    const memory = guestMemory([['pc.ram', 1200], ['vga.vram', 200]], 31);
    const layout = layoutOf(memory.blocks);
    const { sender, receiver } = stores(memory);
    const first = multifdMigration(memory, { format, channels: 3, rounds: [all(memory), all(memory).filter((i) => i % 7 === 0)] });
    let frames: ChannelFrames['frames'][] = [];
    const one = multifdRoundTrip(first.channels, layout, { store: sender, reference: null }, receiver, {
      chunk: 9_000,
      checks: true,
      alterFrames: (c, f) => (frames[c] = f),
    });
    one.rebuilt.forEach((bytes, c) => expect(bytes.equals(first.channels[c])).toBe(true));
    first.channels.forEach((channel, c) => {
      expect(frames[c].filter((f) => f.kind === 'check')).toHaveLength(syncPackets(channel).length);
      expect(syncPackets(channel).length).toBeGreaterThanOrEqual(2);
    });
    // The back leg: Runs stand for the pages both stores hold, and are checked alike.
    frames = [];
    const two = multifdRoundTrip(first.channels, layout, { store: sender, reference: sender.digests }, receiver, { chunk: 5_000, checks: true, readAhead: true, alterFrames: (c, f) => (frames[c] = f) });
    two.rebuilt.forEach((bytes, c) => expect(bytes.equals(first.channels[c])).toBe(true));
    expect(frames.some((f) => f.some((frame) => frame.kind === 'run'))).toBe(true);
    expect(two.decoders.reduce((n, d) => n + d.counts.pagesReused, 0)).toBeGreaterThan(0);
  });

  test.each([false, true])('every piece the codec lays out reaches the destination once, those held for a check too (PacketHeader frames: %s)', (packetHeaders) => {
    // The gateway lays pieces out in output slabs, each free again once every piece taken from it has been
    // written: a piece held back as a copy of itself was never written, and its slab never free again.
    const memory = guestMemory([['pc.ram', 1200]], 33);
    const layout = layoutOf(memory.blocks);
    const { sender, receiver } = stores(memory);
    const migration = multifdMigration(memory, { format, channels: 3, rounds: [all(memory), all(memory).filter((i) => i % 5 === 0), all(memory).filter((i) => i % 9 === 0)] });
    multifdRoundTrip(migration.channels, layout, { store: sender, reference: null }, receiver, { checks: true, packetHeaders });
    // Each piece in memory of its own: what reaches `out` is known by its memory.
    const handedOut = new Map<ArrayBufferLike, number>();
    const back = multifdRoundTrip(migration.channels, layout, { store: sender, reference: sender.digests }, receiver, {
      chunk: 7_000,
      checks: true,
      packetHeaders,
      allocate: (_c, size) => {
        const piece = Buffer.allocUnsafeSlow(size);
        handedOut.set(piece.buffer, 0);
        return piece;
      },
      out: (_c, bytes) => {
        const times = handedOut.get(bytes.buffer);
        if (times !== undefined) handedOut.set(bytes.buffer, times + 1);
      },
    });
    back.rebuilt.forEach((bytes, c) => expect(bytes.equals(migration.channels[c])).toBe(true));
    // Runs after SYNC packets, and with PacketHeader frames each SYNC packet's header, were held for checks.
    expect(handedOut.size).toBeGreaterThan(migration.channels.length * 3);
    expect([...handedOut.values()].filter((times) => times !== 1)).toEqual([]);
  });

  test('a channel parked at a SYNC hands that SYNC packet on once its check has passed, and nothing after it until the other channels have reached it', () => {
    const memory = guestMemory([['pc.ram', 900]], 32);
    const layout = layoutOf(memory.blocks);
    const { sender, receiver } = stores(memory);
    const migration = multifdMigration(memory, { format, channels: 2, rounds: [all(memory), all(memory).slice(0, 300)] });
    const handedOn = [0, 0];
    let channel0WhenChannel1Began = -1;
    // Channel 0 is rebuilt whole first: it parks at its first SYNC, and its check comes next.
    const trip = multifdRoundTrip(migration.channels, layout, { store: sender, reference: null }, receiver, {
      checks: true,
      out: (c, bytes) => (handedOn[c] += bytes.length),
      alterFrames: (c, f) => {
        if (c === 1) channel0WhenChannel1Began = handedOn[0];
        return f;
      },
    });
    trip.rebuilt.forEach((bytes, c) => expect(bytes.equals(migration.channels[c])).toBe(true));
    const firstSync = syncPackets(migration.channels[0])[0];
    expect(channel0WhenChannel1Began).toBe(firstSync.end);
  });

  test.each([false, true])('a byte flipped between the codecs in a page (checks: %s): the SYNC packet after it leaves only without checks', (checks) => {
    const memory = guestMemory([['pc.ram', 1000]], 33, 0);
    const layout = layoutOf(memory.blocks);
    const { sender, receiver } = stores(memory);
    const migration = multifdMigration(memory, { format, channels: 2, rounds: [all(memory), all(memory).slice(0, 200)] });
    const syncs = syncPackets(migration.channels[1]);
    // A byte of a page well inside channel 1's first round, before its first SYNC packet.
    const at = Math.floor(syncs[0].start / 2);
    const out: Buffer[] = [];
    let thrown: unknown = null;
    try {
      multifdRoundTrip(migration.channels, layout, { store: sender, reference: null }, receiver, {
        checks,
        out: (c, bytes) => c === 1 && out.push(Buffer.from(bytes)),
        alterFrames: (c, f) => (c === 1 ? flipAt(f, at) : f),
      });
    } catch (err) {
      thrown = err;
    }
    expect(thrown).toBeInstanceOf(RebuildError);
    const handed = Buffer.concat(out);
    // The damaged byte itself went on: a destination writes it into guest memory, which is harmless as
    // long as the guest never runs.
    expect(handed.length).toBeGreaterThan(at);
    if (checks) {
      expect((thrown as Error).message).toMatch(/XXH3-64/);
      expect(handed.length).toBeLessThan(syncs[0].end);
    } else {
      // Without checks the SYNC packet left, and a destination could have loaded the device state.
      expect(handed.length).toBeGreaterThanOrEqual(syncs[0].end);
    }
  });

  test('a check that does not match what was rebuilt, or of another length, fails the channel', () => {
    const memory = guestMemory([['pc.ram', 600]], 34);
    const layout = layoutOf(memory.blocks);
    for (const alter of ['check', 'length'] as const) {
      const { sender, receiver } = stores(memory);
      const migration = multifdMigration(memory, { format, channels: 2, rounds: [all(memory)] });
      const damaged = (frames: ChannelFrames['frames']): ChannelFrames['frames'] =>
        frames.map((frame) => {
          if (frame.kind !== 'check') return frame;
          const seal = JSON.parse(frame.payload.toString()) as { streamBytes: number; streamCheck: string };
          if (alter === 'check') seal.streamCheck = seal.streamCheck.replace(/^./, (d) => (d === '0' ? '1' : '0'));
          else seal.streamBytes -= 1;
          return { kind: 'check', payload: Buffer.from(JSON.stringify(seal)) };
        });
      expect(() => multifdRoundTrip(migration.channels, layout, { store: sender, reference: null }, receiver, { checks: true, alterFrames: (c, f) => (c === 0 ? damaged(f) : f) })).toThrow(RebuildError);
    }
  });

  test(`a sender that says it checks and never does: at most ${MAX_HELD_SYNC_BYTES} bytes are held back, then the channel fails`, () => {
    const memory = guestMemory([['pc.ram', 1500]], 35, 0);
    const layout = layoutOf(memory.blocks);
    const { sender, receiver } = stores(memory);
    // One channel: everything after its first SYNC (a whole second round) waits for a check that never comes.
    const migration = multifdMigration(memory, { format, channels: 1, rounds: [all(memory), all(memory)] });
    expect(() =>
      multifdRoundTrip(migration.channels, layout, { store: sender, reference: null }, receiver, {
        checks: true,
        alterFrames: (_c, f) => f.filter((frame) => frame.kind !== 'check'),
      }),
    ).toThrow(/held back for a check that has not come/);
  });
});
