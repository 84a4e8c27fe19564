/**
 * Pages that resemble each other: a page whose content is another page's with a few bytes changed, at
 * another place of the guest's memory (a heap buffer holding a file page with a header of its own, a
 * record copied and updated). Such a page goes as a Delta against that other page, when the receiver
 * holds it and this side still has its content in memory (ResemblanceCache).
 *
 * Resemblance is judged by one sample of the page: its 16 bytes at RESEMBLANCE_AT. Two pages
 * whose samples are equal are candidates; the Delta's ranges (at most MAX_DELTA_BYTES) decide, so a
 * candidate that differs more costs an encode, never a wrong page. A sample of one repeated 32-bit word
 * (zeros, a fill pattern) names nothing: pages full of such runs are many and alike only there.
 */

import { digestWords } from '../digest';
import { pageBuffers, type ReusedBuffers } from './reused-buffers';
import { copyBytes } from '../common/copy';

/** Offset of the sample within a page: past the headers page-sized records often begin with. */
export const RESEMBLANCE_AT = 2048;

/**
 * The page's resemblance key (a 32-bit mix of its sample), or 0 for none. Four 32-bit reads: cheap
 * enough for every page a sending gateway sends.
 */
export function resemblanceKey(page: Buffer, pageStart: number): number {
  const at = pageStart + RESEMBLANCE_AT;
  const a = page.readUInt32LE(at);
  const b = page.readUInt32LE(at + 4);
  const c = page.readUInt32LE(at + 8);
  const d = page.readUInt32LE(at + 12);
  if (a === b && b === c && c === d) return 0;
  const key = (Math.imul(a, 0x85ebca6b) ^ Math.imul(b ^ (b >>> 15), 0xc2b2ae35) ^ Math.imul(c, 0x27d4eb2f) ^ Math.imul(d ^ (d >>> 13), 0x165667b1)) >>> 0;
  return key === 0 ? 1 : key;
}

/** Entries per bucket: a key is looked for in one bucket of four. */
const WAYS = 4;
/**
 * Adds in a row with no key looked for found (nothing resembling what was kept) after which the cache
 * keeps only the keys of one bucket in QUIET_SAMPLE: on memory that resembles nothing (pseudo-random,
 * already-compressed) the copy of every page sent and a cache's worth of touched memory buy nothing.
 */
export const QUIET_ADDS = 4096;
export const QUIET_SAMPLE = 16;
/** Most pages a ResemblanceCache keeps: 32 MiB of page content. */
export const RESEMBLANCE_CACHE_PAGES = 8192;

/** Pages kept in the cache after which its worth is judged. */
export const WORTH_WINDOW_PAGES = 4096;
/** Candidate pages the cache then stays off for when it did not pay (64 MiB of pages), before it is tried again. */
export const WORTH_OFF_PAGES = 16384;
/**
 * What keeping a page costs the two gateways, in seconds: its key and its copy into this cache at the
 * sender, its copy into RecentPages at the receiver (0.15, 0.4 and 0.55 µs in a profile of a 1 Gbit/s
 * first leg, docs/benchmarks.md, "Eleventh session").
 */
const KEEP_SECONDS = 1.1e-6;
/** What a Delta against a page alike costs the two gateways, in seconds: the encode here, the rebuild and its digest there. */
const DELTA_SECONDS = 8e-6;

/**
 * Whether the resemblance cache pays for itself: the WAN time its Deltas saved (bytes saved at the rate
 * the WAN was last measured to take them) against what keeping the pages and making the Deltas cost
 * both gateways, judged every WORTH_WINDOW_PAGES pages kept. A window that did not pay turns the cache
 * off for WORTH_OFF_PAGES candidate pages, then it is tried again. While zstd compresses, a page alike
 * one sent shortly before compresses against it anyway: on a guest of pseudo-random pages at 1 Gbit/s
 * the cache's 1,100 Deltas a leg saved no WAN byte and cost both gateways CPU; on a guest of files its
 * 2,600–6,500 saved about 7 MB (docs/benchmarks.md, "Eleventh session"). Until the WAN's rate is
 * known every window pays. No clock of its own: the costs are the profile's.
 */
export class ResemblanceWorth {
  private kept = 0;
  private deltas = 0;
  private savedBytes = 0;
  private offLeft = 0;
  /** Bytes a second the WAN was last measured to take (-1: not measured yet). */
  private wanBytesPerSecond = -1;

  /** Whether pages are kept and looked for now. */
  get on(): boolean {
    return this.offLeft === 0;
  }

  observeWanRate(bytesPerSecond: number): void {
    this.wanBytesPerSecond = bytesPerSecond;
  }

  /** A page that could have been kept went by while the cache is off. */
  passedOver(): void {
    if (this.offLeft > 0) this.offLeft--;
  }

  /** A Delta against a page alike was sent, `savedBytes` fewer than the page. */
  delta(savedBytes: number): void {
    this.deltas++;
    this.savedBytes += savedBytes;
  }

  /** A page was kept; every WORTH_WINDOW_PAGES of them the window is judged. */
  pageKept(): void {
    if (++this.kept < WORTH_WINDOW_PAGES) return;
    const rate = this.wanBytesPerSecond;
    const pays = rate <= 0 || this.savedBytes / rate >= this.kept * KEEP_SECONDS + this.deltas * DELTA_SECONDS;
    if (!pays) this.offLeft = WORTH_OFF_PAGES;
    this.kept = 0;
    this.deltas = 0;
    this.savedBytes = 0;
  }
}

/**
 * Pages sent lately, by resemblance key: the bases a page like one of them is given as a Delta against,
 * with no store read at the sender (a random read costs about as much as the page takes to cross a
 * 100 Mbit/s link, and blocks the gateway meanwhile). Each entry keeps the page's content as it was
 * sent, its page index and its digest: the receiver holds that content at that index only while its
 * digest table (the encoder's reference) still says so, which the encoder checks before it names one.
 *
 * Buckets of four entries, the bucket chosen by the key; an entry for the same key is replaced (any
 * page of a key serves), a full bucket gives up its entries in turn. At most RESEMBLANCE_CACHE_PAGES
 * entries (fewer for a smaller guest), each 4 KiB of content and 24 bytes of key, page and digest,
 * the content taken at the first add from the pool of page buffers (reused-buffers.ts; resident, when
 * new, only where entries were written: a sixteenth of it while nothing resembles) and given back by
 * release() at the migration's end: only on the sending gateway, only once it looks for resemblance, one
 * per migration.
 */
export class ResemblanceCache {
  /** Key and page of each entry side by side. */
  private readonly entries: Uint32Array;
  /** The digest of each entry's content, 16 bytes an entry. */
  readonly digests: Uint8Array;
  readonly digestWords: Uint32Array;
  /** Each entry's content, 4 KiB an entry, taken from the pool of page buffers at the first add. */
  private pages: Buffer = Buffer.alloc(0);
  private readonly bucketMask: number;
  private readonly capacity: number;
  private victim = 0;
  /** Adds since a key looked for was last found. */
  private quiet = 0;
  /** While quiet, only keys of buckets below this are kept. */
  private readonly sampledBuckets: number;

  constructor(
    /** Pages of the guest's RAM: a smaller guest gets a smaller cache. */
    pageCount: number,
    private readonly pageSize: number,
    /** Where the content comes from and goes back to. */
    private readonly buffers: ReusedBuffers = pageBuffers,
  ) {
    // A power of two (buckets are picked by the key's low bits), from 1024 to RESEMBLANCE_CACHE_PAGES.
    const capacity = Math.min(RESEMBLANCE_CACHE_PAGES, 2 ** Math.max(10, Math.ceil(Math.log2(Math.max(pageCount, 1)))));
    this.capacity = capacity;
    this.entries = new Uint32Array(2 * capacity);
    this.digests = new Uint8Array(16 * capacity);
    this.digestWords = digestWords(this.digests);
    this.bucketMask = capacity / WAYS - 1;
    this.sampledBuckets = capacity / WAYS / QUIET_SAMPLE;
  }

  /**
   * The receiver now holds, at `page`, the content at src[srcStart…] with this key (0: nothing to keep)
   * and the digest at digestWords[digestAt…].
   */
  add(key: number, page: number, src: Buffer, srcStart: number, digestWords: Uint32Array, digestAt: number): void {
    if (key === 0) return;
    const bucket = key & this.bucketMask;
    // While nothing resembles, a sample by key: two pages alike share their key, so resemblance that
    // begins is still seen (in one bucket of QUIET_SAMPLE) and brings every key back.
    if (this.quiet++ >= QUIET_ADDS && bucket >= this.sampledBuckets) return;
    const entries = this.entries;
    const first = bucket * WAYS;
    let e = first;
    while (e < first + WAYS && entries[2 * e] !== key && entries[2 * e] !== 0) e++;
    if (e === first + WAYS) e = first + (this.victim++ & (WAYS - 1));
    entries[2 * e] = key;
    entries[2 * e + 1] = page;
    const words = this.digestWords;
    words[4 * e] = digestWords[digestAt];
    words[4 * e + 1] = digestWords[digestAt + 1];
    words[4 * e + 2] = digestWords[digestAt + 2];
    words[4 * e + 3] = digestWords[digestAt + 3];
    copyBytes(src, srcStart, this.contentBuffer(), e * this.pageSize, this.pageSize);
  }

  /** The entry holding a page with this key, or -1. */
  find(key: number): number {
    if (key === 0) return -1;
    const entries = this.entries;
    const first = (key & this.bucketMask) * WAYS;
    for (let e = first; e < first + WAYS; e++) {
      if (entries[2 * e] === key) {
        this.quiet = 0;
        return e;
      }
    }
    return -1;
  }

  /** The page index the entry's content was sent for. */
  pageOf(entry: number): number {
    return this.entries[2 * entry + 1];
  }

  /** The buffer holding the entries' content, entry × pageSize on (empty until the first add). */
  content(): Buffer {
    return this.pages;
  }

  private contentBuffer(): Buffer {
    if (this.pages.length === 0) this.pages = this.buffers.take(this.capacity * this.pageSize);
    return this.pages;
  }

  /**
   * The migration is over: the content buffer goes back to the pool for the next one, and the cache
   * forgets every entry (a later add starts it afresh), so that nothing here names bytes it no longer has.
   */
  release(): void {
    this.entries.fill(0);
    this.buffers.give(this.pages);
    this.pages = Buffer.alloc(0);
  }
}
