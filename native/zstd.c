/*
 * zstd streaming contexts for the gateways' Literal payloads (src/wire/compression.ts): one compressor
 * on the sending gateway and one decompressor on the receiving gateway per migration, so each batch
 * is compressed against the ones before it (within the window), not on its own.
 *
 * The compressor writes a batch into a caller's buffer no larger than the batch itself: when the
 * compressed batch does not fit (incompressible data), the call says so and restarts the stream, and
 * the caller sends the batch raw; the receiver restarts its stream on the raw frame too.
 *
 * The decompressor produces exactly the number of bytes the frame declared, into a buffer of that
 * size, and refuses anything else (more, less, corrupt input, a window larger than agreed): input
 * from a peer is never trusted.
 */
#include <node_api.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zstd.h>

/* Tags: a handle of the other kind (or of page I/O) is refused, never used as this one. */
#define ZC_TAG 0x7a637478u /* "zctx" */
#define ZD_TAG 0x7a647478u /* "zdtx" */

typedef struct {
  uint32_t tag;
  /* A batch is on the thread pool (zstdCompressAsync): every other call is refused until it completes. */
  int busy;
  ZSTD_CCtx *cctx;
} zc;

typedef struct {
  uint32_t tag;
  ZSTD_DCtx *dctx;
} zd;

static napi_value z_throw(napi_env env, const char *msg) {
  napi_throw_error(env, "ERR_BFMIG_ZSTD", msg);
  return NULL;
}

static napi_value z_throw_zstd(napi_env env, const char *what, size_t code) {
  char msg[200];
  snprintf(msg, sizeof msg, "%s: %s", what, ZSTD_getErrorName(code));
  return z_throw(env, msg);
}

static int z_bytes(napi_env env, napi_value v, uint8_t **data, size_t *length) {
  bool is_ta = false;
  napi_typedarray_type type;
  void *p = NULL;
  if (napi_is_typedarray(env, v, &is_ta) != napi_ok || !is_ta) return 0;
  if (napi_get_typedarray_info(env, v, &type, length, &p, NULL, NULL) != napi_ok || type != napi_uint8_array) return 0;
  *data = (uint8_t *)p;
  return 1;
}

static int z_int(napi_env env, napi_value v, int32_t *out) {
  return napi_get_value_int32(env, v, out) == napi_ok;
}

static void *z_handle(napi_env env, napi_value v, uint32_t tag) {
  void *data = NULL;
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_external || napi_get_value_external(env, v, &data) != napi_ok) return NULL;
  return data != NULL && *(uint32_t *)data == tag ? data : NULL;
}

static void zc_finalize(napi_env env, void *data, void *hint) {
  zc *c = (zc *)data;
  ZSTD_freeCCtx(c->cctx);
  free(c);
}

static void zd_finalize(napi_env env, void *data, void *hint) {
  zd *d = (zd *)data;
  ZSTD_freeDCtx(d->dctx);
  free(d);
}

/* The handle JS holds: freed by `fin` when collected, or at once when it cannot be made. */
static napi_value z_external(napi_env env, void *p, napi_finalize fin) {
  napi_value handle;
  if (napi_create_external(env, p, fin, NULL, &handle) != napi_ok) {
    fin(env, p, NULL);
    return z_throw(env, "napi_create_external");
  }
  return handle;
}

/* The one handle argument of a reset call. */
static void *z_only_handle(napi_env env, napi_callback_info info, uint32_t tag) {
  size_t argc = 1;
  napi_value argv[1];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1) return NULL;
  return z_handle(env, argv[0], tag);
}

/* zstdCompressorNew(level, windowLog) -> handle */
static napi_value CompressorNew(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  int32_t level = 0, window_log = 0;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2 || !z_int(env, argv[0], &level) ||
      !z_int(env, argv[1], &window_log))
    return z_throw(env, "zstdCompressorNew expects (level, windowLog)");
  zc *c = calloc(1, sizeof *c);
  if (c != NULL) c->tag = ZC_TAG;
  if (c == NULL || (c->cctx = ZSTD_createCCtx()) == NULL) {
    free(c);
    return z_throw(env, "out of memory for a zstd compressor");
  }
  size_t r = ZSTD_CCtx_setParameter(c->cctx, ZSTD_c_compressionLevel, level);
  if (!ZSTD_isError(r)) r = ZSTD_CCtx_setParameter(c->cctx, ZSTD_c_windowLog, window_log);
  /* The receiver knows each batch's length from the frame; no checksum: the stream check covers it. */
  if (!ZSTD_isError(r)) r = ZSTD_CCtx_setParameter(c->cctx, ZSTD_c_checksumFlag, 0);
  if (ZSTD_isError(r)) {
    zc_finalize(env, c, NULL);
    return z_throw_zstd(env, "zstd compressor parameters", r);
  }
  return z_external(env, c, zc_finalize);
}

/*
 * Compresses `count` parts into out[0, out_len) and flushes: the bytes written, -1 when they did not fit
 * (the stream is restarted: the batch is to be sent raw, and the next batch starts a new zstd frame),
 * or -2 on a zstd error (`*error` says which; the stream is restarted). Touches no JS value: the thread
 * pool runs it too.
 */
static double zc_compress(zc *c, uint8_t *const *parts, const size_t *lengths, uint32_t count, uint8_t *out, size_t out_len,
                          const char **error, size_t *code) {
  ZSTD_outBuffer output = {out, out_len, 0};
  int fits = 1;
  for (uint32_t i = 0; i < count && fits; i++) {
    ZSTD_inBuffer input = {parts[i], lengths[i], 0};
    while (input.pos < input.size) {
      size_t r = ZSTD_compressStream2(c->cctx, &output, &input, ZSTD_e_continue);
      if (ZSTD_isError(r)) {
        ZSTD_CCtx_reset(c->cctx, ZSTD_reset_session_only);
        *error = "zstd compress";
        *code = r;
        return -2.0;
      }
      if (output.pos == output.size && input.pos < input.size) {
        fits = 0;
        break;
      }
    }
  }
  /* Flush: everything given so far can be decompressed from what was written. */
  while (fits) {
    ZSTD_inBuffer none = {NULL, 0, 0};
    size_t r = ZSTD_compressStream2(c->cctx, &output, &none, ZSTD_e_flush);
    if (ZSTD_isError(r)) {
      ZSTD_CCtx_reset(c->cctx, ZSTD_reset_session_only);
      *error = "zstd flush";
      *code = r;
      return -2.0;
    }
    if (r == 0) break;
    if (output.pos == output.size) fits = 0;
  }
  if (!fits) ZSTD_CCtx_reset(c->cctx, ZSTD_reset_session_only);
  return fits ? (double)output.pos : -1.0;
}

/*
 * zstdCompress(handle, inputs: Uint8Array[], out: Uint8Array, outOffset) -> bytes written at outOffset,
 * or -1 when the compressed batch did not fit before the end of out: the stream was restarted (the
 * batch is to be sent raw, and the next batch starts a new zstd frame).
 */
static napi_value Compress(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4], result;
  uint32_t count = 0;
  bool is_array = false;
  uint8_t *out = NULL;
  size_t out_len = 0;
  int32_t out_off = 0;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 4) return z_throw(env, "zstdCompress expects (handle, inputs, out, outOffset)");
  zc *c = (zc *)z_handle(env, argv[0], ZC_TAG);
  if (c == NULL || c->cctx == NULL) return z_throw(env, "expected a zstd compressor");
  if (c->busy) return z_throw(env, "zstdCompress: the compressor is busy with a batch on the thread pool");
  if (napi_is_array(env, argv[1], &is_array) != napi_ok || !is_array || napi_get_array_length(env, argv[1], &count) != napi_ok)
    return z_throw(env, "zstdCompress: inputs must be an array");
  if (!z_bytes(env, argv[2], &out, &out_len) || !z_int(env, argv[3], &out_off) || out_off < 0 || (size_t)out_off > out_len)
    return z_throw(env, "zstdCompress: bad output buffer or offset");
  /* Per call, not static: worker threads share the addon's statics. */
  uint8_t **parts = malloc((count + 1) * sizeof *parts);
  size_t *lengths = malloc((count + 1) * sizeof *lengths);
  if (parts == NULL || lengths == NULL) {
    free(parts);
    free(lengths);
    return z_throw(env, "out of memory for a zstd batch");
  }
  for (uint32_t i = 0; i < count; i++) {
    napi_value item;
    if (napi_get_element(env, argv[1], i, &item) != napi_ok || !z_bytes(env, item, &parts[i], &lengths[i])) {
      free(parts);
      free(lengths);
      return z_throw(env, "zstdCompress: inputs must be Uint8Arrays");
    }
  }
  const char *error = NULL;
  size_t code = 0;
  double written = zc_compress(c, parts, lengths, count, out + out_off, out_len - (size_t)out_off, &error, &code);
  free(parts);
  free(lengths);
  if (written == -2.0) return z_throw_zstd(env, error, code);
  if (napi_create_double(env, written, &result) != napi_ok) return z_throw(env, "napi_create_double");
  return result;
}

/* One batch on the thread pool: what the work reads and writes, held by references until it completes. */
typedef struct {
  zc *c;
  napi_async_work work;
  napi_ref handle, input, out, done;
  uint8_t *in_data, *out_data;
  size_t in_len, out_len;
  double written, cpu_seconds;
  const char *error;
  size_t code;
} zc_job;

static double thread_cpu_seconds(void) {
  struct timespec ts;
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) != 0) return 0.0;
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void zc_job_execute(napi_env env, void *data) {
  zc_job *job = (zc_job *)data;
  double started = thread_cpu_seconds();
  job->written = zc_compress(job->c, &job->in_data, &job->in_len, 1, job->out_data, job->out_len, &job->error, &job->code);
  job->cpu_seconds = thread_cpu_seconds() - started;
}

static void zc_job_free(napi_env env, zc_job *job) {
  napi_ref refs[4] = {job->handle, job->input, job->out, job->done};
  for (int i = 0; i < 4; i++)
    if (refs[i] != NULL) napi_delete_reference(env, refs[i]);
  if (job->work != NULL) napi_delete_async_work(env, job->work);
  free(job);
}

/* Back on the JS thread: done(written, cpuSeconds, error) as zstdCompress would have returned or thrown. */
static void zc_job_complete(napi_env env, napi_status status, void *data) {
  zc_job *job = (zc_job *)data;
  job->c->busy = 0;
  napi_value done, undefined, argv[3];
  char message[200] = "";
  if (status != napi_ok) {
    snprintf(message, sizeof message, "zstd compression on the thread pool did not run (status %d)", (int)status);
  } else if (job->written == -2.0) {
    snprintf(message, sizeof message, "%s: %s", job->error, ZSTD_getErrorName(job->code));
  }
  if (napi_get_reference_value(env, job->done, &done) == napi_ok && napi_get_undefined(env, &undefined) == napi_ok &&
      napi_create_double(env, message[0] ? -2.0 : job->written, &argv[0]) == napi_ok &&
      napi_create_double(env, job->cpu_seconds, &argv[1]) == napi_ok) {
    if (message[0]) napi_create_string_utf8(env, message, NAPI_AUTO_LENGTH, &argv[2]);
    else argv[2] = undefined;
    zc_job_free(env, job);
    napi_call_function(env, undefined, done, 3, argv, NULL);
    return;
  }
  zc_job_free(env, job);
}

/*
 * zstdCompressAsync(handle, input: Uint8Array, out: Uint8Array, outOffset, done): as zstdCompress of
 * [input], on libuv's thread pool; done(written, cpuSeconds, error) is called on the JS thread once it
 * ran (error: a message, written then -2). The caller must leave input and out alone until then, and
 * the compressor takes no other call meanwhile (it refuses them).
 */
static napi_value CompressAsync(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5], name;
  int32_t out_off = 0;
  napi_valuetype done_type;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 5) return z_throw(env, "zstdCompressAsync expects (handle, input, out, outOffset, done)");
  zc *c = (zc *)z_handle(env, argv[0], ZC_TAG);
  if (c == NULL || c->cctx == NULL) return z_throw(env, "expected a zstd compressor");
  if (c->busy) return z_throw(env, "zstdCompressAsync: the compressor is busy with a batch on the thread pool");
  zc_job *job = calloc(1, sizeof *job);
  if (job == NULL) return z_throw(env, "out of memory for a zstd batch");
  job->c = c;
  if (!z_bytes(env, argv[1], &job->in_data, &job->in_len) || !z_bytes(env, argv[2], &job->out_data, &job->out_len) || !z_int(env, argv[3], &out_off) ||
      out_off < 0 || (size_t)out_off > job->out_len || napi_typeof(env, argv[4], &done_type) != napi_ok || done_type != napi_function) {
    free(job);
    return z_throw(env, "zstdCompressAsync: bad input, output buffer, offset or callback");
  }
  job->out_data += out_off;
  job->out_len -= (size_t)out_off;
  if (napi_create_reference(env, argv[0], 1, &job->handle) != napi_ok || napi_create_reference(env, argv[1], 1, &job->input) != napi_ok ||
      napi_create_reference(env, argv[2], 1, &job->out) != napi_ok || napi_create_reference(env, argv[4], 1, &job->done) != napi_ok ||
      napi_create_string_utf8(env, "bfmig:zstd", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_async_work(env, NULL, name, zc_job_execute, zc_job_complete, job, &job->work) != napi_ok ||
      napi_queue_async_work(env, job->work) != napi_ok) {
    zc_job_free(env, job);
    return z_throw(env, "zstdCompressAsync: could not queue the batch");
  }
  c->busy = 1;
  return NULL;
}

/* zstdCompressorReset(handle): the next batch starts a new zstd frame (the receiver restarts too). */
static napi_value CompressorReset(napi_env env, napi_callback_info info) {
  zc *c = (zc *)z_only_handle(env, info, ZC_TAG);
  if (c == NULL || c->cctx == NULL) return z_throw(env, "zstdCompressorReset expects a zstd compressor");
  if (c->busy) return z_throw(env, "zstdCompressorReset: the compressor is busy with a batch on the thread pool");
  ZSTD_CCtx_reset(c->cctx, ZSTD_reset_session_only);
  return NULL;
}

/* zstdDecompressorNew(windowLogMax) -> handle */
static napi_value DecompressorNew(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  int32_t window_log_max = 0;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1 || !z_int(env, argv[0], &window_log_max))
    return z_throw(env, "zstdDecompressorNew expects (windowLogMax)");
  zd *d = calloc(1, sizeof *d);
  if (d != NULL) d->tag = ZD_TAG;
  if (d == NULL || (d->dctx = ZSTD_createDCtx()) == NULL) {
    free(d);
    return z_throw(env, "out of memory for a zstd decompressor");
  }
  size_t r = ZSTD_DCtx_setParameter(d->dctx, ZSTD_d_windowLogMax, window_log_max);
  if (ZSTD_isError(r)) {
    zd_finalize(env, d, NULL);
    return z_throw_zstd(env, "zstd decompressor parameters", r);
  }
  return z_external(env, d, zd_finalize);
}

/*
 * zstdDecompress(handle, input: Uint8Array, out: Uint8Array): decompresses all of input into exactly
 * all of out, or throws (and the stream is then unusable: the migration ends).
 */
static napi_value Decompress(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  uint8_t *in = NULL, *out = NULL;
  size_t in_len = 0, out_len = 0;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 3) return z_throw(env, "zstdDecompress expects (handle, input, out)");
  zd *d = (zd *)z_handle(env, argv[0], ZD_TAG);
  if (d == NULL || d->dctx == NULL) return z_throw(env, "expected a zstd decompressor");
  if (!z_bytes(env, argv[1], &in, &in_len) || !z_bytes(env, argv[2], &out, &out_len)) return z_throw(env, "zstdDecompress: input and out must be Uint8Arrays");
  ZSTD_inBuffer input = {in, in_len, 0};
  ZSTD_outBuffer output = {out, out_len, 0};
  while (input.pos < input.size) {
    size_t r = ZSTD_decompressStream(d->dctx, &output, &input);
    if (ZSTD_isError(r)) return z_throw_zstd(env, "zstd decompress", r);
    if (output.pos == output.size && input.pos < input.size) return z_throw(env, "compressed batch holds more bytes than its frame declared");
  }
  if (output.pos < output.size) {
    /* zstd may hold decoded bytes back until asked again with room. */
    ZSTD_inBuffer none = {NULL, 0, 0};
    size_t r = ZSTD_decompressStream(d->dctx, &output, &none);
    if (ZSTD_isError(r)) return z_throw_zstd(env, "zstd decompress", r);
    if (output.pos < output.size) return z_throw(env, "compressed batch holds fewer bytes than its frame declared");
  }
  /* Nothing may be left over for a later call: the batch must end where its frame says. */
  uint8_t spare;
  ZSTD_inBuffer none = {NULL, 0, 0};
  ZSTD_outBuffer extra = {&spare, 1, 0};
  size_t r = ZSTD_decompressStream(d->dctx, &extra, &none);
  if (ZSTD_isError(r)) return z_throw_zstd(env, "zstd decompress", r);
  if (extra.pos != 0) return z_throw(env, "compressed batch holds more bytes than its frame declared");
  return NULL;
}

/* zstdDecompressorReset(handle): the sender restarted its stream (it sent a batch raw). */
static napi_value DecompressorReset(napi_env env, napi_callback_info info) {
  zd *d = (zd *)z_only_handle(env, info, ZD_TAG);
  if (d == NULL || d->dctx == NULL) return z_throw(env, "zstdDecompressorReset expects a zstd decompressor");
  ZSTD_DCtx_reset(d->dctx, ZSTD_reset_session_only);
  return NULL;
}

napi_status bf_zstd_register(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"zstdCompressorNew", NULL, CompressorNew, NULL, NULL, NULL, napi_enumerable, NULL},
      {"zstdCompress", NULL, Compress, NULL, NULL, NULL, napi_enumerable, NULL},
      {"zstdCompressAsync", NULL, CompressAsync, NULL, NULL, NULL, napi_enumerable, NULL},
      {"zstdCompressorReset", NULL, CompressorReset, NULL, NULL, NULL, napi_enumerable, NULL},
      {"zstdDecompressorNew", NULL, DecompressorNew, NULL, NULL, NULL, napi_enumerable, NULL},
      {"zstdDecompress", NULL, Decompress, NULL, NULL, NULL, napi_enumerable, NULL},
      {"zstdDecompressorReset", NULL, DecompressorReset, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  return napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
