/**
 * Byte copy between two Uint8Arrays at offsets, for the data path: the store's
 * write path, the codecs' copies of pages (a receiver's rebuilt Run records,
 * its recent pages, the sender's resemblance cache), the frame and record
 * parsers' carries: one 4 KiB page per call, hundreds of thousands of calls
 * per second, where an allocation a page would keep the collector busy.
 *
 * Node has no public API that copies a sub-range of one typed array into
 * another without allocating: `dst.set(src.subarray(a, b), o)` allocates a
 * view per call, and in Node 20 `Buffer.prototype.copy` does too. The buffer
 * binding's own `copy(source, target, targetStart, sourceStart, sourceEnd)`
 * (what Buffer#copy ends in) allocates nothing. We use it when it is
 * available AND behaves exactly as expected on a self-test at load time;
 * otherwise (other Node version, permission model, --pending-deprecation,
 * BFMIG_STORE_COPY=portable) we fall back to set(subarray).
 *
 * The binding does no bounds checking (memmove), so copyBytes checks every
 * bound itself before calling it.
 */

import { types } from 'node:util';

interface BufferBinding {
  copy(source: Uint8Array, target: Uint8Array, targetStart: number, sourceStart: number, sourceEnd: number): number;
}

/** The binding converts offsets with Uint32Value: keep every offset below 2^32. */
const NATIVE_LIMIT = 2 ** 32;

function pendingDeprecation(): boolean {
  // process.binding() prints DEP0111 under --pending-deprecation: don't cause that noise.
  const flag = '--pending-deprecation';
  return process.execArgv.includes(flag) || (process.env.NODE_OPTIONS ?? '').includes(flag);
}

function probe(): BufferBinding | null {
  if (process.env.BFMIG_STORE_COPY === 'portable' || pendingDeprecation()) return null;
  try {
    const bindingFn = (process as unknown as { binding?: (name: string) => unknown }).binding;
    if (typeof bindingFn !== 'function') return null;
    const b = bindingFn.call(process, 'buffer') as Partial<BufferBinding> | null;
    if (b === null || typeof b !== 'object' || typeof b.copy !== 'function') return null;
    const binding = b as BufferBinding;
    // Self-test on views with non-zero byteOffsets and lots of slack, so that a
    // binding with another argument convention (e.g. a length instead of an
    // end) stays in bounds and is detected by the content check.
    const srcBacking = new Uint8Array(1024);
    for (let i = 0; i < srcBacking.length; i++) srcBacking[i] = (i * 7 + 3) & 0xff;
    const src = srcBacking.subarray(13, 13 + 512);
    const dstBacking = new Uint8Array(1024);
    const dst = dstBacking.subarray(29, 29 + 512);
    const ret = binding.copy(src, dst, 37, 11, 11 + 100);
    if (ret !== 100) return null;
    for (let i = 0; i < dstBacking.length; i++) {
      const k = i - 29 - 37; // index into the copied range
      const want = k >= 0 && k < 100 ? srcBacking[13 + 11 + k] : 0;
      if (dstBacking[i] !== want) return null;
    }
    return binding;
  } catch {
    return null;
  }
}

const nativeBinding: BufferBinding | null = probe();

/** "native" (zero-allocation binding copy) or "portable" (set(subarray)). */
export function copyMode(): 'native' | 'portable' {
  return nativeBinding !== null ? 'native' : 'portable';
}

/** dst[dstStart .. dstStart+len) = src[srcStart .. srcStart+len). Throws RangeError on bad bounds. */
export function copyBytes(src: Uint8Array, srcStart: number, dst: Uint8Array, dstStart: number, len: number): void {
  if (!types.isUint8Array(src) || !types.isUint8Array(dst)) {
    throw new TypeError('copyBytes: source and destination must be Uint8Arrays');
  }
  if (
    !Number.isInteger(srcStart) ||
    !Number.isInteger(dstStart) ||
    !Number.isInteger(len) ||
    srcStart < 0 ||
    dstStart < 0 ||
    len < 0 ||
    srcStart + len > src.length ||
    dstStart + len > dst.length
  ) {
    throw new RangeError(
      `copyBytes: [${srcStart}, +${len}) of ${src.length} -> [${dstStart}, +${len}) of ${dst.length} out of bounds`,
    );
  }
  if (nativeBinding !== null && srcStart + len < NATIVE_LIMIT && dstStart + len < NATIVE_LIMIT) {
    nativeBinding.copy(src, dst, dstStart, srcStart, srcStart + len);
  } else {
    dst.set(src.subarray(srcStart, srcStart + len), dstStart);
  }
}
