/**
 * The compatibility matrix (src/lab/compat/matrix.ts) with real QEMU: each row's guest migrates
 * through two gateways and back, and must verify its memory at every destination and — where the row
 * says so — reuse on the back leg. The default run takes the rows marked everyRun; BFMIG_COMPAT=all
 * takes every row (CI does). BFMIG_SKIP_E2E=1 skips it.
 */
import { COMPAT_ROWS, compatPassed, REUSE_MAX_BACK_SHARE, runCompatRow } from '../src/lab/compat/matrix';
import { qemuInstalled } from '../src/lab/vm/qemu-releases';
import { requireInCi } from './mounts';

const SKIP = process.env.BFMIG_SKIP_E2E === '1';
const ALL = process.env.BFMIG_COMPAT === 'all';
const rows = COMPAT_ROWS.filter((r) => ALL || r.everyRun);
const haveQemu10 = SKIP ? false : requireInCi(qemuInstalled('10.0'), 'QEMU 10.0 (scripts/install-qemu10.sh)');

(SKIP ? describe.skip : describe)('compatibility matrix through the gateways', () => {
  for (const row of rows) {
    const runnable = haveQemu10 || !row.qemu.includes('10.0');
    (runnable ? test : test.skip)(
      `${row.id}: completes with the guest verified${row.expectReuse ? `, back leg ≤ ${REUSE_MAX_BACK_SHARE * 100}% of the first` : ''}`,
      async () => {
        const outcome = await runCompatRow(row);
        const summary = outcome.legs.map((l) => ({ leg: l.leg, wanBytes: l.wanBytes, verified: l.verified, postcopy: l.postcopyStarted, continued: l.continuedFromPause, reused: l.pagesReused, unordered: l.pagesUnordered, verbatim: l.verbatim, gatewayErrors: l.gatewayErrors }));
        const failures = outcome.legs.filter((l) => l.failure !== undefined).map((l) => `leg ${l.leg}:\n${l.failure}`);
        const verdict = compatPassed(outcome) ? 'passed' : `failed: back leg share ${outcome.backShare}, legs ${JSON.stringify(summary)}\n${failures.join('\n')}`;
        expect(verdict).toBe('passed');
      },
      600_000,
    );
  }
});
