/**
 * A store the kernel refused an AIO context (every one of `fs.aio-max-nr` taken) reads ahead with its
 * reader pool: as correct, only slower. The gateway says so when it opens the store for a migration, so
 * that an operator can raise the limit, and says nothing where the store has its context. The refusal
 * itself is the kernel's (io_setup), which a test cannot cause without taking the host's every context:
 * the store's answer is stood in for here.
 */
import { PageStore } from '../src/store';
import { migrateThroughPair, startPair, stopPair, type TestSite } from '../src/lab/harness/gateway-pair';
import { guestMemory, migrationStream } from '../src/lab/harness/migration-stream';
import { suiteTempDir } from './temp-dir';

const NOTE = 'store reads ahead with threads: the kernel refused an AIO context (raise fs.aio-max-nr)';
const memory = guestMemory([['pc.ram', 300]], 23);

const notes = (site: TestSite): unknown[] => site.logs.filter((l) => l.msg === NOTE);

describe('a store without the kernel’s AIO', () => {
  let a: TestSite;
  let b: TestSite;
  beforeAll(async () => {
    [a, b] = await startPair(suiteTempDir('bfmig-aio-refused-'));
  });
  afterAll(() => stopPair([a, b]));
  afterEach(() => jest.restoreAllMocks());

  test('migrates as ever, and each gateway says its store reads ahead with threads', async () => {
    jest.spyOn(PageStore.prototype, 'kernelReadsRefused', 'get').mockReturnValue(true);
    const stream = migrationStream(memory, [[2, 3]]);
    const { received, sent, got } = await migrateThroughPair(a, b, stream);
    expect(received.equals(stream)).toBe(true);
    expect([sent.result, got.result]).toEqual(['completed', 'completed']);
    expect(notes(a)).toEqual([expect.objectContaining({ vm: 'vm1', direction: 'send' })]);
    expect(notes(b)).toEqual([expect.objectContaining({ vm: 'vm1', direction: 'receive' })]);
  });

  test('says nothing where the store has its AIO context', async () => {
    const stream = migrationStream(memory, [[2, 3]]);
    expect((await migrateThroughPair(b, a, stream)).received.equals(stream)).toBe(true);
    for (const site of [a, b]) expect(notes(site)).toHaveLength(1);
  });
});
