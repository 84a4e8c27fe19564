/**
 * The store's pages moved with O_DIRECT (src/store/direct-pages.ts, native/pageio.c): writes queued to
 * a thread, stream reads read ahead. What must hold is what the page cache gave for free: a read sees
 * every write before it, and a write that fails is never claimed.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { DIGEST_BYTES, digestOne } from '../src/digest';
import { PageStore, PAGES_FILE, type StoreLayout } from '../src/store';
import { isNoSpace } from '../src/gateway/store-space';
import { DirectPages } from '../src/store/direct-pages';
import { canMountTmpfs, requireInCi } from './mounts';
import { TestStores } from './test-stores';

const PAGE = 4096;
let tmp: string;
const stores = new TestStores();

beforeEach(() => {
  tmp = stores.dir('bfmig-direct-');
});

function open(root: string, options?: Parameters<typeof PageStore.open>[2]): PageStore {
  return stores.open(root, 'vm1', options);
}

function layout(pageCount: number): StoreLayout {
  return { pageSize: PAGE, pageCount, layoutId: 'L1', layout: { blocks: [{ name: 'pc.ram', length: pageCount * PAGE }] } };
}

const page = Buffer.alloc(PAGE);
const digest = Buffer.alloc(DIGEST_BYTES);

/** Stores page i with content unique to (i, generation). */
function put(store: PageStore, i: number, generation: number): void {
  page.fill(0);
  page.writeUInt32LE(i, 0);
  page.writeUInt32LE(generation, 4);
  page.fill(generation & 0xff, 8, 64);
  digestOne(page, 0, PAGE, digest, 0);
  store.writePage(i, page, 0, digest, 0);
}

/** Which (index, generation) a read page holds. */
function identify(buf: Buffer, at: number): [number, number] {
  return [buf.readUInt32LE(at), buf.readUInt32LE(at + 4)];
}

function directOrSkip(store: PageStore): boolean {
  return requireInCi(store.directIo, `O_DIRECT on the filesystem of ${os.tmpdir()}`);
}

test('pages rewritten while earlier writes are still queued read back as their last version, in and out of stream order', () => {
  const pages = 3000; // about 12 MiB: more than the write queue and the read-ahead hold
  const direct = open(path.join(tmp, 'direct'));
  const cached = open(path.join(tmp, 'cached'), { directIo: false });
  expect(cached.directIo).toBe(false);
  for (const store of [direct, cached]) {
    store.begin(layout(pages));
    for (let generation = 1; generation <= 3; generation++) {
      for (let i = 0; i < pages; i += generation) put(store, i, generation);
    }
  }
  const want = (i: number): number => (i % 3 === 0 ? 3 : i % 2 === 0 ? 2 : 1);
  // A destination offset that is not 4 KiB aligned takes the native bounce buffer.
  const buf = Buffer.alloc(250 * PAGE + 7);
  for (const store of [direct, cached]) {
    const seen: string[] = [];
    for (let i = 0; i < pages; i += 250) {
      const n = Math.min(250, pages - i);
      store.readPages(i, n, buf, 7);
      for (let k = 0; k < n; k++) {
        const [index, generation] = identify(buf, 7 + k * PAGE);
        if (index !== i + k || generation !== want(i + k)) seen.push(`${i + k}: ${index}/${generation}`);
      }
    }
    for (const i of [2999, 5, 1777, 0]) {
      store.readPages(i, 1, buf, 0, false);
      expect(identify(buf, 0)).toEqual([i, want(i)]);
    }
    expect(seen).toEqual([]);
    store.commit('s1');
    expect(store.verify()).toEqual([]);
  }
  directOrSkip(direct);
  // Both ways leave the same bytes on disk.
  direct.close();
  cached.close();
  const a = fs.readFileSync(path.join(tmp, 'direct', 'vm1', PAGES_FILE));
  const b = fs.readFileSync(path.join(tmp, 'cached', 'vm1', PAGES_FILE));
  expect(a.equals(b)).toBe(true);
  const again = open(path.join(tmp, 'direct'));
  expect(again.snapshotId()).toBe('s1');
  expect(again.verify()).toEqual([]);
});

test('stretches of pages written interleaved, as multifd channels write them, more of them than runs stay open, read back as their last version', () => {
  const stretches = 12; // more than the runs a store keeps open
  const perStretch = 300; // more than a run holds
  const pages = stretches * perStretch;
  const direct = open(path.join(tmp, 'direct'));
  const cached = open(path.join(tmp, 'cached'), { directIo: false });
  const last = new Array<number>(pages).fill(0);
  for (const store of [direct, cached]) store.begin(layout(pages));
  const write = (i: number, generation: number): void => {
    for (const store of [direct, cached]) put(store, i, generation);
    last[i] = generation;
  };
  const buf = Buffer.alloc(8 * PAGE);
  const seen: string[] = [];
  const check = (store: PageStore, i: number, n: number): void => {
    store.readPages(i, n, buf, 0, false);
    for (let k = 0; k < n; k++) {
      const [index, generation] = identify(buf, k * PAGE);
      if (index !== i + k || generation !== last[i + k]) seen.push(`${i + k}: ${index}/${generation}, not ${last[i + k]}`);
    }
  };
  let x = 7;
  const rand = (n: number): number => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return Math.floor(((x >>> 0) / 2 ** 32) * n);
  };
  for (let generation = 1; generation <= 2; generation++) {
    const next = Array.from({ length: stretches }, () => 0);
    // Each turn one stretch gets its next few pages (a chunk of one channel), now and then a page
    // already written elsewhere is written again, and now and then pages written (some still waiting in a run) are read.
    while (next.some((n) => n < perStretch)) {
      const s = rand(stretches);
      for (let k = 0; k < 1 + rand(24) && next[s] < perStretch; k++) write(s * perStretch + next[s]++, generation);
      if (rand(4) === 0) write(rand(pages), generation + 10);
      if (rand(8) === 0) {
        const i = rand(pages - 8);
        if (last.slice(i, i + 8).every((g) => g > 0)) for (const store of [direct, cached]) check(store, i, 8);
      }
    }
  }
  for (const store of [direct, cached]) {
    for (let i = 0; i < pages; i += 8) check(store, i, Math.min(8, pages - i));
    store.commit('s1');
    expect(store.verify()).toEqual([]);
  }
  expect(seen).toEqual([]);
  directOrSkip(direct);
  direct.close();
  cached.close();
  expect(fs.readFileSync(path.join(tmp, 'direct', 'vm1', PAGES_FILE)).equals(fs.readFileSync(path.join(tmp, 'cached', 'vm1', PAGES_FILE)))).toBe(true);
});

test('packets read strided, as a back leg’s multifd channels read their Runs, read back as their last version, pages rewritten after they were read ahead too', () => {
  const packet = 128;
  const packets = 64; // 32 MiB
  const channels = 4;
  const store = open(path.join(tmp, 'direct'));
  store.begin(layout(packets * packet));
  const last = new Array<number>(packets * packet).fill(1);
  for (let i = 0; i < last.length; i++) put(store, i, 1);
  const buf = Buffer.alloc(packet * PAGE);
  const seen: string[] = [];
  let reads = 0;
  // Each channel reads a burst of its packets (every 4th), then the next channel; now and then a page
  // of a packet the reader has just fetched ahead (two strides on) is written again.
  for (let burst = 0; burst * 6 * channels < packets; burst++) {
    for (let c = 0; c < channels; c++) {
      for (let b = 0; b < 6; b++) {
        const k = (burst * 6 + b) * channels + c;
        if (k >= packets) continue;
        store.readPages(k * packet, packet, buf, 0);
        for (let p = 0; p < packet; p++) {
          const [index, generation] = identify(buf, p * PAGE);
          if (index !== k * packet + p || generation !== last[k * packet + p]) seen.push(`${k * packet + p}: ${index}/${generation}, not ${last[k * packet + p]}`);
        }
        const ahead = (k + 2 * channels) * packet + (reads++ % packet);
        if (reads % 3 === 0 && ahead < last.length) {
          put(store, ahead, 2 + reads);
          last[ahead] = 2 + reads;
        }
      }
    }
  }
  expect(seen).toEqual([]);
  directOrSkip(store);
});

/**
 * A store moving pages with O_DIRECT that holds generation 1 of `pages` pages as snapshot s1, in a new
 * migration; null where O_DIRECT is not to be had (outside CI).
 */
function directStoreHolding(pages: number): PageStore | null {
  const store = open(tmp);
  store.begin(layout(pages));
  if (!directOrSkip(store)) return null;
  for (let i = 0; i < pages; i++) put(store, i, 1);
  store.commit('s1');
  store.begin(layout(pages));
  return store;
}

/** A store holding generation 1 of every page, the generation each page holds now (`last`), and a way to write a new one. */
function rewritableStore(pages: number): { store: PageStore; last: Uint32Array; rewrite: (i: number, generation: number) => void } | null {
  const store = directStoreHolding(pages);
  if (store === null) return null;
  const last = new Uint32Array(pages).fill(1);
  const rewrite = (i: number, generation: number): void => {
    put(store, i, generation);
    last[i] = generation;
  };
  return { store, last, rewrite };
}

test('a page written after the reader fetched it ahead is read back new', () => {
  const pages = 2048; // 8 MiB
  const store = directStoreHolding(pages);
  if (store === null) return;
  const buf = Buffer.alloc(64 * PAGE);
  // Stream reads, each using what was read ahead of it: the read-ahead grows to the megabytes after them.
  for (let first = 0; first < 256; first += 64) store.readPages(first, 64, buf, 0);
  // Pages in the windows now read ahead, rewritten (one through the coalescing buffer, one as a run).
  put(store, 300, 2);
  for (let i = 500; i < 520; i++) put(store, i, 2);
  put(store, 900, 2);
  store.readPages(256, 64, buf, 0); // flushes nothing of the rewrites: they are ahead of it
  const out = Buffer.alloc(PAGE);
  for (const [i, generation] of [[300, 2], [301, 1], [499, 1], [500, 2], [519, 2], [520, 1], [900, 2], [1200, 1]]) {
    store.readPages(i, 1, out, 0);
    expect(identify(out, 0)).toEqual([i, generation]);
  }
  store.commit('s2');
  expect(store.verify()).toEqual([]);
});

test('a stream read a page at a time, hundreds of KiB apart, costs the device little more than its pages', () => {
  // A first leg's stream reads: pages QEMU sent again unchanged, a Delta's base of its own version.
  const pages = 2048; // 8 MiB
  const file = versionedFile('sparse-stream', pages);
  if (file === null) return;
  const { direct, wrongAt } = file;
  try {
    const out = Buffer.alloc(PAGE);
    const wrong: string[] = [];
    const before = direct.deviceReadBytes;
    let reads = 0;
    for (let i = 0; i < pages; i += 100, reads++) {
      direct.read(out, 0, PAGE, i * PAGE, true);
      const wrongHere = wrongAt(out, 0, i);
      if (wrongHere !== null) wrong.push(wrongHere);
    }
    direct.drain(); // any read-ahead started meanwhile finishes, and is counted
    expect(wrong).toEqual([]);
    // Reading the 4 MiB after each read (as the store did) cost the device the whole file.
    expect(direct.deviceReadBytes - before).toBeLessThanOrEqual(20 * reads * PAGE);
  } finally {
    direct.close();
  }
});

test('a stream read in order through the file is read ahead: the device reads each byte once, the caller waits for hardly any of it', () => {
  const pages = 2048; // 8 MiB
  const file = versionedFile('whole-stream', pages);
  if (file === null) return;
  const { direct, wrongAt } = file;
  try {
    const READ = 24; // pages: 96 KiB, so that reads straddle what each buffer read ahead holds
    const out = Buffer.alloc(READ * PAGE);
    const wrong: string[] = [];
    const before = direct.deviceReadBytes;
    const callerBefore = direct.callerReadBytes;
    for (let first = 0; first < pages; first += READ) {
      const count = Math.min(READ, pages - first);
      direct.read(out, 0, count * PAGE, first * PAGE, true);
      for (let k = 0; k < count; k++) {
        const wrongHere = wrongAt(out, k * PAGE, first + k);
        if (wrongHere !== null) wrong.push(wrongHere);
      }
    }
    direct.drain();
    expect(wrong).toEqual([]);
    expect(direct.deviceReadBytes - before).toBe(pages * PAGE);
    expect(direct.callerReadBytes - callerBefore).toBeLessThanOrEqual((pages * PAGE) / 16);
  } finally {
    direct.close();
  }
});

/**
 * A pages file moved by DirectPages alone, every page written at version 1: page i holds i and its
 * version in its first bytes, the version's low byte after them. write() writes pages at their version
 * (a write buffer each); wrongAt() says how a page read at out[at…] differs from page i's version.
 */
function versionedFile(name: string, pages: number): { direct: DirectPages; version: Uint32Array; write: (which: number[]) => void; wrongAt: (out: Buffer, at: number, i: number) => string | null } | null {
  const file = path.join(tmp, name);
  fs.writeFileSync(file, Buffer.alloc(0));
  const direct = DirectPages.open(file, pages * PAGE);
  if (!requireInCi(direct !== null, `O_DIRECT on the filesystem of ${os.tmpdir()}`) || direct === null) return null;
  const version = new Uint32Array(pages).fill(1);
  const write = (which: number[]): void => {
    for (const i of which) {
      const index = direct.acquire();
      const buffer = direct.writeBuffers[index];
      buffer.fill(version[i] & 0xff, 0, PAGE);
      buffer.writeUInt32LE(i, 0);
      buffer.writeUInt32LE(version[i], 4);
      direct.submit(index, PAGE, i * PAGE);
    }
  };
  const wrongAt = (out: Buffer, at: number, i: number): string | null =>
    out.readUInt32LE(at) === i && out.readUInt32LE(at + 4) === version[i] && out[at + PAGE - 1] === (version[i] & 0xff) ? null : `page ${i}: ${out.readUInt32LE(at)}/${out.readUInt32LE(at + 4)}, want version ${version[i]}`;
  write([...Array(pages).keys()]);
  direct.drain();
  return { direct, version, write, wrongAt };
}

/** Who reads the lone pages and ranges prefetched: the kernel's AIO (as shipped, where the kernel has it) or the reader pool. */
const READERS_AHEAD: Array<[string, string | undefined]> = [
  ['the kernel (AIO)', undefined],
  ['the reader pool', '0'],
];

describe.each(READERS_AHEAD)('pages read ahead by %s', (_readers, aioSetting) => {
  beforeEach(() => {
    if (aioSetting === undefined) delete process.env.BFMIG_STORE_AIO;
    else process.env.BFMIG_STORE_AIO = aioSetting;
  });
  afterEach(() => {
    delete process.env.BFMIG_STORE_AIO;
  });

  test('pages written all over the file, some again while their last write is queued, hold their last version, read back and on disk', () => {
    // A back leg's changed pages: a write of one page each, which the write thread sends to the device
    // side by side where the kernel has AIO, and one after another where the setting says not.
    const pages = 4096;
    const file = versionedFile('scattered', pages);
    if (file === null) return;
    const { direct, version, write, wrongAt } = file;
    try {
      let seed = 7;
      const random = (): number => (seed = (seed * 1103515245 + 12345) % 2147483648) % pages;
      for (let round = 2; round < 6; round++) {
        const which = Array.from({ length: 600 }, random);
        // Some pages twice in a row, and some again a few writes later: overlapping writes in the queue.
        for (let k = 0; k < which.length; k += 10) which.splice(k + 1, 0, which[k]);
        for (let k = 0; k + 3 < which.length; k += 25) which.splice(k + 3, 0, which[k]);
        for (const i of which) version[i] = round * 1000 + (version[i] % 1000) + 1;
        write(which);
        const wrong: string[] = [];
        const out = Buffer.alloc(PAGE);
        for (const i of new Set(which)) {
          direct.read(out, 0, PAGE, i * PAGE, false);
          const wrongHere = wrongAt(out, 0, i);
          if (wrongHere !== null) wrong.push(wrongHere);
        }
        expect(wrong).toEqual([]);
      }
      direct.drain();
      const onDisk = fs.readFileSync(path.join(tmp, 'scattered'));
      const wrong: string[] = [];
      for (let i = 0; i < pages; i++) {
        const wrongHere = wrongAt(onDisk, i * PAGE, i);
        if (wrongHere !== null) wrong.push(wrongHere);
      }
      expect(wrong).toEqual([]);
    } finally {
      direct.close();
    }
  });

  test('lone pages are read by whom the setting says, and read back as written, also when rewritten while being read', () => {
    const pages = 256; // more than the lone-page slots (128)
    const file = versionedFile('lone', pages);
    if (file === null) return;
    const { direct, version, write, wrongAt } = file;
    try {
      if (aioSetting === '0') expect(direct.kernelReads).toBe(false);
      else if (!requireInCi(direct.kernelReads, 'the kernel’s asynchronous I/O (io_setup)')) return;
      // Not asked for, or had: nothing for the gateway to say (it logs a refusal).
      expect(direct.kernelReadsRefused).toBe(false);
      const order = [...Array(pages).keys()].map((k) => (k * 97) % pages); // no read-ahead guesses it
      for (let round = 2; round < 5; round++) {
        const queued = direct.prefetch(Float64Array.from(order, (i) => i * PAGE), pages);
        expect(queued).toBeGreaterThan(0);
        expect(queued).toBeLessThanOrEqual(128);
        // Rewritten after the prefetch: their reads may be under way and must not be served.
        const rewritten = order.filter((_, k) => k % 5 === round % 5);
        for (const i of rewritten) version[i] = round;
        write(rewritten);
        const wrong: string[] = [];
        const out = Buffer.alloc(PAGE);
        for (const i of order) {
          direct.read(out, 0, PAGE, i * PAGE, false);
          const wrongHere = wrongAt(out, 0, i);
          if (wrongHere !== null) wrong.push(wrongHere);
        }
        expect(wrong).toEqual([]);
      }
    } finally {
      direct.close();
    }
  });

  test('lone pages prefetched read back as their last version: rewritten before the prefetch, after it, in an open run, queued, or on disk', () => {
    const pages = 4000; // more than the prefetch pool holds (128) and the write queue (16 MiB)
    const held = rewritableStore(pages);
    if (held === null) return;
    const { store, last, rewrite } = held;
    // A scattered set of pages, in an order no read-ahead guesses.
    const scattered = (seed: number, n: number): Uint32Array => {
      const out = new Uint32Array(n);
      for (let k = 0, x = seed; k < n; k++) out[k] = x = (x * 2654435761 + 12345) % pages;
      return out;
    };
    const out = Buffer.alloc(PAGE);
    const check = (list: Uint32Array): void => {
      const wrong: string[] = [];
      for (const i of list) {
        store.readPages(i, 1, out, 0, false);
        const [index, generation] = identify(out, 0);
        if (index !== i || generation !== last[i]) wrong.push(`${i}: ${index}/${generation}, want ${last[i]}`);
      }
      expect(wrong).toEqual([]);
    };
    for (let round = 0; round < 6; round++) {
      const list = scattered(round + 1, 300);
      // Some pages rewritten before the prefetch (queued, or still in an open run), some after it.
      for (let k = 0; k < list.length; k += 5) rewrite(list[k], 10 + round);
      store.prefetchPages(list.slice(), list.length); // a copy: prefetchPages compacts its argument
      for (let k = 2; k < list.length; k += 7) rewrite(list[k], 20 + round);
      // Enough stream writes to flush the open runs and queue them behind the prefetch.
      for (let i = round * 600; i < round * 600 + 600; i++) if (i % 3 === round % 3) rewrite(i, 30 + round);
      check(list);
      // Read again, now that every prefetched page has been taken or dropped.
      check(list.subarray(0, 50));
    }
    store.commit('s2');
    expect(store.verify()).toEqual([]);
  });

  test('ranges prefetched read back as their last version: rewritten before the prefetch, after it, in an open run, queued, or on disk', () => {
    const pages = 16384; // 64 MiB: more than the range slots hold (32 MiB) and the write queue
    const held = rewritableStore(pages);
    if (held === null) return;
    const { store, last, rewrite } = held;
    const RANGE = 128; // a multifd packet's pages
    const ranges = pages / RANGE;
    const buf = Buffer.alloc(RANGE * PAGE);
    const check = (first: number, count: number): string[] => {
      store.readPages(first, count, buf, 0);
      const wrong: string[] = [];
      for (let k = 0; k < count; k++) {
        const [index, generation] = identify(buf, k * PAGE);
        if (index !== first + k || generation !== last[first + k]) wrong.push(`${first + k}: ${index}/${generation}, want ${last[first + k]}`);
      }
      return wrong;
    };
    for (let round = 0; round < 4; round++) {
      // Every 5th range in turn from a place of its own, as the Runs of a back leg's channels come.
      const order = Array.from({ length: 24 }, (_, k) => ((round * 7 + k * 5) % ranges) * RANGE);
      for (const first of order.filter((_, k) => k % 4 === 0)) rewrite(first + 3, 10 + round); // before the prefetch
      // A whole write buffer's worth (1 MiB) rewritten just before the prefetch: queued, or being written,
      // as two of the ranges are asked for.
      const stretch = order[1] - (order[1] % 256);
      for (let i = stretch; i < stretch + 257; i++) rewrite(i, 40 + round);
      const starts = Uint32Array.from(order);
      store.prefetchRanges(starts, new Uint32Array(order.length).fill(RANGE), order.length);
      // After it: a page in a range being read or read already, one past the middle, and stream writes
      // enough to flush the open runs and queue them behind the prefetch.
      for (const first of order.filter((_, k) => k % 3 === 1)) rewrite(first + 64, 20 + round);
      for (let i = round * 900; i < round * 900 + 900; i++) if (i % 4 === round % 4) rewrite(i, 30 + round);
      const wrong: string[] = [];
      // Read whole, and in two pieces (a Run of a packet with a gap in it).
      order.forEach((first, k) => {
        if (k % 2 === 0) wrong.push(...check(first, RANGE));
        else wrong.push(...check(first, 40), ...check(first + 50, RANGE - 50));
      });
      expect(wrong).toEqual([]);
    }
    store.commit('s2');
    expect(store.verify()).toEqual([]);
  });

  test('ranges rewritten while the reads ahead of them are under way read back as written', () => {
    const pages = 1024; // 4 MiB: eight ranges of 512 KiB
    const file = versionedFile('ranges', pages);
    if (file === null) return;
    const { direct, version, write, wrongAt } = file;
    try {
      const RANGE = 128; // pages: 512 KiB
      const starts = [5, 2, 7, 0, 3, 6, 1, 4].map((r) => r * RANGE); // the channels' Runs, in turn
      for (let round = 2; round < 5; round++) {
        const queued = direct.prefetchRanges(Float64Array.from(starts, (p) => p * PAGE), new Float64Array(starts.length).fill(RANGE * PAGE), starts.length);
        expect(queued).toBe(starts.length);
        // A page of every other range rewritten at once: its read may be under way and must not be served.
        const rewritten = starts.filter((_, k) => k % 2 === round % 2).map((p) => p + 17 * round);
        for (const i of rewritten) version[i] = round;
        write(rewritten);
        const wrong: string[] = [];
        const out = Buffer.alloc(RANGE * PAGE);
        for (const first of starts) {
          direct.read(out, 0, RANGE * PAGE, first * PAGE, false);
          for (let k = 0; k < RANGE; k++) {
            const wrongHere = wrongAt(out, k * PAGE, first + k);
            if (wrongHere !== null) wrong.push(wrongHere);
          }
        }
        expect(wrong).toEqual([]);
      }
    } finally {
      direct.close();
    }
  });

  test('stream reads that ranges read ahead serve cost the device those ranges and no more; one a range holds only the start of is read in two', () => {
    const pages = 2048; // 8 MiB: room after each range for the stream read-ahead it must not start
    const file = versionedFile('served', pages);
    if (file === null) return;
    const { direct, wrongAt } = file;
    try {
      const RANGE = 64; // pages: 256 KiB, a stream read large enough to have started read-ahead of its own
      const starts = [1024, 0, 1536, 512]; // the channels' Runs, in turn
      const before = direct.deviceReadBytes;
      direct.prefetchRanges(Float64Array.from([...starts, 1800], (p) => p * PAGE), Float64Array.from([...starts.map(() => RANGE), 16], (n) => n * PAGE), starts.length + 1);
      const wrong: string[] = [];
      const out = Buffer.alloc(RANGE * PAGE);
      const read = (first: number, count: number): void => {
        direct.read(out, 0, count * PAGE, first * PAGE, true);
        for (let k = 0; k < count; k++) {
          const wrongHere = wrongAt(out, k * PAGE, first + k);
          if (wrongHere !== null) wrong.push(wrongHere);
        }
      };
      for (const first of starts) read(first, RANGE);
      // A Run reaching past what was read ahead for it: 16 pages from its range, 16 read there and then.
      read(1800, 32);
      direct.drain(); // any read-ahead started meanwhile finishes, and is counted
      expect(wrong).toEqual([]);
      expect(direct.deviceReadBytes - before).toBe((starts.length * RANGE + 16 + 16) * PAGE);
    } finally {
      direct.close();
    }
  });
});


/** A store of `pages` pages holding the even ones (generation 1), mid-migration; null where O_DIRECT is not to be had. */
function storeHoldingEvenPages(pages: number): PageStore | null {
  const store = open(tmp);
  store.begin(layout(pages));
  if (!directOrSkip(store)) return null;
  for (let i = 0; i < pages; i += 2) put(store, i, 1);
  return store;
}

/** Runs `check` on the direct I/O of an empty file: any position is past its end. */
function onEmptyDirectFile(check: (direct: DirectPages) => void): void {
  fs.writeFileSync(path.join(tmp, 'raw'), '');
  const direct = DirectPages.open(path.join(tmp, 'raw'), 0);
  expect(direct).not.toBeNull();
  if (direct === null) return;
  try {
    check(direct);
  } finally {
    direct.close();
  }
}

test('prefetching ranges absent, past the end or off a page boundary does no harm, and a bad argument throws', () => {
  const store = storeHoldingEvenPages(512);
  if (store === null) return;
  // Past the store's pages (cut, or passed over), of no pages, and the odd pages never written.
  store.prefetchRanges(Uint32Array.from([0, 480, 600, 10]), Uint32Array.from([128, 128, 4, 0]), 4);
  const out = Buffer.alloc(64 * PAGE);
  store.readPages(480, 1, out, 0, false);
  expect(identify(out, 0)).toEqual([480, 1]);
  expect(() => store.readPages(3, 1, out, 0, false)).toThrow(/absent/);
  onEmptyDirectFile((direct) => {
    // Not a 4 KiB boundary, negative, of no length, past the end of the file: skipped; a count past either array: refused.
    expect(direct.prefetchRanges(Float64Array.from([4095, -4096, 0, 8192]), Float64Array.from([4096, 4096, 0, 4096]), 4)).toBe(0);
    expect(() => direct.prefetchRanges(new Float64Array(3), new Float64Array(2), 3)).toThrow(/pageioPrefetchRanges/);
  });
});

test('prefetching pages absent, out of range or off a page boundary does no harm, and a bad argument throws', () => {
  const store = storeHoldingEvenPages(64);
  if (store === null) return;
  store.prefetchPages(Uint32Array.from([1, 3, 5, 1000, 2, 4]), 6);
  const out = Buffer.alloc(PAGE);
  store.readPages(2, 1, out, 0, false);
  expect(identify(out, 0)).toEqual([2, 1]);
  expect(() => store.readPages(3, 1, out, 0, false)).toThrow(/absent/);
  onEmptyDirectFile((direct) => {
    // Not a 4 KiB boundary, negative, past the end of the file: skipped; a count past the array: refused.
    expect(direct.prefetch(Float64Array.from([4095, -4096, 8192]), 3)).toBe(0);
    expect(() => direct.prefetch(new Float64Array(2), 3)).toThrow(/pageioPrefetch/);
  });
});

const MOUNT = canMountTmpfs();
(MOUNT ? test : test.skip)('a queued write that fails leaves its pages absent, names ENOSPC, and the store verifies', () => {
  const mounted = path.join(tmp, 'small');
  fs.mkdirSync(mounted);
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', mounted]);
  try {
    const store = open(mounted);
    const pages = 1024; // 4 MiB of pages into a 2 MiB filesystem
    store.begin(layout(pages));
    let failure: unknown = null;
    try {
      for (let i = 0; i < pages; i++) put(store, i, 1);
      store.commit('full');
    } catch (err) {
      failure = err;
    }
    expect(failure).toBeInstanceOf(Error);
    expect(isNoSpace(failure)).toBe(true);
    expect(String((failure as Error).message)).toMatch(/no space left on device/i);
    // Later queued writes fail too; abort() reports them (the store then stays "dirty" for open() to repair).
    try {
      store.abort();
    } catch (err) {
      expect(isNoSpace(err)).toBe(true);
    }
    expect(store.snapshotId()).toBeNull();
    try {
      store.close(); // closes the files even when its last attempt to persist fails
    } catch (err) {
      expect(isNoSpace(err)).toBe(true);
    }
    // Opening repairs the store, which needs room to write its digests.
    execFileSync('mount', ['-o', 'remount,size=16m', mounted]);
    const reopened = open(mounted);
    expect(reopened.snapshotId()).toBeNull();
    const held = reopened.meta()?.presentPages ?? 0;
    expect(held).toBeLessThan(pages);
    // Every page the store still claims holds exactly what its digest says.
    expect(reopened.verify()).toEqual([]);
  } finally {
    stores.closeAll();
    execFileSync('umount', ['-l', mounted]);
  }
});

test('closing hands the write queue’s buffers back at once: JavaScript sees them emptied', () => {
  const file = path.join(tmp, 'pages');
  fs.writeFileSync(file, Buffer.alloc(0));
  const direct = DirectPages.open(file, 0);
  if (!requireInCi(direct !== null, `O_DIRECT on the filesystem of ${os.tmpdir()}`)) {
    return;
  }
  const buffers = (direct as DirectPages).writeBuffers;
  expect(buffers.length).toBeGreaterThan(0);
  for (const b of buffers) expect(b.byteLength).toBeGreaterThanOrEqual(PAGE);
  const index = (direct as DirectPages).acquire();
  buffers[index].fill(7, 0, PAGE);
  (direct as DirectPages).submit(index, PAGE, 0);
  (direct as DirectPages).close();
  // Detached, not left to the GC: no view can reach freed memory, and the 4 MiB go back now.
  for (const b of buffers) expect(b.byteLength).toBe(0);
  expect(fs.readFileSync(file).subarray(0, PAGE).equals(Buffer.alloc(PAGE, 7))).toBe(true);
});
