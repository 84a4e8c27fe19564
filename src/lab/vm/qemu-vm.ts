/**
 * Drives real QEMU for tests, benchmarks and the demo: boots the bfmig test guest
 * (scripts/build-guest.sh) in qemu-system-x86_64, talks QMP to it, watches its serial console,
 * migrates it.
 *
 *   const vm = new QemuVm({ workload: { mib: 32 } });
 *   try {
 *     await vm.start();
 *     await vm.waitForSerial(/WORKLOAD READY pages=(\d+)/, 120_000);
 *     await vm.migrate('exec:cat > /tmp/x.mig');
 *     const info = await vm.waitForMigration();
 *   } finally {
 *     await vm.dispose();          // or disposeAllVms() in afterAll
 *   }
 *
 * Every VM gets its own temp dir (QMP socket, serial log, stderr log) that dispose()
 * removes. QEMU runs under `setpriv --pdeathsig KILL` where available, and is SIGKILLed
 * when this process exits or a signal ends it (harness/reap-children.ts), so a crashed or
 * killed test run does not leave QEMU behind.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { reapWithThisProcess } from '../harness/reap-children';
import { QmpClient, type QmpEvent } from './qmp';
import { defaultGuestDir, ensureGuestBuilt, type GuestImage, readGuestImage } from './guest-image';
import { deathSignalPrefix, kvmBootsGuest } from './kvm';
import { type MigrationInfo, MigrationFailedError, type RunState, type StatusInfo } from './qmp-types';
import { errorMessage } from '../../common/errors';
import { makeTempDir, removeTempDir } from '../harness/temp-dir';

export { QmpClient, QmpError } from './qmp';
export type { JsonValue, QmpEvent, QmpGreeting } from './qmp';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

// ------------------------------------------------------------------ the VM

export type Accel = 'auto' | 'kvm' | 'tcg';

/** Workload parameters, passed on the kernel command line as `workload.*=`. */
export interface WorkloadParams {
  /** MiB filled and verified (workload.mib, default 64). */
  mib?: number;
  /** Pattern seed (workload.seed, default 1). */
  seed?: number;
  /** Percent of pages rewritten per second (workload.rewrite, default 0). */
  rewritePct?: number;
  /** Verify/rewrite interval in ms (workload.interval, default 1000). */
  intervalMs?: number;
  /** Print VERIFY OK every K rounds (workload.report, default 1). */
  reportEvery?: number;
  /** Self-test: corrupt one page in round R (workload.fault). */
  faultRound?: number;
  /**
   * Page content (workload.content): 'random' (default: pseudo-random, the worst case for compression)
   * or 'files' (pages of real files from Debian packages, the guest booted with the corpus initrd).
   */
  content?: 'random' | 'files';
  /** Database-like updates: each overwrites this many bytes at a random offset of a page (workload.scribble). */
  scribbleBytes?: number;
  /** Such updates per second (workload.scribblerate). */
  scribbleRate?: number;
  /** run (default), shell (busybox sh on the console), idle (nothing). */
  mode?: 'run' | 'shell' | 'idle';
  /**
   * Give the guest a second serial port (ttyS1) the workload reads commands from; send them with
   * QemuVm.changePages(). A migration destination needs the same setting (same devices).
   */
  control?: boolean;
}

/** The guest's kernel command line: the image's own words, then the workload's parameters and `appendExtra`. */
export function guestKernelCmdline(img: GuestImage, w: WorkloadParams, appendExtra?: string): string {
  const words = [img.baseCmdline];
  if (w.mib !== undefined) words.push(`workload.mib=${w.mib}`);
  if (w.seed !== undefined) words.push(`workload.seed=${w.seed}`);
  if (w.rewritePct !== undefined) words.push(`workload.rewrite=${w.rewritePct}`);
  if (w.intervalMs !== undefined) words.push(`workload.interval=${w.intervalMs}`);
  if (w.reportEvery !== undefined) words.push(`workload.report=${w.reportEvery}`);
  if (w.faultRound !== undefined) words.push(`workload.fault=${w.faultRound}`);
  if (w.mode !== undefined) words.push(`workload.mode=${w.mode}`);
  if (w.control) words.push('workload.control=ttyS1');
  if (w.content !== undefined) words.push(`workload.content=${w.content}`);
  if (w.scribbleBytes !== undefined) words.push(`workload.scribble=${w.scribbleBytes}`);
  if (w.scribbleRate !== undefined) words.push(`workload.scribblerate=${w.scribbleRate}`);
  if (appendExtra) words.push(appendExtra);
  return words.join(' ');
}

export interface QemuVmOptions {
  /** Label used in the QEMU -name, temp dir and error messages. */
  name?: string;
  /** -machine type, e.g. pc-i440fx-2.0, pc-i440fx-7.2, pc-q35-7.2 (default pc-i440fx-7.2). */
  machine?: string;
  /** Guest RAM in MiB (default 256). */
  memMiB?: number;
  smp?: number;
  /** -cpu model; QEMU's default (qemu64 under TCG) when unset. */
  cpu?: string;
  /** Default: $BFMIG_QEMU_ACCEL or 'auto' (KVM if /dev/kvm is usable, falling back to TCG). */
  accel?: Accel;
  workload?: WorkloadParams;
  /** Extra kernel command-line words. */
  appendExtra?: string;
  /** -incoming URI: tcp:127.0.0.1:PORT, exec:cat FILE, defer, ... */
  incoming?: string;
  /** Directory with guest.json, kernel and initrd (default: .cache/guest, built on demand). */
  guestDir?: string;
  qemuBinary?: string;
  /** Pass -nodefaults (no NIC/VGA/floppy/CD; default true: faster boot, smaller state). */
  nodefaults?: boolean;
  extraArgs?: string[];
  /** QEMU trace events to enable (`-trace NAME`), written to stderr by QEMU's log trace backend. */
  traceEvents?: readonly string[];
  /** Keep the temp dir after dispose() (also $BFMIG_KEEP_VM_TMP=1). */
  keepTempDir?: boolean;
  /** QMP connect timeout after spawn, ms (default 30000). */
  startTimeoutMs?: number;
}

export interface WaitForSerialOptions {
  /** Only consider console text from this offset on (see serialMark()). Default 0. */
  since?: number;
  /** Skip matches this returns false for (e.g. round numbers too low). */
  accept?: (m: RegExpExecArray) => boolean;
  /** Reject as soon as this appears after `since` (default: verify failure, panic, workload exit). */
  failOn?: RegExp | null;
}

export interface WaitForMigrationOptions {
  timeoutMs?: number;
  pollMs?: number;
  /** Return a failed/cancelled result instead of throwing MigrationFailedError. */
  allowFailure?: boolean;
  /**
   * With `pause-before-switchover` on: once the migration waits in `pre-switchover` (the guest stopped,
   * its last pages and device state not yet sent), send `migrate-continue` this many ms later, as
   * libvirt does once its storage jobs are ready.
   */
  continueAfterPauseMs?: number;
  /** Called once migrate-continue has been sent (continueAfterPauseMs). */
  onContinued?: () => void;
}

/** The guest visibly failed (its console matched a failure pattern) or its QEMU exited while a test waited on it. */
export class GuestFailedError extends Error {}

export const DEFAULT_SERIAL_FAIL = /WORKLOAD VERIFY FAIL|WORKLOAD EXITED|WORKLOAD ERROR|Kernel panic/;

const liveVms = new Set<QemuVm>();

/** Disposes every VM this process started and has not disposed yet. */
export async function disposeAllVms(): Promise<void> {
  await Promise.all([...liveVms].map((vm) => vm.dispose()));
}

let vmCounter = 0;

export class QemuVm {
  readonly options: Readonly<QemuVmOptions>;
  readonly name: string;
  readonly tempDir: string;
  readonly qmpSocketPath: string;
  readonly serialLogPath: string;
  readonly stderrLogPath: string;
  /** The host end of the guest's control port (workload.control). */
  readonly controlSocketPath: string;
  private changeSeq = 0;
  /** The full QEMU command line (after start()). */
  args: string[] = [];
  /** Accelerator in use, known after start(). */
  accel: 'kvm' | 'tcg' | null = null;
  /** Date.now() when the process was spawned. */
  startedAt = 0;

  private child: ChildProcess | null = null;
  private qmpClient: QmpClient | null = null;
  private serialText = '';
  private stderrText = '';
  private serialLog: fs.WriteStream | null = null;
  private exitInfo: { code: number | null; signal: NodeJS.Signals | null } | null = null;
  private exitPromise: Promise<void> | null = null;
  private serialListeners = new Set<() => void>();
  private disposed = false;
  private maxBandwidth = 10 * 1024 * 1024 * 1024; // bytes/s: don't let QEMU 7.2's 128 MiB/s default throttle tests
  private downtimeLimitMs = 500;

  constructor(options: QemuVmOptions = {}) {
    this.options = { ...options };
    this.name = options.name ?? `vm${++vmCounter}`;
    this.tempDir = makeTempDir(`bfmig-${this.name.replace(/[^A-Za-z0-9_-]/g, '_')}-`);
    this.qmpSocketPath = path.join(this.tempDir, 'qmp.sock');
    this.serialLogPath = path.join(this.tempDir, 'serial.log');
    this.stderrLogPath = path.join(this.tempDir, 'stderr.log');
    this.controlSocketPath = path.join(this.tempDir, 'control.sock');
    liveVms.add(this);
  }

  /** Options for a migration destination: same machine, memory and guest, given -incoming. */
  destinationOptions(incoming: string, name?: string): QemuVmOptions {
    return { ...this.options, incoming, name: name ?? `${this.name}-dst` };
  }

  get pid(): number | undefined {
    return this.child?.pid;
  }

  get running(): boolean {
    return this.child !== null && this.exitInfo === null;
  }

  get exit(): { code: number | null; signal: NodeJS.Signals | null } | null {
    return this.exitInfo;
  }

  /** Console text so far (CR stripped). */
  get serial(): string {
    return this.serialText;
  }

  /** Current end of the console text, for `waitForSerial(..., { since })`. */
  serialMark(): number {
    return this.serialText.length;
  }

  serialTail(chars = 2000): string {
    return this.serialText.slice(-chars);
  }

  get qmpEvents(): readonly QmpEvent[] {
    return this.qmpClient?.events ?? [];
  }

  /** The corpus initrd only for workload.content=files: it costs every other guest boot time and RAM. */
  private initrd(img: GuestImage): string {
    if (this.options.workload?.content !== 'files') return img.initrd;
    if (img.initrdWithFiles === null) throw new Error(`${this.name}: the guest in ${img.dir} has no corpus initrd; rebuild it (scripts/build-guest.sh)`);
    return img.initrdWithFiles;
  }

  private async accelArgs(qemu: string, img: GuestImage, guestDir: string): Promise<string[]> {
    const env = process.env.BFMIG_QEMU_ACCEL;
    const fromEnv: Accel | undefined = env === 'kvm' || env === 'tcg' || env === 'auto' ? env : undefined;
    const want = this.options.accel ?? fromEnv ?? 'auto';
    if (want === 'tcg') return ['-accel', 'tcg'];
    if (want === 'kvm') return ['-accel', 'kvm'];
    // QEMU tries -accel options in order: KVM when it opens, TCG when it does not.
    return (await kvmBootsGuest(qemu, img, guestDir)) ? ['-accel', 'kvm', '-accel', 'tcg'] : ['-accel', 'tcg'];
  }

  private buildArgs(img: GuestImage, accel: string[]): string[] {
    const o = this.options;
    const args = [
      '-name',
      `bfmig-${this.name}`,
      '-no-user-config',
      ...(o.nodefaults === false ? [] : ['-nodefaults']),
      '-machine',
      o.machine ?? 'pc-i440fx-7.2',
      ...accel,
      ...(o.cpu ? ['-cpu', o.cpu] : []),
      '-m',
      String(o.memMiB ?? 256),
      '-smp',
      String(o.smp ?? 1),
      '-display',
      'none',
      '-no-reboot',
      // Serial console on QEMU's stdout (a pipe we read); stdin is /dev/null.
      '-chardev',
      'stdio,id=serial0,signal=off',
      '-serial',
      'chardev:serial0',
      '-qmp',
      `unix:${this.qmpSocketPath},server=on,wait=off`,
      '-kernel',
      img.kernel,
      '-initrd',
      this.initrd(img),
      '-append',
      guestKernelCmdline(img, this.options.workload ?? {}, this.options.appendExtra),
    ];
    if (o.workload?.control) {
      args.push('-chardev', `socket,id=control0,path=${this.controlSocketPath},server=on,wait=off`, '-serial', 'chardev:control0');
    }
    if (o.incoming !== undefined) args.push('-incoming', o.incoming);
    if (o.extraArgs) args.push(...o.extraArgs);
    for (const event of o.traceEvents ?? []) args.push('-trace', event);
    return args;
  }

  /** Spawns QEMU and connects QMP. Rejects (and cleans up) if QEMU dies during startup. */
  async start(): Promise<this> {
    if (this.child) throw new Error(`${this.name}: already started`);
    if (this.disposed) throw new Error(`${this.name}: disposed`);
    const dir = this.options.guestDir ?? defaultGuestDir();
    // build/ is shared with node-gyp, whose `rebuild` wipes it: rebuild the guest on demand.
    const img = readGuestImage(dir) ?? (this.options.guestDir ? null : ensureGuestBuilt(dir));
    if (!img) throw new Error(`${this.name}: no guest image in ${dir} (run scripts/build-guest.sh)`);

    const qemu = this.options.qemuBinary ?? process.env.BFMIG_QEMU ?? 'qemu-system-x86_64';
    this.args = [qemu, ...this.buildArgs(img, await this.accelArgs(qemu, img, dir))];
    const argv = [...deathSignalPrefix(), ...this.args];
    this.serialLog = fs.createWriteStream(this.serialLogPath);
    const stderrLog = fs.createWriteStream(this.stderrLogPath);
    this.startedAt = Date.now();
    const child = spawn(argv[0], argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'], cwd: this.tempDir });
    reapWithThisProcess(child);
    this.child = child;
    child.stdout?.setEncoding('latin1');
    child.stdout?.on('data', (chunk: string) => {
      this.serialLog?.write(chunk, 'latin1');
      this.serialText += chunk.replace(/\r/g, '');
      for (const l of [...this.serialListeners]) l();
    });
    child.stderr?.setEncoding('utf8');
    child.stderr?.on('data', (chunk: string) => {
      stderrLog.write(chunk);
      this.stderrText += chunk;
    });
    this.exitPromise = new Promise<void>((resolve) => {
      const done = (code: number | null, signal: NodeJS.Signals | null): void => {
        if (this.exitInfo) return;
        this.exitInfo = { code, signal };
        this.qmpClient?.close();
        stderrLog.end();
        for (const l of [...this.serialListeners]) l();
        resolve();
      };
      // 'close' comes after the last stdout data; don't wait forever for it in case a
      // grandchild (an exec: migration's shell) still holds the pipes.
      child.once('exit', (code, signal) => {
        const t = setTimeout(() => done(code, signal), 1000);
        child.once('close', () => {
          clearTimeout(t);
          done(code, signal);
        });
      });
      child.once('error', (err) => {
        this.stderrText += `spawn error: ${err.message}\n`;
        done(null, null);
      });
    });

    const qmp = new QmpClient(this.qmpSocketPath);
    this.qmpClient = qmp;
    try {
      await qmp.connect(this.options.startTimeoutMs ?? 30_000, () => this.exitInfo === null);
      const kvm = await qmp.execute<{ enabled: boolean; present: boolean }>('query-kvm');
      this.accel = kvm.enabled ? 'kvm' : 'tcg';
    } catch (e) {
      const msg = errorMessage(e);
      await this.kill();
      throw new Error(`${this.name}: QEMU failed to start: ${msg}\n${this.describe()}`);
    }
    return this;
  }

  /** What QEMU has written to stderr so far (its trace lines among it). */
  get stderr(): string {
    return this.stderrText;
  }

  /** Command line, exit status, stderr and console tail, for error messages. */
  describe(): string {
    const exit = this.exitInfo ? `exited code=${this.exitInfo.code} signal=${this.exitInfo.signal}` : 'running';
    return [
      `[${this.name}] ${exit}; temp ${this.tempDir}`,
      `[${this.name}] cmd: ${this.args.join(' ')}`,
      `[${this.name}] stderr: ${this.stderrText.trim().slice(-2000) || '(empty)'}`,
      `[${this.name}] console tail:\n${this.serialTail(1500)}`,
    ].join('\n');
  }

  private requireQmp(): QmpClient {
    if (!this.qmpClient || !this.qmpClient.connected) {
      throw new Error(`${this.name}: QMP not connected${this.exitInfo ? ' (QEMU exited)' : ''}\n${this.describe()}`);
    }
    return this.qmpClient;
  }

  /** Executes a QMP command and resolves with its `return` value. */
  async qmp<T = unknown>(command: string, args?: Record<string, unknown>, timeoutMs?: number): Promise<T> {
    return this.requireQmp().execute<T>(command, args, timeoutMs);
  }

  /** The same out of band: for migrate-recover and migrate-pause, which must answer while the main thread waits for a page. */
  async qmpOob<T = unknown>(command: string, args?: Record<string, unknown>, timeoutMs?: number): Promise<T> {
    return this.requireQmp().executeOob<T>(command, args, timeoutMs);
  }

  status(): Promise<StatusInfo> {
    return this.qmp<StatusInfo>('query-status');
  }

  async waitForStatus(want: RunState, timeoutMs = 60_000, pollMs = 100): Promise<StatusInfo> {
    const deadline = Date.now() + timeoutMs;
    let last: StatusInfo | null = null;
    for (;;) {
      if (this.exitInfo) throw new GuestFailedError(`${this.name}: QEMU exited while waiting for status ${want}\n${this.describe()}`);
      last = await this.status();
      if (last.status === want) return last;
      if (Date.now() >= deadline) {
        throw new Error(`${this.name}: status still ${last.status} after ${timeoutMs} ms (want ${want})\n${this.describe()}`);
      }
      await sleep(pollMs);
    }
  }

  /**
   * Resolves with the first match of `re` in complete console lines after `since`.
   * The returned match's `index` is an absolute offset into `serial`.
   */
  waitForSerial(re: RegExp, timeoutMs: number, opts: WaitForSerialOptions = {}): Promise<RegExpExecArray> {
    const flags = re.flags.includes('g') ? re.flags : `${re.flags}g`;
    const pattern = new RegExp(re.source, flags);
    const failOn = opts.failOn === undefined ? DEFAULT_SERIAL_FAIL : opts.failOn;
    const failPattern = failOn ? new RegExp(failOn.source, failOn.flags.replace('g', '')) : null;
    let scanFrom = opts.since ?? 0;
    return new Promise<RegExpExecArray>((resolve, reject) => {
      const finish = (err: Error | null, m?: RegExpExecArray): void => {
        clearTimeout(timer);
        this.serialListeners.delete(check);
        if (err) reject(err);
        else if (m) resolve(m);
      };
      const check = (): void => {
        // Only complete lines: "round=1" must not match while "round=12" is still arriving.
        const end = this.serialText.lastIndexOf('\n') + 1;
        if (end > scanFrom) {
          const text = this.serialText.slice(0, end);
          if (failPattern) {
            const f = failPattern.exec(text.slice(opts.since ?? 0));
            if (f) {
              const line = text.slice(0, (opts.since ?? 0) + f.index).lastIndexOf('\n') + 1;
              const failLine = text.slice(line, text.indexOf('\n', line));
              finish(new GuestFailedError(`${this.name}: console shows failure "${failLine}" while waiting for ${re}\n${this.describe()}`));
              return;
            }
          }
          pattern.lastIndex = scanFrom;
          let m: RegExpExecArray | null;
          while ((m = pattern.exec(text)) !== null) {
            if (m[0].length === 0) pattern.lastIndex++;
            if (!opts.accept || opts.accept(m)) {
              finish(null, m);
              return;
            }
          }
          // Resume after the last complete line; a match never spans past a newline we've seen.
          scanFrom = end;
        }
        if (this.exitInfo) {
          finish(new GuestFailedError(`${this.name}: QEMU exited while waiting for ${re} on the console\n${this.describe()}`));
        }
      };
      const timer = setTimeout(
        () => finish(new Error(`${this.name}: ${re} not seen on the console within ${timeoutMs} ms\n${this.describe()}`)),
        timeoutMs,
      );
      this.serialListeners.add(check);
      check();
    });
  }

  /**
   * Has the workload rewrite each of its pages with probability pct/100, once, and resolves with how
   * many it rewrote once the guest has verified every page after the change. Needs workload.control.
   */
  async changePages(pct: number, timeoutMs = 120_000): Promise<number> {
    if (!this.options.workload?.control) throw new Error(`${this.name}: started without workload.control`);
    const seq = ++this.changeSeq;
    const since = this.serialMark();
    await new Promise<void>((resolve, reject) => {
      const socket = net.createConnection(this.controlSocketPath, () => socket.end(`change ${seq} ${pct}\n`, () => resolve()));
      socket.on('error', reject);
      socket.on('close', () => resolve());
    });
    const changed = await this.waitForSerial(new RegExp(`WORKLOAD CHANGED seq=${seq} pages=(\\d+) round=(\\d+)`), timeoutMs, { since });
    const round = Number(changed[2]);
    await this.waitForSerial(/WORKLOAD VERIFY OK round=(\d+)/, timeoutMs, { since, accept: (m) => Number(m[1]) >= round });
    return Number(changed[1]);
  }

  /** max-bandwidth (bytes/s) applied by the next migrate(); default 10 GiB/s. */
  setMaxBandwidth(bytesPerSecond: number): void {
    this.maxBandwidth = bytesPerSecond;
  }

  /** downtime-limit (ms) applied by the next migrate(); default 500. */
  setDowntimeLimit(ms: number): void {
    this.downtimeLimitMs = ms;
  }

  /** migrate-set-parameters with arbitrary QEMU parameter names. */
  async setMigrationParameters(params: Record<string, unknown>): Promise<void> {
    await this.qmp('migrate-set-parameters', params);
  }

  /** migrate-set-capabilities, e.g. { xbzrle: false, events: true }. */
  async setMigrationCapabilities(caps: Record<string, boolean>): Promise<void> {
    const capabilities = Object.entries(caps).map(([capability, state]) => ({ capability, state }));
    await this.qmp('migrate-set-capabilities', { capabilities });
  }

  /** Starts an outgoing migration (returns when QEMU accepted it; see waitForMigration()). */
  async migrate(uri: string): Promise<void> {
    await this.setMigrationParameters({
      'max-bandwidth': this.maxBandwidth,
      'downtime-limit': this.downtimeLimitMs,
    });
    await this.qmp('migrate', { uri });
  }

  /** For a destination started with `incoming: 'defer'`. */
  async migrateIncoming(uri: string): Promise<void> {
    await this.qmp('migrate-incoming', { uri });
  }

  queryMigrate(): Promise<MigrationInfo> {
    return this.qmp<MigrationInfo>('query-migrate');
  }

  /**
   * Polls query-migrate until the migration is completed (returns the full result),
   * failed or cancelled (throws MigrationFailedError unless allowFailure).
   */
  async waitForMigration(opts: WaitForMigrationOptions = {}): Promise<MigrationInfo> {
    const timeoutMs = opts.timeoutMs ?? 300_000;
    const pollMs = opts.pollMs ?? 100;
    const deadline = Date.now() + timeoutMs;
    let completedAt: number | undefined;
    let continued = false;
    for (;;) {
      const info = await this.queryMigrate();
      if (info.status === 'pre-switchover' && opts.continueAfterPauseMs !== undefined && !continued) {
        continued = true;
        await sleep(opts.continueAfterPauseMs);
        await this.qmp('migrate-continue', { state: 'pre-switchover' });
        opts.onContinued?.();
      }
      // QEMU 7.2 sets the state to completed in the migration thread and computes total-time only
      // afterwards (migration_iteration_finish, under the main lock): a query between the two reads
      // total-time 0, so a completed migration is polled once more until its time is in.
      if (info.status === 'completed') {
        completedAt ??= Date.now();
        if ((info['total-time'] ?? 0) > 0 || Date.now() - completedAt > 2000) return info;
      }
      if (info.status === 'failed' || info.status === 'cancelled') {
        if (opts.allowFailure) return info;
        throw new MigrationFailedError(info, this.name);
      }
      if (Date.now() >= deadline) {
        throw new Error(`${this.name}: migration still ${info.status ?? 'none'} after ${timeoutMs} ms: ${JSON.stringify(info)}`);
      }
      await sleep(pollMs);
    }
  }

  /** Waits up to timeoutMs for the process to exit; true if it did. */
  async waitForExit(timeoutMs: number): Promise<boolean> {
    if (!this.exitPromise || this.exitInfo) return true;
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<false>((r) => {
      timer = setTimeout(() => r(false), timeoutMs);
    });
    const ok = await Promise.race([this.exitPromise.then(() => true as const), timedOut]);
    clearTimeout(timer);
    return ok;
  }

  /** SIGKILL and wait for the exit. */
  async kill(): Promise<void> {
    if (!this.child || this.exitInfo) return;
    this.child.kill('SIGKILL');
    await this.waitForExit(10_000);
  }

  /** QMP `quit`, then SIGKILL if QEMU has not exited within timeoutMs. */
  async quit(timeoutMs = 10_000): Promise<void> {
    if (!this.child || this.exitInfo) return;
    // QEMU may close the socket before the reply arrives; that is a successful quit too.
    // If QMP is not connected this rejects at once and we fall through to kill.
    await this.qmp('quit', undefined, timeoutMs).catch(() => undefined);
    if (!(await this.waitForExit(timeoutMs))) await this.kill();
  }

  /** Stops QEMU (quit, then kill), closes QMP, removes the temp dir. Idempotent. */
  async dispose(): Promise<void> {
    if (this.disposed) return;
    this.disposed = true;
    try {
      await this.quit(3_000);
    } finally {
      await this.kill();
      this.qmpClient?.close();
      this.serialListeners.clear();
      await new Promise<void>((r) => (this.serialLog ? this.serialLog.end(() => r()) : r()));
      liveVms.delete(this);
      const keep = this.options.keepTempDir ?? process.env.BFMIG_KEEP_VM_TMP === '1';
      if (!keep) removeTempDir(this.tempDir);
    }
  }
}
