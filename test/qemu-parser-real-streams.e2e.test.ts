/**
 * The codec against streams real QEMU emits: 7.2 in the legacy framing (pc-i440fx-2.0) and the current
 * one (pc-i440fx-7.2, pc-q35-7.2), 10.0 with its own machine types (SWITCHOVER_START) and switched to
 * postcopy: a self-verifying guest migrates through `bfmig capture --forward` to a destination QEMU,
 * then from there into a file with QEMU's own exec: URI. Both captures must rewrite byte-identically,
 * match query-migrate's page counts, and restore.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { inspectPath } from '../src/cli/inspect';
import { type NodeChild, startBfmig } from '../src/lab/harness/child';
import { QemuVm, disposeAllVms } from '../src/lab/vm/qemu-vm';
import { ensureGuestBuilt } from '../src/lab/vm/guest-image';
import { freePort } from '../src/lab/vm/ports';
import { type MigrationInfo } from '../src/lab/vm/qmp-types';
import { qemuBinary, qemuInstalled, type QemuRelease } from '../src/lab/vm/qemu-releases';
import { requireInCi } from './mounts';
import { suiteTempDir } from './temp-dir';

const SKIP = process.env.BFMIG_SKIP_E2E === '1';
const OK_RE = /WORKLOAD VERIFY OK round=(\d+)/g;
const READY_RE = /WORKLOAD READY pages=(\d+)/;

function lastRound(vm: QemuVm): number {
  let max = 0;
  for (const m of vm.serial.matchAll(OK_RE)) max = Math.max(max, Number(m[1]));
  return max;
}

/**
 * A migrated VM's console holds only what the guest printed after it resumed, so any VERIFY OK line
 * means the guest re-checked every page it wrote against what it expects.
 */
async function waitForVerified(vm: QemuVm): Promise<void> {
  await vm.waitForSerial(/WORKLOAD VERIFY OK round=\d+ pages=\d+/, 60_000);
}

/** Starts `bfmig capture` and resolves once it listens, with the port it listens on. */
async function startCapture(out: string, forwardPort: number): Promise<{ child: NodeChild; port: number }> {
  const child = startBfmig(['capture', '--listen', '127.0.0.1:0', '--out', out, '--forward', `127.0.0.1:${forwardPort}`]);
  const listening = /^listening on 127\.0\.0\.1:(\d+)$/m;
  return { child, port: Number(listening.exec(await child.said(listening))?.[1]) };
}

async function expectCaptureMatches(file: string, info: MigrationInfo, framing: 'legacy' | 'current', postcopy: boolean): Promise<void> {
  const report = await inspectPath(file);
  expect(report.error).toBeNull();
  expect(report.fallback).toBeNull();
  expect(report.identical).toBe(true);
  expect(report.complete).toBe(true);
  expect(report.framing).toBe(framing);
  expect(report.bytes).toBe(fs.statSync(file).size);
  expect(report.ram.records.normal).toBe(info.ram?.normal);
  expect(report.ram.records.zero).toBe(info.ram?.duplicate);
  expect(report.ram.blocks.find((b) => b.name === 'pc.ram')?.bytes).toBe(128 * 1024 * 1024);
  expect(report.postcopy !== null).toBe(postcopy);
  if (postcopy) {
    // Postcopy's stream ends at EOF: its device state went in the package, and no vmdesc follows.
    expect(report.vmDescription.present).toBe(false);
  } else if (framing === 'current') {
    expect(report.vmDescription.present).toBe(true);
    expect(report.vmDescription.matchesSections).toBe(true);
  } else {
    expect(report.configuration).toBeNull();
    expect(report.vmDescription.present).toBe(false);
    // Device sections after the first are found by their header pattern.
    const scanned = report.sections.filter((s) => s.found === 'scanned').map((s) => s.idstr);
    expect(scanned).toEqual(expect.arrayContaining(['cpu', 'apic', 'mc146818rtc', '0000:00:01.1/ide']));
  }
  expect(report.sections.reduce((n, s) => n + s.bytes, 0)).toBeLessThanOrEqual(report.bytes);
}

interface StreamCase {
  qemu: QemuRelease;
  machine: string;
  framing: 'legacy' | 'current';
  /** The live leg switches to postcopy (return path and postcopy-ram on at both ends). */
  postcopy?: boolean;
}

const CASES: StreamCase[] = [
  { qemu: '7.2', machine: 'pc-i440fx-2.0', framing: 'legacy' },
  { qemu: '7.2', machine: 'pc-i440fx-7.2', framing: 'current' },
  { qemu: '7.2', machine: 'pc-q35-7.2', framing: 'current' },
  // SWITCHOVER_START on every stream of these machine types.
  { qemu: '10.0', machine: 'pc-i440fx-10.0', framing: 'current' },
  { qemu: '10.0', machine: 'pc-q35-10.0', framing: 'current' },
  // POSTCOPY_ADVISE, RAM_DISCARD, the PACKAGED device state, RAM after it.
  { qemu: '10.0', machine: 'pc-i440fx-10.0', framing: 'current', postcopy: true },
];
const haveQemu10 = SKIP ? false : requireInCi(qemuInstalled('10.0'), 'QEMU 10.0 (scripts/install-qemu10.sh)');
const label = (c: StreamCase): string => `QEMU ${c.qemu}, ${c.machine}${c.postcopy ? ', switched to postcopy' : ''}`;

(SKIP ? describe.skip : describe).each(CASES.filter((c) => c.qemu === '7.2' || haveQemu10).map((c) => [label(c), c] as const))('real QEMU streams: %s', (_label, c) => {
  const { machine, framing } = c;
  let tmp = '';
  beforeAll(() => {
    ensureGuestBuilt();
    tmp = suiteTempDir('bfmig-codec-');
  });
  afterAll(async () => {
    await disposeAllVms();
  });

  test('capture --forward and exec: streams rewrite byte-identically, match query-migrate and restore', async () => {
    const options = { machine, memMiB: 128, qemuBinary: qemuBinary(c.qemu), workload: { mib: 16, seed: 7, rewritePct: 5, intervalMs: 300 } };
    const source = new QemuVm({ ...options, name: 'source' });
    await source.start();
    await source.waitForSerial(READY_RE, 180_000);

    // 1. Live migration through bfmig capture to a real destination.
    const destPort = await freePort();
    const caps = { 'return-path': true, 'postcopy-ram': true };
    const dest = new QemuVm({ ...options, name: 'dest', incoming: c.postcopy ? 'defer' : `tcp:127.0.0.1:${destPort}` });
    await dest.start();
    if (c.postcopy) {
      await dest.setMigrationCapabilities(caps);
      await dest.migrateIncoming(`tcp:127.0.0.1:${destPort}`);
      await source.setMigrationCapabilities(caps);
    }
    const captured = path.join(tmp, 'captured.mig');
    const capture = await startCapture(captured, destPort);
    await source.migrate(`tcp:127.0.0.1:${capture.port}`);
    if (c.postcopy) await source.qmp('migrate-start-postcopy');
    const sourceInfo = await source.waitForMigration({ timeoutMs: 120_000 });
    expect(sourceInfo.status).toBe('completed');
    const end = await capture.child.exited;
    expect(`exit ${end.code}: ${end.stdout}${end.stderr}`).toMatch(/^exit 0:/);
    await dest.waitForStatus('running', 60_000);
    await waitForVerified(dest);
    await expectCaptureMatches(captured, sourceInfo, framing, c.postcopy === true);
    await source.dispose();

    // 2. The destination, now running, migrates into a file with QEMU's own exec: URI.
    const execFile = path.join(tmp, 'exec.mig');
    // exec: has no return path, and a source on one waits for the destination's verdict forever.
    if (c.postcopy) await dest.setMigrationCapabilities({ 'return-path': false, 'postcopy-ram': false });
    await dest.migrate(`exec:cat > '${execFile}'`);
    const execInfo = await dest.waitForMigration({ timeoutMs: 120_000 });
    expect(execInfo.status).toBe('completed');
    await expectCaptureMatches(execFile, execInfo, framing, false);
    await dest.dispose();

    // 3. The captures restore into a fresh QEMU, whose guest verifies its memory (a postcopy stream
    // needs the return path, which exec: has not).
    for (const file of c.postcopy ? [execFile] : [execFile, captured]) {
      const restored = new QemuVm({ ...options, name: 'restored', incoming: `exec:cat '${file}'` });
      await restored.start();
      await restored.waitForStatus('running', 60_000);
      await waitForVerified(restored);
      expect(lastRound(restored)).toBeGreaterThan(0);
      await restored.dispose();
    }
  }, 600_000);
});
