/**
 * Quick-start demo: boots the test guest in QEMU, migrates it through `bfmig capture` into a
 * destination QEMU, then runs `bfmig inspect` on the stream just captured.
 * Run with: node dist/scripts/capture-demo.js [machine-type]
 */
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { createInterface } from 'node:readline';
import { PACKAGE_ROOT } from '../src/digest/package-root';
import { QemuVm, disposeAllVms } from '../src/lab/vm/qemu-vm';
import { ensureGuestBuilt } from '../src/lab/vm/guest-image';
import { freePort } from '../src/lab/vm/ports';
import { errorMessage } from '../src/common/errors';

async function main(): Promise<void> {
  const machine = process.argv[2] ?? 'pc-i440fx-7.2';
  const bfmig = path.join(PACKAGE_ROOT, 'bin', 'bfmig.js');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bfmig-demo-'));
  const out = path.join(dir, 'vm1.mig');
  ensureGuestBuilt();
  const options = { machine, memMiB: 256, workload: { mib: 64, seed: 1, rewritePct: 1, intervalMs: 1000 } };
  console.log(`booting a ${options.memMiB} MiB guest (${machine}) that fills ${options.workload.mib} MiB with pseudo-random pages...`);
  const source = new QemuVm({ ...options, name: 'source' });
  await source.start();
  await source.waitForSerial(/WORKLOAD READY/, 180_000);
  const destPort = await freePort();
  const dest = new QemuVm({ ...options, name: 'dest', incoming: `tcp:127.0.0.1:${destPort}` });
  await dest.start();

  const capture = spawn(process.execPath, [bfmig, 'capture', '--listen', '127.0.0.1:0', '--out', out, '--forward', `127.0.0.1:${destPort}`], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const port = await new Promise<number>((resolve, reject) => {
    createInterface({ input: capture.stdout! }).on('line', (line) => {
      console.log(`  bfmig capture: ${line}`);
      const m = /listening on .*:(\d+)$/.exec(line);
      if (m) resolve(Number(m[1]));
    });
    capture.on('exit', (code) => reject(new Error(`bfmig capture exited with ${code}`)));
  });
  console.log(`source QEMU: migrate tcp:127.0.0.1:${port}  (through bfmig capture to the destination QEMU)`);
  await source.migrate(`tcp:127.0.0.1:${port}`);
  const info = await source.waitForMigration({ timeoutMs: 300_000 });
  await dest.waitForStatus('running', 60_000);
  const verified = await dest.waitForSerial(/WORKLOAD VERIFY OK round=\d+ pages=\d+/, 60_000);
  console.log(`migration ${info.status}: ${info.ram?.normal} normal + ${info.ram?.duplicate} zero pages; destination guest says "${verified[0]}"`);
  await disposeAllVms();

  console.log(`\n$ bfmig inspect ${out}`);
  const result = spawnSync(process.execPath, [bfmig, 'inspect', out], { stdio: 'inherit' });
  console.log(`\nThe capture stays in ${out} (try: bfmig inspect --json ${out}).`);
  process.exitCode = result.status ?? 1;
}

main().catch(async (err: unknown) => {
  await disposeAllVms();
  console.error(`capture demo failed: ${errorMessage(err)}`);
  process.exitCode = 1;
});
