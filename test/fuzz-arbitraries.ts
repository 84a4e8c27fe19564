/**
 * What the short fuzz runs (test/fuzz-*.test.ts) share: fast-check's arbitrary of the harness's
 * mutations, which it draws and shrinks, and the mutator loop of the long run, shortened.
 */
import fc from 'fast-check';
import { errorMessage } from '../src/common/errors';
import { INTERESTING_32, INTERESTING_8, inputSeed, type Mutation, type Outcome } from '../src/lab/harness/fuzz';

/** Lists of up to `maxLength` mutations; `field` writes up to `maxDelta` bytes into a record's header. */
export function mutationLists(maxDelta: number, minLength: number, maxLength: number): fc.Arbitrary<Mutation[]> {
  const mutation: fc.Arbitrary<Mutation> = fc.oneof(
    fc.record({ op: fc.constant('flip' as const), at: fc.nat(), bit: fc.nat(7) }),
    fc.record({ op: fc.constant('set8' as const), at: fc.nat(), value: fc.constantFrom(...INTERESTING_8) }),
    fc.record({ op: fc.constant('set32' as const), at: fc.nat(), value: fc.constantFrom(...INTERESTING_32) }),
    fc.record({
      op: fc.constant('field' as const),
      record: fc.nat(),
      delta: fc.nat(maxDelta),
      width: fc.constantFrom(1 as const, 4 as const, 8 as const),
      value: fc.oneof(fc.constantFrom(...INTERESTING_32), fc.nat()),
    }),
    fc.record({ op: fc.constant('insert' as const), at: fc.nat(), bytes: fc.array(fc.nat(255), { minLength: 1, maxLength: 24 }) }),
    fc.record({ op: fc.constant('delete' as const), at: fc.nat(), length: fc.integer({ min: 1, max: 5000 }) }),
    fc.record({ op: fc.constant('truncate' as const), at: fc.nat() }),
    fc.record({ op: fc.constant('splice' as const), record: fc.nat(), donor: fc.nat(), from: fc.nat(), count: fc.integer({ min: 1, max: 4 }) }),
    fc.record({ op: fc.constant('duplicate' as const), record: fc.nat() }),
  );
  return fc.array(mutation, { minLength, maxLength });
}

/**
 * Inputs 0 .. count-1 of the run seeded `runSeed` through `run`, their outcomes counted. An input that
 * breaks a property fails the test with the command that replays it alone.
 */
export function countOutcomes(target: string, count: number, runSeed: number, run: (seed: number) => Outcome): Record<Outcome, number> {
  const outcomes: Record<Outcome, number> = { rebuilt: 0, verbatim: 0, rejected: 0 };
  for (let i = 0; i < count; i++) {
    try {
      outcomes[run(inputSeed(runSeed, i))]++;
    } catch (err) {
      throw new Error(`input ${i} of seed ${runSeed} (replay: node dist/bench/fuzz.js --seed ${runSeed} --target ${target} --replay ${i}): ${errorMessage(err)}`);
    }
  }
  return outcomes;
}
