/**
 * Page digests: XXH3-128 (seed 0, default secret) of guest pages, computed
 * in batch by the native addon `bfmig_digest` (native/digest.c).
 *
 * Each digest is the 16-byte canonical form of the 128-bit hash (big-endian,
 * XXH128_canonicalFromHash), i.e. the same bytes as the hex string printed by
 * `xxhsum -H2` / hash-wasm's `xxhash128`.
 *
 * The functions write into a caller-supplied buffer: digest i goes to
 * out[outOffset + 16*i .. outOffset + 16*i + 16). They allocate nothing per
 * page and return undefined. Every offset and length is validated in C before
 * any byte is read or written; bad arguments throw RangeError (out of bounds,
 * non-integer, negative) or TypeError (wrong argument type) and leave `out`
 * untouched. If `out` overlaps the pages being hashed, digests are written in
 * page order and may overwrite pages not yet hashed: don't do that.
 *
 * The addon is loaded when this module is first imported, so a missing build
 * fails at startup, not in the middle of a migration. Build it with
 * `npm run build:native` (needs g++, make, python3, libxxhash-dev and libzstd-dev).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { PACKAGE_ROOT } from './package-root';
import { errorMessage } from '../common/errors';

/** Bytes per digest (XXH3-128). */
export const DIGEST_BYTES = 16;

/** Kernel names: "avx2"/"sse2" on x86-64, "default" elsewhere. */
export type DigestVariant = 'avx2' | 'sse2' | 'default';

/**
 * Hash `count` pages of `pageSize` bytes at src[offsets[i]]; write digest i at
 * out[outOffset + 16*i]. Requires count <= offsets.length,
 * offsets[i] + pageSize <= src.length, outOffset + 16*count <= out.length.
 */
export type DigestPagesFn = (
  src: Uint8Array,
  offsets: Uint32Array,
  count: number,
  pageSize: number,
  out: Uint8Array,
  outOffset: number,
) => void;

/** Hash `count` consecutive pages starting at src[start]. */
export type DigestContiguousFn = (
  src: Uint8Array,
  start: number,
  count: number,
  pageSize: number,
  out: Uint8Array,
  outOffset: number,
) => void;

/** Hash src[start .. start+len) (any length, including 0). */
export type DigestOneFn = (
  src: Uint8Array,
  start: number,
  len: number,
  out: Uint8Array,
  outOffset: number,
) => void;

interface DigestAddon {
  digestPages: DigestPagesFn;
  digestContiguous: DigestContiguousFn;
  digestOne: DigestOneFn;
  variant: () => DigestVariant;
  variants: () => DigestVariant[];
  selectVariant: (name: DigestVariant | 'auto') => DigestVariant;
  streamHashNew: () => StreamHashState;
  streamHashUpdate: (state: StreamHashState, src: Uint8Array, start: number, len: number) => void;
  streamHashDigest: (state: StreamHashState) => string;
}

/** Opaque native XXH3 streaming state. */
declare const streamHashState: unique symbol;
type StreamHashState = { readonly [streamHashState]: true };

const ADDON_RELATIVE_PATH = path.join('build', 'Release', 'bfmig_digest.node');
export const DIGEST_ADDON_PATH: string = path.join(PACKAGE_ROOT, ADDON_RELATIVE_PATH);

const BUILD_HINT = 'run `npm run build:native` (needs g++, make, python3, libxxhash-dev and libzstd-dev)';

function isDigestAddon(m: unknown): m is DigestAddon {
  if (typeof m !== 'object' || m === null) return false;
  const r = m as Record<string, unknown>;
  return ['digestPages', 'digestContiguous', 'digestOne', 'variant', 'variants', 'selectVariant', 'streamHashNew', 'streamHashUpdate', 'streamHashDigest'].every(
    (k) => typeof r[k] === 'function',
  );
}

function loadAddon(file: string): DigestAddon {
  if (!fs.existsSync(file)) {
    throw new Error(`bfmig digest: native addon not built (${file} is missing): ${BUILD_HINT}`);
  }
  let mod: unknown;
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    mod = require(file);
  } catch (err) {
    const why = errorMessage(err);
    throw new Error(`bfmig digest: cannot load native addon ${file}: ${why}; ${BUILD_HINT}`, { cause: err });
  }
  if (!isDigestAddon(mod)) {
    throw new Error(`bfmig digest: ${file} is not the bfmig_digest addon; ${BUILD_HINT}`);
  }
  return mod;
}

const addon: DigestAddon = loadAddon(DIGEST_ADDON_PATH);

/**
 * The addon's other exports (socket options, the store's direct page I/O and its constants), for the
 * modules that wrap them; undefined where an older build lacks one.
 */
export function nativeExport(name: string): unknown {
  return (addon as unknown as Record<string, unknown>)[name];
}

// Ops escape hatch: BFMIG_DIGEST_VARIANT=sse2 forces the baseline kernel.
{
  const forced = process.env.BFMIG_DIGEST_VARIANT;
  if (forced !== undefined && forced !== '') {
    addon.selectVariant(forced as DigestVariant | 'auto');
  }
}

/** Batch digest of pages at arbitrary offsets (one native call). */
export const digestPages: DigestPagesFn = addon.digestPages;
/** Batch digest of consecutive pages (one native call). */
export const digestContiguous: DigestContiguousFn = addon.digestContiguous;
/** Digest of an arbitrary byte range (tests and tools). */
export const digestOne: DigestOneFn = addon.digestOne;

/** Kernel currently used by the digest functions (process-wide). */
export function digestVariant(): DigestVariant {
  return addon.variant();
}

/** Kernels this build can run on this CPU, best first. */
export function availableDigestVariants(): DigestVariant[] {
  return addon.variants();
}

/**
 * Select the kernel for the whole process ("auto" = best available); for
 * tests and benchmarks. All kernels produce identical digests. Throws if the
 * CPU does not support the requested kernel.
 */
export function selectDigestVariant(name: DigestVariant | 'auto'): DigestVariant {
  return addon.selectVariant(name);
}

/** Digests of all-zero pages, by page size: made once each (every kernel gives the same). */
const zeroPageDigests = new Map<number, Buffer>();

/**
 * The digest of an all-zero page of `pageSize` bytes: how a zero page is told from its digest alone.
 * Shared by every caller, so never written to.
 */
export function zeroPageDigest(pageSize: number): Buffer {
  let digest = zeroPageDigests.get(pageSize);
  if (digest === undefined) {
    digest = newDigestBuffer();
    digestOne(new Uint8Array(pageSize), 0, pageSize, digest, 0);
    zeroPageDigests.set(pageSize, digest);
  }
  return digest;
}

/** 32-bit words in a digest. */
export const DIGEST_WORDS = DIGEST_BYTES / 4;

/**
 * `bytes` (a digest, or a table of them) as 32-bit words over the same memory, for the per-page
 * comparisons: four loads of one typed-array kind instead of sixteen byte loads, which on the data path
 * also meet Buffers and Uint8Arrays alike and go polymorphic. Every digest buffer and table bfmig
 * allocates starts on a 4-byte boundary; anything else is refused.
 */
export function digestWords(bytes: Uint8Array): Uint32Array {
  if (bytes.byteOffset % 4 !== 0 || bytes.length % DIGEST_BYTES !== 0) {
    throw new RangeError(`digestWords: ${bytes.length} bytes at offset ${bytes.byteOffset} are not whole, aligned digests`);
  }
  return new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.length / 4);
}

/** A zeroed digest buffer of its own (so on a 4-byte boundary, for digestWords()). */
export function newDigestBuffer(): Buffer {
  return Buffer.from(new ArrayBuffer(DIGEST_BYTES));
}

/** Whether the digests at a[aAt .. aAt+4) and b[bAt .. bAt+4) (word offsets) are equal. */
export function sameDigestWords(a: Uint32Array, aAt: number, b: Uint32Array, bAt: number): boolean {
  return a[aAt] === b[bAt] && a[aAt + 1] === b[bAt + 1] && a[aAt + 2] === b[bAt + 2] && a[aAt + 3] === b[bAt + 3];
}

/**
 * Whether the digest at words[at .. at+4) is all zero, a digest table's mark of an absent page (a held
 * page has that XXH3-128 digest with probability 2^-128, so all zero is free to mean "absent"):
 * - four 32-bit words, not sixteen bytes: four loads for a test made for every page of a migration;
 * - joined with `|`, not `||`: no branch per word, and the result is zero only when every word is;
 * - `at` counts words (4 per digest), so a caller walking a table steps it by 4, no multiply per page.
 */
export function isAbsentDigest(words: Uint32Array, at: number): boolean {
  return (words[at] | words[at + 1] | words[at + 2] | words[at + 3]) === 0;
}

/** Lower-case hex of the digest at buf[offset .. offset+16). */
export function digestHex(buf: Uint8Array, offset = 0): string {
  if (!Number.isInteger(offset) || offset < 0 || offset + DIGEST_BYTES > buf.length) {
    throw new RangeError(`digestHex: offset ${offset} out of range for length ${buf.length}`);
  }
  return Buffer.from(buf.buffer, buf.byteOffset + offset, DIGEST_BYTES).toString('hex');
}

/**
 * XXH3-64 of a whole byte stream fed piece by piece: what both gateways compute over a migration
 * stream (the source's and the rebuilt one) to prove them equal at the end. About three times the
 * speed of zlib's CRC-32 here, and 64 bits wide.
 */
export class StreamHash {
  private readonly state = addon.streamHashNew();

  update(bytes: Uint8Array): void {
    addon.streamHashUpdate(this.state, bytes, 0, bytes.length);
  }

  /** 16 lower-case hex digits of the hash of everything fed so far. */
  digest(): string {
    return addon.streamHashDigest(this.state);
  }
}
