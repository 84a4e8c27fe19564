import { DIGEST_BYTES, nativeExport } from '../digest';
import { RebuildError } from './rebuild-error';

/**
 * A Delta frame's payload: one RAM page given as a page the receiver holds (the base) and the byte
 * ranges where the new content differs from it (`native/pagedelta.c`: ULEB128 unchanged bytes, ULEB128
 * changed bytes, the changed bytes; the rest of the page is the base's).
 *
 *   u32 page index (in the stream's RAM layout) | u32 base page index
 *   | 16-byte XXH3-128 of the base | 16-byte XXH3-128 of the new content | the ranges
 *
 * The base is the version of the same page both sides hold (a page changed in a few bytes), or another
 * page the receiver holds with the very same content and no ranges at all (a content match).
 * The Delta stands for the page's 4 KiB of data only: the record's header word (and block name) goes
 * before it as Literal bytes. The receiver patches the base it holds, checks the result against the
 * new digest, and passes the page on; any mismatch fails the migration.
 */
export const DELTA_HEADER_BYTES = 8 + 2 * DIGEST_BYTES;
/**
 * A SiblingDelta frame's payload: u8 the sibling's place in the receiver's Offer (`siblings`), then a
 * Delta payload whose base page index and digest name a page of that sibling's retained snapshot, with
 * no ranges (the sender matches whole pages only). Checked on the receiver as a Delta is.
 */
export const SIBLING_DELTA_LEAD_BYTES = 1;
/**
 * A KeepVersion frame's payload: u32 the index of a page about to be written, whose version held now a
 * Delta of the epoch may go against (see MultifdMigration, "Bases of an earlier epoch").
 */
export const KEEP_VERSION_BYTES = 4;

/** A KeepVersion payload for page `pageIndex`, laid out in `slab`. */
export function keepVersionPayload(slab: DeltaSlab, pageIndex: number): Buffer {
  slab.reserve(KEEP_VERSION_BYTES).writeUInt32BE(pageIndex, 0);
  return slab.take(KEEP_VERSION_BYTES);
}

/** The page a KeepVersion payload names; RebuildError if it is not one. */
export function keepVersionPage(payload: Buffer): number {
  if (payload.length !== KEEP_VERSION_BYTES) throw new RebuildError(`KeepVersion frame of ${payload.length} bytes`);
  return payload.readUInt32BE(0);
}
export const DELTA_BASE_DIGEST_AT = 8;
export const DELTA_NEW_DIGEST_AT = 8 + DIGEST_BYTES;
/** A Delta payload's first bytes that name its base and the base's digest: what a look ahead of it needs. */
export const DELTA_AHEAD_BYTES = DELTA_BASE_DIGEST_AT + DIGEST_BYTES;

/**
 * Writes a Delta payload's header at out[at…]: page `page` from page `base`, whose digest is at
 * baseDigest[baseAt…], and the digest of the page's new content, newDigest[0…].
 */
export function writeDeltaHeader(out: Buffer, at: number, page: number, base: number, baseDigest: Uint8Array, baseAt: number, newDigest: Uint8Array): void {
  out.writeUInt32BE(page, at);
  out.writeUInt32BE(base, at + 4);
  out.set(baseDigest.subarray(baseAt, baseAt + DIGEST_BYTES), at + DELTA_BASE_DIGEST_AT);
  out.set(newDigest.subarray(0, DIGEST_BYTES), at + DELTA_NEW_DIGEST_AT);
}

/**
 * Largest delta worth sending: above it the page goes whole. A delta costs a store read on both sides
 * and a patch; under a quarter of a page saved it is not worth it.
 */
export const MAX_DELTA_BYTES = 3072;

type EncodeFn = (old: Uint8Array, oldStart: number, next: Uint8Array, nextStart: number, pageSize: number, out: Uint8Array, outStart: number, maxLen: number) => number;
type ApplyFn = (old: Uint8Array, oldStart: number, delta: Uint8Array, deltaStart: number, deltaLen: number, pageSize: number, out: Uint8Array, outStart: number) => void;

function native<T>(name: string): T {
  const fn = nativeExport(name);
  if (typeof fn !== 'function') throw new Error(`bfmig: the native addon lacks ${name}; rebuild it (npm run build:native)`);
  return fn as T;
}

/** Writes the ranges of `next` that differ from `old` at out[outStart…]; their length, or -1 above maxLen. */
export const encodePageDelta: EncodeFn = native<EncodeFn>('pageDeltaEncode');
/** Writes `old` patched by the ranges at out[outStart…]; throws RangeError on a malformed delta. */
export const applyPageDelta: ApplyFn = native<ApplyFn>('pageDeltaApply');

const SLAB_BYTES = 256 * 1024;

/**
 * Where the encoder lays out Delta payloads: consecutive pieces of 256 KiB slabs, so a delta costs no
 * allocation of its own. A slab is never written again once a payload was taken from it; it goes when
 * the last payload in it has been sent.
 */
export class DeltaSlab {
  private slab = Buffer.allocUnsafe(SLAB_BYTES);
  private used = 0;

  /** Room for `bytes` at the slab's free end (valid until the next reserve()). */
  reserve(bytes: number): Buffer {
    if (this.used + bytes > SLAB_BYTES) {
      this.slab = Buffer.allocUnsafe(SLAB_BYTES);
      this.used = 0;
    }
    return this.slab.subarray(this.used, this.used + bytes);
  }

  /** The first `bytes` of what reserve() gave, now owned by the caller. */
  take(bytes: number): Buffer {
    const out = this.slab.subarray(this.used, this.used + bytes);
    this.used += bytes;
    return out;
  }
}
