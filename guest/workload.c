/*
 * bfmig guest memory workload: a self-verifying memory pattern for migration tests.
 *
 * Build: gcc -O2 -static -o workload guest/workload.c
 *
 * It allocates N MiB as 4 KiB pages, fills every page with content derived only from
 * (seed, page index, generation), then loops forever: each interval it rewrites a share
 * of the pages with a new generation and verifies EVERY page against what it last wrote.
 * A migration stream that loses, reorders, or corrupts a page is caught by the guest.
 *
 * Page layout (512 little-endian 64-bit words):
 *   word 0: 0x574B4C44 ("WKLD") << 32 | page index (low 32 bits)
 *   word 1: generation << 32 | seed (low 32 bits)
 *   words 2..511: xorshift64 stream seeded from splitmix64(seed, index, generation)
 * The header words only help diagnose a failure (which page / generation landed here).
 *
 * Console lines (stdout, line-buffered; the guest's /init points stdout at the console):
 *   WORKLOAD START mib=<m> pages=<n> seed=<s> rewrite_pct=<p> interval_ms=<i> mlock=<0|1>
 *   WORKLOAD READY pages=<n>
 *   WORKLOAD VERIFY OK round=<r> pages=<n> rewritten=<k>
 *   WORKLOAD VERIFY FAIL page=<i> round=<r> gen=<g> word=<w> expected=0x.. got=0x.. hdr_page=<p> hdr_gen=<g>
 *   WORKLOAD VERIFY FAIL round=<r> pages=<n> bad=<b> rewritten=<k>      (per-round summary)
 *   WORKLOAD REWROTE round=<r> pages=<k>          (with --control: this round's rewriting, before its check)
 *   WORKLOAD CHANGED seq=<q> pages=<k> round=<r>   (a "change" command was carried out; the VERIFY
 *                                                   line of the same round follows)
 *
 * Control (--control PATH, e.g. /dev/ttyS1, a second serial port the host writes to): each round,
 * before rewriting, the workload reads the lines waiting there. "change <seq> <pct>" rewrites, once,
 * every page with probability pct/100 (distinct pages, a new generation each), so a benchmark can
 * change a share of memory between two migrations and keep the guest quiet during them.
 * A failing page is not repaired: the failure is reported again every round.
 *
 * Content (--content): "random" (the default, above) is the worst case for compression and the
 * strongest check. "files" makes guest memory look like a real guest's: words 2..511 of a page are
 * bytes 16..4095 of one page of a real file (binaries, libraries, text, already-compressed files taken
 * from the build machine's Debian packages, see scripts/build-guest.sh), picked by
 * splitmix64(seed, index, generation) among the pages of the files under --corpus. The files are
 * mapped, not copied: they are in the guest's page cache (its initramfs), and the heap holds copies.
 *
 * Database-like writes (--scribble-bytes N --scribble-rate R): R times a second, N bytes at a random
 * offset of a random page (past its header) are overwritten, as a database updates rows in place. The
 * workload then keeps a 64-bit sum of every page it wrote and checks each page against it, so a page
 * that lost an update is caught too (reported as word=-1 with the sums as expected/got). A round's
 * updates are spread through it in SCRIBBLE_SLICES, as a database takes them through the second.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <dirent.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define PAGE_SIZE 4096u
#define WORDS_PER_PAGE (PAGE_SIZE / 8u)
#define HDR_MAGIC 0x574B4C44ull
#define MAX_FAIL_LINES_PER_ROUND 8u
/* Slices a round's database-like updates are spread in (see the round loop). */
#define SCRIBBLE_SLICES 10u

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t page_state(uint64_t seed, uint64_t index, uint32_t gen) {
    uint64_t x = seed ^ (index * 0xD1B54A32D192ED03ull) ^ ((uint64_t)gen * 0x8CB92BA72F3D8DD7ull);
    uint64_t s = splitmix64(&x);
    s ^= splitmix64(&x);
    return s ? s : 0x2545F4914F6CDD1Dull;
}

static inline uint64_t xorshift64(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

static inline uint64_t hdr0(uint64_t index) { return (HDR_MAGIC << 32) | (index & 0xFFFFFFFFull); }
static inline uint64_t hdr1(uint64_t seed, uint32_t gen) {
    return ((uint64_t)gen << 32) | (seed & 0xFFFFFFFFull);
}

/* --content files: the pages of the corpus files, mapped read-only (NULL: --content random). */
static const uint8_t **corpus;
static uint64_t corpus_pages;

/* The corpus page a (seed, index, generation) page copies. */
static const uint8_t *corpus_page(uint64_t seed, uint64_t index, uint32_t gen) {
    return corpus[page_state(seed, index, gen) % corpus_pages];
}

static void fill_page(uint64_t *p, uint64_t seed, uint64_t index, uint32_t gen) {
    p[0] = hdr0(index);
    p[1] = hdr1(seed, gen);
    if (corpus) {
        memcpy(p + 2, corpus_page(seed, index, gen) + 16, PAGE_SIZE - 16);
        return;
    }
    uint64_t s = page_state(seed, index, gen);
    for (unsigned w = 2; w < WORDS_PER_PAGE; w++) p[w] = xorshift64(&s);
}

/* With --scribble-bytes: what every page must sum to (the page as last written, updates included). */
static uint64_t page_sum(const uint64_t *p) {
    uint64_t h = 0xCBF29CE484222325ull;
    for (unsigned w = 0; w < WORDS_PER_PAGE; w++) h = (h ^ p[w]) * 0x100000001B3ull + w;
    return h;
}

/* Returns the index of the first mismatching word, or -1 if the page is intact. */
static int check_page(const uint64_t *p, uint64_t seed, uint64_t index, uint32_t gen,
                      uint64_t *expected_out) {
    if (p[0] != hdr0(index)) { *expected_out = hdr0(index); return 0; }
    if (p[1] != hdr1(seed, gen)) { *expected_out = hdr1(seed, gen); return 1; }
    if (corpus) {
        const uint64_t *c = (const uint64_t *)corpus_page(seed, index, gen);
        for (unsigned w = 2; w < WORDS_PER_PAGE; w++) {
            if (p[w] != c[w]) { *expected_out = c[w]; return (int)w; }
        }
        return -1;
    }
    uint64_t s = page_state(seed, index, gen);
    uint64_t diff = 0;
    for (unsigned w = 2; w < WORDS_PER_PAGE; w++) diff |= p[w] ^ xorshift64(&s);
    if (diff == 0) return -1;
    s = page_state(seed, index, gen);
    for (unsigned w = 2; w < WORDS_PER_PAGE; w++) {
        uint64_t e = xorshift64(&s);
        if (p[w] != e) { *expected_out = e; return (int)w; }
    }
    return -1; /* not reached */
}

/* Maps every regular file under dir (recursively) and lists its pages in corpus; 0 on success. */
static int map_corpus_dir(const char *dir, uint64_t *cap) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        struct stat st;
        if (stat(path, &st) != 0) continue;
        if (S_ISDIR(st.st_mode)) {
            map_corpus_dir(path, cap);
            continue;
        }
        if (!S_ISREG(st.st_mode) || st.st_size == 0) continue;
        int fd = open(path, O_RDONLY);
        if (fd < 0) continue;
        /* Past the end of the file the last page reads as zeros, as in the page cache. */
        uint8_t *m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
        close(fd);
        if (m == MAP_FAILED) continue;
        for (off_t at = 0; at < st.st_size; at += PAGE_SIZE) {
            if (corpus_pages == *cap) {
                *cap = *cap ? *cap * 2 : 4096;
                corpus = realloc(corpus, *cap * sizeof *corpus);
                if (!corpus) return -1;
            }
            corpus[corpus_pages++] = m + at;
        }
    }
    closedir(d);
    return 0;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_until_ns(uint64_t deadline) {
    for (;;) {
        uint64_t t = now_ns();
        if (t >= deadline) return;
        uint64_t d = deadline - t;
        struct timespec ts = { (time_t)(d / 1000000000ull), (long)(d % 1000000000ull) };
        if (nanosleep(&ts, NULL) == 0) return;
        if (errno != EINTR) return;
    }
}

/* Opens the control port non-blocking and raw (no echo, no line editing); -1 when it cannot. */
static int open_control(const char *path) {
    int fd = open(path, O_RDWR | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) return -1;
    struct termios t;
    if (tcgetattr(fd, &t) == 0) {
        cfmakeraw(&t);
        tcsetattr(fd, TCSANOW, &t);
    }
    return fd;
}

/*
 * Reads what is waiting on the control port and returns the share (0..1) of pages the last complete
 * "change <seq> <pct>" line asks to rewrite, or -1 when no complete command arrived; *seq_out gets its seq.
 */
static double read_control(int fd, char *buf, size_t cap, size_t *len, uint64_t *seq_out) {
    double share = -1.0;
    for (;;) {
        if (*len == cap - 1) *len = 0; /* a line longer than the buffer is garbage: drop it */
        ssize_t n = read(fd, buf + *len, cap - 1 - *len);
        if (n <= 0) break;
        *len += (size_t)n;
    }
    buf[*len] = '\0';
    char *line = buf;
    char *nl;
    while ((nl = strchr(line, '\n')) != NULL) {
        *nl = '\0';
        unsigned long long seq = 0;
        double pct = 0;
        if (sscanf(line, "change %llu %lf", &seq, &pct) == 2 && pct >= 0 && pct <= 100) {
            share = pct / 100.0;
            *seq_out = (uint64_t)seq;
        } else if (line[0] != '\0' && line[0] != '\r') {
            printf("WORKLOAD CONTROL IGNORED \"%.60s\"\n", line);
        }
        line = nl + 1;
    }
    size_t rest = strlen(line);
    memmove(buf, line, rest + 1);
    *len = rest;
    return share;
}

static void usage(const char *argv0) {
    fprintf(stderr,
            "usage: %s [--mib N] [--seed S] [--rewrite-pct P] [--interval-ms MS]\n"
            "          [--rounds R] [--report-every K] [--inject-fault-round R]\n"
            "  --mib N          memory to allocate and verify, MiB (default 64)\n"
            "  --seed S         pattern seed (default 1)\n"
            "  --rewrite-pct P  share of pages rewritten per second, percent (default 0)\n"
            "  --interval-ms MS verify/rewrite interval (default 1000)\n"
            "  --rounds R       stop after R rounds, 0 = run forever (default 0)\n"
            "  --report-every K print VERIFY OK every K rounds (default 1); FAIL always printed\n"
            "  --inject-fault-round R  self-test: flip one bit of one page in round R\n"
            "  --control PATH   read \"change <seq> <pct>\" commands from PATH (e.g. /dev/ttyS1)\n"
            "  --content random|files  page content (default random)\n"
            "  --corpus DIR     the files --content files copies pages of (default /corpus)\n"
            "  --scribble-bytes N  bytes each database-like update overwrites (default 0: none)\n"
            "  --scribble-rate R   database-like updates per second (default 0)\n",
            argv0);
}

static int parse_u64(const char *s, uint64_t *out) {
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || end == s || *end != '\0') return -1;
    *out = (uint64_t)v;
    return 0;
}

static int parse_double(const char *s, double *out) {
    char *end = NULL;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end != '\0') return -1;
    *out = v;
    return 0;
}

int main(int argc, char **argv) {
    uint64_t mib = 64, seed = 1, interval_ms = 1000, rounds = 0, report_every = 1, fault_round = 0;
    double rewrite_pct = 0.0, scribble_rate = 0.0;
    uint64_t scribble_bytes = 0;
    const char *control_path = NULL, *content = "random", *corpus_dir = "/corpus";

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = (i + 1 < argc) ? argv[i + 1] : NULL;
        int bad;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(argv[0]); return 0; }
        if (!strcmp(a, "--mib")) bad = !v || parse_u64(v, &mib) || mib == 0;
        else if (!strcmp(a, "--seed")) bad = !v || parse_u64(v, &seed);
        else if (!strcmp(a, "--rewrite-pct")) bad = !v || parse_double(v, &rewrite_pct) || rewrite_pct < 0 || rewrite_pct > 100;
        else if (!strcmp(a, "--interval-ms")) bad = !v || parse_u64(v, &interval_ms) || interval_ms == 0;
        else if (!strcmp(a, "--rounds")) bad = !v || parse_u64(v, &rounds);
        else if (!strcmp(a, "--report-every")) bad = !v || parse_u64(v, &report_every) || report_every == 0;
        else if (!strcmp(a, "--inject-fault-round")) bad = !v || parse_u64(v, &fault_round);
        else if (!strcmp(a, "--control")) bad = !v || (control_path = v, 0);
        else if (!strcmp(a, "--content")) bad = !v || (strcmp(v, "random") && strcmp(v, "files")) || (content = v, 0);
        else if (!strcmp(a, "--corpus")) bad = !v || (corpus_dir = v, 0);
        else if (!strcmp(a, "--scribble-bytes")) bad = !v || parse_u64(v, &scribble_bytes) || scribble_bytes > PAGE_SIZE - 16;
        else if (!strcmp(a, "--scribble-rate")) bad = !v || parse_double(v, &scribble_rate) || scribble_rate < 0;
        else bad = 2;
        if (bad) {
            if (bad == 2) fprintf(stderr, "workload: unknown option %s\n", a);
            else fprintf(stderr, "workload: bad option %s %s\n", a, v ? v : "(missing value)");
            usage(argv[0]);
            return 2;
        }
        i++;
    }

    setvbuf(stdout, NULL, _IOLBF, 0);

    const uint64_t npages = mib * (1024u * 1024u / PAGE_SIZE);
    if (npages > 0xFFFFFFFFull) { fprintf(stderr, "workload: too many pages\n"); return 2; }
    const size_t bytes = (size_t)npages * PAGE_SIZE;

    if (!strcmp(content, "files")) {
        uint64_t cap = 0;
        if (map_corpus_dir(corpus_dir, &cap) != 0 || corpus_pages == 0) {
            printf("WORKLOAD ERROR no corpus files under %s (build the guest with its corpus)\n", corpus_dir);
            return 1;
        }
    }
    const int scribbling = scribble_bytes > 0 && scribble_rate > 0;

    int locked = mlockall(MCL_CURRENT | MCL_FUTURE) == 0;
    uint8_t *mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (mem == MAP_FAILED) {
        printf("WORKLOAD ERROR mmap %" PRIu64 " MiB failed: %s\n", mib, strerror(errno));
        return 1;
    }
    uint32_t *gens = calloc((size_t)npages, sizeof(uint32_t));
    if (!gens) { printf("WORKLOAD ERROR calloc generations failed\n"); return 1; }
    madvise(mem, bytes, MADV_NOHUGEPAGE); /* keep dirty tracking at 4 KiB granularity */

    uint64_t *sums = scribbling ? calloc((size_t)npages, sizeof(uint64_t)) : NULL;
    if (scribbling && !sums) { printf("WORKLOAD ERROR calloc sums failed\n"); return 1; }

    printf("WORKLOAD START mib=%" PRIu64 " pages=%" PRIu64 " seed=%" PRIu64 " rewrite_pct=%g interval_ms=%" PRIu64
           " mlock=%d content=%s corpus_pages=%" PRIu64 " scribble_bytes=%" PRIu64 " scribble_rate=%g\n",
           mib, npages, seed, rewrite_pct, interval_ms, locked, content, corpus_pages, scribble_bytes, scribble_rate);

#define WRITE_PAGE(i) do { \
        uint64_t *page_ = (uint64_t *)(mem + (i) * PAGE_SIZE); \
        fill_page(page_, seed, (i), gens[i]); \
        if (sums) sums[i] = page_sum(page_); \
    } while (0)
    for (uint64_t i = 0; i < npages; i++) WRITE_PAGE(i);
    int control_fd = -1;
    if (control_path && control_path[0]) {
        control_fd = open_control(control_path);
        if (control_fd < 0) printf("WORKLOAD CONTROL UNAVAILABLE %s: %s\n", control_path, strerror(errno));
    }
    char control_buf[256];
    size_t control_len = 0;
    uint64_t change_pick = seed ^ 0x2545F4914F6CDD1Dull;

    printf("WORKLOAD READY pages=%" PRIu64 "\n", npages);

    /* Pages to rewrite per round, carried as a fraction so small shares still happen. */
    const double per_round = (double)npages * rewrite_pct / 100.0 * (double)interval_ms / 1000.0;
    double carry = 0.0;
    uint64_t pick = seed ^ 0x5DEECE66Dull;
    /* A round's updates in SCRIBBLE_SLICES slices, one every interval/SCRIBBLE_SLICES: all at the round's
     * start, a migration found one round's burst of changed pages or two by where it fell in the round
     * (a back leg of the benchmarks' files guest carried 611, 1,100 or 1,671 pages, docs/benchmarks.md,
     * "Forty-second session"). */
    const double scribbles_per_round = scribble_rate * (double)interval_ms / 1000.0;
    double scribble_carry = 0.0;
    uint64_t scribble_pick = seed ^ 0x9E3779B97F4A7C15ull;
    uint64_t next = now_ns();

    for (uint64_t round = 1; rounds == 0 || round <= rounds; round++) {
        next += interval_ms * 1000000ull;
        sleep_until_ns(next);
        if (now_ns() > next + interval_ms * 1000000ull) next = now_ns(); /* fell behind (or VM was paused) */
        const uint64_t round_start = next;

        carry += per_round;
        uint64_t k = (uint64_t)carry;
        carry -= (double)k;
        for (uint64_t j = 0; j < k; j++) {
            uint64_t i = splitmix64(&pick) % npages;
            gens[i]++;
            WRITE_PAGE(i);
        }
        /* With a control port, say at once what was rewritten (the VERIFY line comes after the whole
         * check), so a benchmark knows what changed before it starts a migration. */
        if (control_fd >= 0 && k > 0) printf("WORKLOAD REWROTE round=%" PRIu64 " pages=%" PRIu64 "\n", round, k);

        if (control_fd >= 0) {
            uint64_t seq = 0;
            double share = read_control(control_fd, control_buf, sizeof control_buf, &control_len, &seq);
            if (share >= 0) {
                /* Each page independently with probability `share`: distinct pages, about share × npages. */
                const uint64_t cut = share >= 1.0 ? UINT64_MAX : (uint64_t)(share * 18446744073709551616.0);
                uint64_t changed = 0;
                for (uint64_t i = 0; i < npages; i++) {
                    if (share < 1.0 && splitmix64(&change_pick) >= cut) continue;
                    gens[i]++;
                    WRITE_PAGE(i);
                    changed++;
                }
                k += changed;
                printf("WORKLOAD CHANGED seq=%" PRIu64 " pages=%" PRIu64 " round=%" PRIu64 "\n", seq, changed, round);
            }
        }

        if (scribbling) {
            scribble_carry += scribbles_per_round;
            uint64_t u = (uint64_t)scribble_carry;
            scribble_carry -= (double)u;
            for (uint64_t slice = 0; slice < SCRIBBLE_SLICES; slice++) {
                if (slice > 0) sleep_until_ns(round_start + interval_ms * 1000000ull * slice / SCRIBBLE_SLICES);
                for (uint64_t j = u * slice / SCRIBBLE_SLICES; j < u * (slice + 1) / SCRIBBLE_SLICES; j++) {
                    uint64_t i = splitmix64(&scribble_pick) % npages;
                    uint8_t *page = mem + i * PAGE_SIZE;
                    uint64_t at = 16 + splitmix64(&scribble_pick) % (PAGE_SIZE - 16 - scribble_bytes + 1);
                    uint64_t r = splitmix64(&scribble_pick) | 1;
                    for (uint64_t b = 0; b < scribble_bytes; b++) page[at + b] = (uint8_t)(xorshift64(&r) >> 56);
                    sums[i] = page_sum((const uint64_t *)page);
                }
            }
            if (control_fd >= 0 && u > 0) printf("WORKLOAD SCRIBBLED round=%" PRIu64 " updates=%" PRIu64 "\n", round, u);
        }

        if (round == fault_round) mem[(npages / 2) * PAGE_SIZE + 1234] ^= 0x10;

        uint64_t bad = 0;
        for (uint64_t i = 0; i < npages; i++) {
            const uint64_t *p = (const uint64_t *)(mem + i * PAGE_SIZE);
            uint64_t expected = 0;
            int w;
            if (sums) {
                /* Updated pages differ from their generation's content: the sum is the check. */
                expected = sums[i];
                w = page_sum(p) == expected ? -1 : -2;
            } else {
                w = check_page(p, seed, i, gens[i], &expected);
            }
            if (w == -1) continue;
            if (bad < MAX_FAIL_LINES_PER_ROUND) {
                printf("WORKLOAD VERIFY FAIL page=%" PRIu64 " round=%" PRIu64 " gen=%" PRIu32 " word=%d expected=0x%016" PRIx64
                       " got=0x%016" PRIx64 " hdr_page=%" PRIu64 " hdr_gen=%" PRIu64 "\n",
                       i, round, gens[i], w < 0 ? -1 : w, expected, w < 0 ? page_sum(p) : p[w], (uint64_t)(p[0] & 0xFFFFFFFFu), (uint64_t)(p[1] >> 32));
            }
            bad++;
        }
        if (bad) {
            printf("WORKLOAD VERIFY FAIL round=%" PRIu64 " pages=%" PRIu64 " bad=%" PRIu64 " rewritten=%" PRIu64 "\n",
                   round, npages, bad, k);
        } else if (round % report_every == 0) {
            printf("WORKLOAD VERIFY OK round=%" PRIu64 " pages=%" PRIu64 " rewritten=%" PRIu64 "\n", round, npages, k);
        }
    }
    return 0;
}
