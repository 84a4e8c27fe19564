/**
 * A local user's libvirt session daemon (`qemu:///session`), as the libvirt recipe's end-to-end test
 * runs two of them on one machine to play two hosts (docs/libvirt.md). Each runs as its own system
 * user with its own directories and its own `host_uuid` (libvirt refuses to migrate a domain to a daemon
 * with its own host UUID, and every daemon of one machine would otherwise share the machine's).
 * Root reaches either through its socket: `qemu+unix:///session?socket=...`.
 */
import { execFile, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { errorMessage } from '../../common/errors';

const run = promisify(execFile);

/** Whether libvirtd with its QEMU driver and virsh are installed (Debian: libvirt-daemon-driver-qemu, libvirt-clients). */
export function libvirtInstalled(): boolean {
  const qemuDriver = (dir: string): boolean => fs.existsSync(path.join(dir, 'libvirt', 'connection-driver', 'libvirt_driver_qemu.so'));
  const libDirs = fs.readdirSync('/usr/lib').map((d) => path.join('/usr/lib', d));
  return spawnSync('libvirtd', ['--version'], { stdio: 'ignore' }).status === 0 && spawnSync('virsh', ['--version'], { stdio: 'ignore' }).status === 0 && libDirs.some(qemuDriver);
}

interface Account {
  uid: number;
  gid: number;
}

function account(user: string): Account | null {
  const id = (flag: string): number | null => {
    const r = spawnSync('id', [flag, user], { encoding: 'utf8' });
    return r.status === 0 ? Number(r.stdout.trim()) : null;
  };
  const uid = id('-u');
  const gid = id('-g');
  return uid === null || gid === null ? null : { uid, gid };
}

/** The system user `user`, made (as root) if it does not exist yet: no home, no login shell. */
export function ensureSystemUser(user: string): Account {
  const existing = account(user);
  if (existing) return existing;
  const r = spawnSync('useradd', ['--system', '--user-group', '--no-create-home', '--home-dir', '/nonexistent', '--shell', '/usr/sbin/nologin', user], { encoding: 'utf8' });
  const made = account(user);
  if (!made) throw new Error(`useradd ${user} failed (exit ${r.status}): ${r.stderr}`);
  return made;
}

export interface SessionDaemon {
  readonly user: string;
  /** How virsh, as root, reaches this daemon: `qemu+unix:///session?socket=DIR/run/libvirt/libvirt-sock`. */
  readonly uri: string;
  /** Runs `virsh -c URI ...args` and resolves with its output; rejects with virsh's error text. */
  virsh(...args: string[]): Promise<string>;
  /** Destroys the daemon's running domains (QEMU outlives its session daemon), then stops the daemon. */
  stop(): Promise<void>;
}

/**
 * Starts `user`'s session daemon with everything under `dir` (made and given to the user): its
 * configuration (libvirtd.conf with a fresh host_uuid), cache, data and runtime directories, and its log
 * (`dir/libvirtd.log`). Resolves once it answers virsh.
 */
export async function startSessionDaemon(user: string, dir: string, timeoutMs = 30_000): Promise<SessionDaemon> {
  const { uid, gid } = ensureSystemUser(user);
  const xdg = { XDG_CONFIG_HOME: path.join(dir, 'config'), XDG_CACHE_HOME: path.join(dir, 'cache'), XDG_DATA_HOME: path.join(dir, 'data'), XDG_RUNTIME_DIR: path.join(dir, 'run') };
  for (const d of Object.values(xdg)) fs.mkdirSync(d, { recursive: true, mode: 0o700 });
  const conf = path.join(xdg.XDG_CONFIG_HOME, 'libvirt');
  fs.mkdirSync(conf, { recursive: true });
  fs.writeFileSync(path.join(conf, 'libvirtd.conf'), `host_uuid = "${randomUUID()}"\n`);
  // QEMU's own output to a file beside its log rather than through a per-user virtlogd left running after the daemon.
  fs.writeFileSync(path.join(conf, 'qemu.conf'), 'stdio_handler = "file"\n');
  const chown = spawnSync('chown', ['-R', `${uid}:${gid}`, dir], { encoding: 'utf8' });
  if (chown.status !== 0) throw new Error(`chown ${dir} failed: ${chown.stderr}`);

  const log = fs.openSync(path.join(dir, 'libvirtd.log'), 'a');
  const env = { ...xdg, HOME: dir, PATH: '/usr/sbin:/usr/bin:/sbin:/bin' };
  const setpriv = ['--reuid', String(uid), '--regid', String(gid), '--clear-groups', '--pdeathsig', 'KILL', '--', 'libvirtd'];
  const child: ChildProcess = spawn('setpriv', setpriv, { env, stdio: ['ignore', log, log] });
  fs.closeSync(log);
  let exited = false;
  const exit = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  void exit.then(() => (exited = true));

  const uri = `qemu+unix:///session?socket=${path.join(xdg.XDG_RUNTIME_DIR, 'libvirt', 'libvirt-sock')}`;
  const virsh = async (...args: string[]): Promise<string> => {
    try {
      return (await run('virsh', ['-c', uri, ...args], { encoding: 'utf8', timeout: 120_000 })).stdout;
    } catch (err) {
      const stderr = (err as { stderr?: string }).stderr?.trim();
      throw new Error(`virsh ${args.join(' ')} (${user}): ${stderr || errorMessage(err)}`);
    }
  };
  const stop = async (): Promise<void> => {
    if (exited) return;
    for (const name of (await virsh('list', '--name').catch(() => '')).split('\n').filter(Boolean)) await virsh('destroy', name).catch(() => undefined);
    child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
    await exit;
    clearTimeout(timer);
  };

  const until = Date.now() + timeoutMs;
  for (;;) {
    const answered = await virsh('version').then(
      () => true,
      (err: unknown) => {
        if (!exited && Date.now() <= until) return false;
        child.kill('SIGKILL');
        throw new Error(`${user}'s libvirtd did not come up (log: ${path.join(dir, 'libvirtd.log')}): ${errorMessage(err)}`);
      },
    );
    if (answered) return { user, uri, virsh, stop };
    await new Promise((r) => setTimeout(r, 100));
  }
}
