/**
 * The short fuzz run: a few thousand mutated real-shaped inputs against the codec, the frame parser
 * and the proxy pair (the long run is bench/fuzz.ts). fast-check draws and shrinks the mutations;
 * a failure prints the fast-check seed and path, or the run seed and input index, that reproduce it.
 * FUZZ_SEED=N picks another seed.
 */
import fc from 'fast-check';
import { RebuildError } from '../src/proxy/rebuild-error';
import { decodeRun, isHeld } from '../src/proxy/run';
import { StreamInspector } from '../src/qemu/inspect';
import { FRAME_HEADER_BYTES, FrameType } from '../src/wire/frames';
import {
  applyMutations,
  buildCorpus,
  decodeFrames,
  fuzzCodec,
  fuzzFrames,
  fuzzProxyStream,
  fuzzProxyWire,
  frameBoundaries,
  Rng,
  runInput,
  TARGETS,
} from '../src/lab/harness/fuzz';
import { countOutcomes, mutationLists } from './fuzz-arbitraries';

const SEED = Number(process.env.FUZZ_SEED ?? 20240611);
const corpus = buildCorpus();

const mutations = mutationLists(13, 0, 4);

describe('fast-check properties (shrinking mutations)', () => {
  test('codec: every mutated stream is rewritten byte-exact, relayed verbatim, or rejected with a StreamError, whatever the chunking', () => {
    const pool = corpus.streams;
    fc.assert(
      fc.property(fc.nat(pool.length - 1), mutations, fc.nat(), (k, ms, split) => {
        fuzzCodec(applyMutations(pool[k], ms, pool), new Rng(split));
      }),
      { seed: SEED, numRuns: 1200 },
    );
  });

  test('frames: mutated frame streams give the same frames whatever the chunking and pausing, or a WireError', () => {
    const pool = corpus.frames;
    fc.assert(
      fc.property(fc.nat(pool.length - 1), mutations, fc.nat(), (k, ms, split) => {
        fuzzFrames(applyMutations(pool[k], ms, pool), new Rng(split));
      }),
      { seed: SEED, numRuns: 1200 },
    );
  });

  test('proxy: a mutated stream comes out of the decoder byte-identical, or the encoder rejects it', () => {
    const pool = corpus.proxy;
    const seeds = pool.map((p) => p.seed);
    fc.assert(
      fc.property(fc.nat(pool.length - 1), mutations, fc.nat(), (k, ms, split) => {
        fuzzProxyStream(applyMutations(seeds[k], ms, seeds), new Rng(split), pool[k].ctx);
      }),
      { seed: SEED, numRuns: 600 },
    );
  });

  test('proxy: mutated wire bytes never complete a migration with a stream that differs from the source', () => {
    const pool = corpus.proxy;
    const wires = pool.map((p) => p.wire);
    const donors = pool.map((p) => p.donor);
    fc.assert(
      fc.property(fc.nat(pool.length - 1), mutations, fc.nat(), (k, ms, split) => {
        fuzzProxyWire(pool[k].seed.bytes, applyMutations(wires[k], ms, donors), new Rng(split), pool[k].ctx);
      }),
      { seed: SEED, numRuns: 600 },
    );
  });
});

describe('mutator loop (the long run, shortened)', () => {
  test.each(TARGETS.map((t) => [t]))('%s: 400 inputs', (target) => {
    const outcomes = countOutcomes(target, 400, SEED, (seed) => runInput(target, corpus, seed).outcome);
    // The mutations reach every outcome: a harness that only ever rejects proves nothing.
    expect(outcomes.rejected).toBeGreaterThan(0);
    expect(outcomes.rebuilt).toBeGreaterThan(0);
    if (target !== 'proxy-wire') expect(outcomes.verbatim).toBeGreaterThan(0);
  });

  test('the seeds themselves pass unmutated and are rebuilt or relayed', () => {
    for (const s of corpus.streams) fuzzCodec(s.bytes, new Rng(1));
    for (const p of corpus.proxy) {
      expect(fuzzProxyStream(p.seed.bytes, new Rng(2), p.ctx)).not.toBe('rejected');
      expect(fuzzProxyWire(p.seed.bytes, p.wire.bytes, new Rng(3), p.ctx)).toBe('rebuilt');
    }
  });

  test('a sibling’s first leg is in the corpus as SiblingDelta frames, so mutations reach them', () => {
    const sibling = corpus.proxy.find((p) => p.seed.name === 'synthetic-sibling-first-leg');
    const wire = sibling?.wire.bytes ?? Buffer.alloc(0);
    const types = frameBoundaries(wire).slice(0, -1).map((at) => wire[at]);
    expect(types.filter((t) => t === FrameType.SiblingDelta).length).toBeGreaterThan(10);
  });
});

describe('regressions found by fuzzing', () => {
  test('inspect: the bytes of a rejected stream are counted, so bytesByKind adds up to the stream length', () => {
    // "QEVM" and one byte of the version: truncated inside the file header.
    const inspector = new StreamInspector();
    inspector.push(Buffer.from('QEVM\x00', 'latin1'));
    const report = inspector.end();
    expect(report.error?.code).toBe('TRUNCATED');
    expect(report.bytesByKind).toEqual({ rejected: 5 });
  });

  /** The frames of the second-leg seed's wire bytes: [type, payload start, payload length]. */
  function framesOf(wire: Buffer): [FrameType, number, number][] {
    const out: [FrameType, number, number][] = [];
    for (let at = 0; at < wire.length; at += FRAME_HEADER_BYTES + wire.readUInt32BE(at + 1)) {
      out.push([wire[at] as FrameType, at + FRAME_HEADER_BYTES, wire.readUInt32BE(at + 1)]);
    }
    return out;
  }
  const leg = corpus.proxy.find((p) => p.seed.name === 'synthetic-second-leg');
  if (!leg) throw new Error('no second-leg seed');

  test('proxy: a damaged byte of a page inside a Literal frame fails the migration (it used to reach the destination unnoticed)', () => {
    const wire = Buffer.from(leg.wire.bytes);
    // The largest Literal frame carries whole changed pages; damage a byte deep inside it.
    const [, start, length] = framesOf(wire)
      .filter(([type]) => type === FrameType.Literal)
      .sort((a, b) => b[2] - a[2])[0];
    expect(length).toBeGreaterThan(4096);
    wire[start + length - 100] ^= 0x10;
    const decoded = decodeFrames(wire, [wire.length], leg.ctx);
    expect(decoded.error).toBeInstanceOf(RebuildError);
    expect(String(decoded.error)).toMatch(/XXH3-64/);
  });

  test("proxy: a changed fill byte of a Run fails the migration (Runs' fill pages carry no digest)", () => {
    const wire = Buffer.from(leg.wire.bytes);
    const run = framesOf(wire).find(([type, start, length]) => {
      if (type !== FrameType.Run) return false;
      const r = decodeRun(wire.subarray(start, start + length));
      return Array.from({ length: r.count }, (_, k) => isHeld(r.bitmap, k)).includes(false);
    });
    if (!run) throw new Error('no Run with fill pages in the seed');
    wire[run[1]] = 0x5a; // the fill byte
    const decoded = decodeFrames(wire, [wire.length], leg.ctx);
    expect(decoded.error).toBeInstanceOf(RebuildError);
    expect(String(decoded.error)).toMatch(/XXH3-64/);
  });

  test('proxy: the undamaged wire bytes rebuild the stream exactly', () => {
    const decoded = decodeFrames(leg.wire.bytes, [leg.wire.bytes.length], leg.ctx);
    expect(decoded.error).toBeNull();
    expect(decoded.output.equals(leg.seed.bytes)).toBe(true);
  });
});
