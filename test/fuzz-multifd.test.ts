/**
 * The short fuzz run of multifd channels (src/lab/harness/fuzz-multifd.ts; the long run is
 * `node dist/bench/fuzz.js --target multifd-codec,multifd-stream,multifd-wire`): mutated channels
 * through MultifdParser and through a gateway pair's multifd codecs, and damaged frames between the
 * codecs. FUZZ_SEED=N picks another seed.
 */
import fc from 'fast-check';
import { applyMutations, Rng } from '../src/lab/harness/fuzz';
import { countOutcomes, mutationLists } from './fuzz-arbitraries';
import { buildMultifdCorpus, CODEC_OPTIONS, fuzzMultifdParser, fuzzMultifdStream, fuzzMultifdWire, MULTIFD_TARGETS, runMultifdInput } from '../src/lab/harness/fuzz-multifd';
import { multifdRoundTrip } from '../src/lab/harness/multifd-stream';
import { RebuildError } from '../src/proxy/rebuild-error';

const SEED = Number(process.env.FUZZ_SEED ?? 20261206);
const corpus = buildMultifdCorpus();

const mutations = mutationLists(40, 1, 3);
const migration = fc.nat(corpus.migrations.length - 1);

describe('fast-check properties of multifd channels (shrinking mutations)', () => {
  test('a mutated channel parses to the same records however it is split, or is refused with a StreamError', () => {
    fc.assert(
      fc.property(fc.nat(corpus.channels.length - 1), mutations, fc.nat(), (k, ms, split) => {
        fuzzMultifdParser(applyMutations(corpus.channels[k], ms, corpus.channels), new Rng(split));
      }),
      { seed: SEED, numRuns: 600 },
    );
  });

  test('a migration with a mutated channel comes out of the codecs byte for byte, channel by channel, or fails with a typed error', () => {
    fc.assert(
      fc.property(migration, fc.nat(2), mutations, fc.nat(), (m, c, ms, feed) => {
        const seed = corpus.migrations[m];
        fuzzMultifdStream(seed, c, applyMutations(seed.channels[c], ms, corpus.channels), new Rng(feed));
      }),
      { seed: SEED, numRuns: 150 },
    );
  });

  test("damaged frames between the codecs never complete a channel with bytes that differ from the source's", () => {
    const donors = corpus.migrations.flatMap((m) => m.wires);
    fc.assert(
      fc.property(migration, fc.nat(2), mutations, fc.nat(), (m, c, ms, feed) => {
        const seed = corpus.migrations[m];
        fuzzMultifdWire(seed, c, applyMutations(seed.wires[c], ms, donors), new Rng(feed));
      }),
      { seed: SEED, numRuns: 300 },
    );
  });
});

describe('multifd mutator loop (the long run, shortened)', () => {
  test.each([
    ['multifd-codec', 400],
    ['multifd-stream', 120],
    ['multifd-wire', 400],
  ] as const)('%s: %i inputs', (target, count) => {
    expect(MULTIFD_TARGETS).toContain(target);
    const outcomes = countOutcomes(target, count, SEED, (seed) => runMultifdInput(target, corpus, seed).outcome);
    // The mutations reach every outcome: a harness that only ever rejects proves nothing.
    expect(outcomes.rejected).toBeGreaterThan(0);
    expect(outcomes.rebuilt).toBeGreaterThan(0);
    if (target !== 'multifd-wire') expect(outcomes.verbatim).toBeGreaterThan(0);
  });

  test('the seeds pass unmutated, and every channel is rebuilt', () => {
    for (const seed of corpus.migrations) {
      seed.channels.forEach((channel, c) => {
        expect(fuzzMultifdParser(channel.bytes, new Rng(1))).toBe('rebuilt');
        expect(fuzzMultifdStream(seed, c, channel.bytes, new Rng(2 + c))).toBe('rebuilt');
        expect(fuzzMultifdWire(seed, c, seed.wires[c].bytes, new Rng(5 + c))).toBe('rebuilt');
      });
    }
  });

  test("the second legs' frames hold Runs and Deltas, so that mutations reach them", () => {
    for (const seed of corpus.migrations.filter((m) => m.name.endsWith('second-leg'))) {
      const kinds = seed.wires.flatMap((w) => w.boundaries.slice(0, -1).map((at) => w.bytes[at]));
      expect(kinds.filter((k) => k === 2).length).toBeGreaterThan(3); // run
      expect(kinds.filter((k) => k === 3).length).toBeGreaterThan(0); // delta
    }
  });

  test('a byte of a Delta changed on its way fails the migration with a RebuildError', () => {
    const seed = corpus.migrations.find((m) => m.name === 'qemu-10.0-second-leg');
    const stores = seed?.stores;
    if (!seed || !stores) throw new Error('no 10.0 second-leg seed');
    const sender = stores.sender.clone();
    const run = (damage: boolean): void => {
      multifdRoundTrip(
        seed.channels.map((ch) => ch.bytes),
        seed.layout,
        { store: sender.clone(), reference: sender.digests },
        stores.receiver.clone(),
        {
          ...CODEC_OPTIONS,
          tamperDelta: damage ? (payload) => (payload[payload.length - 1] ^= 0x20) : undefined,
        },
      );
    };
    expect(() => run(false)).not.toThrow();
    expect(() => run(true)).toThrow(RebuildError);
  });
});
