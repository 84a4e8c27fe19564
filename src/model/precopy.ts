/**
 * A performance model of QEMU pre-copy live migration over a WAN, direct (QEMU to QEMU) and through a
 * bfmig gateway pair, with and without a retained snapshot at the destination. Pure functions, no I/O.
 * docs/model.md derives every equation and says where each constant comes from.
 *
 * QEMU's loop (migration/migration.c, migration/ram.c, QEMU 7.2) is simulated in small time steps:
 *  - every page of RAM starts dirty; the source sends pending pages in address order, a zero page as a
 *    9-byte record, any other as 8 + 4096 bytes (ram.c save_zero_page / save_normal_page);
 *  - every 100 ms (BUFFER_DELAY) it measures the stream bytes it wrote in that window, bandwidth × the
 *    downtime-limit is the threshold (migration_update_counters);
 *  - when the pending dirty pages × 4096 fall below the threshold it syncs the dirty bitmap
 *    (ram_save_pending); if they are still below, it stops the VM and sends the rest, then the device
 *    state (migration_iteration_run → migration_completion): that is the downtime;
 *  - the guest dirties `dirtyPagesPerS` page writes a second, uniformly over a hot set of H pages, so in
 *    τ seconds H·(1 − e^(−d·τ/H)) distinct pages (Clark et al. 2005's writable working set; the
 *    saturating form as in Akoush et al. 2010's simulation model).
 * The source writes into a pipeline: a local stage (QEMU's max-bandwidth, the host's and — through
 * bfmig — the gateways' ceiling, in stream bytes per second), then the WAN (link rate, WAN bytes) with
 * `bufferBytes` of socket buffers and emulator queue in between. QEMU's total time ends when its last
 * byte enters that pipeline, not when it reaches the destination.
 */

export const PAGE_BYTES = 4096;
/** A normal page record: 8-byte offset|flags word + the page (the block name only on a block's first record). */
export const NORMAL_PAGE_STREAM_BYTES = 8 + PAGE_BYTES;
/** The offset|flags word a page record starts with. */
export const RECORD_HEADER_BYTES = 8;
/** A zero page record: the word + one fill byte. */
export const ZERO_PAGE_STREAM_BYTES = 9;
/** bfmig frame header (u8 type, u32 length) and the fixed part of a Run payload (src/wire, src/proxy/run.ts). */
export const FRAME_HEADER_BYTES = 5;
export const RUN_FIXED_BYTES = 1 + 2 + 2 + 4 + 8 + 16;
/** Most held pages and most records in one Run frame. */
export const RUN_MAX_HELD = 256;
export const RUN_MAX_RECORDS = 4096;
/**
 * Carried pages at most 1/SPARSE_SHARE of the stream are compressed whatever the WAN does: the gateway's
 * compression policy (SPARSE_SHARE in src/wire/compression-policy.ts; test/model.test.ts keeps them equal).
 */
export const SPARSE_SHARE = 32;
/** A Run frame beside its bitmap: the frame header and the Run's fixed part. */
export const RUN_FRAME_BYTES = FRAME_HEADER_BYTES + RUN_FIXED_BYTES;
/** WAN bytes of a page the receiver holds: one bit of a Run's bitmap and its share of a Run (≤ 256 held pages a Run). */
export const HELD_PAGE_WAN_BYTES = 1 / 8 + RUN_FRAME_BYTES / RUN_MAX_HELD;
/** WAN bytes of a zero page: one bit and its share of a Run (≤ 4096 records a Run). */
export const ZERO_PAGE_WAN_BYTES = 1 / 8 + RUN_FRAME_BYTES / RUN_MAX_RECORDS;
/**
 * With multifd (QEMU 10.0: 128 pages a packet, zero pages among them), every page, normal or zero, comes
 * with its share of its packet's header: its 8-byte offset and a share of the fixed part, 10.67 B of
 * stream a page (`node dist/bench/multifd-headers.js`: a 256 MiB guest's back leg, 4 channels). Where the
 * leg compresses, the gateways send each header as a PacketHeader frame (proxy/packet-header.ts): a
 * 4-channel back leg of real QEMU 10.0 packets through bfmig (docs/benchmarks.md, "Thirtieth session")
 * took 30.7 B a packet, 0.29 B a guest page with the frame's own header. To a peer that takes no such
 * frames the headers go as Literal bytes through zstd: about 1.0 B a page with real QEMU 10.0 (the six
 * 4-channel back legs of docs/benchmarks/leg-cost-1000-multifd-nineteenth.json, less the model's other
 * terms). A held page goes in its packet's Run (≤ 128 pages a Run): 0.477 B.
 */
export const MULTIFD_HEADER_STREAM_BYTES = 10.67;
export const MULTIFD_HEADER_WAN_BYTES = 0.29;
export const MULTIFD_HEADER_ZSTD_WAN_BYTES = 1.0;
export const MULTIFD_HELD_PAGE_WAN_BYTES = 0.477;
/**
 * WAN bytes of a delta beside its payload: the record's header as a Literal frame of its own (the Delta
 * frame flushes the batch before it, too small to compress), then the Delta frame's header.
 */
export const DELTA_FRAMING_WAN_BYTES = 2 * FRAME_HEADER_BYTES + RECORD_HEADER_BYTES;
/** Digest-table entry the receiver sends when the sender lacks its snapshot's digests. */
export const DIGEST_TABLE_BYTES_PER_PAGE = 16;
/** QEMU's bandwidth window (migration.c BUFFER_DELAY). */
const WINDOW_S = 0.1;

/** What this machine and its software stack add; see src/model/calibration.ts for measured values. */
export interface Platform {
  /** Device state, stream header, configuration and RAM block list: bytes per migration beyond the pages. */
  deviceStateBytes: number;
  /** Bytes in flight between the source QEMU and the WAN that it does not wait for, direct path. */
  directBufferBytes: number;
  /** The same through a gateway pair (two more sockets and the sender's reads). */
  bfmigBufferBytes: number;
  /** Ceiling of the source QEMU's stream, bytes/s (host CPU; TCG here), before any link. */
  sourceBytesPerS: number;
  /** Ceiling of a gateway pair, stream bytes/s, when the WAN is not the limit (parse, hash, store). */
  gatewayBytesPerS: number;
  /**
   * The same for pages the pair carries (Literal bytes: framed and sent, written to the store at both
   * ends), at most gatewayBytesPerS: a carried page costs the gateways more CPU than a held one.
   */
  gatewayLiteralBytesPerS: number;
  /**
   * Gateway time per Run a changed page breaks off, seconds: the receiver reads and checks each Run's
   * held pages from its store separately, the sender saves each changed page's old version (undo).
   */
  gatewaySecondsPerRun: number;
  /** Rate the WAN path really carries at most, bytes/s (here the user-space emulator under load). */
  linkCeilingBytesPerS: number;
  /** Fixed cost of stopping the VM and finishing, beyond the bytes sent meanwhile, seconds. */
  stopSeconds: number;
  /** Fixed cost before the first page (QEMU setup, connection), seconds. */
  setupSeconds: number;
  /** bfmig control frames (Hello, Offer, End, Done) both ways, bytes per migration. */
  bfmigControlBytes: number;
  /** Literal bytes a sending gateway zstd-compresses a second on a core of its own, when it compresses. */
  compressorBytesPerS: number;
  /**
   * Share of a core (0..1] the sending gateway's own work takes while it carries pages raw at
   * gatewayLiteralBytesPerS. Below 1 something else sets that pace (the receiver, the stores, the source
   * QEMU) and the sender waits the rest of the time: zstd runs in that wait before it slows the pages.
   */
  senderCoreShare: number;
}

export interface ModelInputs {
  /** Guest RAM, bytes (every RAM block QEMU migrates). */
  ramBytes: number;
  /** Share of RAM pages that are not zero (0..1]; zero pages cost QEMU 9 bytes. */
  usedShare: number;
  rateMbit: number;
  /** Round-trip time of the WAN, ms. */
  rttMs: number;
  /** Share of RAM pages changed since the VM last left the destination site (bfmig's warm leg). */
  changedShare: number;
  /** Page writes of the guest while it migrates, Mbit/s (pages/s × 4 KiB × 8). */
  dirtyMbit: number;
  /** Share of RAM those writes fall on (the writable working set). */
  hotShare: number;
  /** QEMU's downtime-limit, ms (300 by default in 7.2). */
  downtimeLimitMs: number;
  /**
   * QEMU 8.2+'s avail-switchover-bandwidth, bytes/s (0 or absent: not set): what QEMU weighs what is left
   * against instead of the rate it measured in its last window (migration_update_counters).
   */
  availSwitchoverBytesPerS?: number;
  /** QEMU's max-bandwidth, bytes/s (128 MiB/s by default in 7.2). */
  maxBandwidthBytesPerS: number;
  /** Whether the sending gateway already has the digests of the receiver's snapshot (it took part in it). */
  senderHasDigests: boolean;
  /**
   * WAN bytes per Literal byte when the gateway compresses (`bfmig inspect` measures it from a capture);
   * absent or 1: not compressed. The gateway compresses only while the WAN is the bottleneck.
   */
  compressionRatio?: number;
  /**
   * Deltas, `bytes` each on average (the Delta payload, the gateway's deltaBytes / (pagesDelta +
   * pagesMatched)): `share` (0..1) of a warm leg's changed pages go as deltas, and `firstLegShare`
   * (default 0) of a first leg's pages (content it sent already at another place, pages re-sent after
   * the guest changed them); absent: every page whole.
   */
  delta?: { bytes: number; share: number; firstLegShare?: number };
  /** QEMU 10.0's multifd channels (0 or absent: none): pages travel in packets, each with its header share. */
  multifdChannels?: number;
  /**
   * Where the leg compresses, the receiving gateway takes PacketHeader frames (Feature.ChannelPacketHeaders,
   * default true); false: a peer of an earlier release, which takes the headers as Literal bytes, through zstd.
   */
  packetHeaders?: boolean;
  platform: Platform;
}

export interface PathPrediction {
  /** Bytes over the WAN, both ways. */
  wanBytes: number;
  /** QEMU stream bytes. */
  streamBytes: number;
  /** QEMU's total-time, seconds. */
  totalSeconds: number;
  /** QEMU's downtime, ms. */
  downtimeMs: number;
  /** Dirty-bitmap syncs after the first (≈ pre-copy rounds). */
  rounds: number;
  /** Pages sent in full over the WAN. */
  pagesSent: number;
  /** False when the dirtying outpaces the link: QEMU 7.2 would iterate forever (figures are at the cap). */
  converged: boolean;
}

export interface Prediction {
  direct: PathPrediction;
  /** Through bfmig when the destination retains nothing for this VM (first leg). */
  bfmigCold: PathPrediction;
  /** Through bfmig to the site the VM last left, `changedShare` of its pages changed since. */
  bfmigWarm: PathPrediction;
  breakEven: {
    /** Changed share above which the warm leg takes longer than direct (null: not up to 100%). */
    changedShareForTime: number | null;
    /** Changed share above which the warm leg sends more WAN bytes than direct (null: not up to 100%). */
    changedShareForBytes: number | null;
    /** Link rate, Mbit/s, above which the warm leg takes longer than direct at this changed share (null: not up to 100 Gbit/s). */
    rateMbitForTime: number | null;
  };
}

/** Pages of one kind: stream and WAN bytes each, and extra local-stage seconds each (per-Run costs). */
interface PageKind {
  stream: number;
  wan: number;
  extraSeconds?: number;
}

/** Pending pages by kind, as the source's dirty bitmap holds them. */
interface Pending {
  /** Pages whose content the far site lacks (direct: every non-zero page). */
  literal: number;
  /** Non-zero pages the far site holds (bfmig warm leg only). */
  held: number;
  zero: number;
}

interface PathCosts {
  literal: PageKind;
  /** The literal pages when the gateway compresses them (absent: it never does). */
  compressedLiteral?: PageKind;
  held: PageKind;
  zero: PageKind;
  /** Stream-byte ceiling of the local stage. */
  localBytesPerS: number;
  bufferBytes: number;
  setupSeconds: number;
  /** WAN bytes that cross before the stream (digest table) and control frames. */
  extraWanBytes: number;
  /** WAN bytes of the device state per byte of it (below 1: the gateway compresses it). */
  deviceWanRatio: number;
}

const total = (p: Pending): number => p.literal + p.held + p.zero;

/**
 * Simulates one migration. Time advances in steps of `dt`; each step the source writes what the local
 * stage and the WAN (after its buffer) let through, taking pending pages in proportion to their kinds
 * (dirty pages are spread over RAM, so the mix is uniform along QEMU's address-order walk).
 */
function simulate(inputs: ModelInputs, start: Pending, costs: PathCosts): PathPrediction {
  checkInputs(inputs);
  const { platform } = inputs;
  const wanBytesPerS = Math.min((inputs.rateMbit * 1e6) / 8, platform.linkCeilingBytesPerS);
  const limitS = inputs.downtimeLimitMs / 1000;
  const pages = inputs.ramBytes / PAGE_BYTES;
  const hot = Math.max(1, inputs.hotShare * pages);
  const dirtyPerS = (inputs.dirtyMbit * 1e6) / 8 / PAGE_BYTES;
  const fullCopyS = (total(start) * costs.literal.wan) / wanBytesPerS;
  const capS = 20 * fullCopyS + 600;
  // About 2,000 steps for a full copy (a step longer than QEMU's 100 ms window measures the same rate).
  const dt = Math.max(1e-4, fullCopyS / 2_000);

  let pending: Pending = { ...start };
  let t = costs.setupSeconds;
  let queue = 0;
  let wan = costs.extraWanBytes;
  let stream = 0;
  let pagesSent = 0;
  let sinceSync = 0;
  let windowStart = t;
  let windowStream = 0;
  let threshold = 0;
  let rounds = 0;
  let converged = true;

  /** Pages of `p` the pipeline lets through in `budgetS` with `literal` as the literal pages' costs. */
  const throughput = (budgetS: number, p: Pending, literal: PageKind): { k: number; used: number; streamPerPage: number; wanPerPage: number } => {
    const n = total(p);
    const streamPerPage = (p.literal * literal.stream + p.held * costs.held.stream + p.zero * costs.zero.stream) / n;
    const wanPerPage = (p.literal * literal.wan + p.held * costs.held.wan + p.zero * costs.zero.wan) / n;
    // Local-stage seconds a page: its stream bytes at the local ceiling plus any per-page gateway cost.
    const localPerPage = streamPerPage / costs.localBytesPerS + (p.literal * (literal.extraSeconds ?? 0)) / n;
    // Pages the local stage lets through in budgetS, and the pages the WAN stage accepts: what it drains
    // meanwhile plus the room left in the buffer.
    const byLocal = budgetS / localPerPage;
    const byWan = wanPerPage > 0 ? (wanBytesPerS * budgetS + Math.max(0, costs.bufferBytes - queue)) / wanPerPage : Infinity;
    const k = Math.min(n, byLocal, byWan);
    const used = k === n ? Math.max(k * localPerPage, (k * wanPerPage - Math.max(0, costs.bufferBytes - queue)) / wanBytesPerS, 0) : budgetS;
    return { k, used, streamPerPage, wanPerPage };
  };

  /** Sends up to `budgetS` seconds' worth of pending pages; returns the seconds used. */
  const sendFor = (budgetS: number, p: Pending): { used: number; sent: Pending } => {
    const n = total(p);
    if (n === 0) return { used: 0, sent: { literal: 0, held: 0, zero: 0 } };
    // The gateway compresses unless that lets less through (it backs off only when its CPU, not the WAN,
    // is the bottleneck: compressing in the time it would wait anyway costs nothing), and whatever the WAN
    // does while the pages it carries are at most 1/SPARSE_SHARE of the stream (a back leg: compressing
    // them costs little of the gateway's work on that stream).
    const raw = throughput(budgetS, p, costs.literal);
    const zipped = costs.compressedLiteral ? throughput(budgetS, p, costs.compressedLiteral) : raw;
    const sparse = p.literal * costs.literal.stream * SPARSE_SHARE <= p.literal * costs.literal.stream + p.held * costs.held.stream + p.zero * costs.zero.stream;
    const { k, used, streamPerPage, wanPerPage } = sparse || zipped.k / zipped.used >= raw.k / raw.used ? zipped : raw;
    const share = k / n;
    const sent = { literal: p.literal * share, held: p.held * share, zero: p.zero * share };
    queue = Math.max(0, queue + k * wanPerPage - wanBytesPerS * used);
    wan += k * wanPerPage;
    stream += k * streamPerPage;
    pagesSent += sent.literal;
    return { used, sent };
  };

  for (;;) {
    // QEMU checks pending against the threshold before each iteration; it syncs when below.
    if (total(pending) * PAGE_BYTES < threshold || total(pending) === 0) {
      const dirtied = hot * (1 - Math.exp((-dirtyPerS * sinceSync) / hot));
      // Dirtied pages already sent are pending again; dirtied pages still pending as held are no longer
      // what the far site holds.
      const fresh = dirtied * (1 - Math.min(1, total(pending) / pages));
      const spoiled = Math.min(pending.held, dirtied * (pending.held / pages));
      pending = { literal: pending.literal + fresh + spoiled, held: pending.held - spoiled, zero: pending.zero };
      sinceSync = 0;
      rounds++;
      if (total(pending) * PAGE_BYTES < threshold || (total(pending) < 1 && threshold >= 0)) break;
    }
    if (t > capS) {
      converged = false;
      break;
    }
    const { used, sent } = sendFor(dt, pending);
    pending = { literal: pending.literal - sent.literal, held: pending.held - sent.held, zero: pending.zero - sent.zero };
    t += used;
    sinceSync += used;
    windowStream += sent.literal * costs.literal.stream + sent.held * costs.held.stream + sent.zero * costs.zero.stream;
    if (t - windowStart >= WINDOW_S) {
      // The rate it measured in the window, unless the operator told it the link's (avail-switchover-bandwidth).
      threshold = (inputs.availSwitchoverBytesPerS || windowStream / (t - windowStart)) * limitS;
      windowStart = t;
      windowStream = 0;
    }
  }

  // Stop and copy: the rest of the pending pages, then the device state, as fast as the pipeline takes them.
  const stopStart = t;
  while (total(pending) > 1e-9) {
    const { used, sent } = sendFor(1, pending);
    pending = { literal: pending.literal - sent.literal, held: pending.held - sent.held, zero: pending.zero - sent.zero };
    t += used;
  }
  const deviceWan = platform.deviceStateBytes * costs.deviceWanRatio + FRAME_HEADER_BYTES;
  t += Math.max(platform.deviceStateBytes / costs.localBytesPerS, (deviceWan - Math.max(0, costs.bufferBytes - queue)) / wanBytesPerS, 0);
  t += platform.stopSeconds;
  wan += deviceWan;
  stream += platform.deviceStateBytes;
  return { wanBytes: wan, streamBytes: stream, totalSeconds: t, downtimeMs: (t - stopStart) * 1000, rounds, pagesSent: Math.round(pagesSent), converged };
}

/** Throws on inputs the model has no answer for (they would also stall the simulation). */
export function checkInputs(i: ModelInputs): void {
  const bad = (name: string, ok: boolean): void => {
    if (!ok) throw new RangeError(`model input ${name} is out of range`);
  };
  bad('ramBytes', Number.isFinite(i.ramBytes) && i.ramBytes >= PAGE_BYTES);
  bad('usedShare', i.usedShare > 0 && i.usedShare <= 1);
  bad('rateMbit', Number.isFinite(i.rateMbit) && i.rateMbit > 0);
  bad('rttMs', Number.isFinite(i.rttMs) && i.rttMs >= 0);
  bad('changedShare', i.changedShare >= 0 && i.changedShare <= 1);
  bad('dirtyMbit', Number.isFinite(i.dirtyMbit) && i.dirtyMbit >= 0);
  bad('hotShare', i.hotShare > 0 && i.hotShare <= 1);
  bad('downtimeLimitMs', Number.isFinite(i.downtimeLimitMs) && i.downtimeLimitMs > 0);
  bad('availSwitchoverBytesPerS', i.availSwitchoverBytesPerS === undefined || (Number.isFinite(i.availSwitchoverBytesPerS) && i.availSwitchoverBytesPerS >= 0));
  bad('maxBandwidthBytesPerS', i.maxBandwidthBytesPerS > 0);
  bad('compressionRatio', i.compressionRatio === undefined || (i.compressionRatio > 0 && i.compressionRatio <= 1));
  bad('delta.bytes', i.delta === undefined || (Number.isFinite(i.delta.bytes) && i.delta.bytes >= 0 && i.delta.bytes <= PAGE_BYTES));
  const share = (x: number | undefined): boolean => x === undefined || (x >= 0 && x <= 1);
  bad('delta.share', i.delta === undefined || (share(i.delta.share) && share(i.delta.firstLegShare)));
  const p = i.platform;
  for (const [name, v] of Object.entries(p)) bad(`platform.${name}`, typeof v === 'number' && v >= 0 && !Number.isNaN(v));
  bad('platform.gatewayBytesPerS', p.gatewayBytesPerS > 0 && p.gatewayLiteralBytesPerS > 0 && p.sourceBytesPerS > 0 && p.compressorBytesPerS > 0);
  bad('platform.senderCoreShare', p.senderCoreShare > 0 && p.senderCoreShare <= 1);
}

/** Pages of the guest by kind at the start of a migration. */
function startPages(inputs: ModelInputs, heldShare: number): Pending {
  const pages = inputs.ramBytes / PAGE_BYTES;
  const used = pages * inputs.usedShare;
  const held = used * heldShare;
  return { literal: used - held, held, zero: pages - used };
}

function localCeiling(inputs: ModelInputs, throughGateways: boolean): number {
  const p = inputs.platform;
  return Math.min(inputs.maxBandwidthBytesPerS, p.sourceBytesPerS, throughGateways ? p.gatewayBytesPerS : Infinity);
}

export function predictDirect(inputs: ModelInputs): PathPrediction {
  const p = inputs.platform;
  const literal = { stream: NORMAL_PAGE_STREAM_BYTES, wan: NORMAL_PAGE_STREAM_BYTES };
  const zero = { stream: ZERO_PAGE_STREAM_BYTES, wan: ZERO_PAGE_STREAM_BYTES };
  return simulate(inputs, startPages(inputs, 0), {
    literal,
    held: literal,
    zero,
    localBytesPerS: localCeiling(inputs, false),
    bufferBytes: p.directBufferBytes,
    setupSeconds: p.setupSeconds,
    extraWanBytes: 0,
    deviceWanRatio: 1,
  });
}

/**
 * Through bfmig. `warm`: the destination holds the snapshot the VM left there, of which all but
 * `changedShare` of the pages are still current.
 *
 * WAN bytes per page: a changed page goes as a Literal (its record plus a frame header) and, changed
 * pages being scattered, ends a Run frame (fixed part + header); a held page is one bit of a Run's
 * bitmap plus its share of a Run's fixed part (≤ 256 held pages a Run); a zero page one bit and its
 * share of a Run (≤ 4096 records a Run).
 */
export function predictBfmig(inputs: ModelInputs, warm: boolean): PathPrediction {
  const p = inputs.platform;
  const pages = inputs.ramBytes / PAGE_BYTES;
  // Changed pages scattered uniformly over the used pages: a changed page ends a Run when the record
  // before it is held, which it is with probability 1 − (changed share of the used pages).
  const runsPerChanged = warm ? 1 - Math.min(1, inputs.changedShare / inputs.usedShare) : 0;
  const runSeconds = runsPerChanged * p.gatewaySecondsPerRun;
  const deltaShare = inputs.delta ? (warm ? inputs.delta.share : inputs.delta.firstLegShare ?? 0) : 0;
  const deltaWan = deltaShare > 0 && inputs.delta ? DELTA_FRAMING_WAN_BYTES + inputs.delta.bytes : 0;
  const changedPage = (wholeWan: number, wholeSeconds: number): PageKind => ({
    stream: NORMAL_PAGE_STREAM_BYTES,
    wan: (1 - deltaShare) * wholeWan + deltaShare * deltaWan + runsPerChanged * RUN_FRAME_BYTES,
    extraSeconds: runSeconds + (1 - deltaShare) * wholeSeconds,
  });
  // A page carried whole costs the local stage what a held page costs (the ceiling) and the difference.
  const carriedSeconds = Math.max(0, NORMAL_PAGE_STREAM_BYTES / p.gatewayLiteralBytesPerS - NORMAL_PAGE_STREAM_BYTES / p.gatewayBytesPerS);
  const ratio = inputs.compressionRatio ?? 1;
  // With multifd every page brings its packet-header share (raw, or as PacketHeader frames where the leg compresses).
  const multifd = (inputs.multifdChannels ?? 0) > 0;
  const header = multifd ? MULTIFD_HEADER_STREAM_BYTES : 0;
  const compressedHeader = inputs.packetHeaders === false ? MULTIFD_HEADER_ZSTD_WAN_BYTES : MULTIFD_HEADER_WAN_BYTES;
  const headerWan = multifd ? (ratio < 1 ? compressedHeader : MULTIFD_HEADER_STREAM_BYTES) : 0;
  const withHeader = (kind: PageKind): PageKind => ({ ...kind, stream: kind.stream + header, wan: kind.wan + headerWan });
  const literal = withHeader(changedPage(NORMAL_PAGE_STREAM_BYTES + FRAME_HEADER_BYTES, carriedSeconds));
  // Compressing a carried page costs the sender zstd's time beyond what it waited for while carrying it raw.
  const carriedPageSeconds = NORMAL_PAGE_STREAM_BYTES / Math.min(p.gatewayLiteralBytesPerS, p.gatewayBytesPerS);
  const zstdSeconds = NORMAL_PAGE_STREAM_BYTES / p.compressorBytesPerS;
  const compressSeconds = Math.max(0, zstdSeconds - (1 - p.senderCoreShare) * carriedPageSeconds);
  const compressedLiteral = ratio < 1 ? withHeader(changedPage(ratio * NORMAL_PAGE_STREAM_BYTES + FRAME_HEADER_BYTES, carriedSeconds + compressSeconds)) : undefined;
  const held = multifd ? { stream: NORMAL_PAGE_STREAM_BYTES + header, wan: MULTIFD_HELD_PAGE_WAN_BYTES + headerWan } : { stream: NORMAL_PAGE_STREAM_BYTES, wan: HELD_PAGE_WAN_BYTES };
  const zero = multifd ? { stream: header, wan: headerWan } : { stream: ZERO_PAGE_STREAM_BYTES, wan: ZERO_PAGE_WAN_BYTES };
  const rttS = inputs.rttMs / 1000;
  const wanBytesPerS = Math.min((inputs.rateMbit * 1e6) / 8, p.linkCeilingBytesPerS);
  // Hello → Offer costs a round trip before the sender passes the first byte on; a sender that lacks the
  // receiver's digests asks for the table (another round trip and 16 bytes a page over the WAN).
  const needsTable = warm && !inputs.senderHasDigests;
  const tableBytes = needsTable ? pages * DIGEST_TABLE_BYTES_PER_PAGE : 0;
  const setupSeconds = p.setupSeconds + rttS + (needsTable ? rttS + tableBytes / wanBytesPerS : 0);
  const heldShare = warm ? Math.max(0, 1 - inputs.changedShare / Math.max(inputs.usedShare, 1e-12)) : 0;
  return simulate(inputs, startPages(inputs, heldShare), {
    literal,
    compressedLiteral,
    held,
    zero,
    localBytesPerS: localCeiling(inputs, true),
    bufferBytes: p.bfmigBufferBytes,
    setupSeconds,
    extraWanBytes: tableBytes + p.bfmigControlBytes,
    // The device state comes at the end of a leg, when Literal bytes are sparse among the last round's
    // Runs, so a compressing gateway compresses it whatever the WAN does: at the leg's ratio, the one
    // figure given (for a back leg, mostly the device state's own).
    deviceWanRatio: ratio,
  });
}

/** Smallest x in [lo, hi] where f turns true, by bisection (f monotone); null when f(hi) is false. */
function firstTrue(lo: number, hi: number, f: (x: number) => boolean, geometric = false): number | null {
  if (!f(hi)) return null;
  if (f(lo)) return lo;
  for (let i = 0; i < 24; i++) {
    const mid = geometric ? Math.sqrt(lo * hi) : (lo + hi) / 2;
    if (f(mid)) hi = mid;
    else lo = mid;
  }
  return hi;
}

export function predict(inputs: ModelInputs): Prediction {
  const direct = predictDirect(inputs);
  const bfmigWarm = predictBfmig(inputs, true);
  const warmAt = (changedShare: number): PathPrediction => predictBfmig({ ...inputs, changedShare }, true);
  const maxChanged = inputs.usedShare;
  return {
    direct,
    bfmigCold: predictBfmig(inputs, false),
    bfmigWarm,
    breakEven: {
      changedShareForTime: firstTrue(0, maxChanged, (c) => warmAt(c).totalSeconds > direct.totalSeconds),
      changedShareForBytes: firstTrue(0, maxChanged, (c) => warmAt(c).wanBytes > direct.wanBytes),
      rateMbitForTime: firstTrue(
        0.1,
        100_000,
        (rateMbit) => predictBfmig({ ...inputs, rateMbit }, true).totalSeconds > predictDirect({ ...inputs, rateMbit }).totalSeconds,
        true,
      ),
    },
  };
}
