/**
 * README behaviours of the stores behind a real gateway pair on loopback, each checked where it would
 * break: storeBudget evicting the least recently used idle snapshot to make room; a migration refused
 * because another process holds the VM's store; a store commit failing after the destination has every
 * byte; and `bfmig restore` refusing a store whose last migration did not complete.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import type { MigrationReport } from '../src/gateway/session';
import { PACKAGE_ROOT } from '../src/digest/package-root';
import { PageStore } from '../src/store';
import { startPair, type TestSite, waitFor } from '../src/lab/harness/gateway-pair';
import { destinationStandIn, sourceStandIn } from '../src/lab/harness/qemu-standins';
import { guestMemory, migrationStream } from '../src/lab/harness/migration-stream';

const PAGES = 2000; // 8 MiB of pages in a store
const stream = migrationStream(guestMemory([['pc.ram', PAGES]], 13), []);

/** A store of `vm` at `data` claiming `snapshot`, as large on disk as vm1's will be (its pages file is full size). */
function plant(data: string, vm: string, snapshot: string): void {
  const store = PageStore.open(data, vm);
  store.begin({ pageSize: 4096, pageCount: PAGES, layoutId: `planted-${vm}`, layout: {} });
  store.writePage(0, Buffer.alloc(4096, 1), 0, Buffer.alloc(16, 1), 0);
  store.commit(snapshot);
  store.close();
}

function claimed(data: string, vm: string): string | null {
  return (JSON.parse(fs.readFileSync(path.join(data, vm, 'meta.json'), 'utf8')) as { snapshotId: string | null }).snapshotId;
}

/** One migration from → to; resolves with how the source's connection ended, what the destination got, and both reports. */
async function migrate(from: TestSite, to: TestSite): Promise<{ source: 'closed' | 'reset'; received: Buffer; sent: MigrationReport; got: MigrationReport }> {
  const dest = await destinationStandIn(to.destPort);
  const before = [from.gateway.history.length, to.gateway.history.length];
  const source = await sourceStandIn(from.routePort, stream);
  await waitFor(() => from.gateway.history.length > before[0] && to.gateway.history.length > before[1]);
  dest.close();
  const sent = from.gateway.history[before[0]];
  const got = to.gateway.history[before[1]];
  // A destination never dialled has nothing to report: its stand-in never accepted.
  const received = got.result === 'completed' ? (await dest.received).bytes : Buffer.alloc(0);
  return { source, received, sent, got };
}

describe('stores behind a gateway pair', () => {
  let tmp = '';
  let a: TestSite;
  let b: TestSite;

  beforeAll(async () => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'bfmig-store-outcomes-'));
    const dataB = path.join(tmp, 'site-b');
    plant(dataB, 'old', 'snap-old');
    plant(dataB, 'newer', 'snap-newer');
    // The budget orders idle stores by their meta.json's time: make 'old' an hour older.
    const hourAgo = new Date(Date.now() - 3_600_000);
    fs.utimesSync(path.join(dataB, 'old', 'meta.json'), hourAgo, hourAgo);
    // Room for two stores of this size, not three.
    [a, b] = await startPair(tmp, ['', 'storeBudget: 20MiB\n']);
  });

  afterAll(async () => {
    await a?.gateway.stop(1);
    await b?.gateway.stop(1);
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  test('storeBudget: a new VM that needs room evicts the least recently used idle snapshot, and only that one', async () => {
    const { source, received, got } = await migrate(a, b);
    expect(source).toBe('closed');
    expect(received.equals(stream)).toBe(true);
    expect(got).toMatchObject({ direction: 'receive', result: 'completed' });
    expect(got.snapshotId).not.toBeNull();
    expect(claimed(b.data, 'vm1')).toBe(got.snapshotId);
    expect(b.logs.filter((l) => l.msg === 'retained snapshot evicted to stay within storeBudget')).toEqual([expect.objectContaining({ vm: 'old', for: 'vm1' })]);
    expect(fs.existsSync(path.join(b.data, 'old'))).toBe(false);
    expect(claimed(b.data, 'newer')).toBe('snap-newer');
    expect(await b.metrics.text()).toMatch(/bfmig_store_evictions_total\{vm="old"\} 1/);
  });

  test('a migration of a VM whose store another process holds is refused, naming the holder, and touches nothing', async () => {
    const before = claimed(b.data, 'vm1');
    const script = `const { PageStore } = require(${JSON.stringify(path.join(PACKAGE_ROOT, 'dist', 'src', 'store', 'index.js'))});
      PageStore.open(${JSON.stringify(b.data)}, 'vm1'); console.log('held'); setInterval(() => {}, 1000);`;
    const holder = spawn(process.execPath, ['-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
    await new Promise<void>((resolve) => holder.stdout.on('data', () => resolve()));
    try {
      const { source, received, sent, got } = await migrate(a, b);
      expect(source).toBe('reset');
      expect(received.length).toBe(0);
      expect(sent).toMatchObject({ direction: 'send', result: 'failed' });
      expect(got).toMatchObject({ direction: 'receive', result: 'failed' });
      expect(got.error).toMatch(new RegExp(`in use by process ${holder.pid}`));
    } finally {
      holder.kill('SIGKILL');
      await new Promise((resolve) => holder.on('exit', resolve));
    }
    expect(claimed(b.data, 'vm1')).toBe(before);
  });

  test('a store commit that fails after the destination has every byte does not fail the migration; the store claims nothing new', async () => {
    const before = claimed(b.data, 'vm1');
    expect(before).not.toBeNull();
    // The stream's head is kept beside the pages at commit, through a temporary file opened with
    // O_NOFOLLOW: a symbolic link in its place makes the commit fail, and only the commit.
    const trap = path.join(b.data, 'vm1', 'blob-stream-head.tmp');
    fs.symlinkSync(path.join(tmp, 'elsewhere'), trap);
    try {
      const { source, received, got } = await migrate(a, b);
      expect(source).toBe('closed');
      expect(received.equals(stream)).toBe(true);
      expect(got).toMatchObject({ direction: 'receive', result: 'completed' });
      expect(b.logs.some((l) => l.msg === 'store commit failed')).toBe(true);
      // It puts back the snapshot it held before this migration.
      expect(claimed(b.data, 'vm1')).toBe(before);
      expect(before).not.toBe(a.gateway.history[a.gateway.history.length - 1].snapshotId);
      expect(fs.existsSync(path.join(tmp, 'elsewhere'))).toBe(false);
    } finally {
      fs.unlinkSync(trap);
    }
    // With the trap gone the next migration commits again.
    const { got } = await migrate(a, b);
    expect(got).toMatchObject({ result: 'completed' });
    expect(claimed(b.data, 'vm1')).toBe(got.snapshotId);
  });
});

describe('bfmig restore', () => {
  test('refuses a store whose last migration did not complete', async () => {
    const data = fs.mkdtempSync(path.join(os.tmpdir(), 'bfmig-restore-incomplete-'));
    try {
      const store = PageStore.open(data, 'vm1');
      store.begin({ pageSize: 4096, pageCount: 4, layoutId: 'l', layout: { blocks: [{ name: 'pc.ram', length: 4 * 4096 }] } });
      store.writePage(0, Buffer.alloc(4096, 1), 0, Buffer.alloc(16, 1), 0);
      store.abort();
      store.close();
      const { restoreSnapshot } = await import('../src/cli/restore');
      await expect(restoreSnapshot(data, 'vm1', { host: '127.0.0.1', port: 9 })).rejects.toThrow(/claims no complete snapshot \(its last migration did not complete\)/);
    } finally {
      fs.rmSync(data, { recursive: true, force: true });
    }
  });
});
