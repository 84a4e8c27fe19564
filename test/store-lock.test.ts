import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { listSnapshots, runSnapshots } from '../src/cli/snapshots';
import { PageStore, StoreBusyError } from '../src/store';
import { acquireLock, lockHolder, processStart, releaseLock, TAKEOVER_FILE } from '../src/store/lock';
import { distModule, startNodeChild } from '../src/lab/harness/child';
import { testTempDir } from './temp-dir';

describe('a VM store shared by several gateway processes', () => {
  let data = '';
  beforeEach(() => {
    data = testTempDir('bfmig-lock-');
  });

  test('a second process cannot open a VM store another holds, and takes it over once that process is gone', async () => {
    const first = PageStore.open(data, 'vm1');
    first.begin({ pageSize: 4096, pageCount: 2, layoutId: 'l', layout: {} });
    first.commit('s1');
    first.close();
    // Another process opens vm1's store and keeps it open.
    const child = startNodeChild(`const { PageStore } = require(${distModule('src/store/index')});
      PageStore.open(${JSON.stringify(data)}, 'vm1'); console.log('held'); setInterval(() => {}, 1000);`);
    await child.said('held');
    try {
      expect(() => PageStore.open(data, 'vm1')).toThrow(StoreBusyError);
      expect(() => PageStore.open(data, 'vm1')).toThrow(new RegExp(`in use by process ${child.pid}`));
      expect(listSnapshots(data)).toMatchObject([{ vm: 'vm1', pages: 2, presentPages: 0, inUse: `${child.pid}@${os.hostname()}` }]);
      expect(() => runSnapshots('rm', data, 'vm1', false, () => undefined)).toThrow(StoreBusyError);
      // Other VMs are not affected.
      PageStore.open(data, 'vm2').close();
    } finally {
      await child.kill();
    }
    // Its process died without letting go: the lock is stale and is taken over.
    const store = PageStore.open(data, 'vm1');
    store.close();
    expect(fs.existsSync(path.join(data, 'vm1', 'lock'))).toBe(false);
  });

  /** A lock file left by a process of this host that is gone: its pid is above the largest pid_max Linux allows (2^22), so no process has it. */
  function staleLock(dir: string, file = 'lock'): void {
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(dir, file), `${os.hostname()} ${2 ** 22 + 1}\n`);
  }

  test('two processes that both found the lock stale: one takes it over, the other is told the store is busy', () => {
    // The interleaving: this process found the lock stale; before it took it over, another one found it
    // stale too and took it over (run here, in the hook). Before the takeover file, this process then
    // removed the other's new lock and made its own: both held the store.
    const dir = path.join(data, 'vm1');
    staleLock(dir);
    let other: unknown = null;
    let thrown: unknown = null;
    try {
      acquireLock(dir, {
        beforeTakeover: () => {
          try {
            acquireLock(dir);
          } catch (err) {
            other = err;
          }
        },
      });
    } catch (err) {
      thrown = err;
    }
    expect(other).toBeNull(); // the other took it over
    expect(thrown).toBeInstanceOf(StoreBusyError);
    expect(String(thrown)).toMatch(`in use by process ${process.pid}`);
    expect(fs.readdirSync(dir)).toEqual(['lock']); // its lock stands; no takeover file is left
    expect(lockHolder(dir)).toEqual({ host: os.hostname(), pid: process.pid });
  });

  test('a takeover file left by a process that died taking a lock over is removed, and the store taken', () => {
    const dir = path.join(data, 'vm1');
    staleLock(dir);
    staleLock(dir, TAKEOVER_FILE);
    acquireLock(dir);
    expect(fs.readdirSync(dir)).toEqual(['lock']);
    expect(lockHolder(dir)).toEqual({ host: os.hostname(), pid: process.pid });
  });

  test('while another process takes a stale lock over, the store is busy and neither file is touched', () => {
    const dir = path.join(data, 'vm1');
    staleLock(dir);
    const taking = `${os.hostname()} ${process.pid}\n`; // a live process's takeover file
    fs.writeFileSync(path.join(dir, TAKEOVER_FILE), taking);
    const stale = fs.readFileSync(path.join(dir, 'lock'), 'utf8');
    expect(() => acquireLock(dir)).toThrow(new RegExp(`being taken over by process ${process.pid} on ${os.hostname()}`));
    expect(fs.readFileSync(path.join(dir, TAKEOVER_FILE), 'utf8')).toBe(taking);
    expect(fs.readFileSync(path.join(dir, 'lock'), 'utf8')).toBe(stale);
  });

  test('a lock whose pid was given again to a process started since is taken over; one without a start time counts as held', () => {
    const dir = path.join(data, 'vm1');
    fs.mkdirSync(dir);
    const started = processStart(process.pid);
    expect(started).toMatch(/^\d+$/);
    // This process's pid, but a start before it: the process that wrote it is gone.
    fs.writeFileSync(path.join(dir, 'lock'), `${os.hostname()} ${process.pid} ${Number(started) - 1}\n`);
    expect(lockHolder(dir)).toBeNull();
    acquireLock(dir);
    expect(lockHolder(dir)).toEqual({ host: os.hostname(), pid: process.pid });
    releaseLock(dir);
    // An earlier version's lock names no start, and a writer that could not read its own says '-': a live pid holds either.
    for (const text of [`${os.hostname()} ${process.pid}\n`, `${os.hostname()} ${process.pid} -\n`]) {
      fs.writeFileSync(path.join(dir, 'lock'), text);
      expect(() => acquireLock(dir)).toThrow(new RegExp(`in use by process ${process.pid}`));
    }
  });

  test('processes racing for a stale lock: exactly one holds the store each round', async () => {
    // Two processes try for vm1's store at once, round after round, each round from a stale lock: the one
    // that takes it holds it until the round is over. A round both won is the race the takeover file closes.
    const dir = path.join(data, 'vm1');
    const signals = path.join(data, 'signals');
    fs.mkdirSync(signals);
    const ROUNDS = 150;
    const racer = (name: string) =>
      startNodeChild(`
        const fs = require('node:fs');
        const path = require('node:path');
        const lock = require(${distModule('src/store/lock')});
        const signals = ${JSON.stringify(signals)};
        const pause = new Int32Array(new SharedArrayBuffer(4));
        const waitFor = (file) => { while (!fs.existsSync(path.join(signals, file))) Atomics.wait(pause, 0, 0, 0.2); };
        for (let round = 0; round < ${ROUNDS}; round++) {
          waitFor('go-' + round);
          let result;
          try {
            lock.acquireLock(${JSON.stringify(dir)});
            result = 'won';
          } catch (err) {
            result = err instanceof lock.StoreBusyError ? 'busy' : 'error: ' + err.message;
          }
          // Written, then renamed into place: the parent sees it whole or not at all.
          fs.writeFileSync(path.join(signals, 'tmp-' + ${JSON.stringify(name)}), result);
          fs.renameSync(path.join(signals, 'tmp-' + ${JSON.stringify(name)}), path.join(signals, ${JSON.stringify(name)} + '-' + round));
          waitFor('over-' + round);
          if (result === 'won') lock.releaseLock(${JSON.stringify(dir)});
          fs.writeFileSync(path.join(signals, ${JSON.stringify(name)} + '-done-' + round), '');
        }`);
    const racers = [racer('a'), racer('b')];
    const until = async (files: string[]): Promise<void> => {
      while (!files.every((f) => fs.existsSync(path.join(signals, f)))) await new Promise((resolve) => setTimeout(resolve, 1));
    };
    const outcomes = new Map<string, number>();
    try {
      for (let round = 0; round < ROUNDS; round++) {
        staleLock(dir);
        fs.writeFileSync(path.join(signals, `go-${round}`), '');
        await until([`a-${round}`, `b-${round}`]);
        const results = ['a', 'b'].map((n) => fs.readFileSync(path.join(signals, `${n}-${round}`), 'utf8')).sort();
        outcomes.set(results.join(','), (outcomes.get(results.join(',')) ?? 0) + 1);
        fs.writeFileSync(path.join(signals, `over-${round}`), '');
        await until([`a-done-${round}`, `b-done-${round}`]);
        expect(fs.existsSync(path.join(dir, TAKEOVER_FILE))).toBe(false);
      }
    } finally {
      await Promise.all(racers.map((r) => r.kill()));
    }
    // Every round: one won, the other found it busy.
    expect(Object.fromEntries(outcomes)).toEqual({ 'busy,won': ROUNDS });
    releaseLock(dir);
  }, 60_000);

  test('a lock made in a directory renamed away meanwhile (an eviction) is not taken, and says so as a directory gone', () => {
    // The interleaving the eviction race can give: this process looked up vm1, the evicting process
    // renamed it away, and then this process's lock file was created in the directory renamed away.
    const dir = path.join(data, 'vm1');
    const away = path.join(data, '.removing-vm1-test');
    fs.mkdirSync(dir);
    let thrown: unknown = null;
    try {
      acquireLock(dir, { afterCreate: () => fs.renameSync(dir, away) });
    } catch (err) {
      thrown = err;
    }
    expect((thrown as NodeJS.ErrnoException | null)?.code).toBe('ENOENT');
    expect(fs.existsSync(path.join(away, 'lock'))).toBe(true);
    // PageStore.open starts again on ENOENT: a new store, its lock where it belongs.
    const store = PageStore.open(data, 'vm1');
    expect(fs.existsSync(path.join(dir, 'lock'))).toBe(true);
    store.close();
    // Not renamed: taken.
    acquireLock(path.join(data, 'vm1'));
    expect(fs.readFileSync(path.join(dir, 'lock'), 'utf8')).toBe(`${os.hostname()} ${process.pid} ${processStart(process.pid)}\n`);
  });
});
