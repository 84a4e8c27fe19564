/**
 * Who broke a guest that failed after a migration the gateways rebuilt byte for byte.
 *
 * QEMU 7.2 under TCG now and then sends a guest state that does not run: the guest panics or a process
 * in it faults right after it resumes at the destination, also QEMU → QEMU with no gateway between
 * (README, "Known problem"). When the bytes the destination QEMU received were checked identical to
 * those the source QEMU sent, replaying the source's own capture into a fresh QEMU, with no gateway and
 * no network, tells the two cases apart: if the replay fails too, the state was broken before it left
 * the source; if the replay verifies, the same bytes run, and the failure must be looked for elsewhere
 * (timing, the gateways' side channels) — a test must then fail.
 */
import { errorMessage } from '../../common/errors';
import { GuestFailedError, QemuVm, type QemuVmOptions } from './qemu-vm';

export interface ReplayVerdict {
  /** True when the source's own bytes, replayed directly, fail too: the state QEMU sent was broken. */
  sourceStateBroken: boolean;
  /** What the replay showed, for the test's log. */
  detail: string;
}

/**
 * Replays `capture` (a stream as the source QEMU sent it, return path off) into a fresh QEMU with the
 * destination's `options` and waits for `verified` on its console.
 */
export async function replayVerdict(options: QemuVmOptions, capture: string, verified: RegExp, timeoutMs = 60_000): Promise<ReplayVerdict> {
  const replay = new QemuVm({ ...options, name: `${options.name ?? 'vm'}-replay`, incoming: `exec:cat '${capture}'` });
  try {
    await replay.start();
    try {
      await replay.waitForSerial(verified, timeoutMs);
    } catch (err) {
      // A replay that runs and stays silent for the whole wait fails as well (an intact capture verifies
      // in under a second); one that could not start says nothing.
      if (!(err instanceof GuestFailedError) && (await replay.status().catch(() => null))?.status !== 'running') throw err;
      return { sourceStateBroken: true, detail: `the capture replayed into a fresh QEMU failed too: ${errorMessage(err).split('\n')[0]}` };
    }
    return { sourceStateBroken: false, detail: 'the capture replayed into a fresh QEMU verified' };
  } finally {
    await replay.dispose();
  }
}

/**
 * Waits for a migrated guest to run and verify at `dest`. Resolves with null when it does; when it
 * fails, or runs without verifying for the whole wait, with the verdict if the source's own bytes (`capture`) fail too, so that the caller
 * may repeat the leg once (`resumeSource`); throws if they verify, or on any other error.
 */
export async function verifiedOrSourceBroken(dest: QemuVm, capture: string, verified: RegExp, timeoutMs = 60_000): Promise<ReplayVerdict | null> {
  let running = false;
  try {
    await dest.waitForStatus('running', timeoutMs);
    running = true;
    await dest.waitForSerial(verified, timeoutMs);
    return null;
  } catch (err) {
    // A guest that runs but never verifies within the wait (CI saw one silent for 60 s) failed too.
    if (!(err instanceof GuestFailedError) && !running) throw err;
    const verdict = await replayVerdict(dest.options, capture, verified, timeoutMs);
    if (!verdict.sourceStateBroken) throw new Error(`${errorMessage(err)}\n${verdict.detail}`);
    return verdict;
  }
}

/** Resumes a source QEMU after its migration completed (its guest is intact) and waits for it to verify again. */
export async function resumeSource(source: QemuVm, verified: RegExp, timeoutMs = 60_000): Promise<void> {
  const mark = source.serialMark();
  await source.qmp('cont');
  await source.waitForSerial(verified, timeoutMs, { since: mark });
}
