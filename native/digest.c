/*
 * bfmig page digests: XXH3-128 over guest pages, computed in batch.
 *
 * One call hashes every page of a chunk and writes the 16-byte canonical
 * (big-endian, XXH128_canonicalFromHash) digests into a caller-supplied,
 * preallocated buffer. No memory is allocated per page and no JS value is
 * created, except the error object when an argument is rejected.
 *
 * Every offset and length is checked before the first byte is read or
 * written; a bad argument throws (RangeError / TypeError) and leaves the
 * output untouched.
 *
 * Code generation: the addon is built for the x86-64 baseline (SSE2). On
 * x86-64 with GCC/Clang the long-input XXH3 kernel is also compiled a
 * second time for AVX2 (function-level target attribute, the same scheme
 * as upstream xxh_x86dispatch.c) and selected at load time when the CPU
 * and OS support it. Both kernels produce identical digests.
 */

#ifndef NAPI_VERSION
#define NAPI_VERSION 8
#endif
#include <node_api.h>

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <errno.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#  define BF_X86_DISPATCH 1
#  include <immintrin.h>
   /* Same knobs as xxh_x86dispatch.c: SSE2 code as the default, AVX2
    * kernels compiled with a function target attribute, and a 64-byte
    * aligned accumulator so that either kernel may run on it. */
#  define XXH_X86DISPATCH
#  define XXH_DISPATCH_AVX2 1
#  define XXH_TARGET_AVX2 __attribute__((__target__("avx2")))
#else
#  define BF_X86_DISPATCH 0
#endif

#define XXH_INLINE_ALL
#include <xxhash.h>

#define BF_DIGEST_BYTES 16
/* Largest integer a JS number represents exactly. */
#define BF_MAX_SAFE 9007199254740991.0

/* ------------------------------------------------------------------ */
/* Hash kernels                                                        */
/* ------------------------------------------------------------------ */

typedef XXH128_hash_t (*bf_hash_fn)(const void *input, size_t len);

static XXH128_hash_t bf_hash_default(const void *input, size_t len) {
  return XXH3_128bits(input, len);
}

#if BF_X86_DISPATCH
XXH_NO_INLINE XXH_TARGET_AVX2 XXH128_hash_t
bf_hashLong_avx2(const void *XXH_RESTRICT input, size_t len, XXH64_hash_t seed64,
                 const void *XXH_RESTRICT secret, size_t secretLen) {
  (void)seed64;
  (void)secret;
  (void)secretLen;
  return XXH3_hashLong_128b_internal(input, len, XXH3_kSecret, sizeof(XXH3_kSecret),
                                     XXH3_accumulate_512_avx2, XXH3_scrambleAcc_avx2);
}

static XXH128_hash_t bf_hash_avx2(const void *input, size_t len) {
  /* Inputs up to 240 bytes take the scalar short paths; longer ones use
   * the AVX2 kernel with the default secret and seed 0, exactly as
   * XXH3_128bits does with its SSE2 kernel. */
  return XXH3_128bits_internal(input, len, 0, XXH3_kSecret, sizeof(XXH3_kSecret),
                               bf_hashLong_avx2);
}

/* The stream hash (XXH3-64, streaming) through the AVX2 kernel: the same
 * state and the same result as XXH3_64bits_update's SSE2 kernel. */
XXH_NO_INLINE XXH_TARGET_AVX2 XXH_errorcode
bf_stream_update_avx2(XXH3_state_t *state, const void *input, size_t len) {
  return XXH3_update(state, (const xxh_u8 *)input, len, XXH3_accumulate_512_avx2,
                     XXH3_scrambleAcc_avx2);
}

static int bf_cpu_has_avx2(void) {
  /* GCC/Clang's cpu model also checks XGETBV, i.e. that the OS saves
   * the YMM state, before reporting AVX/AVX2. */
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") ? 1 : 0;
}
#endif

typedef XXH_errorcode (*bf_stream_update_fn)(XXH3_state_t *state, const void *input, size_t len);

typedef struct {
  const char *name;
  bf_hash_fn fn;
  bf_stream_update_fn stream_update;
} bf_variant;

static const bf_variant bf_variants[] = {
#if BF_X86_DISPATCH
    {"sse2", bf_hash_default, XXH3_64bits_update},
    {"avx2", bf_hash_avx2, bf_stream_update_avx2},
#else
    {"default", bf_hash_default, XXH3_64bits_update},
#endif
};
#define BF_VARIANT_COUNT (sizeof(bf_variants) / sizeof(bf_variants[0]))

/* Process-wide selection (shared by worker threads). Written at load and
 * by selectVariant(), which is meant for tests and benchmarks. */
static const bf_variant *volatile bf_current = &bf_variants[0];

static const bf_variant *bf_best_variant(void) {
#if BF_X86_DISPATCH
  if (bf_cpu_has_avx2()) return &bf_variants[1];
#endif
  return &bf_variants[0];
}

/* ------------------------------------------------------------------ */
/* Argument helpers                                                    */
/* ------------------------------------------------------------------ */

#define BF_CALL(env, call)                                                    \
  do {                                                                        \
    if ((call) != napi_ok) return bf_rethrow(env, #call);                     \
  } while (0)

static napi_value bf_rethrow(napi_env env, const char *what) {
  bool pending = false;
  napi_is_exception_pending(env, &pending);
  if (!pending) {
    const napi_extended_error_info *info = NULL;
    char msg[256];
    napi_get_last_error_info(env, &info);
    snprintf(msg, sizeof msg, "bfmig digest: N-API failure in %s: %s", what,
             (info && info->error_message) ? info->error_message : "unknown");
    napi_throw_error(env, NULL, msg);
  }
  return NULL;
}

static napi_value bf_range(napi_env env, const char *msg) {
  napi_throw_range_error(env, "ERR_OUT_OF_RANGE", msg);
  return NULL;
}

static napi_value bf_type(napi_env env, const char *msg) {
  napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", msg);
  return NULL;
}

/* Reads a typed array of type `want` (or `also`), which `what` names in the error. Returns 0 and throws on error. */
static int bf_get_typed(napi_env env, napi_value v, const char *name, napi_typedarray_type want,
                        napi_typedarray_type also, const char *what, void **data, size_t *len) {
  bool is_ta = false;
  napi_typedarray_type type;
  size_t length = 0;
  void *ptr = NULL;
  char msg[128];
  if (napi_is_typedarray(env, v, &is_ta) != napi_ok || !is_ta) {
    snprintf(msg, sizeof msg, "%s must be a %s", name, what);
    bf_type(env, msg);
    return 0;
  }
  /* For small typed arrays V8 keeps the bytes on the JS heap; asking for
   * the data pointer moves them off-heap once. Buffers are off-heap. */
  if (napi_get_typedarray_info(env, v, &type, &length, &ptr, NULL, NULL) != napi_ok) {
    bf_rethrow(env, "napi_get_typedarray_info");
    return 0;
  }
  if (type != want && type != also) {
    snprintf(msg, sizeof msg, "%s must be a %s", name, what);
    bf_type(env, msg);
    return 0;
  }
  *data = ptr;
  *len = length;
  return 1;
}

/* Reads a byte view (Buffer or Uint8Array). Returns 0 and throws on error. */
static int bf_get_bytes(napi_env env, napi_value v, const char *name, uint8_t **data,
                        size_t *len) {
  void *ptr = NULL;
  if (!bf_get_typed(env, v, name, napi_uint8_array, napi_uint8_clamped_array, "Buffer or Uint8Array", &ptr, len)) return 0;
  *data = (uint8_t *)ptr;
  return 1;
}

/* Reads a Uint32Array; `len` counts its elements. Returns 0 and throws on error. */
static int bf_get_u32array(napi_env env, napi_value v, const char *name,
                           const uint32_t **data, size_t *len) {
  void *ptr = NULL;
  if (!bf_get_typed(env, v, name, napi_uint32_array, napi_uint32_array, "Uint32Array", &ptr, len)) return 0;
  *data = (const uint32_t *)ptr;
  return 1;
}

/* Reads a non-negative safe integer no larger than max. */
static int bf_get_index(napi_env env, napi_value v, const char *name, double max,
                        size_t *out) {
  napi_valuetype t;
  double d = 0;
  char msg[160];
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_number) {
    snprintf(msg, sizeof msg, "%s must be a number", name);
    bf_type(env, msg);
    return 0;
  }
  if (napi_get_value_double(env, v, &d) != napi_ok) {
    bf_rethrow(env, "napi_get_value_double");
    return 0;
  }
  if (!(d >= 0) || !(d <= max) || d != floor(d)) {
    snprintf(msg, sizeof msg, "%s must be an integer in [0, %.0f], got %.17g", name, max, d);
    bf_range(env, msg);
    return 0;
  }
  *out = (size_t)d;
  return 1;
}

/* Checks that out[outOffset .. outOffset + 16*count) lies inside out. */
static int bf_check_out(napi_env env, size_t out_len, size_t out_off, size_t count) {
  char msg[200];
  if (out_off > out_len || count > (out_len - out_off) / BF_DIGEST_BYTES) {
    snprintf(msg, sizeof msg,
             "out too small: %zu digests of %d bytes at outOffset %zu need %.0f bytes, "
             "out has %zu",
             count, BF_DIGEST_BYTES, out_off,
             (double)out_off + (double)count * BF_DIGEST_BYTES, out_len);
    bf_range(env, msg);
    return 0;
  }
  return 1;
}

static inline void bf_put(uint8_t *dst, XXH128_hash_t h) {
  /* XXH128_canonical_t is a struct of 16 unsigned chars: alignment 1. */
  XXH128_canonicalFromHash((XXH128_canonical_t *)(void *)dst, h);
}

/* ------------------------------------------------------------------ */
/* Exports                                                             */
/* ------------------------------------------------------------------ */

/* digestPages(src, offsets, count, pageSize, out, outOffset): undefined */
static napi_value DigestPages(napi_env env, napi_callback_info info) {
  size_t argc = 6;
  napi_value argv[6];
  uint8_t *src = NULL, *out = NULL;
  const uint32_t *offsets = NULL;
  size_t src_len = 0, out_len = 0, offsets_len = 0, count = 0, page = 0, out_off = 0;
  size_t i, max_off = 0;
  bf_hash_fn fn;
  char msg[200];

  BF_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 6) return bf_type(env, "digestPages expects 6 arguments");
  if (!bf_get_bytes(env, argv[0], "src", &src, &src_len)) return NULL;
  if (!bf_get_u32array(env, argv[1], "offsets", &offsets, &offsets_len)) return NULL;
  if (!bf_get_index(env, argv[2], "count", 4294967295.0, &count)) return NULL;
  if (!bf_get_index(env, argv[3], "pageSize", 4294967295.0, &page)) return NULL;
  if (!bf_get_bytes(env, argv[4], "out", &out, &out_len)) return NULL;
  if (!bf_get_index(env, argv[5], "outOffset", BF_MAX_SAFE, &out_off)) return NULL;

  if (page == 0) return bf_range(env, "pageSize must be at least 1");
  if (count > offsets_len) {
    snprintf(msg, sizeof msg, "count %zu exceeds offsets.length %zu", count, offsets_len);
    return bf_range(env, msg);
  }
  if (!bf_check_out(env, out_len, out_off, count)) return NULL;
  if (page > src_len) {
    if (count == 0) return NULL;
    snprintf(msg, sizeof msg, "pageSize %zu exceeds src.length %zu", page, src_len);
    return bf_range(env, msg);
  }
  /* Validate every offset before touching anything: page is <= src_len
   * here, so offsets[i] + page <= src_len  <=>  offsets[i] <= src_len - page. */
  for (i = 0; i < count; i++) {
    if (offsets[i] > max_off) max_off = offsets[i];
  }
  if (count > 0 && max_off > src_len - page) {
    for (i = 0; i < count && offsets[i] <= src_len - page; i++) {
    }
    snprintf(msg, sizeof msg,
             "offsets[%zu] = %u: page [%u, %.0f) is outside src (length %zu)", i,
             offsets[i], offsets[i], (double)offsets[i] + (double)page, src_len);
    return bf_range(env, msg);
  }

  fn = bf_current->fn;
  out += out_off;
  for (i = 0; i < count; i++) {
    /* Read each offset exactly once and check the value used: offsets may
     * live in a SharedArrayBuffer that another thread writes meanwhile. */
    size_t off = ((const volatile uint32_t *)offsets)[i];
    if (off > src_len - page)
      return bf_range(env, "offsets changed during digestPages (shared memory race)");
    bf_put(out + i * BF_DIGEST_BYTES, fn(src + off, page));
  }
  return NULL; /* undefined */
}

/* digestContiguous(src, start, count, pageSize, out, outOffset): undefined */
static napi_value DigestContiguous(napi_env env, napi_callback_info info) {
  size_t argc = 6;
  napi_value argv[6];
  uint8_t *src = NULL, *out = NULL;
  size_t src_len = 0, out_len = 0, start = 0, count = 0, page = 0, out_off = 0, i;
  bf_hash_fn fn;
  char msg[200];

  BF_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 6) return bf_type(env, "digestContiguous expects 6 arguments");
  if (!bf_get_bytes(env, argv[0], "src", &src, &src_len)) return NULL;
  if (!bf_get_index(env, argv[1], "start", BF_MAX_SAFE, &start)) return NULL;
  if (!bf_get_index(env, argv[2], "count", 4294967295.0, &count)) return NULL;
  if (!bf_get_index(env, argv[3], "pageSize", 4294967295.0, &page)) return NULL;
  if (!bf_get_bytes(env, argv[4], "out", &out, &out_len)) return NULL;
  if (!bf_get_index(env, argv[5], "outOffset", BF_MAX_SAFE, &out_off)) return NULL;

  if (page == 0) return bf_range(env, "pageSize must be at least 1");
  if (!bf_check_out(env, out_len, out_off, count)) return NULL;
  if (start > src_len || count > (src_len - start) / page) {
    snprintf(msg, sizeof msg,
             "%zu pages of %zu bytes at start %zu need %.0f bytes, src has %zu", count,
             page, start, (double)start + (double)count * (double)page, src_len);
    return bf_range(env, msg);
  }

  fn = bf_current->fn;
  src += start;
  out += out_off;
  for (i = 0; i < count; i++) {
    bf_put(out + i * BF_DIGEST_BYTES, fn(src + i * page, page));
  }
  return NULL;
}

/* digestOne(src, start, len, out, outOffset): undefined */
static napi_value DigestOne(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  uint8_t *src = NULL, *out = NULL;
  size_t src_len = 0, out_len = 0, start = 0, len = 0, out_off = 0;
  char msg[200];

  BF_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 5) return bf_type(env, "digestOne expects 5 arguments");
  if (!bf_get_bytes(env, argv[0], "src", &src, &src_len)) return NULL;
  if (!bf_get_index(env, argv[1], "start", BF_MAX_SAFE, &start)) return NULL;
  if (!bf_get_index(env, argv[2], "len", BF_MAX_SAFE, &len)) return NULL;
  if (!bf_get_bytes(env, argv[3], "out", &out, &out_len)) return NULL;
  if (!bf_get_index(env, argv[4], "outOffset", BF_MAX_SAFE, &out_off)) return NULL;

  if (!bf_check_out(env, out_len, out_off, 1)) return NULL;
  if (start > src_len || len > src_len - start) {
    snprintf(msg, sizeof msg, "range [%zu, %.0f) is outside src (length %zu)", start,
             (double)start + (double)len, src_len);
    return bf_range(env, msg);
  }
  /* len == 0 may come with a NULL data pointer (empty array); XXH3
   * accepts (NULL, 0). */
  bf_put(out + out_off, bf_current->fn(len ? (const void *)(src + start) : NULL, len));
  return NULL;
}

/* ------------------------------------------------------------------ */
/* Streaming XXH3-64 over a whole migration stream                      */
/* ------------------------------------------------------------------ */

static void bf_stream_free(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  XXH3_freeState((XXH3_state_t *)data);
}

static int bf_get_stream(napi_env env, napi_value v, XXH3_state_t **state) {
  napi_valuetype t;
  void *data = NULL;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_external ||
      napi_get_value_external(env, v, &data) != napi_ok || data == NULL) {
    bf_type(env, "state must come from streamHashNew()");
    return 0;
  }
  *state = (XXH3_state_t *)data;
  return 1;
}

/* streamHashNew(): a fresh XXH3-64 (seed 0) streaming state. */
static napi_value StreamHashNew(napi_env env, napi_callback_info info) {
  napi_value result;
  XXH3_state_t *state = XXH3_createState();
  (void)info;
  if (state == NULL) {
    napi_throw_error(env, NULL, "out of memory for a stream hash state");
    return NULL;
  }
  XXH3_64bits_reset(state);
  if (napi_create_external(env, state, bf_stream_free, NULL, &result) != napi_ok) {
    XXH3_freeState(state);
    return bf_rethrow(env, "napi_create_external");
  }
  return result;
}

/* streamHashUpdate(state, src, start, len): hashes src[start, start+len) on. */
static napi_value StreamHashUpdate(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  XXH3_state_t *state = NULL;
  uint8_t *src = NULL;
  size_t src_len = 0, start = 0, len = 0;
  char msg[200];
  BF_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 4) return bf_type(env, "streamHashUpdate expects 4 arguments");
  if (!bf_get_stream(env, argv[0], &state)) return NULL;
  if (!bf_get_bytes(env, argv[1], "src", &src, &src_len)) return NULL;
  if (!bf_get_index(env, argv[2], "start", BF_MAX_SAFE, &start)) return NULL;
  if (!bf_get_index(env, argv[3], "len", BF_MAX_SAFE, &len)) return NULL;
  if (start > src_len || len > src_len - start) {
    snprintf(msg, sizeof msg, "range [%zu, %.0f) is outside src (length %zu)", start,
             (double)start + (double)len, src_len);
    return bf_range(env, msg);
  }
  if (len > 0) bf_current->stream_update(state, src + start, len);
  return NULL;
}

/* streamHashDigest(state): the hash of everything so far, as 16 hex digits. */
static napi_value StreamHashDigest(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], s;
  XXH3_state_t *state = NULL;
  char hex[17];
  BF_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 1) return bf_type(env, "streamHashDigest expects 1 argument");
  if (!bf_get_stream(env, argv[0], &state)) return NULL;
  snprintf(hex, sizeof hex, "%016llx", (unsigned long long)XXH3_64bits_digest(state));
  BF_CALL(env, napi_create_string_utf8(env, hex, 16, &s));
  return s;
}

static napi_value bf_variant_name(napi_env env) {
  napi_value s;
  BF_CALL(env, napi_create_string_utf8(env, bf_current->name, NAPI_AUTO_LENGTH, &s));
  return s;
}

/* variant(): name of the kernel in use ("avx2", "sse2" or "default"). */
static napi_value Variant(napi_env env, napi_callback_info info) {
  (void)info;
  return bf_variant_name(env);
}

/* variants(): names this build and CPU can run, best first. */
static napi_value Variants(napi_env env, napi_callback_info info) {
  napi_value arr, s;
  uint32_t n = 0;
  size_t i;
  const bf_variant *best = bf_best_variant();
  (void)info;
  BF_CALL(env, napi_create_array(env, &arr));
  for (i = BF_VARIANT_COUNT; i-- > 0;) {
    if (&bf_variants[i] > best) continue; /* not supported by this CPU */
    BF_CALL(env, napi_create_string_utf8(env, bf_variants[i].name, NAPI_AUTO_LENGTH, &s));
    BF_CALL(env, napi_set_element(env, arr, n++, s));
  }
  return arr;
}

/* selectVariant(name | "auto"): selects a kernel for the whole process
 * and returns the name selected. For tests and benchmarks. */
static napi_value SelectVariant(napi_env env, napi_callback_info info) {
  size_t argc = 1, n = 0, i;
  napi_value argv[1];
  char name[32];
  napi_valuetype t;
  const bf_variant *best = bf_best_variant();

  BF_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 1 || napi_typeof(env, argv[0], &t) != napi_ok || t != napi_string)
    return bf_type(env, "selectVariant expects a string");
  BF_CALL(env, napi_get_value_string_utf8(env, argv[0], name, sizeof name, &n));
  if (strcmp(name, "auto") == 0) {
    bf_current = best;
    return bf_variant_name(env);
  }
  for (i = 0; i < BF_VARIANT_COUNT; i++) {
    if (strcmp(name, bf_variants[i].name) == 0) {
      if (&bf_variants[i] > best) {
        char msg[96];
        snprintf(msg, sizeof msg, "digest variant %s is not supported by this CPU", name);
        napi_throw_error(env, "ERR_BFMIG_DIGEST_VARIANT", msg);
        return NULL;
      }
      bf_current = &bf_variants[i];
      return bf_variant_name(env);
    }
  }
  {
    char msg[96];
    snprintf(msg, sizeof msg, "unknown digest variant %.32s", name);
    napi_throw_range_error(env, "ERR_BFMIG_DIGEST_VARIANT", msg);
  }
  return NULL;
}

/* tuneSocket(fd, recvBufferBytes, notSentLowatBytes): sets SO_RCVBUF and TCP_NOTSENT_LOWAT on a
 * connected TCP socket (0 leaves an option as it is). Node has no API for either on TCP sockets; the
 * gateway uses them to keep the stream queued between QEMU and the WAN small (see
 * src/gateway/socket-tuning.ts). Returns whether TCP_NOTSENT_LOWAT exists on this platform. */
static napi_value TuneSocket(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3], result;
  int32_t fd = -1, rcv = 0, lowat = 0;
  bool have_lowat = false;
  BF_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 3 || napi_get_value_int32(env, argv[0], &fd) != napi_ok || napi_get_value_int32(env, argv[1], &rcv) != napi_ok ||
      napi_get_value_int32(env, argv[2], &lowat) != napi_ok || fd < 0 || rcv < 0 || lowat < 0)
    return bf_type(env, "tuneSocket expects (fd, recvBufferBytes, notSentLowatBytes) as non-negative integers");
  if (rcv > 0 && setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof rcv) != 0) {
    char msg[96];
    snprintf(msg, sizeof msg, "setsockopt(SO_RCVBUF): %s", strerror(errno));
    napi_throw_error(env, "ERR_BFMIG_SOCKET", msg);
    return NULL;
  }
#ifdef TCP_NOTSENT_LOWAT
  have_lowat = true;
  if (lowat > 0 && setsockopt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &lowat, sizeof lowat) != 0) {
    char msg[96];
    snprintf(msg, sizeof msg, "setsockopt(TCP_NOTSENT_LOWAT): %s", strerror(errno));
    napi_throw_error(env, "ERR_BFMIG_SOCKET", msg);
    return NULL;
  }
#endif
  BF_CALL(env, napi_get_boolean(env, have_lowat, &result));
  return result;
}

/* socketTuning(fd): [SO_RCVBUF, TCP_NOTSENT_LOWAT] of a TCP socket as the kernel reports them (Linux
 * doubles what SO_RCVBUF was set to; -1 where the platform has no TCP_NOTSENT_LOWAT). Lets tests see
 * that tuneSocket reached every connection it is meant to. */
static napi_value SocketTuning(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], result, value;
  int32_t fd = -1;
  int rcv = 0, lowat = -1;
  socklen_t len = sizeof rcv;
  BF_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 1 || napi_get_value_int32(env, argv[0], &fd) != napi_ok || fd < 0) return bf_type(env, "socketTuning expects a file descriptor");
  if (getsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcv, &len) != 0) {
    char msg[96];
    snprintf(msg, sizeof msg, "getsockopt(SO_RCVBUF): %s", strerror(errno));
    napi_throw_error(env, "ERR_BFMIG_SOCKET", msg);
    return NULL;
  }
#ifdef TCP_NOTSENT_LOWAT
  len = sizeof lowat;
  if (getsockopt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &lowat, &len) != 0) {
    char msg[96];
    snprintf(msg, sizeof msg, "getsockopt(TCP_NOTSENT_LOWAT): %s", strerror(errno));
    napi_throw_error(env, "ERR_BFMIG_SOCKET", msg);
    return NULL;
  }
#endif
  BF_CALL(env, napi_create_array_with_length(env, 2, &result));
  BF_CALL(env, napi_create_int32(env, rcv, &value));
  BF_CALL(env, napi_set_element(env, result, 0, value));
  BF_CALL(env, napi_create_int32(env, lowat, &value));
  BF_CALL(env, napi_set_element(env, result, 1, value));
  return result;
}

/*
 * threadCpuSeconds(): CPU time the calling thread has used, in seconds. What a piece of the gateway's
 * work costs, where the wall clock also counts the time the thread waited for a core (two cores shared
 * by the QEMUs, the gateways and the WAN emulator, as in the lab, stretch a 0.4 ms zstd call to 4 ms).
 */
static napi_value ThreadCpuSeconds(napi_env env, napi_callback_info info) {
  (void)info;
  struct timespec ts;
  napi_value result;
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) != 0) {
    napi_throw_error(env, "ERR_BFMIG_CLOCK", "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    return NULL;
  }
  BF_CALL(env, napi_create_double(env, (double)ts.tv_sec + (double)ts.tv_nsec / 1e9, &result));
  return result;
}

napi_status bf_pageio_register(napi_env env, napi_value exports); /* native/pageio.c */
napi_status bf_pagedelta_register(napi_env env, napi_value exports); /* native/pagedelta.c */
napi_status bf_zstd_register(napi_env env, napi_value exports);   /* native/zstd.c */

NAPI_MODULE_INIT() {
  napi_property_descriptor props[] = {
      {"digestPages", NULL, DigestPages, NULL, NULL, NULL, napi_enumerable, NULL},
      {"digestContiguous", NULL, DigestContiguous, NULL, NULL, NULL, napi_enumerable, NULL},
      {"digestOne", NULL, DigestOne, NULL, NULL, NULL, napi_enumerable, NULL},
      {"variant", NULL, Variant, NULL, NULL, NULL, napi_enumerable, NULL},
      {"variants", NULL, Variants, NULL, NULL, NULL, napi_enumerable, NULL},
      {"selectVariant", NULL, SelectVariant, NULL, NULL, NULL, napi_enumerable, NULL},
      {"streamHashNew", NULL, StreamHashNew, NULL, NULL, NULL, napi_enumerable, NULL},
      {"streamHashUpdate", NULL, StreamHashUpdate, NULL, NULL, NULL, napi_enumerable, NULL},
      {"streamHashDigest", NULL, StreamHashDigest, NULL, NULL, NULL, napi_enumerable, NULL},
      {"tuneSocket", NULL, TuneSocket, NULL, NULL, NULL, napi_enumerable, NULL},
      {"socketTuning", NULL, SocketTuning, NULL, NULL, NULL, napi_enumerable, NULL},
      {"threadCpuSeconds", NULL, ThreadCpuSeconds, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  static int initialised = 0;
  if (!initialised) {
    /* Benign race if two workers load at once: both store the same value. */
    bf_current = bf_best_variant();
    initialised = 1;
  }
  if (napi_define_properties(env, exports, sizeof props / sizeof props[0], props) != napi_ok ||
      bf_pageio_register(env, exports) != napi_ok || bf_pagedelta_register(env, exports) != napi_ok ||
      bf_zstd_register(env, exports) != napi_ok)
    return bf_rethrow(env, "napi_define_properties");
  return exports;
}
