/**
 * The store limits at a gateway: storeBudget never lets a peer's new VM evict another VM's snapshot it
 * could not fit beside anyway, stores that claim nothing are removed (at start and after a migration),
 * and limits.maxStores bounds how many store directories peers can make.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { PageStore } from '../src/store';
import { startPair, stopPair, type TestSite, waitFor } from '../src/lab/harness/gateway-pair';
import { destinationStandIn, sourceStandIn } from '../src/lab/harness/qemu-standins';
import { guestMemory, migrationStream } from '../src/lab/harness/migration-stream';
import { suiteTempDir } from './temp-dir';

// 2,000 pages: some 8 MiB in a store.
const memory = guestMemory(
  [
    ['pc.ram', 1960],
    ['vga', 40],
  ],
  11,
);
const stream = migrationStream(memory, []);

function plant(data: string, vm: string, snapshot: string | null, pages = 1): void {
  const store = PageStore.open(data, vm);
  store.begin({ pageSize: 4096, pageCount: 4, layoutId: 'small', layout: {} });
  if (pages > 0) store.writePage(0, Buffer.alloc(4096, 1), 0, Buffer.alloc(16, 1), 0);
  if (snapshot === null) store.abort();
  else store.commit(snapshot);
  store.close();
}

async function migrate(from: TestSite, to: TestSite, bytes: Buffer): Promise<Buffer> {
  const dest = await destinationStandIn(to.destPort);
  const before = [from.gateway.history.length, to.gateway.history.length];
  await sourceStandIn(from.routePort, bytes);
  await waitFor(() => from.gateway.history.length > before[0] && to.gateway.history.length > before[1]);
  let timer: NodeJS.Timeout | undefined;
  const got = await Promise.race([dest.received, new Promise<null>((r) => (timer = setTimeout(() => r(null), 3000)))]);
  clearTimeout(timer);
  dest.close();
  return got?.bytes ?? Buffer.alloc(0);
}

const last = (site: TestSite) => site.gateway.history[site.gateway.history.length - 1];

describe('storeBudget at the receiving gateway', () => {
  let tmp = '';
  let a: TestSite;
  let b: TestSite;

  beforeAll(async () => {
    tmp = suiteTempDir('bfmig-gw-budget-');
    const dataB = path.join(tmp, 'site-b');
    plant(dataB, 'other', 'snap-other'); // another VM's snapshot
    plant(dataB, 'failed', null, 0); // a first migration that never completed: it holds no page
    plant(dataB, 'lost', null); // lost its snapshot but holds a page a digest-table exchange can reuse
    fs.mkdirSync(path.join(dataB, 'hello-only')); // an accepted Hello that got no further
    // Both sites: the sending gateway's store is held to the budget the same way.
    [a, b] = await startPair(tmp, ['storeBudget: 1MiB\n', 'storeBudget: 1MiB\n']);
  });

  afterAll(() => stopPair([a, b]));

  test('at start, stores that hold nothing are removed; snapshots and held pages stay', () => {
    expect(fs.readdirSync(b.data).sort()).toEqual(['lost', 'other']);
  });

  test('the metrics show what the stores take now and the budget they are held to', async () => {
    const metric = async (name: string): Promise<number> => Number(new RegExp(`^${name} (\\S+)$`, 'm').exec(await b.metrics.text())?.[1]);
    const fileBytes = (dir: string): number => fs.readdirSync(dir).reduce((sum, f) => sum + fs.lstatSync(path.join(dir, f)).size, 0);
    const onDisk = fileBytes(path.join(b.data, 'lost')) + fileBytes(path.join(b.data, 'other'));
    expect(onDisk).toBeGreaterThan(0);
    expect(await metric('bfmig_store_bytes')).toBe(onDisk);
    expect(await metric('bfmig_store_budget_bytes')).toBe(1024 * 1024);
    // Read at each scrape: a store planted now counts at once.
    plant(b.data, 'planted', 'snap-planted');
    expect(await metric('bfmig_store_bytes')).toBe(onDisk + fileBytes(path.join(b.data, 'planted')));
    fs.rmSync(path.join(b.data, 'planted'), { recursive: true });
    expect(await metric('bfmig_store_bytes')).toBe(onDisk);
  });

  test('a failed first migration leaves no store behind at either gateway (whether the budget let it retain or not)', async () => {
    await migrate(a, b, stream.subarray(0, stream.length >> 1));
    expect(last(a)).toMatchObject({ direction: 'send', result: 'failed' });
    expect(last(b)).toMatchObject({ direction: 'receive', result: 'failed' });
    expect(fs.existsSync(path.join(a.data, 'vm1'))).toBe(false);
    expect(fs.existsSync(path.join(b.data, 'vm1'))).toBe(false);
  });

  test('a new VM larger than the budget could ever make room for evicts nothing and migrates without retention', async () => {
    const received = await migrate(a, b, stream);
    expect(received.equals(stream)).toBe(true);
    expect(last(b)).toMatchObject({ direction: 'receive', result: 'completed', snapshotId: null });
    expect(b.logs.some((l) => l.msg === 'storeBudget has no room for this store: this migration retains nothing')).toBe(true);
    expect(b.logs.some((l) => l.msg === 'retained snapshot evicted to stay within storeBudget')).toBe(false);
    const other = PageStore.open(b.data, 'other');
    try {
      expect(other.snapshotId()).toBe('snap-other');
    } finally {
      other.close();
    }
    expect(last(a)).toMatchObject({ direction: 'send', result: 'completed', mode: 'none' });
    expect(a.logs.some((l) => l.msg === 'storeBudget has no room for this store: this migration retains nothing')).toBe(true);
    // The stores they began hold nothing and are gone after the migration.
    expect(fs.existsSync(path.join(b.data, 'vm1'))).toBe(false);
    expect(fs.existsSync(path.join(a.data, 'vm1'))).toBe(false);
  });
});

describe('stores of migrations that never completed, and limits.maxStores', () => {
  let tmp = '';
  let a: TestSite;
  let b: TestSite;

  beforeAll(async () => {
    tmp = suiteTempDir('bfmig-gw-stores-');
    const dataB = path.join(tmp, 'site-b');
    plant(dataB, 'other1', 'snap-1');
    plant(dataB, 'other2', 'snap-2');
    [a, b] = await startPair(tmp, ['', 'limits:\n  maxStores: 2\n']);
  });

  afterAll(() => stopPair([a, b]));

  test('with limits.maxStores stores kept, a new VM migrates without retention and makes no store', async () => {
    const received = await migrate(a, b, stream);
    expect(received.equals(stream)).toBe(true);
    expect(last(b)).toMatchObject({ direction: 'receive', result: 'completed', snapshotId: null });
    expect(b.logs.some((l) => l.msg === 'limits.maxStores stores exist: this new VM migrates without retention')).toBe(true);
    expect(fs.readdirSync(b.data).sort()).toEqual(['other1', 'other2']);
    // The sending site has no such limit: it retained the migration.
    expect(last(a)).toMatchObject({ direction: 'send', result: 'completed' });
    expect(fs.existsSync(path.join(a.data, 'vm1', 'meta.json'))).toBe(true);
  });
});
