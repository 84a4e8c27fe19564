/**
 * deploy/systemd/bfmig-gateway.service: systemd's own checker accepts it without a warning
 * (`systemd-analyze verify` needs no running systemd, so it works in a container too), and it keeps
 * what the README promises: its own user, a read-only system with only the store writable, restart on
 * failure, and more stop time than the gateway's drain.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { DEFAULT_SHUTDOWN_GRACE_SECONDS } from '../src/gateway/config';
import { onPath, requireInCi } from './mounts';
import { testTempDir } from './temp-dir';

const UNIT = path.join(__dirname, '..', 'deploy', 'systemd', 'bfmig-gateway.service');
const text = fs.readFileSync(UNIT, 'utf8');

/** The unit's settings, key → every value given to it (comments and section headers left out). */
function settings(unit: string): Map<string, string[]> {
  const found = new Map<string, string[]>();
  for (const line of unit.split('\n')) {
    const m = /^([A-Za-z]+)=(.*)$/.exec(line);
    if (m) found.set(m[1], [...(found.get(m[1]) ?? []), m[2]]);
  }
  return found;
}

describe('systemd unit (deploy/systemd/bfmig-gateway.service)', () => {
  const s = settings(text);
  const one = (key: string): string | undefined => s.get(key)?.at(-1);

  test('its own user, the store its only writable place, no privileges, restart on failure', () => {
    expect(one('DynamicUser')).toBe('yes');
    expect(one('StateDirectory')).toBe('bfmig');
    expect(one('ExecStart')).toMatch(/\/bin\/bfmig\.js gateway --config \/etc\/bfmig\/site\.yaml$/);
    expect(one('Restart')).toBe('on-failure');
    expect(one('KillSignal')).toBe('SIGTERM');
    for (const [key, value] of [
      ['ProtectSystem', 'strict'],
      ['ProtectHome', 'yes'],
      ['PrivateTmp', 'yes'],
      ['NoNewPrivileges', 'yes'],
      ['CapabilityBoundingSet', ''],
    ]) {
      expect({ key, value: one(key) }).toEqual({ key, value });
    }
    // V8 needs writable-executable memory: this setting would kill the gateway at its first JIT.
    expect(s.has('MemoryDenyWriteExecute')).toBe(false);
  });

  test('TimeoutStopSec exceeds the gateway\'s default drain (shutdownGraceSeconds)', () => {
    expect(Number(one('TimeoutStopSec'))).toBeGreaterThan(DEFAULT_SHUTDOWN_GRACE_SECONDS);
  });

  const haveAnalyze = requireInCi(onPath('systemd-analyze'), "systemd-analyze (Debian's systemd package)");

  (haveAnalyze ? test : test.skip)('systemd-analyze verify accepts it without a single warning', () => {
    // verify checks that ExecStart's program exists: point it at this machine's node if that lives elsewhere.
    const dir = testTempDir('bfmig-unit-');
    const unit = path.join(dir, path.basename(UNIT));
    fs.writeFileSync(unit, text.replace('ExecStart=/usr/bin/node ', `ExecStart=${process.execPath} `));
    const run = spawnSync('systemd-analyze', ['verify', unit], { encoding: 'utf8' });
    // It exits 0 even for settings it cannot parse and ignores: its output must be empty.
    expect(`${run.stdout}${run.stderr}`).toBe('');
    expect(run.status).toBe(0);
    // The check can fail: a setting systemd does not understand is reported.
    fs.writeFileSync(unit, text.replace('ProtectSystem=strict', 'ProtectSystem=very'));
    expect(spawnSync('systemd-analyze', ['verify', unit], { encoding: 'utf8' }).stderr).toMatch(/ProtectSystem|protect system/i);
  });
});
