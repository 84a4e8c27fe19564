/**
 * One migration of a VM at a time through a gateway: another is refused while one is in progress, and
 * waits while one whose stream is over ends (its stores settling).
 */
import { Refusal } from '../src/gateway/limits';
import { VmClaims } from '../src/gateway/vm-claims';

/** What whenFree() came to: 'free', or the refusal's reason and text. */
async function outcome(p: Promise<void>): Promise<string> {
  try {
    await p;
    return 'free';
  } catch (err) {
    if (!(err instanceof Refusal)) throw err;
    return `${err.reason}: ${err.message}`;
  }
}

/** A migration as the gateway holds one: claimed, then settling, then let go before `settled` resolves. */
function completedMigration(claims: VmClaims, vm: string): { settle: () => void } {
  claims.add(vm);
  let resolve!: () => void;
  const settled = new Promise<void>((r) => (resolve = r));
  claims.settling(vm, settled);
  return {
    settle: () => {
      claims.delete(vm);
      resolve();
    },
  };
}

describe('VmClaims', () => {
  test('a VM nothing holds is free at once; one a migration in progress holds is refused at once', async () => {
    const claims = new VmClaims();
    expect(await outcome(claims.whenFree('vm1', Date.now() + 5000))).toBe('free');
    claims.add('vm1');
    const started = Date.now();
    expect(await outcome(claims.whenFree('vm1', Date.now() + 5000))).toMatch(/^busy: VM vm1 is already migrating/);
    expect(Date.now() - started).toBeLessThan(1000);
    // Another VM is not held by it.
    expect(await outcome(claims.whenFree('vm2', Date.now() + 5000))).toBe('free');
  });

  test('a VM whose migration completed and settles is free once it has settled', async () => {
    const claims = new VmClaims();
    const last = completedMigration(claims, 'vm1');
    let done = '';
    const waiting = outcome(claims.whenFree('vm1', Date.now() + 5000)).then((o) => (done = o));
    await new Promise((r) => setTimeout(r, 50));
    expect(done).toBe('');
    last.settle();
    expect(await waiting).toBe('free');
    expect(claims.has('vm1')).toBe(false);
  });

  test('still settling at the deadline: refused, saying so', async () => {
    const claims = new VmClaims();
    completedMigration(claims, 'vm1');
    expect(await outcome(claims.whenFree('vm1', Date.now() + 100))).toBe("busy: VM vm1's last migration was still ending (its stores settling)");
  });
});
