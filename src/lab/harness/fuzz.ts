/**
 * Fuzz harness for the codec, the wire protocol and the proxy pair. Shared by the short run in
 * test/fuzz-codec-frames-proxy.test.ts (fast-check properties with shrinking) and the long run in
 * bench/fuzz.ts (a fast mutator loop). Everything is deterministic from a numeric seed.
 *
 * Each target takes one input and returns its outcome, or throws FuzzFailure when a property breaks:
 * an exception that is not a typed error, output that differs from the input without an error, or a
 * result that depends on how the input was split into chunks.
 */
import { DIGEST_BYTES } from '../../digest';
import { StreamDecoder } from '../../proxy/decoder';
import { RebuildError } from '../../proxy/rebuild-error';
import { StreamEncoder } from '../../proxy/encoder';
import { SiblingMatch } from '../../proxy/sibling-match';
import type { PageLayout, RetainedPages } from '../../proxy/retained';
import { RunError, decodeRun } from '../../proxy/run';
import { RecordKind, StreamError, StreamParser, StreamWriter, type StreamRecord } from '../../qemu';
import { StreamInspector } from '../../qemu/inspect';
import {
  decodeAbort,
  decodeDone,
  decodeEnd,
  decodeHello,
  decodeOffer,
  encodeFrame,
  encodeJson,
  FRAME_HEADER_BYTES,
  FrameParser,
  frameHeader,
  FrameType,
  MAX_FRAME_PAYLOAD,
  WireError,
} from '../../wire/frames';
import { buildFixtures } from './fixtures';
import { dirty, guestMemory, migrationStream } from './migration-stream';

// ---------------------------------------------------------------------------------------------
// Deterministic randomness

/** A small, fast PRNG (mulberry32): the same seed gives the same inputs on every machine. */
export class Rng {
  private s: number;
  constructor(seed: number) {
    this.s = seed >>> 0;
  }
  next(): number {
    this.s = (this.s + 0x6d2b79f5) >>> 0;
    let t = this.s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  }
  /** An integer in [0, n). */
  below(n: number): number {
    return n <= 0 ? 0 : Math.floor((this.next() / 2 ** 32) * n);
  }
  pick<T>(items: readonly T[]): T {
    return items[this.below(items.length)];
  }
}

/** The seed of input `index` of a run seeded `runSeed`: any input can be replayed alone. */
export function inputSeed(runSeed: number, index: number): number {
  let h = Math.imul(runSeed ^ 0x9e3779b9, 0x85ebca6b) ^ Math.imul(index + 1, 0xc2b2ae35);
  h ^= h >>> 16;
  h = Math.imul(h, 0x7feb352d);
  h ^= h >>> 15;
  return h >>> 0;
}

// ---------------------------------------------------------------------------------------------
// Seeds and mutations

/** A real-shaped input and where its records (or frames) begin, for structure-aware mutations. */
export interface Seed {
  name: string;
  bytes: Buffer;
  boundaries: number[];
}

/**
 * Where the records `parse` reports begin in `bytes`, with its start and end: `parse` runs a parser over
 * the bytes and calls `start` with each record's offset. A seed that is itself an error case still has
 * the boundaries found before the error.
 */
export function boundariesOf(bytes: Buffer, parse: (bytes: Buffer, start: (offset: number) => void) => void): number[] {
  const starts = new Set<number>([0]);
  try {
    parse(bytes, (offset) => starts.add(offset));
  } catch {
    // What was found up to the error stands.
  }
  starts.add(bytes.length);
  return [...starts].sort((a, b) => a - b);
}

/** Where the records of a QEMU stream begin (as far as it parses). */
export function recordBoundaries(stream: Buffer): number[] {
  return boundariesOf(stream, (bytes, start) => {
    const parser = new StreamParser((r) => {
      if (r.kind !== RecordKind.SectionData && r.kind !== RecordKind.VmDescriptionData && r.kind !== RecordKind.Verbatim) start(r.streamOffset);
    });
    parser.push(bytes);
    parser.end();
  });
}

/** Where the frames of a frame stream begin. */
export function frameBoundaries(bytes: Buffer): number[] {
  const starts: number[] = [];
  for (let at = 0; at + FRAME_HEADER_BYTES <= bytes.length; at += FRAME_HEADER_BYTES + bytes.readUInt32BE(at + 1)) starts.push(at);
  starts.push(bytes.length);
  return starts;
}

/**
 * One mutation, as data, so that fast-check can generate and shrink lists of them and the long run can
 * draw them from its PRNG. Positions are taken modulo the input length (or the boundary count).
 */
export type Mutation =
  | { op: 'flip'; at: number; bit: number }
  | { op: 'set8'; at: number; value: number }
  | { op: 'set32'; at: number; value: number }
  /** An interesting value written into a header field: `delta` bytes after a record's start. */
  | { op: 'field'; record: number; delta: number; width: 1 | 4 | 8; value: number }
  | { op: 'insert'; at: number; bytes: number[] }
  | { op: 'delete'; at: number; length: number }
  | { op: 'truncate'; at: number }
  /** Records [from, from + count) of a donor seed inserted at a record boundary. */
  | { op: 'splice'; record: number; donor: number; from: number; count: number }
  /** A record of the input repeated in place. */
  | { op: 'duplicate'; record: number };

/** Values that break length and type checks: 0, ±1 around limits, all ones, QEMU type bytes. */
export const INTERESTING_8 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 0x10, 0x20, 0x3f, 0x40, 0x7e, 0x7f, 0x80, 0xfe, 0xff];
export const INTERESTING_32 = [
  0, 1, 2, 3, 4, 7, 8, 0x7e, 0xff, 0x100, 0xfff, 0x1000, 0x1001, 0x100e, 0x100f, 0xffff, 0x10000, 0x10001, 0x3fffff, MAX_FRAME_PAYLOAD,
  MAX_FRAME_PAYLOAD + 1, 0x7fffffff, 0x80000000, 0xfffffffe, 0xffffffff,
];

export function applyMutations(seed: Seed, mutations: readonly Mutation[], donors: readonly Seed[]): Buffer {
  let bytes = Buffer.from(seed.bytes);
  // Boundaries go stale as bytes move; they still point at plausible places, which is all we need.
  const bounds = seed.boundaries;
  const boundary = (k: number): number => Math.min(bounds[k % bounds.length], bytes.length);
  for (const m of mutations) {
    const n = bytes.length;
    switch (m.op) {
      case 'flip':
        if (n > 0) bytes[m.at % n] ^= 1 << (m.bit & 7);
        break;
      case 'set8':
        if (n > 0) bytes[m.at % n] = m.value & 0xff;
        break;
      case 'set32':
        if (n >= 4) bytes.writeUInt32BE(m.value >>> 0, m.at % (n - 3));
        break;
      case 'field': {
        const at = boundary(m.record) + m.delta;
        if (at + m.width > n) break;
        if (m.width === 1) bytes[at] = m.value & 0xff;
        else if (m.width === 4) bytes.writeUInt32BE(m.value >>> 0, at);
        else bytes.writeBigUInt64BE(BigInt(m.value >>> 0) << 12n | BigInt(m.value & 0xfff), at);
        break;
      }
      case 'insert': {
        const at = m.at % (n + 1);
        bytes = Buffer.concat([bytes.subarray(0, at), Buffer.from(m.bytes), bytes.subarray(at)]);
        break;
      }
      case 'delete': {
        if (n === 0) break;
        const at = m.at % n;
        bytes = Buffer.concat([bytes.subarray(0, at), bytes.subarray(Math.min(n, at + m.length))]);
        break;
      }
      case 'truncate':
        bytes = bytes.subarray(0, m.at % (n + 1));
        break;
      case 'splice': {
        const donor = donors[m.donor % donors.length];
        if (!donor) break;
        const db = donor.boundaries;
        const from = db[m.from % db.length];
        const to = db[Math.min(db.length - 1, (m.from % db.length) + Math.max(1, m.count))];
        const at = boundary(m.record);
        bytes = Buffer.concat([bytes.subarray(0, at), donor.bytes.subarray(from, to), bytes.subarray(at)]);
        break;
      }
      case 'duplicate': {
        const k = m.record % bounds.length;
        const from = boundary(k);
        const to = boundary(k + 1 < bounds.length ? k + 1 : k);
        if (to <= from || to - from > 64 * 1024) break;
        bytes = Buffer.concat([bytes.subarray(0, to), bytes.subarray(from, to), bytes.subarray(to)]);
        break;
      }
    }
  }
  return bytes;
}

/** Draws 1–4 mutations from the PRNG, weighted towards the structure-aware ones. */
export function randomMutations(rng: Rng, seed: Seed, donorCount: number): Mutation[] {
  const count = 1 + rng.below(4);
  const out: Mutation[] = [];
  const len = Math.max(1, seed.bytes.length);
  for (let i = 0; i < count; i++) {
    const roll = rng.below(20);
    const at = rng.below(len + 1);
    if (roll < 3) out.push({ op: 'flip', at, bit: rng.below(8) });
    else if (roll < 5) out.push({ op: 'set8', at, value: rng.pick(INTERESTING_8) });
    else if (roll < 6) out.push({ op: 'set32', at, value: rng.pick(INTERESTING_32) });
    else if (roll < 11) {
      const width = rng.pick([1, 4, 4, 8] as const);
      const value = width === 1 ? rng.pick(INTERESTING_8) : rng.pick(INTERESTING_32);
      out.push({ op: 'field', record: rng.below(seed.boundaries.length), delta: rng.below(14), width, value });
    } else if (roll < 13) {
      const bytes = Array.from({ length: 1 + rng.below(rng.below(2) ? 4 : 32) }, () => (rng.below(2) ? rng.pick(INTERESTING_8) : rng.below(256)));
      out.push({ op: 'insert', at, bytes });
    } else if (roll < 15) out.push({ op: 'delete', at, length: 1 + rng.below(rng.below(2) ? 8 : 4200) });
    else if (roll < 16) out.push({ op: 'truncate', at });
    else if (roll < 18) out.push({ op: 'splice', record: rng.below(seed.boundaries.length), donor: rng.below(donorCount), from: rng.below(1 << 16), count: 1 + rng.below(4) });
    else out.push({ op: 'duplicate', record: rng.below(seed.boundaries.length) });
  }
  return out;
}

/** Chunk boundaries for one delivery of `length` bytes: few big chunks, many small ones, or both. */
export function randomSplits(rng: Rng, length: number): number[] {
  const cuts: number[] = [];
  const style = rng.below(3);
  for (let at = 0; at < length; ) {
    const size = style === 0 ? 1 + rng.below(16) : style === 1 ? 1 + rng.below(8192) : rng.below(4) === 0 ? 1 + rng.below(8) : 1 + rng.below(70_000);
    at = Math.min(length, at + size);
    cuts.push(at);
  }
  return cuts;
}

function* chunksOf(input: Buffer, cuts: readonly number[]): Generator<Buffer> {
  let from = 0;
  for (const to of cuts) {
    if (to > from) yield input.subarray(from, to);
    from = to;
  }
  if (from < input.length) yield input.subarray(from);
}

const byteCuts = (length: number): number[] => Array.from({ length }, (_, i) => i + 1);

// ---------------------------------------------------------------------------------------------
// Outcomes and failures

/** What became of an input: parsed and rebuilt, relayed (partly) verbatim, or rejected with a typed error. */
export type Outcome = 'rebuilt' | 'verbatim' | 'rejected';

export type FailureKind = 'crash' | 'mismatch' | 'chunking' | 'silent-corruption' | 'spurious-rejection' | 'unbounded';

/** A property broke. The message says which and how; the runner adds the seed that reproduces it. */
export class FuzzFailure extends Error {
  override readonly name = 'FuzzFailure';
  constructor(
    readonly kind: FailureKind,
    detail: string,
  ) {
    super(`${kind}: ${detail}`);
  }
}

/** The typed errors each layer may reject input with; anything else is a crash. */
const isStreamError = (err: unknown): err is StreamError => err instanceof StreamError;
const isWireError = (err: unknown): boolean => err instanceof WireError || err instanceof RunError;
/** The harness's own stand-ins for the receiving gateway's protocol checks and the store's limits. */
export class ProtocolError extends Error {
  override readonly name = 'ProtocolError';
}
export class StoreLimitError extends Error {
  override readonly name = 'StoreLimitError';
}
const isProxyError = (err: unknown): boolean =>
  isStreamError(err) || isWireError(err) || err instanceof RebuildError || err instanceof ProtocolError || err instanceof StoreLimitError;

function describe(err: unknown): string {
  return err instanceof Error ? `${err.name}: ${err.message}\n${err.stack ?? ''}` : String(err);
}

/** A cheap order-sensitive hash, to compare record sequences without keeping them. */
function mix(h: number, v: number): number {
  h = Math.imul(h ^ v, 0x01000193) >>> 0;
  return (h ^ (h >>> 13)) >>> 0;
}

// ---------------------------------------------------------------------------------------------
// Target 1: the QEMU stream codec (parser → writer, and inspect)

interface ParseResult {
  outcome: Outcome;
  /** Everything that pins the result down except the chunking: must be equal for every split. */
  signature: string;
  output: Buffer;
}

function parseAndRewrite(input: Buffer, cuts: readonly number[]): ParseResult {
  const out: Buffer[] = [];
  const writer = new StreamWriter((b) => out.push(Buffer.from(b)), 4096);
  let records = 0x811c9dc5;
  let fallback = '';
  const parser = new StreamParser((r: StreamRecord) => {
    if (r.kind !== RecordKind.SectionData && r.kind !== RecordKind.VmDescriptionData && r.kind !== RecordKind.Verbatim) {
      records = mix(mix(records, r.kind), r.streamOffset);
    }
    if (r.kind === RecordKind.Fallback) fallback = `${r.reason}@${r.streamOffset}`;
    writer.write(r);
  });
  let error = '';
  try {
    for (const chunk of chunksOf(input, cuts)) parser.push(chunk);
    parser.end();
  } catch (err) {
    if (!isStreamError(err)) throw new FuzzFailure('crash', `parser threw ${describe(err)}`);
    error = `${err.code}@${err.offset}`;
  }
  writer.flush();
  const output = Buffer.concat(out);
  const outcome: Outcome = error ? 'rejected' : fallback ? 'verbatim' : 'rebuilt';
  return { outcome, signature: `${outcome} error=${error} fallback=${fallback} records=${records}`, output };
}

/**
 * Parses the input whole, split at random points, and byte by byte when small: each time it must be
 * rewritten byte-exact (or, when rejected, the records before the error must be a prefix of it), and
 * every split must give the same records, fallback and error. Inspect must agree.
 */
export function fuzzCodec(input: Buffer, rng: Rng, bytewiseUpTo = 4096): Outcome {
  const whole = parseAndRewrite(input, [input.length]);
  const check = (r: ParseResult, how: string): void => {
    if (r.outcome !== 'rejected' && !r.output.equals(input)) {
      throw new FuzzFailure('mismatch', `${how}: ${r.outcome} but the rewrite differs (${r.output.length} of ${input.length} bytes)`);
    }
    if (r.outcome === 'rejected' && !r.output.equals(input.subarray(0, r.output.length))) {
      throw new FuzzFailure('mismatch', `${how}: the records written before the error are not a prefix of the input`);
    }
    if (r.signature !== whole.signature) throw new FuzzFailure('chunking', `${how}: ${r.signature}; whole: ${whole.signature}`);
  };
  check(whole, 'whole');
  const cuts = randomSplits(rng, input.length);
  check(parseAndRewrite(input, cuts), `split at ${cuts.length} points`);
  if (input.length <= bytewiseUpTo) check(parseAndRewrite(input, byteCuts(input.length)), 'byte by byte');

  let report;
  try {
    const inspector = new StreamInspector();
    for (const chunk of chunksOf(input, cuts)) inspector.push(chunk);
    report = inspector.end();
  } catch (err) {
    throw new FuzzFailure('crash', `inspect threw ${describe(err)}`);
  }
  const inspected: Outcome = report.error ? 'rejected' : report.fallback ? 'verbatim' : 'rebuilt';
  if (inspected !== whole.outcome) throw new FuzzFailure('chunking', `inspect says ${inspected}, the parser ${whole.outcome}`);
  if (inspected !== 'rejected' && !report.identical) throw new FuzzFailure('mismatch', 'inspect: the rewrite is not identical');
  const byKind = Object.values(report.bytesByKind).reduce((s, v) => s + v, 0);
  if (byKind !== input.length) throw new FuzzFailure('mismatch', `inspect: bytesByKind adds up to ${byKind}, not ${input.length}`);
  return whole.outcome;
}

// ---------------------------------------------------------------------------------------------
// Target 2: the wire frame parser and its message decoders

/** Decodes one whole frame as the gateways would; typed errors only. */
function decodeFrame(type: FrameType, payload: Buffer): string {
  switch (type) {
    case FrameType.Hello:
      return JSON.stringify(decodeHello(payload));
    case FrameType.Offer:
      return JSON.stringify(decodeOffer(payload));
    case FrameType.End:
      return JSON.stringify(decodeEnd(payload));
    case FrameType.Done:
      return JSON.stringify(decodeDone(payload));
    case FrameType.Abort:
      return JSON.stringify(decodeAbort(payload));
    case FrameType.Run: {
      const run = decodeRun(payload);
      return `${run.count}/${run.held}/${run.firstOffset}`;
    }
    default:
      return `${payload.length}`;
  }
}

function parseFrames(input: Buffer, cuts: readonly number[], rng: Rng | null): { signature: string; outcome: Outcome } {
  let events = 0x811c9dc5;
  let frames = 0;
  let literalOpen = false;
  let error = '';
  const parser: FrameParser = new FrameParser(
    (type, payload) => {
      if (type === FrameType.Literal) {
        // Pieces of one Literal frame join up: hash bytes, not the piece boundaries.
        if (!literalOpen) events = mix(events, 0x4c);
        literalOpen = true;
        for (const b of payload) events = mix(events, b);
        return;
      }
      literalOpen = false;
      frames++;
      events = mix(events, type);
      let decoded: string;
      try {
        decoded = decodeFrame(type, payload);
      } catch (err) {
        if (!isWireError(err)) throw new FuzzFailure('crash', `decoding frame type ${type} threw ${describe(err)}`);
        decoded = `error ${(err as Error).message}`;
      }
      for (let i = 0; i < decoded.length; i++) events = mix(events, decoded.charCodeAt(i));
      // A receiver whose destination is slow pauses mid-chunk; delivery must not change.
      if (rng && rng.below(4) === 0) parser.pause();
    },
    (type) => type === FrameType.Literal,
  );
  try {
    for (const chunk of chunksOf(input, cuts)) {
      parser.push(chunk);
      while (parser.isPaused) parser.resume();
      if (parser.pending > MAX_FRAME_PAYLOAD + FRAME_HEADER_BYTES + chunk.length) {
        throw new FuzzFailure('unbounded', `frame parser holds ${parser.pending} bytes`);
      }
    }
  } catch (err) {
    if (err instanceof FuzzFailure) throw err;
    if (!isWireError(err)) throw new FuzzFailure('crash', `frame parser threw ${describe(err)}`);
    error = (err as Error).message;
  }
  const outcome: Outcome = error ? 'rejected' : parser.atBoundary ? 'rebuilt' : 'verbatim';
  return { outcome, signature: `${outcome} frames=${frames} events=${events} error=${error} pending=${error ? 0 : parser.pending}` };
}

/**
 * Feeds frame bytes whole, at random splits (pausing at random frames) and byte by byte when small:
 * the frames and decoded messages must not depend on it. "verbatim" here means the input ended
 * mid-frame (the bytes stay pending), "rejected" a WireError or RunError.
 */
export function fuzzFrames(input: Buffer, rng: Rng, bytewiseUpTo = 4096): Outcome {
  const whole = parseFrames(input, [input.length], null);
  const split = parseFrames(input, randomSplits(rng, input.length), rng);
  // A frame rejected from its header in one delivery is rejected in every delivery, but how many
  // frames came before it is the same too: the signatures must match exactly.
  if (split.signature !== whole.signature) throw new FuzzFailure('chunking', `split: ${split.signature}; whole: ${whole.signature}`);
  if (input.length <= bytewiseUpTo) {
    const bytewise = parseFrames(input, byteCuts(input.length), rng);
    if (bytewise.signature !== whole.signature) throw new FuzzFailure('chunking', `byte by byte: ${bytewise.signature}; whole: ${whole.signature}`);
  }
  return whole.outcome;
}

// ---------------------------------------------------------------------------------------------
// Target 3: the proxy pair, encoder → frames → decoder, with retained pages in memory

/** Most pages an in-memory store takes: layouts above it are refused with StoreLimitError. */
export const MEMORY_STORE_MAX_PAGES = 1 << 20;

/** A page store in memory, with the same contract as src/store's PageStore on the data path. */
export class MemoryPages implements RetainedPages {
  digests: Uint8Array = new Uint8Array(0);
  /**
   * Behave as a store with an undo journal does to a sender's Deltas: the first write of a held page in
   * a migration reads its old version anyway (readsBeforeWrite), until newMigration().
   */
  journalled = false;
  private written = new Set<number>();
  private pages: Buffer = Buffer.alloc(0);
  private layoutId = '';
  private pageCount = 0;
  private readonly pageSize = 4096;

  begin(layout: PageLayout): void {
    if (layout.pageCount > MEMORY_STORE_MAX_PAGES) throw new StoreLimitError(`layout of ${layout.pageCount} pages`);
    if (layout.layoutId === this.layoutId && layout.pageCount === this.pageCount) return;
    this.layoutId = layout.layoutId;
    this.pageCount = layout.pageCount;
    this.digests = new Uint8Array(layout.pageCount * DIGEST_BYTES);
    this.pages = Buffer.alloc(layout.pageCount * this.pageSize);
  }
  newMigration(): void {
    this.written = new Set();
  }
  readsBeforeWrite(index: number): boolean {
    return this.journalled && !this.written.has(index) && this.digests.subarray(index * DIGEST_BYTES, (index + 1) * DIGEST_BYTES).some((v) => v !== 0);
  }
  writePage(index: number, src: Uint8Array, srcStart: number, digest: Uint8Array, digestStart: number): void {
    this.check(index, 1);
    this.written.add(index);
    this.pages.set(src.subarray(srcStart, srcStart + this.pageSize), index * this.pageSize);
    this.digests.set(digest.subarray(digestStart, digestStart + DIGEST_BYTES), index * DIGEST_BYTES);
  }
  markAbsent(index: number): void {
    this.check(index, 1);
    this.digests.fill(0, index * DIGEST_BYTES, (index + 1) * DIGEST_BYTES);
  }
  readPages(index: number, count: number, dest: Uint8Array, destStart: number): void {
    this.check(index, count);
    for (let i = index; i < index + count; i++) {
      if (this.digests.subarray(i * DIGEST_BYTES, (i + 1) * DIGEST_BYTES).every((v) => v === 0)) throw new Error(`page ${i} is absent`);
    }
    dest.set(this.pages.subarray(index * this.pageSize, (index + count) * this.pageSize), destStart);
  }
  clone(): MemoryPages {
    const copy = new MemoryPages();
    copy.digests = Uint8Array.from(this.digests);
    copy.pages = Buffer.from(this.pages);
    copy.layoutId = this.layoutId;
    copy.pageCount = this.pageCount;
    copy.journalled = this.journalled;
    return copy;
  }
  private check(index: number, count: number): void {
    if (!Number.isInteger(index) || index < 0 || index + count > this.pageCount) throw new RangeError(`pages [${index}, +${count}) outside [0, ${this.pageCount})`);
  }
}

/** Both gateways' stores after an earlier migration: identical, so the sender may reuse its own table. */
export interface ProxyContext {
  sender: MemoryPages;
  receiver: MemoryPages;
  /** A sibling VM's retained snapshot at both sites (read only): its pages may go as SiblingDelta frames. */
  sibling?: { sender: MemoryPages; receiver: MemoryPages };
}

/** The frame bytes an encoder sends for `stream` (fed in `cuts`), ending with the End frame; or its typed error. */
function encodeToFrames(stream: Buffer, cuts: readonly number[], ctx: ProxyContext | null): { wire: Buffer; error: unknown; fallback: boolean } {
  const frames: Buffer[] = [];
  const sender = ctx ? ctx.sender.clone() : null;
  const encoder: StreamEncoder = new StreamEncoder(
    {
      literal: (bytes) => frames.push(frameHeader(FrameType.Literal, bytes.length), Buffer.from(bytes)),
      run: (payload) => frames.push(encodeFrame(FrameType.Run, payload)),
      delta: (payload) => frames.push(encodeFrame(FrameType.Delta, payload)),
      siblingDelta: (payload) => frames.push(encodeFrame(FrameType.SiblingDelta, payload)),
    },
    sender,
    () => {
      if (sender) encoder.reference = sender.digests;
      encoder.deltas = sender !== null;
      if (ctx?.sibling) encoder.siblings = new SiblingMatch([ctx.sibling.sender.digests]);
    },
  );
  try {
    for (const chunk of chunksOf(stream, cuts)) encoder.push(chunk);
    encoder.end();
  } catch (err) {
    return { wire: Buffer.concat(frames), error: err, fallback: encoder.fallback !== null };
  }
  frames.push(encodeJson(FrameType.End, { streamBytes: encoder.counts.streamBytes, streamCheck: encoder.streamCheck, snapshotId: 'fuzz' }));
  return { wire: Buffer.concat(frames), error: null, fallback: encoder.fallback !== null };
}

/** The receiving side: frames in, rebuilt stream out. Returns the output and the typed error, if any. */
export function decodeFrames(wire: Buffer, cuts: readonly number[], ctx: ProxyContext | null): { output: Buffer; error: unknown; ended: boolean } {
  const out: Buffer[] = [];
  const decoder = new StreamDecoder((b) => out.push(Buffer.from(b)), ctx ? ctx.receiver.clone() : null);
  const sibling = ctx?.sibling?.receiver;
  if (sibling) decoder.siblings = [{ vm: 'sibling', digests: sibling.digests, readPages: (index, count, dest, destStart) => sibling.readPages(index, count, dest, destStart) }];
  let ended = false;
  const frames = new FrameParser(
    (type, payload) => {
      if (ended) throw new ProtocolError(`frame type ${type} after End`);
      if (type === FrameType.Literal) decoder.literal(payload);
      else if (type === FrameType.Run) decoder.run(payload);
      else if (type === FrameType.Delta) decoder.delta(payload);
      else if (type === FrameType.SiblingDelta) decoder.siblingDelta(payload);
      else if (type === FrameType.End) {
        const end = decodeEnd(payload);
        decoder.end(end.streamBytes, end.streamCheck);
        ended = true;
      } else throw new ProtocolError(`unexpected frame type ${type}`);
    },
    (type) => type === FrameType.Literal,
  );
  try {
    for (const chunk of chunksOf(wire, cuts)) frames.push(chunk);
    if (!ended) throw new ProtocolError('the connection ended before End');
  } catch (err) {
    return { output: Buffer.concat(out), error: err, ended };
  }
  return { output: Buffer.concat(out), error: null, ended };
}

function checkTyped(err: unknown, where: string): void {
  if (err !== null && !isProxyError(err)) throw new FuzzFailure('crash', `${where} threw ${describe(err)}`);
}

/**
 * A (mutated) QEMU stream through encoder → frame bytes → decoder: the decoder must rebuild it byte
 * for byte, or the encoder must reject it with a typed error (and then the decoder must not have
 * passed on a byte that is not the stream's). A stream the encoder accepts must not be refused by
 * the decoder.
 */
export function fuzzProxyStream(stream: Buffer, rng: Rng, ctx: ProxyContext | null): Outcome {
  const { wire, error, fallback } = encodeToFrames(stream, randomSplits(rng, stream.length), ctx);
  checkTyped(error, 'encoder');
  const decoded = decodeFrames(wire, randomSplits(rng, wire.length), ctx);
  checkTyped(decoded.error, 'decoder');
  if (!decoded.output.equals(stream.subarray(0, decoded.output.length))) {
    throw new FuzzFailure('mismatch', `the decoder passed on bytes that differ from the source stream (${decoded.output.length} bytes out)`);
  }
  // A rejected stream leaves the wire without End: the receiver fails the migration.
  if (error !== null) return 'rejected';
  if (decoded.error !== null) {
    throw new FuzzFailure('spurious-rejection', `the encoder took the stream, the decoder refused it: ${describe(decoded.error)}`);
  }
  if (!decoded.output.equals(stream)) throw new FuzzFailure('mismatch', `rebuilt ${decoded.output.length} of ${stream.length} bytes`);
  return fallback ? 'verbatim' : 'rebuilt';
}

/** Encodes a valid stream once, for fuzzProxyWire. */
export function encodeForWire(stream: Buffer, ctx: ProxyContext | null): Buffer {
  const { wire, error } = encodeToFrames(stream, [stream.length], ctx);
  if (error) throw error;
  return wire;
}

/**
 * Mutated frame bytes between a valid encoding of `stream` and the decoder: whatever reaches the
 * destination must be the source's stream, unless the migration fails with a typed error. Output
 * that differs from the stream with no error is the worst failure there is.
 */
export function fuzzProxyWire(stream: Buffer, wire: Buffer, rng: Rng, ctx: ProxyContext | null): Outcome {
  const decoded = decodeFrames(wire, randomSplits(rng, wire.length), ctx);
  checkTyped(decoded.error, 'decoder');
  if (decoded.error !== null) return 'rejected';
  if (!decoded.output.equals(stream)) {
    throw new FuzzFailure('silent-corruption', `the migration completed but the destination got ${decoded.output.length} bytes that differ from the ${stream.length}-byte stream`);
  }
  return 'rebuilt';
}

// ---------------------------------------------------------------------------------------------
// Seed sets

export interface Corpus {
  /** QEMU streams: every hand-built fixture and synthetic migrations. */
  streams: Seed[];
  /** Frame streams: encodings of the streams, and control messages. */
  frames: Seed[];
  /** Streams for the proxy, with the stores of the migration before (null: no store). */
  proxy: { seed: Seed; ctx: ProxyContext | null; wire: Seed; donor: Seed }[];
  /**
   * The proxy seeds' frames without their End frame, to splice into other wire inputs. A whole
   * migration spliced in with its own End is a valid migration of another stream, which no check on
   * one migration's bytes can tell apart (that is the job of the peer's authentication, not of the
   * codec); any part of one without its End must be caught.
   */
}

const seedOf = (name: string, bytes: Buffer): Seed => ({ name, bytes, boundaries: recordBoundaries(bytes) });

/** Builds the seed corpus; `extra` are further streams (e.g. captured from a real QEMU). */
export function buildCorpus(extra: { name: string; bytes: Buffer }[] = []): Corpus {
  const streams: Seed[] = buildFixtures().map((f) => seedOf(f.name, f.bytes));
  const memory = guestMemory([['pc.ram', 40], ['0000:00:02.0/vga.vram', 8]], 11, 0.4);
  const first = migrationStream(memory, [[3, 4, 5]]);
  streams.push(seedOf('synthetic-first-leg', first));
  // Leg 1 leaves both stores holding the guest; leg 2 (after a few pages changed) reuses them in Runs.
  const sender = new MemoryPages();
  const receiver = new MemoryPages();
  const leg1 = new StreamDecoder(() => undefined, receiver);
  const enc = new StreamEncoder({ literal: (b) => leg1.literal(Buffer.from(b)), run: (p) => leg1.run(p) }, sender);
  enc.push(first);
  enc.end();
  leg1.end(first.length, enc.streamCheck);
  const ctx: ProxyContext = { sender, receiver };
  // A sibling of that guest (booted from the same image) on its first leg: the pages the stores of the
  // guest hold go as SiblingDelta frames.
  const siblingCtx: ProxyContext = { sender: new MemoryPages(), receiver: new MemoryPages(), sibling: { sender, receiver } };
  streams.push(seedOf('synthetic-sibling-first-leg', first));
  dirty(memory, 0.1, 5);
  const second = migrationStream(memory, [[7, 8, 41]]);
  streams.push(seedOf('synthetic-second-leg', second));
  for (const e of extra) streams.push(seedOf(e.name, e.bytes));

  const proxy: Corpus['proxy'] = [];
  for (const s of streams) {
    const withStore = s.name === 'synthetic-sibling-first-leg' ? siblingCtx : s.name === 'synthetic-second-leg' || s.name === 'synthetic-first-leg' ? ctx : null;
    let wire: Buffer;
    try {
      wire = encodeForWire(s.bytes, withStore);
    } catch {
      continue; // an error fixture: fine for the stream target, no valid encoding for the wire target
    }
    const boundaries = frameBoundaries(wire);
    const withoutEnd = wire.subarray(0, boundaries[boundaries.length - 2]);
    proxy.push({
      seed: s,
      ctx: withStore,
      wire: { name: `${s.name}.frames`, bytes: wire, boundaries },
      donor: { name: `${s.name}.frames-without-end`, bytes: withoutEnd, boundaries: boundaries.slice(0, -1) },
    });
  }
  const control = Buffer.concat([
    encodeJson(FrameType.Hello, { protocol: 1, site: 'site-a', vm: 'vm1', target: '127.0.0.1:4444' }),
    encodeJson(FrameType.Offer, { site: 'site-b', snapshotId: 's1', layoutId: null, pageCount: 48, presentPages: 48 }),
    encodeFrame(FrameType.TableRequest),
    encodeFrame(FrameType.TableData, Buffer.alloc(64, 3)),
    encodeFrame(FrameType.TableEnd),
    encodeFrame(FrameType.Return, Buffer.from('return path')),
    encodeJson(FrameType.Done, { snapshotId: 's1', streamBytes: 1234 }),
    encodeJson(FrameType.Abort, { error: 'because' }),
  ]);
  const frames: Seed[] = [{ name: 'control', bytes: control, boundaries: frameBoundaries(control) }, ...proxy.map((p) => p.wire)];
  return { streams, frames, proxy };
}

// ---------------------------------------------------------------------------------------------
// One fuzz input per (target, seed): shared by the long run and the short run

export type TargetName = 'codec' | 'frames' | 'proxy-stream' | 'proxy-wire';
export const TARGETS: readonly TargetName[] = ['codec', 'frames', 'proxy-stream', 'proxy-wire'];

/** Random bytes, sometimes behind a valid file header: the unstructured end of the input space. */
function randomInput(rng: Rng, header: Buffer | null): Buffer {
  const body = Buffer.alloc(rng.below(2) ? rng.below(64) : rng.below(8192));
  for (let i = 0; i < body.length; i++) body[i] = rng.below(3) ? rng.below(256) : rng.pick(INTERESTING_8);
  return header ? Buffer.concat([header, body]) : body;
}

const QEMU_HEADER = Buffer.from('QEVM\x00\x00\x00\x03', 'latin1');

/** Builds input `seed` for `target` from the corpus: which seed input, which mutations. */
export function makeInput(target: TargetName, corpus: Corpus, seed: number): { input: Buffer; from: string; mutations: Mutation[] | null; rng: Rng } {
  const rng = new Rng(seed);
  const pool = target === 'codec' ? corpus.streams : target === 'frames' ? corpus.frames : target === 'proxy-stream' ? corpus.proxy.map((p) => p.seed) : corpus.proxy.map((p) => p.wire);
  if ((target === 'codec' || target === 'frames') && rng.below(40) === 0) {
    return { input: randomInput(rng, target === 'codec' && rng.below(2) ? QEMU_HEADER : null), from: 'random', mutations: null, rng };
  }
  const k = rng.below(pool.length);
  const from = pool[k];
  // A few inputs go through unmutated: the seeds themselves must pass every property.
  const mutations = rng.below(50) === 0 ? [] : randomMutations(rng, from, pool.length);
  const donors = target === 'proxy-wire' ? corpus.proxy.map((p) => p.donor) : pool;
  return { input: applyMutations(from, mutations, donors), from: `${from.name}#${k}`, mutations, rng };
}

/** Runs input `seed` against `target`; throws FuzzFailure when a property breaks. */
export function runInput(target: TargetName, corpus: Corpus, seed: number): { outcome: Outcome; bytes: number; from: string } {
  const { input, from, rng } = makeInput(target, corpus, seed);
  let outcome: Outcome;
  if (target === 'codec') outcome = fuzzCodec(input, rng);
  else if (target === 'frames') outcome = fuzzFrames(input, rng);
  else {
    const k = Number(from.slice(from.lastIndexOf('#') + 1));
    const p = corpus.proxy[k];
    outcome = target === 'proxy-stream' ? fuzzProxyStream(input, rng, p.ctx) : fuzzProxyWire(p.seed.bytes, input, rng, p.ctx);
  }
  return { outcome, bytes: input.length, from };
}
