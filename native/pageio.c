/*
 * bfmig page I/O: a store's pages file read and written with O_DIRECT, the writes queued to a thread
 * of the store's own, the reads of a sequential stream fetched ahead by that thread, and those of a
 * strided one (a back leg's multifd channel reading the Runs of every N-th packet) likewise.
 *
 * Why: the store writes each page once per migration and reads it once in the next one, in stream
 * order. Through the page cache every byte costs a fresh page of kernel memory, and on a virtual
 * machine whose freed memory goes back to the host (virtio-balloon free page reporting) that costs
 * more CPU than everything else the gateway does to the byte. O_DIRECT moves pages between the
 * gateway's own reused buffers and the device; the thread keeps the device busy while the event loop
 * parses, hashes and forwards.
 *
 * The JavaScript API stays synchronous (src/store/direct-pages.ts): the store fills a write buffer of
 * the queue itself (pageioWriteBuffers, pageioAcquire: waits only while all are queued) and hands it to
 * the thread (pageioSubmit); pageioRead returns the bytes; pageioDrain waits for every queued write.
 * Ordering: the thread works its queue in order, and a read first waits for every queued write that overlaps it, so a read always sees the last write before it.
 * A read-ahead buffer whose range a later write overlaps is dropped.
 * A read that a queued write covers whole is served from that write's buffer: it need not wait for the device.
 *
 * Lone pages read at random (a Delta's base on a receiving gateway) cost the device's whole latency
 * each, 100-250 us here, while the device serves many at once (16 in parallel: about 15 us a page).
 * pageioPrefetch submits such pages to the kernel's asynchronous I/O (io_submit: one system call a batch,
 * no thread to wake) as soon as the caller knows it will want them, or, where the kernel has none for
 * us, queues them to a small pool of reader threads; a pageioRead of one of them takes the bytes read
 * (waiting if the read is under way).
 * A prefetched page that a later write overlaps is dropped, as a read-ahead is.
 * pageioPrefetchRanges does the same for ranges of pages (a back leg's multifd Runs, which the channels
 * read in turn from as many places of the file: one stream read-ahead cannot follow them), all submitted
 * at once to the kernel's AIO, or read PIO_RANGE_READERS at a time by the pool. A stream read that such a
 * range serves starts no stream read-ahead: its caller reads ahead its own way.
 * pageioDeviceReadBytes says how many bytes every path has read from the file, used or not.
 *
 * A failed write is reported once, by the next pageioWrite or pageioDrain, as the range of the file
 * that may not hold what was written (errno and [start, end)); the caller must stop trusting it.
 */
#ifndef NAPI_VERSION
#define NAPI_VERSION 8
#endif
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <node_api.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#define PIO_ALIGN 4096
/* One queue buffer; a write or a read-ahead moves at most this much. */
#define PIO_SLOT_BYTES (1024 * 1024)
/* Write buffers: the store keeps up to 8 lent at once as open runs (src/store/pages-file.ts: one for
   each multifd channel writing its own stretch of pages), and at most PIO_WRITE_QUEUE are queued or
   being written, so a single stream touches no more of them than before runs stayed open. */
#define PIO_WRITE_SLOTS 12
#define PIO_WRITE_QUEUE 4
/* More writes may be queued while those queued hold no more than this: a back leg's changed pages, each a
   write of a page somewhere in the file, touch a page of each buffer, and the device writes them side by
   side (below). */
#define PIO_SMALL_WRITES_BYTES (256 * 1024)
#define PIO_READ_SLOTS 4
#define PIO_SLOTS (PIO_WRITE_SLOTS + PIO_READ_SLOTS)
#define PIO_HUGE_PAGE (2 * 1024 * 1024)
/* Bytes of a region holding `slots` queue buffers, in whole huge pages. */
#define pio_region_bytes(slots) (((size_t)(slots) * PIO_SLOT_BYTES + PIO_HUGE_PAGE - 1) / PIO_HUGE_PAGE * PIO_HUGE_PAGE)
/* Lone pages read ahead by the reader pool (pageioPrefetch), and the pool's threads: the device serves
   about this many reads at once before more stop paying (measured: 16 in parallel, ~15 us a page). */
#define PIO_PREFETCH_SLOTS 128
#define PIO_PREFETCH_THREADS 12
/* Ranges read ahead by the same pool (pageioPrefetchRanges): a back leg's multifd Runs, a packet's pages
   each (512 KiB on x86), which a receiver's channels read in turn from all over the file, so that neither
   the stream read-ahead nor its strides follow them. Slots of their own, allocated at the first use
   (32 MiB, resident as slots are read into): the channels share them, 4 Runs ahead each up to 10
   channels, fewer beyond (src/proxy/reads-ahead.ts). 32 slots had 8 channels read 2 Runs ahead each,
   and their back legs ran at 0.22 GB/s against 0.31 with 64 (docs/benchmarks.md). */
#define PIO_RANGE_SLOTS 64
#define PIO_RANGE_BYTES (512 * 1024)
#define PIO_RANGE_QUEUE (4 * PIO_RANGE_SLOTS)
/* Ranges read at once at most: the device is as fast with a few large reads in flight, and every pool
   thread woken for one competes for the cores with the gateway it reads for. */
#define PIO_RANGE_READERS 4
/* Reads the kernel's AIO may have in flight at once: every lone page and range slot. */
#define PIO_AIO_SLOTS (PIO_PREFETCH_SLOTS + PIO_RANGE_SLOTS)
/* A stream read this large starts read-ahead without waiting for a second one. */
#define PIO_STREAM_READ_BYTES (64 * 1024)
/* How far a stream is read ahead of its reader: it starts at 4x the read that began it (at least
   PIO_READ_AHEAD_MIN), doubles each time its reader has used a window read ahead, up to every read slot
   full, and falls back once a window goes unused. A first leg's stream reads (a page QEMU sent again
   unchanged, a Delta's base of its own version) are a page or two hundreds of KiB apart: reading the
   4 MiB after each had a receiver's device read 149 MB for 24 MB of pages (docs/benchmarks.md,
   "Thirty-sixth session"). */
#define PIO_READ_AHEAD_MIN (64 * 1024)
#define PIO_READ_AHEAD_MAX ((off_t)PIO_READ_SLOTS * PIO_SLOT_BYTES)

enum slot_state {
  SLOT_FREE = 0,
  SLOT_FILLING, /* a write buffer lent to JavaScript (pageioAcquire) until pageioSubmit */
  SLOT_QUEUED, /* in the queue, not started */
  SLOT_BUSY,   /* the thread is on it */
  SLOT_DONE,   /* a finished read-ahead holding [pos, pos + got) */
};

typedef struct {
  uint8_t *buf;
  int state;
  int is_write;
  int stale; /* a read-ahead whose range was written since it was queued: never served */
  int err;   /* read-ahead: errno, or 0 */
  int used;  /* read-ahead: a read was served from it */
  off_t pos;
  size_t len;
  size_t got;
} pio_slot;

/* A lone page read ahead by the reader pool: state as a slot's (FREE, QUEUED, BUSY, DONE). */
typedef struct {
  int state;
  int stale; /* written since it was queued: never served */
  int err;
  off_t pos;
  uint64_t seq; /* queue order: the pool reads the oldest first, a new prefetch evicts the oldest unread */
} pio_page;

/* A range read ahead by the reader pool: state as a slot's (FREE, QUEUED, BUSY, DONE). */
typedef struct {
  int state;
  int stale; /* written since it was queued: never served */
  int err;
  off_t pos;
  size_t len;
  size_t got;
  uint64_t seq; /* queue order: a new prefetch evicts, of ranges not served from, the oldest only */
  int used;     /* a read was served from it: the rest of it is likely not wanted (a Run's last pages zero) */
} pio_range;

typedef struct {
  int fd;
  off_t file_size; /* read-ahead stops here */
  pthread_t thread;
  int thread_started;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  pio_slot slots[PIO_SLOTS];
  int queue[PIO_SLOTS]; /* slot indexes in submission order */
  int qhead, qlen;
  int closing, closed;
  int exported; /* the write buffers are also JavaScript ArrayBuffers */
  napi_ref exported_refs[PIO_WRITE_SLOTS]; /* weak: detached at close */
  int refs;     /* the handle and each exported ArrayBuffer: the last one gone frees everything */
  /* First failed write since it was last reported, widened to cover every failure since. */
  int werr;
  off_t werr_start, werr_end;
  /* End of the last read: a read starting there (or a little after) is sequential. */
  off_t last_read_end;
  /* Start of the last stream read, and the distance from the one before it (0: none yet). A read at
     the same distance again is strided: a back leg's multifd channel reading every N-th packet. */
  off_t last_read_pos;
  off_t last_stride;
  /* The stream's read-ahead: how far ahead of its reader (0: not begun), and where what is queued ends. */
  off_t ra_bytes;
  off_t ra_end;
  uint8_t *bounce; /* the calling thread's aligned buffer for reads not served ahead */
  /* Bytes read from the file so far, by every path (read ahead or not; added to atomically: the pool's
     threads read without mu). What pageioDeviceReadBytes reports. */
  uint64_t read_bytes;
  /* Of those, the bytes pageioRead read itself, the caller waiting: none of the paths ahead held them. */
  uint64_t caller_read_bytes;
  /* Prefetched lone pages: their own slots (PIO_ALIGN bytes each), queue order by seq, and the reader
     pool, started on the first pageioPrefetch; the pool waits on pf_cv, readers of its pages on cv. */
  pio_page pf[PIO_PREFETCH_SLOTS];
  uint8_t *pf_region;
  uint64_t pf_seq;
  /* Slots queued for the pool, oldest first (a slot taken over or dropped since is passed over). */
  int pf_queue[PIO_PREFETCH_SLOTS];
  int pf_qhead, pf_qlen;
  pthread_cond_t pf_cv;
  pthread_t pf_threads[PIO_PREFETCH_THREADS];
  int pf_started;
  /* The kernel's asynchronous I/O context reading the lone pages and the ranges instead of the pool (0:
     none, the pool reads them): one io_submit a batch and no thread woken a read. On a host short of
     cores each reader woken took the event loop's core, and queuing a 4-channel first leg's Delta bases
     cost its receiving gateway's main thread 205 ms (docs/benchmarks.md, "Twenty-seventh session").
     Only the JavaScript thread submits and reaps, with mu held (released while it waits). An event's
     data names its slot: a lone page's index, or PIO_PREFETCH_SLOTS + a range's. */
  aio_context_t aio;
  /* The write thread's own AIO context (0: none, it writes one buffer after another): the queued writes
     at the head of its queue that overlap none before them go to the device at once. Scattered page
     writes, one after another, took 50 us each here, 16 us eleven at a time; a back leg's 1,100 changed
     pages held its event loop 55-70 ms waiting for a queue slot. */
  aio_context_t waio;
  struct iocb pf_cb[PIO_PREFETCH_SLOTS];
  struct iocb rg_cb[PIO_RANGE_SLOTS];
  int aio_inflight; /* reads submitted and not reaped */
  /* Ranges read ahead (pageioPrefetchRanges), their buffers (PIO_RANGE_BYTES each) and the pool's queue
     of them, oldest first (a slot taken over or dropped since is passed over). */
  pio_range rg[PIO_RANGE_SLOTS];
  uint8_t *rg_region;
  uint64_t rg_seq;
  int rg_queue[PIO_RANGE_QUEUE];
  int rg_qhead, rg_qlen;
  int rg_reading; /* ranges being read now */
  uint8_t *write_region; /* the write slots' buffers, one huge-page-aligned region */
  uint8_t *read_region;  /* the read-ahead slots' buffers, likewise */
} pio;

static void pio_enqueue(pio *p, int s) {
  p->queue[(p->qhead + p->qlen) % PIO_SLOTS] = s;
  p->qlen++;
  pthread_cond_broadcast(&p->cv);
}

static int overlaps(off_t a, size_t alen, off_t b, size_t blen);

/* Moves bytes [done, len) of a queue buffer to or from the file, one call after another; the errno, or 0. */
static int pio_move(pio *p, pio_slot *sl, size_t *done) {
  while (*done < sl->len) {
    ssize_t n = sl->is_write ? pwrite(p->fd, sl->buf + *done, sl->len - *done, sl->pos + (off_t)*done)
                             : pread(p->fd, sl->buf + *done, sl->len - *done, sl->pos + (off_t)*done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (n == 0) return sl->is_write ? EIO : 0;
    *done += (size_t)n;
  }
  return 0;
}

/* Writes the batch's buffers side by side through the write thread's AIO context (mu not held); a write
 * the kernel would not take, or took only part of, is finished one call after another. err[i]: errno or 0. */
static void pio_write_batch(pio *p, const int *batch, int count, int *err) {
  struct iocb cbs[PIO_WRITE_SLOTS];
  struct iocb *ptrs[PIO_WRITE_SLOTS];
  size_t done[PIO_WRITE_SLOTS];
  for (int i = 0; i < count; i++) {
    pio_slot *sl = &p->slots[batch[i]];
    memset(&cbs[i], 0, sizeof cbs[i]);
    cbs[i].aio_data = (uint64_t)i;
    cbs[i].aio_lio_opcode = IOCB_CMD_PWRITE;
    cbs[i].aio_fildes = (uint32_t)p->fd;
    cbs[i].aio_buf = (uint64_t)(uintptr_t)sl->buf;
    cbs[i].aio_nbytes = sl->len;
    cbs[i].aio_offset = (int64_t)sl->pos;
    ptrs[i] = &cbs[i];
    done[i] = 0;
    err[i] = 0;
  }
  long sent;
  do sent = syscall(SYS_io_submit, p->waio, (long)count, ptrs);
  while (sent < 0 && errno == EINTR);
  if (sent < 0) sent = 0;
  struct io_event ev[PIO_WRITE_SLOTS];
  for (long reaped = 0; reaped < sent;) {
    long n = syscall(SYS_io_getevents, p->waio, 1L, (long)PIO_WRITE_SLOTS, ev, NULL);
    if (n < 0) {
      if (errno == EINTR) continue;
      /* Cannot happen with a valid context; the writes' fate unknown, each is reported failed. */
      for (long i = 0; i < sent; i++) err[i] = err[i] != 0 ? err[i] : EIO;
      break;
    }
    for (long k = 0; k < n; k++) {
      int i = (int)ev[k].data;
      if (ev[k].res < 0) err[i] = (int)-ev[k].res;
      else done[i] = (size_t)ev[k].res;
    }
    reaped += n;
  }
  for (int i = 0; i < count; i++)
    if (err[i] == 0) err[i] = pio_move(p, &p->slots[batch[i]], &done[i]);
}

static void *pio_thread(void *arg) {
  pio *p = (pio *)arg;
  int batch[PIO_WRITE_SLOTS], err[PIO_WRITE_SLOTS];
  size_t got = 0;
  pthread_mutex_lock(&p->mu);
  for (;;) {
    while (p->qlen == 0 && !p->closing) pthread_cond_wait(&p->cv, &p->mu);
    if (p->qlen == 0) break;
    /* The head of the queue, and with the AIO context the writes after it that overlap none before them:
       the order of writes to the same bytes is kept, and reads stay behind the writes queued before them. */
    int count = 0;
    for (int i = 0; i < p->qlen && count < (p->waio != 0 ? PIO_WRITE_SLOTS : 1); i++) {
      pio_slot *sl = &p->slots[p->queue[(p->qhead + i) % PIO_SLOTS]];
      if (count > 0 && !sl->is_write) break;
      int clash = 0;
      for (int j = 0; j < count && !clash; j++) clash = overlaps(p->slots[batch[j]].pos, p->slots[batch[j]].len, sl->pos, sl->len);
      if (clash) break;
      batch[count++] = p->queue[(p->qhead + i) % PIO_SLOTS];
      if (!sl->is_write) break;
    }
    for (int i = 0; i < count; i++) p->slots[batch[i]].state = SLOT_BUSY;
    pio_slot *head = &p->slots[batch[0]];
    pthread_mutex_unlock(&p->mu);

    if (count > 1) {
      pio_write_batch(p, batch, count, err);
    } else {
      got = 0;
      err[0] = pio_move(p, head, &got);
      if (!head->is_write) __atomic_add_fetch(&p->read_bytes, got, __ATOMIC_RELAXED);
    }

    pthread_mutex_lock(&p->mu);
    p->qhead = (p->qhead + count) % PIO_SLOTS;
    p->qlen -= count;
    for (int i = 0; i < count; i++) {
      pio_slot *sl = &p->slots[batch[i]];
      if (sl->is_write) {
        if (err[i] != 0) {
          if (p->werr == 0) {
            p->werr = err[i];
            p->werr_start = sl->pos;
            p->werr_end = sl->pos + (off_t)sl->len;
          } else {
            if (sl->pos < p->werr_start) p->werr_start = sl->pos;
            if (sl->pos + (off_t)sl->len > p->werr_end) p->werr_end = sl->pos + (off_t)sl->len;
          }
        }
        sl->state = SLOT_FREE;
      } else {
        sl->err = err[i];
        sl->got = got;
        sl->state = sl->stale ? SLOT_FREE : SLOT_DONE;
      }
    }
    pthread_cond_broadcast(&p->cv);
  }
  pthread_mutex_unlock(&p->mu);
  return NULL;
}

static int overlaps(off_t a, size_t alen, off_t b, size_t blen) {
  return a < b + (off_t)blen && b < a + (off_t)alen;
}

/* Forgets (mu held) the stream being read: the next stream read begins another. */
static void pio_stream_reset(pio *p) {
  p->last_read_end = -1;
  p->last_stride = 0;
  p->ra_bytes = 0;
  p->ra_end = -1;
}

/* Whether a queued or running write overlaps [pos, pos + len) (mu held). */
static int pio_writing(pio *p, off_t pos, size_t len) {
  for (int i = 0; i < p->qlen; i++) {
    pio_slot *sl = &p->slots[p->queue[(p->qhead + i) % PIO_SLOTS]];
    if (sl->is_write && overlaps(sl->pos, sl->len, pos, len)) return 1;
  }
  return 0;
}

/* Waits (mu held) until no queued or running write overlaps [pos, pos + len). */
static void pio_wait_writes(pio *p, off_t pos, size_t len) {
  while (pio_writing(p, pos, len)) pthread_cond_wait(&p->cv, &p->mu);
}

/* Reads len bytes at pos into buf with pread (mu not held): how many it got, and the errno in *err. */
static size_t pio_pread(pio *p, uint8_t *buf, size_t len, off_t pos, int *err) {
  size_t done = 0;
  *err = 0;
  while (done < len) {
    ssize_t n = pread(p->fd, buf + done, len - done, pos + (off_t)done);
    if (n < 0) {
      if (errno == EINTR) continue;
      *err = errno;
      break;
    }
    if (n == 0) break;
    done += (size_t)n;
  }
  __atomic_add_fetch(&p->read_bytes, done, __ATOMIC_RELAXED);
  return done;
}

/* The reader pool: reads the oldest queued lone page, else the oldest queued range, until the handle closes. */
static void *pio_pf_thread(void *arg) {
  pio *p = (pio *)arg;
  pthread_mutex_lock(&p->mu);
  for (;;) {
    int s = -1, r = -1;
    while (!p->closing) {
      while (p->pf_qlen > 0 && s < 0) {
        int q = p->pf_queue[p->pf_qhead];
        p->pf_qhead = (p->pf_qhead + 1) % PIO_PREFETCH_SLOTS;
        p->pf_qlen--;
        if (p->pf[q].state == SLOT_QUEUED) s = q;
      }
      while (s < 0 && p->rg_qlen > 0 && r < 0 && p->rg_reading < PIO_RANGE_READERS) {
        int q = p->rg_queue[p->rg_qhead];
        p->rg_qhead = (p->rg_qhead + 1) % PIO_RANGE_QUEUE;
        p->rg_qlen--;
        if (p->rg[q].state == SLOT_QUEUED) r = q;
      }
      if (s >= 0 || r >= 0) break;
      pthread_cond_wait(&p->pf_cv, &p->mu);
    }
    if (p->closing) break;
    int err = 0;
    if (s >= 0) {
      pio_page *pg = &p->pf[s];
      pg->state = SLOT_BUSY;
      off_t pos = pg->pos;
      uint8_t *buf = p->pf_region + (size_t)s * PIO_ALIGN;
      pthread_mutex_unlock(&p->mu);
      size_t got = pio_pread(p, buf, PIO_ALIGN, pos, &err);
      if (err == 0 && got < PIO_ALIGN) err = EIO;
      pthread_mutex_lock(&p->mu);
      pg->err = err;
      pg->state = pg->stale ? SLOT_FREE : SLOT_DONE;
    } else {
      pio_range *rg = &p->rg[r];
      rg->state = SLOT_BUSY;
      p->rg_reading++;
      off_t pos = rg->pos;
      size_t len = rg->len;
      uint8_t *buf = p->rg_region + (size_t)r * PIO_RANGE_BYTES;
      pthread_mutex_unlock(&p->mu);
      size_t got = pio_pread(p, buf, len, pos, &err);
      pthread_mutex_lock(&p->mu);
      rg->err = err;
      rg->got = got;
      rg->state = rg->stale ? SLOT_FREE : SLOT_DONE;
      p->rg_reading--;
      if (p->rg_qlen > 0) pthread_cond_signal(&p->pf_cv);
    }
    pthread_cond_broadcast(&p->cv);
  }
  pthread_mutex_unlock(&p->mu);
  return NULL;
}

/* Wakes up to `most` readers for `queued` new reads, with mu released: a reader woken while the caller
 * holds the lock only waits for it, and on a host short of cores takes the caller's core to do so. A reader
 * not yet waiting sees the queue under the lock before it waits, so none of them is missed. */
static void pio_wake_readers(pio *p, int queued, int most) {
  for (int i = 0; i < queued && i < most; i++) pthread_cond_signal(&p->pf_cv);
}

/* Starts the reader pool (mu held); 0 or an errno. Only where the kernel's AIO does not read ahead. */
static int pio_pf_start(pio *p) {
  if (p->pf_started > 0) return 0;
  if (p->pf_region == NULL && posix_memalign((void **)&p->pf_region, PIO_ALIGN, (size_t)PIO_PREFETCH_SLOTS * PIO_ALIGN) != 0) return ENOMEM;
  for (int i = 0; i < PIO_PREFETCH_THREADS; i++) {
    int err = pthread_create(&p->pf_threads[i], NULL, pio_pf_thread, p);
    if (err != 0) return i > 0 ? 0 : err; /* fewer readers still read */
    p->pf_started = i + 1;
  }
  return 0;
}

/* The prefetched page at pos not dropped since (-1: none). */
static int pio_pf_find(pio *p, off_t pos) {
  for (int i = 0; i < PIO_PREFETCH_SLOTS; i++)
    if (p->pf[i].state != SLOT_FREE && !p->pf[i].stale && p->pf[i].pos == pos) return i;
  return -1;
}

/* Takes (mu held) the lone pages and ranges the kernel has read since: at least `min` of them, waiting
 * with mu released (only the JavaScript thread submits and reaps, and no other thread touches a slot in
 * flight). 0, or -1 where the kernel refused (what is in flight stays so). */
static int pio_aio_reap(pio *p, int min) {
  if (p->aio_inflight == 0) return 0;
  struct io_event ev[PIO_AIO_SLOTS];
  struct timespec none = {0, 0};
  if (min > 0) pthread_mutex_unlock(&p->mu);
  long n;
  do n = syscall(SYS_io_getevents, p->aio, (long)min, (long)PIO_AIO_SLOTS, ev, min > 0 ? NULL : &none);
  while (n < 0 && errno == EINTR);
  if (min > 0) pthread_mutex_lock(&p->mu);
  if (n < 0) return -1;
  for (long i = 0; i < n; i++) {
    uint64_t slot = ev[i].data;
    int64_t res = ev[i].res;
    if (slot < PIO_PREFETCH_SLOTS) {
      pio_page *pg = &p->pf[slot];
      pg->err = res < 0 ? (int)-res : res < PIO_ALIGN ? EIO : 0;
      pg->state = pg->stale ? SLOT_FREE : SLOT_DONE;
    } else {
      pio_range *rg = &p->rg[slot - PIO_PREFETCH_SLOTS];
      rg->err = res < 0 ? (int)-res : 0;
      rg->got = res < 0 ? 0 : (size_t)res; /* short at the end of the file */
      rg->state = rg->stale ? SLOT_FREE : SLOT_DONE;
    }
    p->aio_inflight--;
  }
  return 0;
}

/* Lays out `cb` as a read of `len` bytes at `pos` into `buf`, its completion naming `slot`; returns it. */
static struct iocb *pio_aio_read(pio *p, struct iocb *cb, uint64_t slot, uint8_t *buf, size_t len, off_t pos) {
  memset(cb, 0, sizeof *cb);
  cb->aio_data = slot;
  cb->aio_lio_opcode = IOCB_CMD_PREAD;
  cb->aio_fildes = (uint32_t)p->fd;
  cb->aio_buf = (uint64_t)(uintptr_t)buf;
  cb->aio_nbytes = len;
  cb->aio_offset = (int64_t)pos;
  return cb;
}

/* Submits (mu held) `count` reads of lone pages or ranges to the kernel: how many it took. What it did
 * not take (its queue full) is not read ahead, and read when asked for. */
static int pio_aio_submit(pio *p, struct iocb **cbs, int count) {
  if (count == 0) return 0;
  long sent;
  do sent = syscall(SYS_io_submit, p->aio, (long)count, cbs);
  while (sent < 0 && errno == EINTR);
  if (sent < 0) sent = 0;
  for (long i = 0; i < sent; i++) __atomic_add_fetch(&p->read_bytes, cbs[i]->aio_nbytes, __ATOMIC_RELAXED);
  for (long i = sent; i < count; i++) {
    uint64_t slot = cbs[i]->aio_data;
    if (slot < PIO_PREFETCH_SLOTS) p->pf[slot].state = SLOT_FREE;
    else p->rg[slot - PIO_PREFETCH_SLOTS].state = SLOT_FREE;
  }
  p->aio_inflight += (int)sent;
  return (int)sent;
}

/* The queued or running write whose buffer holds the last bytes written to [pos, pos + len), when one
 * holds all of them (NULL: none, or the last write to them covers only part). mu held. */
static const uint8_t *pio_written(pio *p, off_t pos, size_t len) {
  const uint8_t *from = NULL;
  for (int i = 0; i < p->qlen; i++) {
    pio_slot *sl = &p->slots[p->queue[(p->qhead + i) % PIO_SLOTS]];
    if (!sl->is_write || !overlaps(sl->pos, sl->len, pos, len)) continue;
    from = sl->pos <= pos && pos + (off_t)len <= sl->pos + (off_t)sl->len ? sl->buf + (pos - sl->pos) : NULL;
  }
  return from;
}

/* Waits (mu held) until the queue is empty. */
static void pio_wait_idle(pio *p) {
  while (p->qlen > 0) pthread_cond_wait(&p->cv, &p->mu);
}

/* Drops (mu held) every read-ahead: finished ones are freed, queued or running ones freed when done. */
static void pio_drop_reads(pio *p, off_t pos, size_t len, int all) {
  for (int s = PIO_WRITE_SLOTS; s < PIO_SLOTS; s++) {
    pio_slot *sl = &p->slots[s];
    if (sl->state == SLOT_FREE || sl->stale) continue;
    if (!all && !overlaps(sl->pos, sl->len, pos, len)) continue;
    if (sl->state == SLOT_DONE) sl->state = SLOT_FREE;
    else sl->stale = 1;
  }
  for (int i = 0; i < PIO_PREFETCH_SLOTS; i++) {
    pio_page *pg = &p->pf[i];
    if (pg->state == SLOT_FREE || pg->stale) continue;
    if (!all && !overlaps(pg->pos, PIO_ALIGN, pos, len)) continue;
    if (pg->state == SLOT_BUSY) pg->stale = 1;
    else pg->state = SLOT_FREE;
  }
  for (int i = 0; i < PIO_RANGE_SLOTS; i++) {
    pio_range *rg = &p->rg[i];
    if (rg->state == SLOT_FREE || rg->stale) continue;
    if (!all && !overlaps(rg->pos, rg->len, pos, len)) continue;
    if (rg->state == SLOT_BUSY) rg->stale = 1;
    else rg->state = SLOT_FREE;
  }
}

static void pio_destroy(pio *p) {
  if (p->thread_started) {
    pthread_mutex_lock(&p->mu);
    p->closing = 1;
    pthread_cond_broadcast(&p->cv);
    pthread_cond_broadcast(&p->pf_cv);
    pthread_mutex_unlock(&p->mu);
    pthread_join(p->thread, NULL);
    p->thread_started = 0;
  }
  if (p->waio != 0) {
    syscall(SYS_io_destroy, p->waio); /* the thread reaped every write it submitted before it ended */
    p->waio = 0;
  }
  for (int i = 0; i < p->pf_started; i++) pthread_join(p->pf_threads[i], NULL);
  p->pf_started = 0;
  if (p->aio != 0) {
    /* The kernel may still read into pf_region and rg_region: wait for those reads before they are freed. */
    pthread_mutex_lock(&p->mu);
    while (p->aio_inflight > 0 && pio_aio_reap(p, p->aio_inflight) == 0) {
    }
    pthread_mutex_unlock(&p->mu);
    syscall(SYS_io_destroy, p->aio); /* waits for any read still in flight */
    p->aio = 0;
  }
  if (p->fd >= 0) {
    close(p->fd);
    p->fd = -1;
  }
  for (int s = PIO_WRITE_SLOTS; s < PIO_SLOTS; s++) p->slots[s].buf = NULL;
  free(p->read_region);
  p->read_region = NULL;
  free(p->pf_region);
  p->pf_region = NULL;
  free(p->rg_region);
  p->rg_region = NULL;
  /* Exported write buffers stay until their ArrayBuffers are collected (pio_release). */
  free(p->bounce);
  p->bounce = NULL;
  p->closed = 1;
}

/* Drops one reference (the handle's or an exported buffer's); the last one stops the thread and frees all. */
static void pio_release(pio *p) {
  if (--p->refs > 0) return;
  if (!p->closed) pio_destroy(p);
  free(p->write_region);
  pthread_mutex_destroy(&p->mu);
  pthread_cond_destroy(&p->cv);
  pthread_cond_destroy(&p->pf_cv);
  free(p);
}

/*
 * Forgets the exported write buffers' references; with `detach`, first detaches them (JavaScript sees
 * them empty from now on) so that their memory goes back as soon as Node runs their finalizers, not
 * whenever the GC gets round to the ArrayBuffers: a gateway running many migrations in turn would
 * otherwise hold 12 MiB per closed store.
 */
static void pio_forget_exported(napi_env env, pio *p, int detach) {
  for (int s = 0; s < PIO_WRITE_SLOTS; s++) {
    if (p->exported_refs[s] == NULL) continue;
    napi_value ab = NULL;
    if (detach && napi_get_reference_value(env, p->exported_refs[s], &ab) == napi_ok && ab != NULL) napi_detach_arraybuffer(env, ab);
    napi_delete_reference(env, p->exported_refs[s]);
    p->exported_refs[s] = NULL;
  }
}

static void pio_finalize(napi_env env, void *data, void *hint) {
  pio *p = (pio *)data;
  pio_forget_exported(env, p, 0);
  pio_release(p);
}

/* ----------------------------------------------------------------------------------- N-API glue */

static napi_value pio_throw(napi_env env, const char *code, const char *msg) {
  napi_throw_error(env, code, msg);
  return NULL;
}

static napi_value pio_throw_errno(napi_env env, int err, const char *what) {
  char msg[160];
  snprintf(msg, sizeof msg, "%s: %s", what, strerror(err));
  napi_value m, e, c, n;
  napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &m);
  napi_create_error(env, NULL, m, &e);
  napi_create_int32(env, err, &n);
  napi_set_named_property(env, e, "errno", n);
  napi_create_string_utf8(env, "EPAGEIO", NAPI_AUTO_LENGTH, &c);
  napi_set_named_property(env, e, "pageio", c);
  napi_throw(env, e);
  return NULL;
}

static pio *pio_arg(napi_env env, napi_value v) {
  void *data = NULL;
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_external || napi_get_value_external(env, v, &data) != napi_ok) {
    pio_throw(env, "ERR_BFMIG_PAGEIO", "expected a page I/O handle");
    return NULL;
  }
  pio *p = (pio *)data;
  if (p->closed) {
    pio_throw(env, "ERR_BFMIG_PAGEIO", "page I/O handle is closed");
    return NULL;
  }
  return p;
}

/* The handle of a call that takes nothing else (`name` for the error), or NULL with an error thrown. */
static pio *pio_only_arg(napi_env env, napi_callback_info info, const char *name) {
  size_t argc = 1;
  napi_value argv[1];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1) {
    char msg[64];
    snprintf(msg, sizeof msg, "%s expects a handle", name);
    pio_throw(env, "ERR_BFMIG_PAGEIO", msg);
    return NULL;
  }
  return pio_arg(env, argv[0]);
}

static int get_num(napi_env env, napi_value v, double *out) {
  return napi_get_value_double(env, v, out) == napi_ok && *out >= 0 && *out <= 9007199254740991.0 && *out == (double)(int64_t)*out;
}

/* Bytes of a Uint8Array/Buffer argument, and the range [off, off + len) checked inside it. */
static uint8_t *bytes_arg(napi_env env, napi_value v, double off, double len) {
  bool is_ta = false;
  napi_typedarray_type type;
  size_t length = 0;
  void *data = NULL;
  if (napi_is_typedarray(env, v, &is_ta) != napi_ok || !is_ta) {
    pio_throw(env, "ERR_BFMIG_PAGEIO", "expected a Uint8Array");
    return NULL;
  }
  if (napi_get_typedarray_info(env, v, &type, &length, &data, NULL, NULL) != napi_ok || type != napi_uint8_array) {
    pio_throw(env, "ERR_BFMIG_PAGEIO", "expected a Uint8Array");
    return NULL;
  }
  if (off + len > (double)length) {
    napi_throw_range_error(env, "ERR_BFMIG_PAGEIO", "range exceeds the buffer");
    return NULL;
  }
  return (uint8_t *)data + (size_t)off;
}

/* pageioOpen(path, fileSize, kernelReads) -> handle. Throws (with .errno) when the file cannot be opened
 * with O_DIRECT, e.g. EINVAL on a filesystem without it. kernelReads: read ahead through the kernel's AIO
 * where it gives a context (else, or when false, through the reader pool). */
static napi_value PageioOpen(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3], handle;
  char file[4096];
  size_t n = 0;
  double size = 0;
  bool kernel_reads = false;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 3 ||
      napi_get_value_string_utf8(env, argv[0], file, sizeof file, &n) != napi_ok || n == 0 || n >= sizeof file - 1 ||
      !get_num(env, argv[1], &size) || napi_get_value_bool(env, argv[2], &kernel_reads) != napi_ok)
    return pio_throw(env, "ERR_BFMIG_PAGEIO", "pageioOpen expects (path, fileSize, kernelReads)");
  int fd = open(file, O_RDWR | O_DIRECT | O_CLOEXEC | O_NOFOLLOW); /* a planted symlink must not redirect the pages */
  if (fd < 0) return pio_throw_errno(env, errno, "open O_DIRECT");
  pio *p = (pio *)calloc(1, sizeof *p);
  if (p == NULL) {
    close(fd);
    return pio_throw_errno(env, ENOMEM, "pageioOpen");
  }
  p->fd = fd;
  p->refs = 1;
  p->file_size = (off_t)size;
  pio_stream_reset(p);
  pthread_mutex_init(&p->mu, NULL);
  pthread_cond_init(&p->cv, NULL);
  pthread_cond_init(&p->pf_cv, NULL);
  int err = 0;
  /* Queue buffers are pinned for every O_DIRECT transfer: in huge pages the kernel pins a few folios
     instead of 256 pages a transfer, which halved the time the writes cost the CPU. */
  err = posix_memalign((void **)&p->write_region, PIO_HUGE_PAGE, pio_region_bytes(PIO_WRITE_SLOTS));
  if (err == 0) {
    madvise(p->write_region, pio_region_bytes(PIO_WRITE_SLOTS), MADV_HUGEPAGE);
    err = posix_memalign((void **)&p->read_region, PIO_HUGE_PAGE, pio_region_bytes(PIO_READ_SLOTS));
  }
  if (err == 0) madvise(p->read_region, pio_region_bytes(PIO_READ_SLOTS), MADV_HUGEPAGE);
  for (int s = 0; s < PIO_SLOTS && err == 0; s++) {
    p->slots[s].is_write = s < PIO_WRITE_SLOTS;
    p->slots[s].buf = s < PIO_WRITE_SLOTS ? p->write_region + (size_t)s * PIO_SLOT_BYTES
                                          : p->read_region + (size_t)(s - PIO_WRITE_SLOTS) * PIO_SLOT_BYTES;
  }
  if (err == 0) err = posix_memalign((void **)&p->bounce, PIO_ALIGN, PIO_SLOT_BYTES);
  /* Lone pages and ranges read ahead through the kernel's AIO where it has it, unless the caller asked for the pool. */
  if (err == 0 && kernel_reads && syscall(SYS_io_setup, PIO_AIO_SLOTS, &p->aio) != 0) p->aio = 0;
  /* The writes likewise; without it (refused, or not asked for) the thread writes them one by one. */
  if (err == 0 && kernel_reads && syscall(SYS_io_setup, PIO_WRITE_SLOTS, &p->waio) != 0) p->waio = 0;
  if (err == 0) err = pthread_create(&p->thread, NULL, pio_thread, p);
  if (err == 0) p->thread_started = 1;
  if (err != 0) {
    pio_finalize(env, p, NULL);
    return pio_throw_errno(env, err, "pageioOpen");
  }
  if (napi_create_external(env, p, pio_finalize, NULL, &handle) != napi_ok) {
    pio_finalize(env, p, NULL);
    return pio_throw(env, "ERR_BFMIG_PAGEIO", "napi_create_external failed");
  }
  return handle;
}

static napi_value take_error(napi_env env, pio *p) {
  napi_value r;
  if (p->werr == 0) {
    napi_get_null(env, &r);
    return r;
  }
  napi_value v;
  napi_create_object(env, &r);
  napi_create_int32(env, p->werr, &v);
  napi_set_named_property(env, r, "errno", v);
  napi_create_double(env, (double)p->werr_start, &v);
  napi_set_named_property(env, r, "start", v);
  napi_create_double(env, (double)p->werr_end, &v);
  napi_set_named_property(env, r, "end", v);
  p->werr = 0;
  return r;
}

static void release_exported(napi_env env, void *data, void *hint) {
  pio_release((pio *)hint);
}

/* pageioWriteBuffers(h) -> ArrayBuffer[]: the queue's write buffers (PIO_SLOT_BYTES each, 4 KiB aligned),
 * once per handle. JavaScript writes only into the one pageioAcquire lent it. */
static napi_value PageioWriteBuffers(napi_env env, napi_callback_info info) {
  napi_value list, ab;
  pio *p = pio_only_arg(env, info, "pageioWriteBuffers");
  if (p == NULL) return NULL;
  if (p->exported) return pio_throw(env, "ERR_BFMIG_PAGEIO", "pageioWriteBuffers: already taken");
  if (napi_create_array_with_length(env, PIO_WRITE_SLOTS, &list) != napi_ok) return pio_throw(env, "ERR_BFMIG_PAGEIO", "napi_create_array failed");
  p->exported = 1;
  for (int s = 0; s < PIO_WRITE_SLOTS; s++) {
    if (napi_create_external_arraybuffer(env, p->slots[s].buf, PIO_SLOT_BYTES, release_exported, p, &ab) != napi_ok)
      return pio_throw(env, "ERR_BFMIG_PAGEIO", "napi_create_external_arraybuffer failed");
    p->refs++;
    if (napi_create_reference(env, ab, 0, &p->exported_refs[s]) != napi_ok) p->exported_refs[s] = NULL;
    if (napi_set_element(env, list, (uint32_t)s, ab) != napi_ok) return pio_throw(env, "ERR_BFMIG_PAGEIO", "napi_set_element failed");
  }
  return list;
}

/* pageioAcquire(h) -> index of a free write buffer, now lent to the caller; waits while none is free or
 * PIO_WRITE_QUEUE writes are queued or running that hold more than PIO_SMALL_WRITES_BYTES. */
static napi_value PageioAcquire(napi_env env, napi_callback_info info) {
  napi_value r;
  pio *p = pio_only_arg(env, info, "pageioAcquire");
  if (p == NULL) return NULL;
  int s = -1;
  pthread_mutex_lock(&p->mu);
  for (;;) {
    int lent = 0, queued = 0;
    size_t queued_bytes = 0;
    s = -1;
    for (int i = 0; i < PIO_WRITE_SLOTS; i++) {
      if (p->slots[i].state == SLOT_FREE && s < 0) s = i;
      if (p->slots[i].state == SLOT_FILLING) lent++;
      if (p->slots[i].state == SLOT_QUEUED || p->slots[i].state == SLOT_BUSY) {
        queued++;
        queued_bytes += p->slots[i].len;
      }
    }
    if ((s >= 0 && (queued < PIO_WRITE_QUEUE || queued_bytes <= PIO_SMALL_WRITES_BYTES)) || lent == PIO_WRITE_SLOTS) break;
    s = -1;
    pthread_cond_wait(&p->cv, &p->mu);
  }
  if (s >= 0) p->slots[s].state = SLOT_FILLING;
  pthread_mutex_unlock(&p->mu);
  if (s < 0) return pio_throw(env, "ERR_BFMIG_PAGEIO", "pageioAcquire: every write buffer is lent already");
  napi_create_int32(env, s, &r);
  return r;
}

/* pageioSubmit(h, index, len, pos) -> null | {errno, start, end} of an earlier failed write: queues the
 * lent buffer's first len bytes for writing at pos (multiples of 4096); len 0 just gives it back. */
static napi_value PageioSubmit(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  int32_t s = -1;
  double len, pos;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 4) return pio_throw(env, "ERR_BFMIG_PAGEIO", "pageioSubmit expects 4 arguments");
  pio *p = pio_arg(env, argv[0]);
  if (p == NULL) return NULL;
  if (napi_get_value_int32(env, argv[1], &s) != napi_ok || s < 0 || s >= PIO_WRITE_SLOTS || !get_num(env, argv[2], &len) ||
      !get_num(env, argv[3], &pos) || len > PIO_SLOT_BYTES || ((int64_t)len % PIO_ALIGN) != 0 || ((int64_t)pos % PIO_ALIGN) != 0)
    return pio_throw(env, "ERR_BFMIG_PAGEIO", "pageioSubmit: bad buffer index, or len/pos not multiples of 4096 within a buffer");
  pthread_mutex_lock(&p->mu);
  pio_slot *sl = &p->slots[s];
  if (sl->state != SLOT_FILLING) {
    pthread_mutex_unlock(&p->mu);
    return pio_throw(env, "ERR_BFMIG_PAGEIO", "pageioSubmit: that buffer is not lent");
  }
  if (len == 0) {
    sl->state = SLOT_FREE;
    pthread_cond_broadcast(&p->cv);
  } else {
    pio_drop_reads(p, (off_t)pos, (size_t)len, 0);
    sl->pos = (off_t)pos;
    sl->len = (size_t)len;
    sl->state = SLOT_QUEUED;
    pio_enqueue(p, s);
  }
  napi_value r = take_error(env, p);
  pthread_mutex_unlock(&p->mu);
  return r;
}

/* pageioDrain(h) -> null | {errno, start, end}: waits for every queued write and drops the read-ahead
 * (before the file is touched another way: fsync, buffered reads, truncation). */
static napi_value PageioDrain(napi_env env, napi_callback_info info) {
  pio *p = pio_only_arg(env, info, "pageioDrain");
  if (p == NULL) return NULL;
  pthread_mutex_lock(&p->mu);
  pio_drop_reads(p, 0, 0, 1);
  pio_wait_idle(p);
  pio_stream_reset(p);
  napi_value r = take_error(env, p);
  pthread_mutex_unlock(&p->mu);
  return r;
}

/* pageioSetSize(h, fileSize): the file's new length (after a truncation); drains first. */
static napi_value PageioSetSize(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  double size;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2 || !get_num(env, argv[1], &size))
    return pio_throw(env, "ERR_BFMIG_PAGEIO", "pageioSetSize expects (handle, fileSize)");
  pio *p = pio_arg(env, argv[0]);
  if (p == NULL) return NULL;
  pthread_mutex_lock(&p->mu);
  pio_drop_reads(p, 0, 0, 1);
  pio_wait_idle(p);
  p->file_size = (off_t)size;
  pio_stream_reset(p);
  pthread_mutex_unlock(&p->mu);
  return NULL;
}

/* Frees (mu held) the finished read-ahead buffers wholly before `from` (behind the reader). A stream's
 * window its reader used lets the stream read further ahead; one it passed unused, less far. */
static void pio_free_behind(pio *p, off_t from) {
  for (int s = PIO_WRITE_SLOTS; s < PIO_SLOTS; s++) {
    pio_slot *sl = &p->slots[s];
    if (sl->state != SLOT_DONE || sl->pos + (off_t)sl->len > from) continue;
    sl->state = SLOT_FREE;
    if (!sl->used) p->ra_bytes = PIO_READ_AHEAD_MIN;
    else if (p->ra_bytes < PIO_READ_AHEAD_MAX) p->ra_bytes *= 2;
  }
}

/* Queues (mu held) a read-ahead of len bytes at w (cut at the end of the file) unless a read-ahead
 * buffer holds them already, first freeing those behind `from`; 0 when no read buffer is free. */
static int pio_queue_read(pio *p, off_t from, off_t w, size_t len) {
  if (w + (off_t)len > p->file_size) len = (size_t)(p->file_size - w);
  len = (len + PIO_ALIGN - 1) / PIO_ALIGN * PIO_ALIGN;
  pio_free_behind(p, from);
  int have = 0, free_slot = -1;
  for (int s = PIO_WRITE_SLOTS; s < PIO_SLOTS; s++) {
    pio_slot *sl = &p->slots[s];
    if (sl->state != SLOT_FREE && !sl->stale && sl->pos <= w && w + (off_t)len <= sl->pos + (off_t)sl->len) have = 1;
    if (sl->state == SLOT_FREE && free_slot < 0) free_slot = s;
  }
  if (have) return 1;
  if (free_slot < 0) return 0;
  pio_slot *sl = &p->slots[free_slot];
  sl->pos = w;
  sl->len = len;
  sl->got = 0;
  sl->err = 0;
  sl->stale = 0;
  sl->used = 0;
  sl->state = SLOT_QUEUED;
  pio_enqueue(p, free_slot);
  return 1;
}

/* Queues (mu held) read-ahead of the stream's next ra_bytes from `from` (at least 4x a read of `len`)
 * once its reader is past half of what is queued, beginning where that ends (so the device reads large
 * parts, not a read's worth at a time), no part across a buffer's boundary in the file, as far as free
 * read slots allow. `reader`: where the reader is (what lies wholly before it is done with). */
static void pio_read_ahead(pio *p, off_t reader, off_t from, size_t len) {
  pio_free_behind(p, reader);
  off_t want = 4 * (off_t)len;
  if (want > PIO_READ_AHEAD_MAX) want = PIO_READ_AHEAD_MAX;
  if (p->ra_bytes < want) p->ra_bytes = want < PIO_READ_AHEAD_MIN ? PIO_READ_AHEAD_MIN : want;
  if (p->ra_end > from && p->ra_end - from >= p->ra_bytes / 2) return;
  off_t target = from + p->ra_bytes;
  if (target > p->file_size) target = p->file_size;
  off_t w = p->ra_end > from ? p->ra_end : from;
  while (w < target) {
    off_t end = w - w % PIO_SLOT_BYTES + PIO_SLOT_BYTES;
    if (end > target) end = target;
    if (!pio_queue_read(p, reader, w, (size_t)(end - w))) return;
    w = end;
    p->ra_end = w;
  }
}

/* Queues (mu held) read-ahead of `len` bytes (at most a buffer) at from + k * stride, k = 1, 2, …, as
 * far as free read slots allow: the reads a strided stream makes next. */
static void pio_read_ahead_strided(pio *p, off_t from, off_t stride, size_t len) {
  for (int k = 1; k <= PIO_READ_SLOTS && from + (off_t)k * stride < p->file_size; k++)
    if (!pio_queue_read(p, from, from + (off_t)k * stride, len)) return;
}

/* Whether (mu held) a range read ahead, or being read, holds the byte at pos. */
static int pio_rg_starts(pio *p, off_t pos) {
  for (int i = 0; i < PIO_RANGE_SLOTS; i++) {
    pio_range *rg = &p->rg[i];
    if (rg->state != SLOT_FREE && !rg->stale && rg->pos <= pos && pos < rg->pos + (off_t)rg->len) return 1;
  }
  return 0;
}

/* pageioRead(h, dest, destOff, len, pos, inStream): reads exactly len bytes at pos (multiples of 4096)
 * after every earlier write to them; throws (with .errno) on an I/O error or the end of the file.
 * inStream: the read is one of a stream read in ascending order (a rebuild), not a lone page; once
 * such reads follow one another (or one is large), the windows after it are read ahead, unless a range
 * read ahead (pageioPrefetchRanges) holds its start. A range serves as much of a read as it holds. */
static napi_value PageioRead(napi_env env, napi_callback_info info) {
  size_t argc = 6;
  napi_value argv[6];
  double off, len, pos;
  bool in_stream = false;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 6 || napi_get_value_bool(env, argv[5], &in_stream) != napi_ok)
    return pio_throw(env, "ERR_BFMIG_PAGEIO", "pageioRead expects (handle, dest, destOff, len, pos, inStream)");
  pio *p = pio_arg(env, argv[0]);
  if (p == NULL) return NULL;
  if (!get_num(env, argv[2], &off) || !get_num(env, argv[3], &len) || !get_num(env, argv[4], &pos) ||
      ((int64_t)len % PIO_ALIGN) != 0 || ((int64_t)pos % PIO_ALIGN) != 0)
    return pio_throw(env, "ERR_BFMIG_PAGEIO", "pageioRead: offsets must be integers, len and pos multiples of 4096");
  uint8_t *dest = bytes_arg(env, argv[1], off, len);
  if (dest == NULL) return NULL;
  off_t at = (off_t)pos;
  size_t left = (size_t)len;
  pthread_mutex_lock(&p->mu);
  int sequential = in_stream && p->last_read_end >= 0 && at >= p->last_read_end && at - p->last_read_end <= PIO_SLOT_BYTES;
  off_t stride = in_stream && p->last_read_end >= 0 ? at - p->last_read_pos : 0;
  int strided = !sequential && stride > (off_t)len && stride == p->last_stride && len <= PIO_SLOT_BYTES;
  /* A read that a range read ahead serves is one of a caller that reads ahead its own way (a back leg's
     multifd Runs, pageioPrefetchRanges): the windows after it are another channel's packets, or ranges
     asked for already, and reading them too took the device as long again (4-5x what the Runs read). */
  int ranged = pio_rg_starts(p, at);
  /* Another stream begins: what was read ahead for the last one says nothing of this one. */
  if (in_stream && !sequential && !strided) {
    p->ra_bytes = 0;
    p->ra_end = -1;
  }
  /* The device reads on while this thread waits for the read's own bytes. */
  if (sequential && !ranged) pio_read_ahead(p, at, at + (off_t)len, (size_t)len);
  while (left > 0) {
    off_t w = at - at % PIO_SLOT_BYTES;
    size_t part = (size_t)(w + PIO_SLOT_BYTES - at);
    if (part > left) part = left;
    int served = 0;
    int k = part == PIO_ALIGN ? pio_pf_find(p, at) : -1;
    if (k >= 0) {
      pio_page *pg = &p->pf[k];
      if (pg->state == SLOT_QUEUED) {
        pg->state = SLOT_FREE; /* no reader has started it: read it here, not behind the others */
      } else {
        /* Only this thread drops prefetched pages, so it stays current while the pool (or the kernel) finishes it. */
        int refused = 0;
        while (pg->state == SLOT_BUSY && !refused) {
          if (p->aio != 0) refused = pio_aio_reap(p, 1) != 0;
          else pthread_cond_wait(&p->cv, &p->mu);
        }
        if (pg->state == SLOT_DONE && pg->err == 0) {
          memcpy(dest, p->pf_region + (size_t)k * PIO_ALIGN, PIO_ALIGN);
          served = 1;
        }
        /* A read the kernel still owns (it would not say) keeps its slot: read the page here instead. */
        if (pg->state != SLOT_BUSY) pg->state = SLOT_FREE;
        else pg->stale = 1;
      }
    }
    for (int r = 0; r < PIO_RANGE_SLOTS && !served; r++) {
      pio_range *rg = &p->rg[r];
      if (rg->state == SLOT_FREE || rg->stale || rg->pos > at || at >= rg->pos + (off_t)rg->len) continue;
      /* A range that holds the part's start serves as much of it as it holds; the rest is the next part. */
      if (at + (off_t)part > rg->pos + (off_t)rg->len) part = (size_t)(rg->pos + (off_t)rg->len - at);
      if (rg->state == SLOT_QUEUED) {
        rg->state = SLOT_FREE; /* no reader has started it: read it here, not behind the others */
        break;
      }
      /* Only this thread drops ranges read ahead, so it stays current while the pool (or the kernel) finishes it. */
      int refused = 0;
      while (rg->state == SLOT_BUSY && !refused) {
        if (p->aio != 0) refused = pio_aio_reap(p, 1) != 0;
        else pthread_cond_wait(&p->cv, &p->mu);
      }
      if (refused) break; /* read it here; the kernel still owns the slot */
      if (rg->state == SLOT_DONE && rg->err == 0 && (size_t)(at - rg->pos) + part <= rg->got) {
        memcpy(dest, p->rg_region + (size_t)r * PIO_RANGE_BYTES + (at - rg->pos), part);
        served = 1;
        rg->used = 1;
        /* A Run's pages are read once: a range read to its end is done with. */
        if (at + (off_t)part == rg->pos + (off_t)rg->len) rg->state = SLOT_FREE;
      } else if (rg->state == SLOT_DONE) {
        rg->state = SLOT_FREE;
      }
    }
    for (int s = PIO_WRITE_SLOTS; s < PIO_SLOTS && !served; s++) {
      pio_slot *sl = &p->slots[s];
      /* A stream's or a stride's read-ahead that holds the part's start serves as much of it as it
         holds; the rest is the next part. */
      if (sl->state == SLOT_FREE || sl->stale || sl->pos > at || at >= sl->pos + (off_t)sl->len) continue;
      if (at + (off_t)part > sl->pos + (off_t)sl->len) part = (size_t)(sl->pos + (off_t)sl->len - at);
      while (sl->state != SLOT_DONE && !sl->stale) pthread_cond_wait(&p->cv, &p->mu);
      if (sl->stale || sl->state != SLOT_DONE) break;
      if (sl->err == 0 && (size_t)(at - sl->pos) + part <= sl->got) {
        memcpy(dest, sl->buf + (at - sl->pos), part);
        served = 1;
        sl->used = 1;
      }
    }
    const uint8_t *written = served ? NULL : pio_written(p, at, part);
    if (written != NULL) {
      memcpy(dest, written, part);
      served = 1;
    }
    if (!served) {
      /* Not read ahead: read it here, once no queued write overlaps it. */
      pio_wait_writes(p, at, part);
      pthread_mutex_unlock(&p->mu);
      uint8_t *into = ((uintptr_t)dest % PIO_ALIGN) == 0 ? dest : p->bounce;
      size_t done = 0;
      int err = 0;
      while (done < part) {
        ssize_t n = pread(p->fd, into + done, part - done, at + (off_t)done);
        if (n < 0) {
          if (errno == EINTR) continue;
          err = errno;
          break;
        }
        if (n == 0) break;
        done += (size_t)n;
      }
      __atomic_add_fetch(&p->read_bytes, done, __ATOMIC_RELAXED);
      __atomic_add_fetch(&p->caller_read_bytes, done, __ATOMIC_RELAXED);
      if (err == 0 && done < part) err = ENODATA;
      if (err == 0 && into != dest) memcpy(dest, into, part);
      pthread_mutex_lock(&p->mu);
      if (err != 0) {
        pio_stream_reset(p);
        pthread_mutex_unlock(&p->mu);
        return pio_throw_errno(env, err == ENODATA ? EIO : err, err == ENODATA ? "pread O_DIRECT: end of file" : "pread O_DIRECT");
      }
    }
    dest += part;
    at += (off_t)part;
    left -= part;
  }
  if (in_stream) {
    p->last_stride = stride;
    p->last_read_pos = (off_t)pos;
    p->last_read_end = at;
    if (strided) pio_read_ahead_strided(p, (off_t)pos, stride, (size_t)len);
    else if (!ranged && (sequential || len >= PIO_STREAM_READ_BYTES)) pio_read_ahead(p, at, at, (size_t)len);
  }
  pthread_mutex_unlock(&p->mu);
  return NULL;
}

/* pageioPrefetch(h, positions: Float64Array, count) -> how many were queued: has the reader pool read the
 * lone pages at positions[0 .. count-1] (multiples of 4096), oldest first, for pageioRead calls to come.
 * Skipped: a page prefetched already, one a queued write covers (read from its buffer), one past the end
 * of the file. A page prefetched and never read is evicted by later prefetches, oldest first. */
static napi_value PageioPrefetch(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3], r;
  double count;
  bool is_ta = false;
  napi_typedarray_type type;
  size_t length = 0;
  void *data = NULL;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 3 || !get_num(env, argv[2], &count) ||
      napi_is_typedarray(env, argv[1], &is_ta) != napi_ok || !is_ta ||
      napi_get_typedarray_info(env, argv[1], &type, &length, &data, NULL, NULL) != napi_ok || type != napi_float64_array || count > (double)length)
    return pio_throw(env, "ERR_BFMIG_PAGEIO", "pageioPrefetch expects (handle, Float64Array, count)");
  pio *p = pio_arg(env, argv[0]);
  if (p == NULL) return NULL;
  const double *positions = (const double *)data;
  int queued = 0;
  struct iocb *submit[PIO_PREFETCH_SLOTS];
  pthread_mutex_lock(&p->mu);
  uint64_t batch = p->pf_seq + 1;
  /* Pages the kernel has read since are DONE, so their slots may be taken again. */
  if (p->aio != 0) pio_aio_reap(p, 0);
  int ready = p->aio != 0 ? (p->pf_region != NULL || posix_memalign((void **)&p->pf_region, PIO_ALIGN, (size_t)PIO_PREFETCH_SLOTS * PIO_ALIGN) == 0) : pio_pf_start(p) == 0;
  if (ready) {
    for (size_t i = 0; i < (size_t)count; i++) {
      double d = positions[i];
      if (!(d >= 0) || d != (double)(int64_t)d || ((int64_t)d % PIO_ALIGN) != 0 || (off_t)d + PIO_ALIGN > p->file_size) continue;
      off_t pos = (off_t)d;
      if (pio_pf_find(p, pos) >= 0 || pio_writing(p, pos, PIO_ALIGN)) continue;
      int k = -1;
      for (int j = 0; j < PIO_PREFETCH_SLOTS; j++) {
        pio_page *pg = &p->pf[j];
        if (pg->state == SLOT_FREE) {
          k = j;
          break;
        }
        /* Evict the oldest page read and not asked for, never one of this batch. */
        if (pg->state == SLOT_DONE && pg->seq < batch && (k < 0 || pg->seq < p->pf[k].seq)) k = j;
      }
      if (k < 0) break;
      pio_page *pg = &p->pf[k];
      pg->state = SLOT_QUEUED;
      pg->stale = 0;
      pg->err = 0;
      pg->pos = pos;
      pg->seq = ++p->pf_seq;
      if (p->aio != 0) {
        pg->state = SLOT_BUSY;
        submit[queued++] = pio_aio_read(p, &p->pf_cb[k], (uint64_t)k, p->pf_region + (size_t)k * PIO_ALIGN, PIO_ALIGN, pos);
        continue;
      }
      /* A slot queued again before the pool passed its old entry over has two: the pool reads it once. */
      if (p->pf_qlen < PIO_PREFETCH_SLOTS) {
        p->pf_queue[(p->pf_qhead + p->pf_qlen) % PIO_PREFETCH_SLOTS] = k;
        p->pf_qlen++;
      } else {
        pg->state = SLOT_FREE;
        break;
      }
      queued++;
    }
  }
  if (p->aio != 0) queued = pio_aio_submit(p, submit, queued);
  pthread_mutex_unlock(&p->mu);
  if (p->aio == 0) pio_wake_readers(p, queued, PIO_PREFETCH_THREADS);
  napi_create_int32(env, queued, &r);
  return r;
}

/* Whether a range read ahead and not dropped covers [pos, pos + len) (mu held). */
static int pio_rg_covers(pio *p, off_t pos, size_t len) {
  for (int i = 0; i < PIO_RANGE_SLOTS; i++) {
    pio_range *rg = &p->rg[i];
    if (rg->state != SLOT_FREE && !rg->stale && rg->pos <= pos && pos + (off_t)len <= rg->pos + (off_t)rg->len) return 1;
  }
  return 0;
}

/* pageioPrefetchRanges(h, positions: Float64Array, lengths: Float64Array, count) -> how many ranges were
 * queued: has the reader pool read [positions[i], positions[i] + lengths[i]) (multiples of 4096), oldest
 * first, in parts of at most PIO_RANGE_BYTES, for pageioRead calls to come. Skipped: a part read ahead
 * already, one a queued write overlaps (read after it, or from its buffer), what lies past the end of the
 * file. A range read to its end by pageioRead is freed; one read and never asked for is evicted by later
 * prefetches, oldest first; when every slot is queued or being read, the rest is not queued. */
static napi_value PageioPrefetchRanges(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4], r;
  double count;
  const double *arrays[2] = {NULL, NULL};
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 4 || !get_num(env, argv[3], &count))
    return pio_throw(env, "ERR_BFMIG_PAGEIO", "pageioPrefetchRanges expects (handle, Float64Array, Float64Array, count)");
  for (int a = 0; a < 2; a++) {
    bool is_ta = false;
    napi_typedarray_type type;
    size_t length = 0;
    void *data = NULL;
    if (napi_is_typedarray(env, argv[1 + a], &is_ta) != napi_ok || !is_ta ||
        napi_get_typedarray_info(env, argv[1 + a], &type, &length, &data, NULL, NULL) != napi_ok || type != napi_float64_array || count > (double)length)
      return pio_throw(env, "ERR_BFMIG_PAGEIO", "pageioPrefetchRanges expects (handle, Float64Array, Float64Array, count)");
    arrays[a] = (const double *)data;
  }
  pio *p = pio_arg(env, argv[0]);
  if (p == NULL) return NULL;
  int queued = 0;
  struct iocb *submit[PIO_RANGE_SLOTS];
  pthread_mutex_lock(&p->mu);
  uint64_t batch = p->rg_seq + 1;
  if (p->rg_region == NULL && posix_memalign((void **)&p->rg_region, PIO_HUGE_PAGE, (size_t)PIO_RANGE_SLOTS * PIO_RANGE_BYTES) == 0)
    madvise(p->rg_region, (size_t)PIO_RANGE_SLOTS * PIO_RANGE_BYTES, MADV_HUGEPAGE);
  /* Ranges the kernel has read since are DONE, so their slots may be taken again. */
  if (p->aio != 0) pio_aio_reap(p, 0);
  int full = p->rg_region == NULL || (p->aio == 0 && pio_pf_start(p) != 0);
  for (size_t i = 0; i < (size_t)count && !full; i++) {
    double d = arrays[0][i], l = arrays[1][i];
    if (!(d >= 0) || d != (double)(int64_t)d || ((int64_t)d % PIO_ALIGN) != 0 || !(l > 0) || l != (double)(int64_t)l || ((int64_t)l % PIO_ALIGN) != 0) continue;
    off_t pos = (off_t)d;
    if (pos >= p->file_size) continue;
    size_t left = (size_t)l;
    if (pos + (off_t)left > p->file_size) left = (size_t)(p->file_size - pos) / PIO_ALIGN * PIO_ALIGN;
    for (; left > 0 && !full; ) {
      size_t len = left < PIO_RANGE_BYTES ? left : PIO_RANGE_BYTES;
      if (!pio_rg_covers(p, pos, len) && !pio_writing(p, pos, len)) {
        int k = -1;
        for (int j = 0; j < PIO_RANGE_SLOTS; j++) {
          pio_range *rg = &p->rg[j];
          if (rg->state == SLOT_FREE) {
            k = j;
            break;
          }
          /* Evict a range served from already (the read of its Run is over, or nearly), else the oldest
             one read and not asked for since PIO_RANGE_SLOTS more were queued (a hint that missed). One
             more recent waits for its read: other channels' Runs are in them, and evicting those makes
             every channel read its own again. */
          if (rg->state != SLOT_DONE || (!rg->used && rg->seq + PIO_RANGE_SLOTS >= batch)) continue;
          if (k < 0 || (rg->used && !p->rg[k].used) || (rg->used == p->rg[k].used && rg->seq < p->rg[k].seq)) k = j;
        }
        if (k < 0 || p->rg_qlen == PIO_RANGE_QUEUE) {
          full = 1;
          break;
        }
        pio_range *rg = &p->rg[k];
        rg->state = SLOT_QUEUED;
        rg->stale = 0;
        rg->err = 0;
        rg->got = 0;
        rg->used = 0;
        rg->pos = pos;
        rg->len = len;
        rg->seq = ++p->rg_seq;
        if (p->aio != 0) {
          /* All at once: no thread is woken for them, and the device takes many reads in flight. */
          rg->state = SLOT_BUSY;
          submit[queued++] = pio_aio_read(p, &p->rg_cb[k], (uint64_t)(PIO_PREFETCH_SLOTS + k), p->rg_region + (size_t)k * PIO_RANGE_BYTES, len, pos);
        } else {
          p->rg_queue[(p->rg_qhead + p->rg_qlen) % PIO_RANGE_QUEUE] = k;
          p->rg_qlen++;
          queued++;
        }
      }
      pos += (off_t)len;
      left -= len;
    }
  }
  if (p->aio != 0) queued = pio_aio_submit(p, submit, queued);
  pthread_mutex_unlock(&p->mu);
  if (p->aio == 0) pio_wake_readers(p, queued, PIO_RANGE_READERS);
  napi_create_int32(env, queued, &r);
  return r;
}

/* pageioClose(h) -> null | {errno, start, end}: waits for the queued writes, stops the thread, closes the file. */
static napi_value PageioClose(napi_env env, napi_callback_info info) {
  pio *p = pio_only_arg(env, info, "pageioClose");
  if (p == NULL) return NULL;
  pthread_mutex_lock(&p->mu);
  pio_drop_reads(p, 0, 0, 1);
  pio_wait_idle(p);
  napi_value r = take_error(env, p);
  pthread_mutex_unlock(&p->mu);
  pio_destroy(p);
  pio_forget_exported(env, p, 1);
  return r;
}

/* One of a store's counts of bytes read (read_bytes or caller_read_bytes), for the function `name`. */
static napi_value pio_read_count(napi_env env, napi_callback_info info, const char *name, int caller) {
  pio *p = pio_only_arg(env, info, name);
  if (p == NULL) return NULL;
  napi_value r;
  napi_create_double(env, (double)__atomic_load_n(caller ? &p->caller_read_bytes : &p->read_bytes, __ATOMIC_RELAXED), &r);
  return r;
}

/* pageioDeviceReadBytes(h) -> bytes read from the file so far, by every path: reads made when asked and
 * every read ahead (stream windows, strides, lone pages, ranges; the kernel's AIO counted as submitted),
 * used or not. What a store costs its device, beside what its callers took. */
static napi_value PageioDeviceReadBytes(napi_env env, napi_callback_info info) {
  return pio_read_count(env, info, "pageioDeviceReadBytes", 0);
}

/* pageioCallerReadBytes(h) -> of the bytes read from the file, those pageioRead read itself while its
 * caller waited: what no read-ahead, prefetch or queued write held for it. */
static napi_value PageioCallerReadBytes(napi_env env, napi_callback_info info) {
  return pio_read_count(env, info, "pageioCallerReadBytes", 1);
}

/* pageioKernelReads(h) -> whether the kernel's AIO reads the lone pages and ranges prefetched (else the reader pool). */
static napi_value PageioKernelReads(napi_env env, napi_callback_info info) {
  napi_value r;
  pio *p = pio_only_arg(env, info, "pageioKernelReads");
  if (p == NULL) return NULL;
  napi_get_boolean(env, p->aio != 0, &r);
  return r;
}

napi_status bf_pageio_register(napi_env env, napi_value exports) {
  /* The number of ranges read ahead at once, for the callers that share them out (one place). */
  napi_value range_slots;
  napi_status st = napi_create_uint32(env, PIO_RANGE_SLOTS, &range_slots);
  if (st != napi_ok) return st;
  napi_property_descriptor props[] = {
      {"pageioRangeSlots", NULL, NULL, NULL, NULL, range_slots, napi_enumerable, NULL},
      {"pageioOpen", NULL, PageioOpen, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pageioWriteBuffers", NULL, PageioWriteBuffers, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pageioAcquire", NULL, PageioAcquire, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pageioSubmit", NULL, PageioSubmit, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pageioRead", NULL, PageioRead, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pageioPrefetch", NULL, PageioPrefetch, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pageioPrefetchRanges", NULL, PageioPrefetchRanges, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pageioKernelReads", NULL, PageioKernelReads, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pageioDeviceReadBytes", NULL, PageioDeviceReadBytes, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pageioCallerReadBytes", NULL, PageioCallerReadBytes, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pageioDrain", NULL, PageioDrain, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pageioSetSize", NULL, PageioSetSize, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pageioClose", NULL, PageioClose, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  return napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
