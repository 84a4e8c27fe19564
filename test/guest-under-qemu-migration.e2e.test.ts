/**
 * End-to-end: the self-verifying guest survives QEMU's own migrations.
 *
 *  1. boot the guest (pc-i440fx-7.2, -m 256, workload.mib=32) and wait for WORKLOAD READY
 *  2. migrate it to a file with `exec:cat > FILE`; the file is a QEMU stream ("QEVM")
 *  3. resume the source, live-migrate it over TCP to a second QEMU (-incoming tcp:...),
 *     wait until the destination runs and its workload verifies all pages again
 *  4. load the captured file into a fresh QEMU (-incoming 'exec:cat FILE') and verify
 *  5. flip one bit in a few workload pages of that file: QEMU loads it happily, the
 *     guest's workload reports VERIFY FAIL for exactly those pages
 *
 * Needs qemu-system-x86 and the guest build prerequisites (scripts/build-guest.sh names
 * the apt packages if any is missing). BFMIG_SKIP_E2E=1 skips it; BFMIG_E2E_MACHINE
 * picks another machine type (pc-i440fx-2.0, pc-q35-7.2).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { suiteTempDir } from './temp-dir';
import { replayVerdict } from '../src/lab/vm/replay-verdict';
import { QemuVm, disposeAllVms, type QemuVmOptions } from '../src/lab/vm/qemu-vm';
import { ensureGuestBuilt } from '../src/lab/vm/guest-image';
import { freePort } from '../src/lab/vm/ports';
import { type MigrationInfo } from '../src/lab/vm/qmp-types';

const SKIP = process.env.BFMIG_SKIP_E2E === '1';
const describeE2e = SKIP ? describe.skip : describe;

const MACHINE = process.env.BFMIG_E2E_MACHINE ?? 'pc-i440fx-7.2';
const MEM_MIB = 256;
const WORKLOAD_MIB = 32;
const WORKLOAD_PAGES = (WORKLOAD_MIB * 1024 * 1024) / 4096;
const BOOT_TIMEOUT_MS = 180_000;
const STEP_TIMEOUT_MS = 300_000;

const READY_RE = /WORKLOAD READY pages=(\d+)/;
/** Bytes 4..7 of every workload page: "WKLD" as a little-endian u32 (after the page index). */
const WKLD_TAG = Buffer.from([0x44, 0x4c, 0x4b, 0x57]);
const OK_RE = /WORKLOAD VERIFY OK round=(\d+) pages=(\d+) rewritten=(\d+)/;

/** Highest round in the VERIFY OK lines printed so far. */
function lastRound(vm: QemuVm): number {
  let max = 0;
  for (const m of vm.serial.matchAll(new RegExp(OK_RE.source, 'g'))) max = Math.max(max, Number(m[1]));
  return max;
}

function expectRamStats(info: MigrationInfo): void {
  expect(info.status).toBe('completed');
  const ram = info.ram;
  expect(ram).toBeDefined();
  if (!ram) return;
  // Every workload page is pseudo-random, so at least that many are sent in full;
  // the untouched rest of the 256 MiB goes as zero ("duplicate") pages.
  expect(ram.normal).toBeGreaterThanOrEqual(WORKLOAD_PAGES);
  expect(ram.duplicate).toBeGreaterThan(0);
  expect(ram.transferred).toBeGreaterThan(WORKLOAD_MIB * 1024 * 1024);
  expect(ram.total).toBeGreaterThanOrEqual(MEM_MIB * 1024 * 1024);
  expect(info['total-time']).toBeGreaterThan(0);
  expect(info.downtime).toBeGreaterThanOrEqual(0);
}

describeE2e(`e2e: self-verifying guest migrates under QEMU (${MACHINE})`, () => {
  const timings: Array<[string, string]> = [];
  const note = (what: string, value: string): void => {
    timings.push([what, value]);
  };
  let tmp = '';
  let streamFile = '';
  let src: QemuVm;
  let roundAtCapture = 0;
  const base: QemuVmOptions = {
    machine: MACHINE,
    memMiB: MEM_MIB,
    workload: { mib: WORKLOAD_MIB, seed: 20240601, rewritePct: 10, intervalMs: 500 },
  };

  beforeAll(() => {
    const t0 = Date.now();
    ensureGuestBuilt();
    note('guest build (or up-to-date check)', `${Date.now() - t0} ms`);
    tmp = suiteTempDir('bfmig-e2e-');
    streamFile = path.join(tmp, 'capture.mig');
  });

  afterAll(async () => {
    await disposeAllVms();
    const width = Math.max(...timings.map(([k]) => k.length));
    // eslint-disable-next-line no-console
    console.log(`e2e timings (${MACHINE}, accel ${src?.accel ?? '?'}):\n${timings.map(([k, v]) => `  ${k.padEnd(width)}  ${v}`).join('\n')}`);
  });

  test(
    'boots, fills and verifies its memory',
    async () => {
      src = new QemuVm({ ...base, name: 'src' });
      await src.start();
      const ready = await src.waitForSerial(READY_RE, BOOT_TIMEOUT_MS);
      note('boot: spawn -> WORKLOAD READY', `${Date.now() - src.startedAt} ms (${src.accel})`);
      expect(Number(ready[1])).toBe(WORKLOAD_PAGES);
      const ok = await src.waitForSerial(OK_RE, 30_000, { since: ready.index });
      expect(Number(ok[2])).toBe(WORKLOAD_PAGES);
      expect(await src.status()).toMatchObject({ status: 'running', running: true });
    },
    BOOT_TIMEOUT_MS + 60_000,
  );

  test(
    'migrates to a file with exec:cat',
    async () => {
      const before = lastRound(src);
      const t0 = Date.now();
      await src.migrate(`exec:cat > '${streamFile}'`);
      const info = await src.waitForMigration({ timeoutMs: STEP_TIMEOUT_MS });
      note(
        'exec: migration to file',
        `${Date.now() - t0} ms wall, total-time ${info['total-time']} ms, downtime ${info.downtime} ms, ` +
          `${info.ram?.normal} normal + ${info.ram?.duplicate} zero pages, ${info.ram?.transferred} bytes`,
      );
      expectRamStats(info);
      // The source stops once the stream is complete.
      expect(await src.status()).toMatchObject({ status: 'postmigrate', running: false });
      roundAtCapture = lastRound(src);
      expect(roundAtCapture).toBeGreaterThanOrEqual(before);

      const head = Buffer.alloc(8);
      const fd = fs.openSync(streamFile, 'r');
      try {
        fs.readSync(fd, head, 0, 8, 0);
      } finally {
        fs.closeSync(fd);
      }
      expect(head.subarray(0, 4).toString('latin1')).toBe('QEVM');
      expect(head.readUInt32BE(4)).toBe(3); // QEMU_VM_FILE_VERSION
      const size = fs.statSync(streamFile).size;
      expect(size).toBeGreaterThan(WORKLOAD_MIB * 1024 * 1024);
      note('exec: stream file size', `${size} bytes`);

      // A source can be resumed after a completed migration ("cont" from postmigrate).
      const mark = src.serialMark();
      await src.qmp('cont');
      await src.waitForStatus('running', 10_000);
      await src.waitForSerial(OK_RE, 30_000, { since: mark });
    },
    STEP_TIMEOUT_MS + 60_000,
  );

  test(
    'live-migrates over TCP to a second QEMU that resumes and verifies',
    async () => {
      const port = await freePort();
      const uri = `tcp:127.0.0.1:${port}`;
      const dst = new QemuVm(src.destinationOptions(uri, 'dst'));
      await dst.start();
      expect(await dst.status()).toMatchObject({ status: 'inmigrate', running: false });

      const t0 = Date.now();
      await src.migrate(uri);
      const info = await src.waitForMigration({ timeoutMs: STEP_TIMEOUT_MS });
      const migratedAt = Date.now();
      expectRamStats(info);
      expect(await src.status()).toMatchObject({ status: 'postmigrate', running: false });

      // The destination resumes by itself (no -S): inmigrate -> running.
      await dst.waitForStatus('running', 30_000);
      const resumedAt = Date.now();
      const dstInfo = await dst.queryMigrate();
      expect(dstInfo.status).toBe('completed');

      // The destination's console only carries output produced after the switchover, and
      // round numbers carry on from the source: a VERIFY OK beyond the source's last
      // round means every page was checked in the migrated memory.
      const srcLast = lastRound(src);
      const ok = await dst.waitForSerial(OK_RE, 60_000, { accept: (m) => Number(m[1]) > srcLast });
      expect(Number(ok[2])).toBe(WORKLOAD_PAGES);
      // ...and keeps rewriting and verifying afterwards.
      await dst.waitForSerial(OK_RE, 60_000, { since: ok.index + ok[0].length, accept: (m) => Number(m[1]) > Number(ok[1]) });
      note(
        'tcp live migration',
        `${migratedAt - t0} ms wall, total-time ${info['total-time']} ms, downtime ${info.downtime} ms, ` +
          `setup ${info['setup-time']} ms, ${info.ram?.normal} normal + ${info.ram?.duplicate} zero pages, ` +
          `${info.ram?.transferred} bytes, ${info.ram?.['dirty-sync-count']} dirty syncs`,
      );
      note('tcp: completed -> dst running', `${resumedAt - migratedAt} ms`);
      note('tcp: first verified round on dst', `round ${ok[1]} (source stopped after round ${srcLast}), ${Date.now() - t0} ms after migrate`);
      await dst.dispose();
      await src.dispose();
    },
    STEP_TIMEOUT_MS + 120_000,
  );

  test(
    'restores the exec: capture into a fresh QEMU',
    async () => {
      expect(fs.existsSync(streamFile)).toBe(true);
      const t0 = Date.now();
      const restored = new QemuVm({ ...base, name: 'restored', incoming: `exec:cat '${streamFile}'` });
      await restored.start();
      await restored.waitForStatus('running', STEP_TIMEOUT_MS);
      const runningAt = Date.now();
      expect((await restored.queryMigrate()).status).toBe('completed');
      const ok = await restored.waitForSerial(OK_RE, 60_000, { accept: (m) => Number(m[1]) > roundAtCapture });
      expect(Number(ok[2])).toBe(WORKLOAD_PAGES);
      note('restore from file: spawn -> running', `${runningAt - t0} ms`);
      note('restore: first verified round', `round ${ok[1]} (captured after round ${roundAtCapture}), ${Date.now() - t0} ms after spawn`);
      await restored.dispose();
    },
    STEP_TIMEOUT_MS + 60_000,
  );

  test(
    'a corrupted stream is caught by the guest itself',
    async () => {
      // Find the last copy of some workload pages in the capture (a page dirtied during
      // the migration is sent again; the last copy wins) and flip one bit in each.
      const data = fs.readFileSync(streamFile);
      const seed = (base.workload?.seed ?? 1) >>> 0;
      const lastCopy = new Map<number, number>();
      for (let at = data.indexOf(WKLD_TAG); at >= 0; at = data.indexOf(WKLD_TAG, at + 1)) {
        const pageStart = at - 4;
        if (pageStart < 0 || pageStart + 4096 > data.length || data.readUInt32LE(at + 4) !== seed) continue;
        lastCopy.set(data.readUInt32LE(pageStart), pageStart);
      }
      expect(lastCopy.size).toBe(WORKLOAD_PAGES);
      const victims = [...lastCopy.keys()].filter((_, i) => i % 1000 === 500).slice(0, 8);
      for (const page of victims) {
        const off = lastCopy.get(page);
        if (off !== undefined) data[off + 2000] ^= 0x01;
      }
      const corrupt = path.join(tmp, 'corrupt.mig');
      fs.writeFileSync(corrupt, data);

      const vm = new QemuVm({ ...base, name: 'corrupt', incoming: `exec:cat '${corrupt}'` });
      await vm.start();
      // QEMU cannot notice: the stream is well-formed, only page content changed.
      await vm.waitForStatus('running', STEP_TIMEOUT_MS);
      await expect(
        vm.waitForSerial(OK_RE, 60_000, { accept: (m) => Number(m[1]) > roundAtCapture }),
      ).rejects.toThrow(/console shows failure "WORKLOAD VERIFY FAIL/);
      const fail = await vm.waitForSerial(/WORKLOAD VERIFY FAIL page=(\d+) round=\d+ gen=\d+ word=250 /, 10_000, {
        failOn: null,
      });
      expect(victims).toContain(Number(fail[1]));
      note('corrupted capture', `${victims.length} pages flipped, guest reported page ${fail[1]}`);
      await vm.dispose();

      // How the gateway e2e tests tell a state QEMU sent broken from one the gateways could have broken:
      // the intact capture replayed verifies, the corrupted one fails, in a fresh QEMU each.
      const intact = await replayVerdict({ ...base, name: 'intact' }, streamFile, OK_RE);
      expect(intact).toMatchObject({ sourceStateBroken: false });
      const broken = await replayVerdict({ ...base, name: 'corrupt' }, corrupt, OK_RE);
      expect(broken.sourceStateBroken).toBe(true);
      expect(broken.detail).toMatch(/WORKLOAD VERIFY FAIL/);
    },
    STEP_TIMEOUT_MS + 120_000,
  );
});
