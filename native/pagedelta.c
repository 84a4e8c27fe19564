/*
 * Page deltas: a guest page that changed since the version both gateways hold, written as the byte
 * ranges that differ from that version. The format, like QEMU's XBZRLE, is a sequence of
 *
 *   ULEB128 unchanged bytes | ULEB128 changed bytes | the changed bytes (new content)
 *
 * covering the page from its start; bytes after the last range are unchanged. Both functions work on
 * caller-supplied buffers and allocate nothing; every length read from a delta is checked before it
 * is used, since a delta comes from the WAN.
 */
#include <node_api.h>
#include <stdint.h>
#include <string.h>

static napi_value pd_throw(napi_env env, const char *msg) {
  napi_throw_range_error(env, "ERR_BFMIG_DELTA", msg);
  return NULL;
}

/* A buffer argument with [start, start + len) inside it. */
static int pd_bytes(napi_env env, napi_value v, napi_value vstart, size_t len, uint8_t **at) {
  void *data = NULL;
  size_t blen = 0;
  double start = 0;
  bool is = false;
  if (napi_is_typedarray(env, v, &is) != napi_ok || !is) return 0;
  napi_typedarray_type type;
  size_t length = 0, offset = 0;
  napi_value ab;
  if (napi_get_typedarray_info(env, v, &type, &length, &data, &ab, &offset) != napi_ok || type != napi_uint8_array) return 0;
  blen = length;
  if (napi_get_value_double(env, vstart, &start) != napi_ok || !(start >= 0) || start != (double)(size_t)start) return 0;
  if ((size_t)start > blen || len > blen - (size_t)start) return 0;
  *at = (uint8_t *)data + (size_t)start;
  return 1;
}

static size_t pd_put_uleb(uint8_t *out, size_t v) {
  size_t n = 0;
  while (v >= 0x80) {
    out[n++] = (uint8_t)(v | 0x80);
    v >>= 7;
  }
  out[n++] = (uint8_t)v;
  return n;
}

/* Reads a ULEB128 of at most 3 bytes (a page is far below 2^21); 0 on malformed or truncated input. */
static size_t pd_get_uleb(const uint8_t *in, size_t avail, size_t *v) {
  size_t value = 0;
  for (size_t i = 0; i < 3 && i < avail; i++) {
    value |= (size_t)(in[i] & 0x7f) << (7 * i);
    if ((in[i] & 0x80) == 0) {
      *v = value;
      return i + 1;
    }
  }
  return 0;
}

static inline uint64_t pd_load(const uint8_t *p) {
  uint64_t v;
  memcpy(&v, p, 8);
  return v;
}

/*
 * pageDeltaEncode(old, oldStart, new, newStart, pageSize, out, outStart, maxLen): the delta's length,
 * or -1 when it would exceed maxLen (the page is better sent whole). pageSize is a multiple of 8.
 */
static napi_value PageDeltaEncode(napi_env env, napi_callback_info info) {
  size_t argc = 8;
  napi_value argv[8], result;
  double page_d = 0, max_d = 0;
  uint8_t *old_p, *new_p, *out;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 8) return pd_throw(env, "pageDeltaEncode expects 8 arguments");
  if (napi_get_value_double(env, argv[4], &page_d) != napi_ok || !(page_d >= 8) || page_d > 65536 || (size_t)page_d % 8 != 0) return pd_throw(env, "pageSize must be a multiple of 8 up to 65536");
  if (napi_get_value_double(env, argv[7], &max_d) != napi_ok || !(max_d >= 0) || max_d > 65536) return pd_throw(env, "maxLen out of range");
  size_t page = (size_t)page_d, max = (size_t)max_d;
  if (!pd_bytes(env, argv[0], argv[1], page, &old_p) || !pd_bytes(env, argv[2], argv[3], page, &new_p) || !pd_bytes(env, argv[5], argv[6], max, &out))
    return pd_throw(env, "pageDeltaEncode: a buffer range is out of bounds");

  size_t at = 0, pos = 0, len = 0;
  size_t w = 0;
  const size_t words = page / 8;
  while (w < words) {
    /* Skip equal words, then take the differing ones: a range ends at the first equal word, since
     * eight unchanged bytes cost more inside a range than a new range's two lengths. */
    while (w < words && pd_load(old_p + 8 * w) == pd_load(new_p + 8 * w)) w++;
    if (w == words) break;
    size_t first = w;
    while (w < words && pd_load(old_p + 8 * w) != pd_load(new_p + 8 * w)) w++;
    /* Trim the range's first and last words to the bytes that differ. */
    size_t start = 8 * first, end = 8 * w;
    while (old_p[start] == new_p[start]) start++;
    while (old_p[end - 1] == new_p[end - 1]) end--;
    len = end - start;
    uint8_t lens[8];
    size_t n = pd_put_uleb(lens, start - pos);
    n += pd_put_uleb(lens + n, len);
    if (at + n + len > max) {
      napi_create_int32(env, -1, &result);
      return result;
    }
    memcpy(out + at, lens, n);
    at += n;
    memcpy(out + at, new_p + start, len);
    at += len;
    pos = end;
  }
  napi_create_double(env, (double)at, &result);
  return result;
}

/*
 * pageDeltaApply(old, oldStart, delta, deltaStart, deltaLen, pageSize, out, outStart): writes the new
 * page into out. Throws when the delta is malformed (ranges past the page, truncated, trailing bytes).
 */
static napi_value PageDeltaApply(napi_env env, napi_callback_info info) {
  size_t argc = 8;
  napi_value argv[8];
  double page_d = 0, dlen_d = 0;
  uint8_t *old_p, *delta, *out;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 8) return pd_throw(env, "pageDeltaApply expects 8 arguments");
  if (napi_get_value_double(env, argv[5], &page_d) != napi_ok || !(page_d >= 8) || page_d > 65536 || (size_t)page_d % 8 != 0) return pd_throw(env, "pageSize must be a multiple of 8 up to 65536");
  if (napi_get_value_double(env, argv[4], &dlen_d) != napi_ok || !(dlen_d >= 0) || dlen_d > 1048576) return pd_throw(env, "deltaLen out of range");
  size_t page = (size_t)page_d, dlen = (size_t)dlen_d;
  if (!pd_bytes(env, argv[0], argv[1], page, &old_p) || !pd_bytes(env, argv[2], argv[3], dlen, &delta) || !pd_bytes(env, argv[6], argv[7], page, &out))
    return pd_throw(env, "pageDeltaApply: a buffer range is out of bounds");
  if (out != old_p) memmove(out, old_p, page);
  size_t at = 0, pos = 0;
  while (at < dlen) {
    size_t skip = 0, len = 0, n;
    if ((n = pd_get_uleb(delta + at, dlen - at, &skip)) == 0) return pd_throw(env, "page delta: malformed length");
    at += n;
    if ((n = pd_get_uleb(delta + at, dlen - at, &len)) == 0) return pd_throw(env, "page delta: malformed length");
    at += n;
    if (skip > page - pos || len > page - pos - skip) return pd_throw(env, "page delta: a range runs past the page");
    if (len > dlen - at) return pd_throw(env, "page delta: truncated");
    pos += skip;
    memcpy(out + pos, delta + at, len);
    pos += len;
    at += len;
  }
  return NULL;
}

napi_status bf_pagedelta_register(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"pageDeltaEncode", NULL, PageDeltaEncode, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pageDeltaApply", NULL, PageDeltaApply, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  return napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
