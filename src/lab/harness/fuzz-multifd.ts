/**
 * Fuzz targets for multifd channels, beside the main channel's in fuzz.ts (the same mutations, PRNG,
 * outcomes and failures; test/fuzz-multifd.test.ts is the short run, bench/fuzz.ts the long one):
 *
 * - `multifd-codec`: one mutated channel through MultifdParser. Its records must not depend on how
 *   the bytes were split, and it may refuse input only with a StreamError.
 * - `multifd-stream`: a migration's channels, one of them mutated, through a gateway pair's multifd
 *   codecs in memory (multifdRoundTrip), with the stores of an earlier migration so that pages go as
 *   Runs and Deltas. Every channel must come out byte for byte as it went in, or the migration fail
 *   with a typed error; a migration that completes leaves every page of both stores under its own digest.
 * - `multifd-wire`: the frames between the two codecs damaged (a payload's bytes, frames dropped,
 *   repeated or spliced from another channel): the destination must get each channel's exact bytes,
 *   or the migration must fail with a typed error, having handed on no SYNC packet after a wrong byte
 *   (the channels are checked after every SYNC packet: a destination could not load the device state
 *   behind it). Frames are laid out as a byte stream (a kind byte
 *   and a 32-bit length before each payload) so that fuzz.ts's mutations apply; damage to that layout
 *   is the frame parser's to catch (the `frames` target), so mutations that break it are drawn again.
 */
import { DIGEST_BYTES, digestOne } from '../../digest';
import { RebuildError } from '../../proxy/rebuild-error';
import { layoutOf, type PageLayout } from '../../proxy/retained';
import { RunError } from '../../proxy/run';
import { X86_PAGE_SIZE } from '../../qemu/constants';
import { MultifdParser, MultifdRecordKind } from '../../qemu/multifd';
import { StreamError } from '../../qemu/errors';
import { errorMessage } from '../../common/errors';
import { applyMutations, boundariesOf, FuzzFailure, MemoryPages, type Mutation, type Outcome, randomMutations, randomSplits, Rng, type Seed } from './fuzz';
import { dirty, guestMemory } from './migration-stream';
import { type ChannelFrames, type MultifdFormat, multifdMigration, multifdRoundTrip } from './multifd-stream';
import { WireError } from '../../wire/frames';

export type MultifdTargetName = 'multifd-codec' | 'multifd-stream' | 'multifd-wire';
export const MULTIFD_TARGETS: readonly MultifdTargetName[] = ['multifd-codec', 'multifd-stream', 'multifd-wire'];

/** One migration's channels, with the stores both sites held before it (null: none, a first leg). */
export interface MultifdMigrationSeed {
  name: string;
  layout: PageLayout;
  channels: Seed[];
  stores: { sender: MemoryPages; receiver: MemoryPages } | null;
  /** Each channel's frames, laid out for mutation (frameLayout). */
  wires: Seed[];
}

export interface MultifdCorpus {
  migrations: MultifdMigrationSeed[];
  /** Every channel of every migration: the multifd-codec target's seeds, and donors for splices. */
  channels: Seed[];
}

type Frame = ChannelFrames['frames'][number];
const KINDS: readonly Frame['kind'][] = ['literal', 'run', 'delta', 'sibling', 'keep', 'check', 'header'];
const FRAME_HEAD = 5;

/** Frames as bytes: per frame its kind (1..6), the payload's length (u32) and the payload. */
function frameLayout(frames: readonly Frame[]): Seed & { bytes: Buffer } {
  const parts: Buffer[] = [];
  const boundaries: number[] = [];
  let at = 0;
  for (const f of frames) {
    const head = Buffer.alloc(FRAME_HEAD);
    head[0] = KINDS.indexOf(f.kind) + 1;
    head.writeUInt32BE(f.payload.length, 1);
    parts.push(head, f.payload);
    boundaries.push(at);
    at += FRAME_HEAD + f.payload.length;
  }
  boundaries.push(at);
  return { name: 'frames', bytes: Buffer.concat(parts), boundaries };
}

/** The frames of a layout, or null where the layout itself no longer parses. */
function framesOfLayout(bytes: Buffer): Frame[] | null {
  const frames: Frame[] = [];
  for (let at = 0; at < bytes.length; ) {
    if (at + FRAME_HEAD > bytes.length) return null;
    const kind = KINDS[bytes[at] - 1];
    const length = bytes.readUInt32BE(at + 1);
    if (kind === undefined || at + FRAME_HEAD + length > bytes.length) return null;
    frames.push({ kind, payload: bytes.subarray(at + FRAME_HEAD, at + FRAME_HEAD + length) });
    at += FRAME_HEAD + length;
  }
  return frames;
}

/** Where a channel's init packet, packets and pages begin (as far as it parses). */
export function multifdBoundaries(channel: Buffer): number[] {
  return boundariesOf(channel, (bytes, start) => {
    const parser = new MultifdParser((r) => {
      if (r.kind === MultifdRecordKind.Packet || r.kind === MultifdRecordKind.Page) start(r.streamOffset);
    });
    parser.push(bytes);
    parser.end();
  });
}

const channelSeeds = (name: string, channels: readonly Buffer[]): Seed[] => channels.map((bytes, c) => ({ name: `${name}.ch${c}`, bytes, boundaries: multifdBoundaries(bytes) }));

/**
 * How a migration goes through the codecs: Deltas on the channels, matches against other pages, each
 * channel checked after every SYNC packet, headers as PacketHeader frames, all kept the same for every input.
 */
export const CODEC_OPTIONS = { deltas: true, matches: true, earlierBases: true, checks: true, packetHeaders: true } as const;

/** The stores as the seed left them, copied: every input starts from the same state. */
function freshStores(seed: MultifdMigrationSeed): { sender: { store: MemoryPages | null; reference: Uint8Array | null }; receiver: MemoryPages | null } {
  if (seed.stores === null) return { sender: { store: null, reference: null }, receiver: null };
  const store = seed.stores.sender.clone();
  return { sender: { store, reference: store.digests }, receiver: seed.stores.receiver.clone() };
}

/**
 * Every page `store` holds has the content its digest names. A migration that completed must leave both
 * stores so: the next one reuses their pages on the strength of those digests.
 */
function checkStore(store: MemoryPages | null, side: string): void {
  if (store === null) return;
  const page = Buffer.alloc(X86_PAGE_SIZE);
  const digest = Buffer.alloc(DIGEST_BYTES);
  for (let i = 0; i * DIGEST_BYTES < store.digests.length; i++) {
    const held = Buffer.from(store.digests.buffer, store.digests.byteOffset + i * DIGEST_BYTES, DIGEST_BYTES);
    if (held.every((b) => b === 0)) continue;
    store.readPages(i, 1, page, 0);
    digestOne(page, 0, X86_PAGE_SIZE, digest, 0);
    if (!digest.equals(held)) throw new FuzzFailure('silent-corruption', `the ${side} store holds page ${i} under a digest its content does not have`);
  }
}

/** Builds the seeds: first and second legs of a small guest in QEMU 7.2's and 10.0's packets. */
export function buildMultifdCorpus(): MultifdCorpus {
  const migrations: MultifdMigrationSeed[] = [];
  (['qemu-10.0', 'qemu-7.2'] as MultifdFormat[]).forEach((format, f) => {
    const memory = guestMemory([['pc.ram', 48], ['vga.vram', 8]], 21 + f, 0.3);
    const layout = layoutOf(memory.blocks);
    const all = memory.pages.map((_, i) => i);
    const shape = { format, channels: 3, pagesPerPacket: 6, leadingSync: true };
    const first = multifdMigration(memory, { ...shape, rounds: [all] });
    const sender = new MemoryPages();
    const receiver = new MemoryPages();
    sender.journalled = true;
    sender.begin(layout);
    receiver.begin(layout);
    const leg1 = multifdRoundTrip(first.channels, layout, { store: sender, reference: null }, receiver);
    const firstSeed: MultifdMigrationSeed = { name: `${format}-first-leg`, layout, channels: channelSeeds(`${format}-first-leg`, first.channels), stores: null, wires: [] };
    // The second leg: a few pages rewritten in a few bytes (Deltas), some whole, the rest reused.
    const stores = { sender: sender.clone(), receiver: receiver.clone() };
    stores.sender.newMigration();
    const rewritten = dirty(memory, 0.1, 7);
    const patched = all.filter((i) => i % 5 === 2 && !rewritten.includes(i) && memory.pages[i].some((b) => b !== 0));
    for (const i of patched) for (const at of [5, 700, 3000]) memory.pages[i][at] ^= 0x5a;
    const changed = [...rewritten, ...patched].sort((a, b) => a - b);
    const second = multifdMigration(memory, { ...shape, rounds: [all, changed] });
    const secondSeed: MultifdMigrationSeed = { name: `${format}-second-leg`, layout, channels: channelSeeds(`${format}-second-leg`, second.channels), stores, wires: [] };
    for (const seed of [firstSeed, secondSeed]) {
      const sent: Frame[][] = seed.channels.map(() => []);
      const { sender: s, receiver: r } = freshStores(seed);
      multifdRoundTrip(
        seed.channels.map((c) => c.bytes),
        layout,
        s,
        r,
        {
          ...CODEC_OPTIONS,
          alterFrames: (c, frames) => {
            sent[c] = frames.map((fr) => ({ kind: fr.kind, payload: Buffer.from(fr.payload) }));
            return frames;
          },
        },
      );
      seed.wires = sent.map((frames, c) => ({ ...frameLayout(frames), name: `${seed.name}.ch${c}.frames` }));
    }
    if (leg1.rebuilt.some((bytes, c) => !bytes.equals(first.channels[c]))) throw new Error(`${format}: the seed's first leg did not rebuild`);
    migrations.push(firstSeed, secondSeed);
  });
  return { migrations, channels: migrations.flatMap((m) => m.channels) };
}

const isTyped = (err: unknown): boolean => err instanceof StreamError || err instanceof RebuildError || err instanceof RunError || err instanceof WireError;

/** How many bytes `a` and `b` have in common from their start. */
function commonPrefix(a: Buffer, b: Buffer): number {
  const common = Math.min(a.length, b.length);
  let at = 0;
  while (at < common && a[at] === b[at]) at++;
  return at;
}

/**
 * What a destination could act on: every SYNC packet it got whole (parsed from `handedOn` as QEMU would)
 * follows only bytes of a source channel. A destination loads the device state once every channel's
 * last SYNC packet is in, so a wrong byte before one never runs. (Frames spliced whole from another
 * channel rebuild that channel, checks and all: its initial packet names the other channel's id, which
 * a destination QEMU has already, and refuses. Frames that bring a check of their own from elsewhere,
 * computed over other bytes, are not the accidents this guards against: only TLS stops an attacker on
 * the link, who can rewrite checks too; the caller does not ask for this property then.)
 */
function checkSyncsHandedOn(handedOn: Buffer, sources: readonly Buffer[], channel: number): void {
  const firstWrong = Math.max(...sources.map((source) => commonPrefix(handedOn, source)));
  if (firstWrong === handedOn.length) return;
  const parser = new MultifdParser((record) => {
    if (record.kind === MultifdRecordKind.PacketEnd && record.sync && record.streamOffset > firstWrong) {
      throw new FuzzFailure('silent-corruption', `channel ${channel} handed on a SYNC packet ending at ${record.streamOffset} after a wrong byte at ${firstWrong}`);
    }
  });
  try {
    parser.push(handedOn);
  } catch (err) {
    if (err instanceof FuzzFailure) throw err;
    // A destination stops at what it cannot parse.
  }
}

/** The harness's word for channels that wait for one another for ever: the gateway's idle limit ends such a migration. */
const STALLED = /never finished/;

/**
 * One channel through MultifdParser whole and in random pieces: the same records either way, and
 * nothing thrown but a StreamError.
 */
export function fuzzMultifdParser(input: Buffer, rng: Rng): Outcome {
  const parse = (cuts: readonly number[]): { signature: string; outcome: Outcome } => {
    const seen: string[] = [];
    const parser = new MultifdParser((r) => {
      if (r.kind === MultifdRecordKind.Packet) seen.push(`P${r.packetNumber}:${r.flags}:${r.normalPages}:${r.zeroPages}:${r.block}:${r.streamOffset}`);
      else if (r.kind === MultifdRecordKind.Page) seen.push(`p${r.offset}@${r.streamOffset}`);
      else if (r.kind === MultifdRecordKind.ZeroPage) seen.push(`z${r.offset}`);
      else if (r.kind === MultifdRecordKind.Fallback) seen.push(`F${r.streamOffset}`);
      else seen.push(`${r.kind}@${r.streamOffset}`);
    });
    try {
      let from = 0;
      for (const to of cuts) {
        parser.push(input.subarray(from, to));
        from = to;
      }
      parser.end();
    } catch (err) {
      if (!(err instanceof StreamError)) throw new FuzzFailure('crash', `MultifdParser threw ${errorMessage(err)}`);
      return { signature: `${seen.join(' ')} !${err.code}`, outcome: 'rejected' };
    }
    return { signature: seen.join(' '), outcome: parser.fallenBack !== null ? 'verbatim' : 'rebuilt' };
  };
  const whole = parse([input.length]);
  const pieces = parse(randomSplits(rng, input.length));
  if (pieces.signature !== whole.signature) throw new FuzzFailure('chunking', `in pieces: ${pieces.signature.slice(-200)}; whole: ${whole.signature.slice(-200)}`);
  return whole.outcome;
}

/** How the codecs are fed: random pieces, channels in a random order, or interleaved piece by piece. */
function feeding(rng: Rng, channels: number): { chunk: number; interleave: boolean; order: number[] } {
  const order = Array.from({ length: channels }, (_, c) => c);
  for (let i = order.length - 1; i > 0; i--) {
    const j = rng.below(i + 1);
    [order[i], order[j]] = [order[j], order[i]];
  }
  return { chunk: rng.below(3) === 0 ? 1 + rng.below(64) : 1 + rng.below(20_000), interleave: rng.below(2) === 0, order };
}

/**
 * A migration whose channel `mutated` is `input` through both codecs: each channel rebuilt byte for
 * byte, or a typed error. A migration whose channels wait for one another for ever is refused too.
 */
export function fuzzMultifdStream(seed: MultifdMigrationSeed, mutated: number, input: Buffer, rng: Rng): Outcome {
  const channels = seed.channels.map((c, i) => (i === mutated ? input : c.bytes));
  const { sender, receiver } = freshStores(seed);
  let result: ReturnType<typeof multifdRoundTrip>;
  try {
    result = multifdRoundTrip(channels, seed.layout, sender, receiver, { ...CODEC_OPTIONS, ...feeding(rng, channels.length) });
  } catch (err) {
    if (isTyped(err) || (err instanceof Error && STALLED.test(err.message) && !/rebuilding/.test(err.message))) return 'rejected';
    throw new FuzzFailure('crash', `the multifd codecs threw ${errorMessage(err)}`);
  }
  result.rebuilt.forEach((bytes, c) => {
    if (!bytes.equals(channels[c])) throw new FuzzFailure('mismatch', `channel ${c}: rebuilt ${bytes.length} bytes that differ from its ${channels[c].length}`);
  });
  checkStore(sender.store, 'sending');
  checkStore(receiver, 'receiving');
  return result.encoders.some((e) => e.fallback !== null) ? 'verbatim' : 'rebuilt';
}

/**
 * The seed migration with channel `damaged`'s frames replaced by `layout` (mutated frameLayout bytes):
 * each channel's exact bytes at the destination, or a typed error. Returns null where the layout no
 * longer parses as frames.
 */
export function fuzzMultifdWire(seed: MultifdMigrationSeed, damaged: number, layout: Buffer, rng: Rng): Outcome | null {
  const frames = framesOfLayout(layout);
  if (frames === null) return null;
  const channels = seed.channels.map((c) => c.bytes);
  const { sender, receiver } = freshStores(seed);
  const handedOn: Buffer[] = [];
  let result: ReturnType<typeof multifdRoundTrip>;
  try {
    result = multifdRoundTrip(channels, seed.layout, sender, receiver, {
      ...CODEC_OPTIONS,
      ...feeding(rng, channels.length),
      alterFrames: (c, sent) => (c === damaged ? frames : sent),
      out: (c, bytes) => c === damaged && handedOn.push(Buffer.from(bytes)),
    });
  } catch (err) {
    if (!isTyped(err)) throw new FuzzFailure('crash', `the multifd decoders threw ${errorMessage(err)}`);
    const checksSent = new Set((framesOfLayout(seed.wires[damaged].bytes) ?? []).filter((f) => f.kind === 'check').map((f) => f.payload.toString('hex')));
    if (frames.every((f) => f.kind !== 'check' || checksSent.has(f.payload.toString('hex')))) checkSyncsHandedOn(Buffer.concat(handedOn), channels, damaged);
    return 'rejected';
  }
  result.rebuilt.forEach((bytes, c) => {
    if (!bytes.equals(channels[c])) throw new FuzzFailure('silent-corruption', `channel ${c} completed with ${bytes.length} bytes that differ from its ${channels[c].length}-byte stream`);
  });
  checkStore(receiver, 'receiving');
  return 'rebuilt';
}

/** Builds input `seed` of `target`: which migration and channel, which mutations. */
export function makeMultifdInput(
  target: MultifdTargetName,
  corpus: MultifdCorpus,
  seed: number,
): { migration: MultifdMigrationSeed; channel: number; input: Buffer; from: string; mutations: Mutation[]; rng: Rng } {
  const rng = new Rng(seed);
  const migration = corpus.migrations[rng.below(corpus.migrations.length)];
  // The codec target needs no stores; the wire target damages the frames of a migration that sent some.
  const channel = rng.below(migration.channels.length);
  const from = target === 'multifd-wire' ? migration.wires[channel] : migration.channels[channel];
  const donors = target === 'multifd-wire' ? corpus.migrations.flatMap((m) => m.wires) : corpus.channels;
  // A few inputs go through unmutated: the seeds themselves must pass every property.
  if (rng.below(50) === 0) return { migration, channel, input: from.bytes, from: from.name, mutations: [], rng };
  let mutations = randomMutations(rng, from, donors.length);
  let input = applyMutations(from, mutations, donors);
  // Damaged frames, not damaged framing (the frame parser's, fuzzed as `frames`): draw again, a few times.
  for (let tries = 0; target === 'multifd-wire' && framesOfLayout(input) === null && tries < 8; tries++) {
    mutations = randomMutations(rng, from, donors.length);
    input = applyMutations(from, mutations, donors);
  }
  return { migration, channel, input, from: from.name, mutations, rng };
}

/** Runs input `seed` against `target`; throws FuzzFailure when a property breaks. */
export function runMultifdInput(target: MultifdTargetName, corpus: MultifdCorpus, seed: number): { outcome: Outcome; bytes: number; from: string } {
  const { migration, channel, input, from, rng } = makeMultifdInput(target, corpus, seed);
  let outcome: Outcome;
  if (target === 'multifd-codec') outcome = fuzzMultifdParser(input, rng);
  else if (target === 'multifd-stream') outcome = fuzzMultifdStream(migration, channel, input, rng);
  // Framing the mutations broke is the frame parser's (fuzz.ts's `frames` target): a refused input.
  else outcome = fuzzMultifdWire(migration, channel, input, rng) ?? 'rejected';
  return { outcome, bytes: input.length, from };
}
