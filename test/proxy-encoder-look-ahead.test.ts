/**
 * StreamEncoder.lookAhead: a read the gateway holds back until the next one comes has its changed pages'
 * held versions read ahead before the read before it is encoded, and is encoded exactly as without it.
 */
import * as digest from '../src/digest';
import { DIGEST_BYTES } from '../src/digest';
import { guestMemory, migrationStream, dirty, PAGE } from '../src/lab/harness/migration-stream';
import { StreamParser } from '../src/qemu/parser';
import { RecordKind } from '../src/qemu/records';
import { StreamEncoder } from '../src/proxy/encoder';
import type { RetainedPages } from '../src/proxy/retained';

const memory = guestMemory([['pc.ram', 900], ['vga.vram', 64]], 21, 0.2);
const pageCount = memory.pages.length;
const changed = new Set(dirty(memory, 0.1, 22));
// A back leg: the bulk round, then a round over some of the pages again.
const stream = migrationStream(memory, [dirty(memory, 0.02, 23)]);

/**
 * A store holding every page at the version of `memory` but the `changed` ones (held at another
 * version), recording each read ahead with the number of pushes begun by then.
 */
function heldStore(pushesBegun: () => number): { store: RetainedPages; prefetchedAt: Map<number, number>; reads: number[] } {
  const digests = new Uint8Array(pageCount * DIGEST_BYTES);
  for (let i = 0; i < pageCount; i++) {
    if (changed.has(i)) digests.fill(0x5a, i * DIGEST_BYTES, (i + 1) * DIGEST_BYTES);
    else digest.digestContiguous(memory.pages[i], 0, 1, PAGE, digests, i * DIGEST_BYTES);
  }
  const saved = new Set<number>();
  const prefetchedAt = new Map<number, number>();
  const reads: number[] = [];
  const store: RetainedPages = {
    begin: () => undefined,
    digests,
    writePage: (index, _src, _at, d, dAt) => {
      saved.add(index);
      digests.set(d.subarray(dAt, dAt + DIGEST_BYTES), index * DIGEST_BYTES);
    },
    markAbsent: (index) => void digests.fill(0, index * DIGEST_BYTES, (index + 1) * DIGEST_BYTES),
    readPages: (index) => void reads.push(index),
    readsBeforeWrite: (index) => !saved.has(index),
    prefetchPages: (indices, count) => {
      for (let i = 0; i < count; i++) if (!prefetchedAt.has(indices[i])) prefetchedAt.set(indices[i], pushesBegun());
    },
  };
  return { store, prefetchedAt, reads };
}

/** The encoder's output, Literal bytes and Runs tagged, as one buffer. */
function encode(reads: Buffer[], holdBack: boolean): { out: Buffer; prefetchedAt: Map<number, number> } {
  let pushes = 0;
  const { store, prefetchedAt } = heldStore(() => pushes);
  const out: Buffer[] = [];
  const encoder: StreamEncoder = new StreamEncoder(
    { literal: (b) => void out.push(Buffer.from('L'), Buffer.from(b)), run: (b) => void out.push(Buffer.from('R'), Buffer.from(b)) },
    store,
    () => {
      encoder.reference = store.digests;
    },
  );
  const push = (read: Buffer): void => {
    pushes++;
    encoder.push(read);
  };
  let held: Buffer | null = null;
  for (const read of reads) {
    if (!holdBack) {
      push(read);
      continue;
    }
    // As a sending gateway does: walk the new read, encode the one held, walk the new one if it could not before.
    encoder.lookAhead(read, held);
    if (held !== null) push(held);
    encoder.lookAhead(read, null);
    held = read;
  }
  if (held !== null) push(held);
  encoder.end();
  return { out: Buffer.concat(out), prefetchedAt };
}

/**
 * For each changed page: the number of the read its record ends in (its data whole in that read, or
 * begun in the read before), and how many of them straddle two reads.
 */
function changedPagesByRead(reads: Buffer[]): { readOf: Map<number, number>; straddling: number } {
  const readOf = new Map<number, number>();
  let straddling = 0;
  let current = -1;
  let readBuffer: Buffer | null = null;
  const parser = new StreamParser((r) => {
    // Only the bulk round: a page sent again was saved by the undo journal the first time.
    if (r.kind !== RecordKind.RamPage || !changed.has(r.pageIndex) || readOf.has(r.pageIndex)) return;
    readOf.set(r.pageIndex, current);
    if (r.data !== readBuffer) straddling++;
  });
  reads.forEach((read, i) => {
    current = i;
    readBuffer = read;
    parser.push(read);
  });
  parser.end();
  return { readOf, straddling };
}

describe('StreamEncoder.lookAhead', () => {
  const cut = (size: number): Buffer[] => {
    const reads: Buffer[] = [];
    for (let at = 0; at < stream.length; at += size) reads.push(Buffer.from(stream.subarray(at, at + size)));
    return reads;
  };

  test.each([64 * 1024, 256 * 1024])('reads of %d bytes: a changed page is read ahead before the read before its own is encoded, one that two reads hold too', (size) => {
    const reads = cut(size);
    const { prefetchedAt } = encode(reads, true);
    const { readOf: byRead, straddling } = changedPagesByRead(reads);
    expect(byRead.size).toBeGreaterThan(60);
    // Among them pages whose data two reads hold, read ahead as well.
    expect(straddling).toBeGreaterThan(0);
    // Read ahead while the reads before read i were being encoded (all but the one just before it), from
    // the third read on (the walk starts at the first page record the parser reads, in the first).
    const late = [...byRead].filter(([page, i]) => i >= 2 && !((prefetchedAt.get(page) ?? Infinity) <= i - 1));
    expect(late).toEqual([]);
    expect([...byRead].filter(([, i]) => i >= 2).length).toBeGreaterThan(byRead.size * 0.7);
    // Without holding reads back, the same pages are read ahead only once their own read is parsed.
    const { prefetchedAt: withoutHolding } = encode(reads, false);
    expect([...byRead].filter(([page, i]) => (withoutHolding.get(page) ?? Infinity) <= i - 1)).toEqual([]);
  });

  test('a page digested ahead is not digested again when its read is encoded (but for one that two reads hold)', () => {
    const reads = cut(256 * 1024);
    // Pages whose data two reads hold: digested to be read ahead, and again as the parser puts them together.
    let straddling = 0;
    let current: Buffer | null = null;
    const parser = new StreamParser((r) => void (straddling += r.kind === RecordKind.RamPage && r.data !== current ? 1 : 0));
    for (const read of reads) {
      current = read;
      parser.push(read);
    }
    parser.end();
    const one = jest.spyOn(digest, 'digestOne');
    const batch = jest.spyOn(digest, 'digestPages');
    const pagesDigested = (holdBack: boolean): number => {
      one.mockClear();
      batch.mockClear();
      encode(reads, holdBack);
      return one.mock.calls.length + batch.mock.calls.reduce((n, call) => n + Number(call[2]), 0);
    };
    const without = pagesDigested(false);
    const withLookAhead = pagesDigested(true);
    jest.restoreAllMocks();
    expect(without).toBeGreaterThan(pageCount * 0.75); // every page record of the bulk round (a fifth are zero), and the round after it
    expect(straddling).toBeLessThan(reads.length);
    expect(withLookAhead).toBeLessThanOrEqual(without + straddling);
  });

  test('the stream is encoded byte for byte as without it, in reads that cut records anywhere', () => {
    const sizes = [1000, 4100, 64 * 1024 + 17, 256 * 1024];
    const plain = encode(cut(256 * 1024), false).out;
    for (const size of sizes) {
      const reads = cut(size);
      expect(encode(reads, true).out.equals(encode(reads, false).out)).toBe(true);
    }
    // Runs stand for the held pages: the output is much smaller than the stream.
    expect(plain.length).toBeLessThan(stream.length * 0.5);
  });
});
