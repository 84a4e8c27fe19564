import { randomBytes } from 'node:crypto';
import { createXXHash128, xxhash128, xxhash3, type IHasher } from 'hash-wasm';
import {
  DIGEST_BYTES,
  availableDigestVariants,
  digestContiguous,
  digestHex,
  digestOne,
  digestPages,
  digestVariant,
  selectDigestVariant,
  StreamHash,
  zeroPageDigest,
} from '../src/digest';

const PAGE = 4096;

/** Independent implementation: hash-wasm's XXH3-128 (seed 0), canonical hex. */
let ref: IHasher;
function refHex(data: Uint8Array): string {
  return ref.init().update(data).digest('hex');
}

function oneHex(data: Uint8Array, start = 0, len = data.length - start): string {
  const out = new Uint8Array(DIGEST_BYTES);
  digestOne(data, start, len, out, 0);
  return digestHex(out);
}

function pattern(len: number, f: (i: number) => number): Buffer {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = f(i) & 0xff;
  return b;
}

/** Deterministic xorshift so failures are reproducible. */
function prng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s;
  };
}

// Each variant (AVX2 / SSE2 kernel) is exercised by every correctness test.
const variants = availableDigestVariants();

beforeAll(async () => {
  ref = await createXXHash128();
});

afterAll(() => {
  selectDigestVariant('auto');
});

describe('digest addon', () => {
  test('exports and variants', () => {
    expect(DIGEST_BYTES).toBe(16);
    expect(variants.length).toBeGreaterThan(0);
    expect(variants).toContain(digestVariant());
    // The default selection is the best available kernel.
    expect(digestVariant()).toBe(variants[0]);
    expect(() => selectDigestVariant('nope' as 'auto')).toThrow(/unknown digest variant/);
  });
});

describe.each(variants)('XXH3-128 digests (%s kernel)', (variant) => {
  beforeAll(() => {
    expect(selectDigestVariant(variant)).toBe(variant);
  });

  test('known test vectors (seed 0, canonical big-endian)', async () => {
    // Empty input: the XXH3-128 reference value; also check hash-wasm agrees.
    expect(await xxhash128(new Uint8Array(0))).toBe('99aa06d3014798d86001c324468d497f');
    expect(oneHex(new Uint8Array(0))).toBe('99aa06d3014798d86001c324468d497f');
    expect(oneHex(Buffer.alloc(0))).toBe('99aa06d3014798d86001c324468d497f');
    // Computed with xxhsum 0.8.1 (`xxhsum -H2`), independent of this addon.
    const vectors: Array<[Uint8Array, string]> = [
      [Buffer.from('abc'), '06b05ab6733a618578af5f94892f3950'],
      [Buffer.from('bfmig'), '200b07afa422b637e2733c4518061b94'],
      [Buffer.alloc(PAGE), '3ee8dc4f9e7ee49593d76fe148c689ba'], // zero page
      [pattern(PAGE, (i) => i * 7 + 3), '1546867423105cd5d7428746842be37e'],
      [pattern(241, (i) => i), '1da1cb61bcb8a2a102e8cd95421c6d02'], // first "long" length
      [pattern(1 << 20, (i) => i), '1b208d2839093774d36c0e13a3df139e'],
    ];
    for (const [data, hex] of vectors) {
      expect(oneHex(data)).toBe(hex);
      expect(refHex(data)).toBe(hex);
    }
  });

  test('zero page', () => {
    const zeros = new Uint8Array(PAGE * 3);
    const out = new Uint8Array(DIGEST_BYTES * 3);
    digestContiguous(zeros, 0, 3, PAGE, out, 0);
    for (let i = 0; i < 3; i++) expect(digestHex(out, i * DIGEST_BYTES)).toBe('3ee8dc4f9e7ee49593d76fe148c689ba');
    expect(refHex(new Uint8Array(PAGE))).toBe('3ee8dc4f9e7ee49593d76fe148c689ba');
  });

  test('every length path of XXH3 matches hash-wasm (digestOne)', () => {
    const buf = randomBytes(70000);
    const lengths: number[] = [];
    for (let n = 0; n <= 300; n++) lengths.push(n);
    lengths.push(511, 512, 1023, 1024, 1025, 4095, 4096, 4097, 8191, 8192, 65535, 65536, 69999);
    for (const len of lengths) {
      for (const start of [0, 1, 7]) {
        if (start + len > buf.length) continue;
        expect(oneHex(buf, start, len)).toBe(refHex(buf.subarray(start, start + len)));
      }
    }
  });

  test('random pages: digestContiguous matches hash-wasm per page', () => {
    const count = 64; // one 256 KiB chunk
    const src = randomBytes(count * PAGE);
    const out = new Uint8Array(count * DIGEST_BYTES);
    digestContiguous(src, 0, count, PAGE, out, 0);
    for (let i = 0; i < count; i++) {
      expect(digestHex(out, i * DIGEST_BYTES)).toBe(refHex(src.subarray(i * PAGE, (i + 1) * PAGE)));
    }
  });

  test('digestPages at unaligned and repeated offsets matches hash-wasm', () => {
    const rnd = prng(0xbf316);
    const src = randomBytes(40 * PAGE + 13);
    const offsets = new Uint32Array(200);
    for (let i = 0; i < offsets.length; i++) offsets[i] = rnd() % (src.length - PAGE + 1);
    offsets[0] = 0;
    offsets[1] = 1;
    offsets[2] = 3;
    offsets[3] = src.length - PAGE; // last valid offset
    offsets[4] = 1; // repeat
    const out = new Uint8Array(offsets.length * DIGEST_BYTES);
    digestPages(src, offsets, offsets.length, PAGE, out, 0);
    for (let i = 0; i < offsets.length; i++) {
      const o = offsets[i];
      expect(digestHex(out, i * DIGEST_BYTES)).toBe(refHex(src.subarray(o, o + PAGE)));
    }
    expect(digestHex(out, 1 * DIGEST_BYTES)).toBe(digestHex(out, 4 * DIGEST_BYTES));
  });

  test('other page sizes (short, mid and long XXH3 paths)', () => {
    const src = randomBytes(1 << 16);
    for (const pageSize of [1, 16, 17, 128, 129, 240, 241, 1000, 2048, 16384]) {
      const count = Math.floor((src.length - 8) / pageSize / 2);
      const offsets = new Uint32Array(count);
      for (let i = 0; i < count; i++) offsets[i] = i * pageSize * 2 + (i % 5);
      const outP = new Uint8Array(count * DIGEST_BYTES);
      const outC = new Uint8Array(count * DIGEST_BYTES);
      digestPages(src, offsets, count, pageSize, outP, 0);
      digestContiguous(src, 3, count, pageSize, outC, 0);
      for (let i = 0; i < count; i++) {
        const o = offsets[i];
        expect(digestHex(outP, i * DIGEST_BYTES)).toBe(refHex(src.subarray(o, o + pageSize)));
        const c = 3 + i * pageSize;
        expect(digestHex(outC, i * DIGEST_BYTES)).toBe(refHex(src.subarray(c, c + pageSize)));
      }
    }
  });

  test('batch equals one-at-a-time, honours outOffset, writes nothing else', () => {
    const count = 37;
    const src = randomBytes(count * PAGE + 100);
    const start = 100;
    const outOffset = 5; // deliberately not a multiple of 16
    const batch = new Uint8Array(outOffset + count * DIGEST_BYTES + 7).fill(0xa5);
    digestContiguous(src, start, count, PAGE, batch, outOffset);

    const offsets = Uint32Array.from({ length: count }, (_, i) => start + i * PAGE);
    const viaPages = new Uint8Array(batch.length).fill(0xa5);
    digestPages(src, offsets, count, PAGE, viaPages, outOffset);
    expect(Buffer.from(viaPages).equals(Buffer.from(batch))).toBe(true);

    const single = new Uint8Array(batch.length).fill(0xa5);
    for (let i = 0; i < count; i++) {
      digestOne(src, start + i * PAGE, PAGE, single, outOffset + i * DIGEST_BYTES);
      const one = new Uint8Array(DIGEST_BYTES);
      digestPages(src, offsets.subarray(i, i + 1), 1, PAGE, one, 0);
      expect(digestHex(one)).toBe(digestHex(batch, outOffset + i * DIGEST_BYTES));
    }
    expect(Buffer.from(single).equals(Buffer.from(batch))).toBe(true);

    // Sentinels around the written region are intact.
    expect(Array.from(batch.subarray(0, outOffset)).every((b) => b === 0xa5)).toBe(true);
    expect(Array.from(batch.subarray(outOffset + count * DIGEST_BYTES)).every((b) => b === 0xa5)).toBe(true);
  });

  test('views with a byteOffset, Uint8Array and SharedArrayBuffer inputs', () => {
    const backing = new ArrayBuffer(3 * PAGE + 64);
    const whole = new Uint8Array(backing);
    whole.set(randomBytes(whole.length));
    const view = new Uint8Array(backing, 33, 2 * PAGE); // src starts at byte 33
    const outBacking = new Uint8Array(64).fill(0);
    const outView = outBacking.subarray(9, 9 + 2 * DIGEST_BYTES);
    digestContiguous(view, 0, 2, PAGE, outView, 0);
    expect(digestHex(outBacking, 9)).toBe(refHex(whole.subarray(33, 33 + PAGE)));
    expect(digestHex(outBacking, 9 + DIGEST_BYTES)).toBe(refHex(whole.subarray(33 + PAGE, 33 + 2 * PAGE)));
    expect(outBacking.subarray(0, 9).every((b) => b === 0)).toBe(true);

    const shared = new Uint8Array(new SharedArrayBuffer(2 * PAGE));
    shared.set(randomBytes(shared.length));
    const offsets = new Uint32Array(new SharedArrayBuffer(8));
    offsets[0] = PAGE;
    offsets[1] = 0;
    const out = new Uint8Array(2 * DIGEST_BYTES);
    digestPages(shared, offsets, 2, PAGE, out, 0);
    expect(digestHex(out, 0)).toBe(refHex(shared.slice(PAGE)));
    expect(digestHex(out, DIGEST_BYTES)).toBe(refHex(shared.slice(0, PAGE)));
  });

  test('count 0 is a no-op', () => {
    const out = new Uint8Array(0);
    expect(digestPages(new Uint8Array(0), new Uint32Array(0), 0, PAGE, out, 0)).toBeUndefined();
    expect(digestContiguous(new Uint8Array(0), 0, 0, PAGE, out, 0)).toBeUndefined();
  });

  test("an all-zero page's digest, per page size, is the reference's, made once each", () => {
    for (const size of [PAGE, 2 * PAGE]) {
      expect(digestHex(zeroPageDigest(size))).toBe(refHex(new Uint8Array(size)));
      expect(zeroPageDigest(size)).toBe(zeroPageDigest(size));
    }
    expect(digestHex(zeroPageDigest(PAGE))).not.toBe(digestHex(zeroPageDigest(2 * PAGE)));
  });
});

describe('argument validation', () => {
  const src = randomBytes(4 * PAGE);
  const offsets = new Uint32Array([0, PAGE, 2 * PAGE, 3 * PAGE]);

  /*
   * The addon creates its errors in Node's main realm, while jest runs tests
   * in a vm context with its own RangeError/TypeError, so `instanceof` and
   * toThrow(RangeError) cannot match here. Check the error's name instead
   * (in the application, `err instanceof RangeError` holds).
   */
  function expectThrowsNamed(name: 'RangeError' | 'TypeError', fn: () => void, message?: RegExp): void {
    let caught: unknown;
    try {
      fn();
    } catch (err) {
      caught = err;
    }
    expect(caught).toBeDefined();
    expect(Object.prototype.toString.call(caught)).toBe('[object Error]');
    expect((caught as Error).name).toBe(name);
    if (message) expect((caught as Error).message).toMatch(message);
  }
  const expectRangeError = (fn: () => void, message?: RegExp): void => expectThrowsNamed('RangeError', fn, message);
  const expectTypeError = (fn: () => void): void => expectThrowsNamed('TypeError', fn);

  test('digestPages: out-of-bounds offsets throw RangeError and write nothing', () => {
    const out = new Uint8Array(4 * DIGEST_BYTES).fill(0x5a);
    const bad: number[] = [3 * PAGE + 1, 4 * PAGE, 0xffffffff, 0x7fffffff];
    for (const b of bad) {
      const offs = new Uint32Array([0, PAGE, b, 0]);
      expectRangeError(() => digestPages(src, offs, 4, PAGE, out, 0), /offsets\[2\]/);
    }
    // The bad offset is only checked if it is within count.
    digestPages(src, new Uint32Array([0, 0xffffffff]), 1, PAGE, out, 0);
    out.fill(0x5a);
    expectRangeError(() => digestPages(src, new Uint32Array([0, 0xffffffff]), 2, PAGE, out, 0));
    expect(out.every((b) => b === 0x5a)).toBe(true);
    // pageSize larger than src.
    expectRangeError(() => digestPages(src, offsets, 1, 4 * PAGE + 1, out, 0));
    // count larger than offsets.length.
    expectRangeError(() => digestPages(src, offsets, 5, PAGE, new Uint8Array(5 * DIGEST_BYTES), 0), /count/);
    expect(out.every((b) => b === 0x5a)).toBe(true);
  });

  test('out buffer too small or outOffset past the end', () => {
    const out = new Uint8Array(4 * DIGEST_BYTES - 1);
    expectRangeError(() => digestPages(src, offsets, 4, PAGE, out, 0), /out too small/);
    expectRangeError(() => digestContiguous(src, 0, 4, PAGE, out, 0), /out too small/);
    const exact = new Uint8Array(4 * DIGEST_BYTES);
    expectRangeError(() => digestPages(src, offsets, 4, PAGE, exact, 1));
    expectRangeError(() => digestPages(src, offsets, 1, PAGE, exact, 3 * DIGEST_BYTES + 1));
    expectRangeError(() => digestPages(src, offsets, 0, PAGE, exact, exact.length + 1));
    expectRangeError(() => digestOne(src, 0, 10, exact, exact.length - 15));
    expectRangeError(() => digestOne(src, 0, 10, new Uint8Array(0), 0));
    // Exactly fitting is fine.
    digestPages(src, offsets, 1, PAGE, exact, 3 * DIGEST_BYTES);
  });

  test('digestContiguous and digestOne: ranges past the end of src', () => {
    const out = new Uint8Array(8 * DIGEST_BYTES);
    expectRangeError(() => digestContiguous(src, 1, 4, PAGE, out, 0));
    expectRangeError(() => digestContiguous(src, 0, 5, PAGE, out, 0));
    expectRangeError(() => digestContiguous(src, src.length + 1, 0, PAGE, out, 0));
    expectRangeError(() => digestContiguous(src, 0, 0xffffffff, 0xffffffff, out, 0));
    expectRangeError(() => digestOne(src, 1, src.length, out, 0));
    expectRangeError(() => digestOne(src, src.length + 1, 0, out, 0));
    expectRangeError(() => digestOne(src, 2 ** 53 - 1, 2, out, 0));
    digestContiguous(src, src.length, 0, PAGE, out, 0); // empty range at the end
    digestOne(src, src.length, 0, out, 0);
    expect(digestHex(out)).toBe('99aa06d3014798d86001c324468d497f');
  });

  test('non-integer, negative, NaN and infinite numbers are RangeErrors', () => {
    const out = new Uint8Array(4 * DIGEST_BYTES);
    for (const v of [-1, 0.5, NaN, Infinity, -Infinity, 2 ** 53, -0.25]) {
      expectRangeError(() => digestPages(src, offsets, v, PAGE, out, 0));
      expectRangeError(() => digestPages(src, offsets, 1, v, out, 0));
      expectRangeError(() => digestPages(src, offsets, 1, PAGE, out, v));
      expectRangeError(() => digestContiguous(src, v, 1, PAGE, out, 0));
      expectRangeError(() => digestOne(src, 0, v, out, 0));
    }
    expectRangeError(() => digestPages(src, offsets, 1, 0, out, 0), /pageSize/);
    expectRangeError(() => digestContiguous(src, 0, 1, 0, out, 0), /pageSize/);
    expectRangeError(() => digestPages(src, offsets, 2 ** 32, PAGE, out, 0));
  });

  test('wrong argument types are TypeErrors', () => {
    const out = new Uint8Array(4 * DIGEST_BYTES);
    type Loose = (...args: unknown[]) => void;
    const pages = digestPages as unknown as Loose;
    const contiguous = digestContiguous as unknown as Loose;
    const one = digestOne as unknown as Loose;
    expectTypeError(() => pages([0], offsets, 1, PAGE, out, 0));
    expectTypeError(() => pages(src, [0], 1, PAGE, out, 0));
    expectThrowsNamed('TypeError', () => pages(src, new Int32Array(1), 1, PAGE, out, 0), /^offsets must be a Uint32Array$/);
    expectTypeError(() => pages(src, new Float64Array(1), 1, PAGE, out, 0));
    expectThrowsNamed('TypeError', () => pages(new Uint16Array(PAGE), offsets, 1, PAGE, out, 0), /^src must be a Buffer or Uint8Array$/);
    expectTypeError(() => pages(src, offsets, '1', PAGE, out, 0));
    expectTypeError(() => pages(src, offsets, 1n, PAGE, out, 0));
    expectTypeError(() => pages(src, offsets, 1, PAGE, new Uint32Array(4), 0));
    expectTypeError(() => pages(src, offsets, 1, PAGE, out));
    expectTypeError(() => contiguous(src, 0, 1, PAGE, out.buffer, 0));
    expectTypeError(() => contiguous(new DataView(src.buffer), 0, 1, PAGE, out, 0));
    expectTypeError(() => one(src, 0, 1, out));
    expectTypeError(() => one(undefined, 0, 1, out, 0));
  });

  test('errors carry Node-style codes and the addon keeps working', () => {
    const out = new Uint8Array(DIGEST_BYTES);
    let caught: unknown;
    try {
      digestOne(src, 0, src.length + 1, out, 0);
    } catch (err) {
      caught = err;
    }
    expect((caught as Error).name).toBe('RangeError');
    expect((caught as NodeJS.ErrnoException).code).toBe('ERR_OUT_OF_RANGE');
    let typeErr: unknown;
    try {
      (digestOne as unknown as (...a: unknown[]) => void)('x', 0, 1, out, 0);
    } catch (err) {
      typeErr = err;
    }
    expect((typeErr as NodeJS.ErrnoException).code).toBe('ERR_INVALID_ARG_TYPE');
    digestOne(src, 0, PAGE, out, 0);
    expect(digestHex(out)).toBe(refHex(src.subarray(0, PAGE)));
  });
});

describe.each(variants)('StreamHash (%s kernel)', (variant) => {
  beforeAll(() => {
    expect(selectDigestVariant(variant)).toBe(variant);
  });

  test('hashes a stream the same however it is split, as an independent XXH3-64 does, and tells streams apart', async () => {
    const bytes = Buffer.alloc(300_000);
    for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 2654435761) >>> 24;
    const whole = new StreamHash();
    whole.update(bytes);
    const pieces = new StreamHash();
    for (let at = 0, n = 1; at < bytes.length; at += n, n = (n * 7 + 3) % 70_001) pieces.update(bytes.subarray(at, at + n));
    expect(pieces.digest()).toBe(whole.digest());
    expect(whole.digest()).toMatch(/^[0-9a-f]{16}$/);
    expect(whole.digest()).toBe(await xxhash3(bytes));
    expect(new StreamHash().digest()).toBe(await xxhash3(Buffer.alloc(0)));
    const flipped = Buffer.from(bytes);
    flipped[123_456] ^= 1;
    const other = new StreamHash();
    other.update(flipped);
    expect(other.digest()).not.toBe(whole.digest());
  });
});

describe('StreamHash across kernels', () => {
  test('a stream hashed partly with one kernel and partly with another hashes as it would with either', async () => {
    const bytes = randomBytes(1_000_000);
    const mixed = new StreamHash();
    for (let at = 0, i = 0; at < bytes.length; at += 65_537, i++) {
      selectDigestVariant(variants[i % variants.length]);
      mixed.update(bytes.subarray(at, at + 65_537));
    }
    selectDigestVariant('auto');
    expect(mixed.digest()).toBe(await xxhash3(bytes));
  });
});
