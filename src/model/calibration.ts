import { median } from '../common/median';
import { type ModelInputs, type Platform, predictBfmig } from './precopy';

/**
 * Constants of the machine the benchmarks ran on (2 shared cores, QEMU 7.2 under TCG, the user-space
 * WAN emulator on loopback), each calibrated from one named measurement of docs/benchmarks/backforth*.json
 * or one named class of them (named below), not fitted per row; docs/model.md says how.
 */
export const BENCH_PLATFORM: Platform = {
  // First grid run (docs/benchmarks/backforth-run1.json), run r100-d20-m256, direct leg 1: WAN bytes −
  // QEMU's ram.transferred = 114 kB (device state, header, block list, vmdesc).
  deviceStateBytes: 114_000,
  // Same run and leg: 192.14 MB at 12.5 MB/s is 15.37 s of link time; QEMU's total-time was 15.04 s with a
  // 0.39 s downtime: the source finished ≈ 4 MB ahead of the link (QEMU's send buffer, ≤ 4 MiB here,
  // and the emulator's queue, BDP + 512 KiB).
  directBufferBytes: 4_200_000,
  // Third grid run (docs/benchmarks/backforth.json, after the gateway limited its socket queues),
  // r100-d20-m256 bfmig leg 1: 191.89 MB over the WAN is 15.35 s of link time; QEMU's total-time was
  // 15.01 s: ≈ 4.3 MB ahead of the link, as direct (before the limits: 10 MB in the first run).
  bfmigBufferBytes: 4_300_000,
  // Third grid run, idle back legs: 191 MB of stream, everything held, in 0.27–0.37 s (256 MiB guest), and
  // 609 MB in 0.71–0.88 s (1 GiB guest); less the round trip and fixed costs ≈ 0.9 GB/s through the source
  // QEMU and the gateway pair, as bench/throughput.ts gives for a back leg (README: 1.0 GB/s). The first
  // two runs (0.33–1.56 s for the same legs, an older and slower gateway) had given 0.4 GB/s.
  sourceBytesPerS: Infinity,
  gatewayBytesPerS: 900e6,
  // bench/throughput.ts, first leg (every page carried) on loopback, where the sending gateway is
  // CPU-bound on a core of its own: 1.95 CPU s/GiB (docs/benchmarks.md, "WAN compression", plain relay)
  // → 1 / 1.95 GiB/s = 551 MB/s; its back leg gives 0.84–1.05 s/GiB, ≈ the 0.9 GB/s above.
  gatewayLiteralBytesPerS: 551e6,
  // Third grid run, r1000-d5-m1024, bfmig leg 4 (10% changed, ≈ 22,000 Runs broken off by changed
  // pages): 1.386 s against 0.883 s for the idle leg 2 of the same run → 23 µs of gateway time per Run
  // (the first run, same method: 70 µs).
  gatewaySecondsPerRun: 23e-6,
  // First grid run, r1000-d5-m1024, direct leg 1: 609.4 MB in 5.53 s: the 1000 Mbit/s emulated link carries
  // ≈ 111 MB/s while two TCG guests share the two cores with it.
  linkCeilingBytesPerS: 111e6,
  stopSeconds: 0.05,
  setupSeconds: 0.01,
  // Hello/Offer/End/Done JSON frames, both ways.
  bfmigControlBytes: 600,
  // docs/benchmarks.md, "WAN compression": `bench/compression.js 4`, zstd 1 as shipped, 276 MiB/s of
  // realistic memory (files) on one core of this machine under load.
  compressorBytesPerS: 289e6,
  // bench/throughput.ts's first leg above: the sending gateway is CPU-bound on its core.
  senderCoreShare: 1,
};

/**
 * The same machine running QEMU 10.0 (pc-i440fx-10.0, TCG) while other engineers' builds and QEMU runs
 * shared its 2 cores (load average 11–14): bench/leg-cost.js, docs/benchmarks/leg-cost-1000-calibration.json
 * (1 Gbit/s, 20 ms, 256 MiB guest, files and pseudo-random memory, 2 interleaved runs), medians. Only its
 * relay legs and its bfmig-plain legs (compression and deltas off) are read; everything else validates.
 * The gateways get a share of a core here, not one each: every gateway rate below is what it got.
 */
export const BENCH_PLATFORM_QEMU10: Platform = {
  ...BENCH_PLATFORM,
  // Relay legs (QEMU → relay → emulator → relay → QEMU, all 8): (stream − the 4.2 MB direct buffer) / QEMU's
  // total time, median 95.7 MB/s: the 1 Gbit/s emulator and the source QEMU on this loaded host.
  linkCeilingBytesPerS: 96e6,
  // bfmig-plain back legs (all pages held but the few the guest changed meanwhile; 4 legs): stream /
  // (total time − round trip), median 180 MB/s (128–189).
  gatewayBytesPerS: 180e6,
  // bfmig-plain first legs (every page carried; 4 legs): stream / (total time − round trip), median
  // 74 MB/s (58–92): slower than the link, so the gateways, not the WAN, set these legs' pace.
  gatewayLiteralBytesPerS: 74e6,
  // The sending gateway used 3.35 CPU s/GiB on those legs (median): 74 MB/s is 23% of a core, and zstd 1
  // at 289 MB/s a core (compressorBytesPerS above) gets 67 MB/s of it. On that loaded host the gateway got
  // no more of a core than it used, so zstd has no wait of its own to run in (senderCoreShare stays 1).
  compressorBytesPerS: 67e6,
};

/**
 * What `bfmig predict` assumes unless told otherwise: this project's gateway and QEMU figures, on a
 * real WAN (no emulator ceiling). `--gateway-gbps` and `--platform bench` change it.
 */
export const DEFAULT_PLATFORM: Platform = { ...BENCH_PLATFORM, linkCeilingBytesPerS: Infinity };

/** What a calibration reads of one measured leg (bench/leg-cost.js writes them). */
export interface BaselineLeg {
  /** 'relay' (a plain TCP relay pair) and 'bfmig-plain' (compression and deltas off) legs calibrate. */
  path: string;
  /** 1: a first leg (every page carried); above 1: a back leg. */
  leg: number;
  streamBytes: number;
  totalTimeMs: number;
  /** From the migrate command until the guest ran at the destination (null: not seen). */
  untilRunningMs: number | null;
  /** The sending gateway's CPU seconds for the leg (null: not measured). */
  gatewayCpuSecondsSend: number | null;
  /**
   * The leg's model inputs (its settings, and the pages it carried as its changed share), where known: a
   * `bfmig-plain` back leg with them calibrates the held-page rate through the model itself.
   */
  inputs?: ModelInputs;
}

/**
 * The gateways' rate for held pages at which the model gives a back leg its measured time, by bisection
 * (the model's time falls as the rate rises), within [1 MB/s, 100 GB/s].
 */
function heldRateFor(inputs: ModelInputs, seconds: number, platform: Platform): number {
  const time = (rate: number): number => predictBfmig({ ...inputs, platform: { ...platform, gatewayBytesPerS: rate } }, true).totalSeconds;
  let lo = 1e6;
  let hi = 1e11;
  if (time(hi) >= seconds) return hi;
  if (time(lo) <= seconds) return lo;
  for (let i = 0; i < 40; i++) {
    const mid = Math.sqrt(lo * hi);
    if (time(mid) > seconds) lo = mid;
    else hi = mid;
  }
  return Math.sqrt(lo * hi);
}

/**
 * A plain first leg whose guest ran at the destination at most this many times as long after the
 * migrate command as the relay's was paced by the link, not the gateways: a leg spends a little on what
 * a relay does not do (the handshake, the stores, the commit). In every results file the plain first
 * legs at 100 Mbit/s ran their guests 1.002–1.024 times as late as the relay's, at 1 Gbit/s 1.062–1.647
 * times, but for the oldest file's files guest (0.92: faster than the relay's, the link's pace too);
 * docs/model.md, "Who paced a plain first leg".
 *
 * Not QEMU's total time: at 100 Mbit/s with 4 multifd channels the plain first legs took 1.10–1.11
 * times the relay's by it, their senders busy 6–7% of the leg, because the relays' connections buffer
 * more of the stream than the gateways' bounded queues and QEMU counts a leg done once its last byte is
 * buffered; read as the gateways' pace, that put the files guest's first leg at 2.7 times its time.
 */
const LINK_PACED = 1.04;

/**
 * `base` with the host's rates read from baseline legs measured beside the legs to be predicted, in the
 * same run, the way BENCH_PLATFORM_QEMU10's were read from a calibration run: a shared host's load moves
 * every rate, and legs of a second or less measure it more than the gateways. The relay legs give the
 * link's ceiling, the `bfmig-plain` back legs the gateways' rate for held pages (through the model, where
 * their inputs are given), its first legs their rate for carried ones and, with the sender's CPU
 * seconds, the share of a core the sender's own work took at that rate (zstd, at a core's rate, runs in
 * the rest); where the link, not the gateways, paced those (LINK_PACED), a gateway with a core to
 * spare: the larger of `base`'s rates and BENCH_PLATFORM's. Throws when a kind of baseline leg is missing.
 */
export function calibrateFromBaseline(legs: readonly BaselineLeg[], rttMs: number, base: Platform): Platform {
  const rttS = rttMs / 1000;
  /** The gateways' rate on `bfmig-plain` first or back legs: stream / (total time − the Hello/Offer round trip). */
  const gatewayRate = (first: boolean): number => {
    const at = legs.filter((l) => l.path === 'bfmig-plain' && (l.leg === 1) === first && l.totalTimeMs / 1000 > rttS);
    if (at.length === 0) throw new Error(`no bfmig-plain ${first ? 'first' : 'back'} legs to calibrate from`);
    return median(at.map((l) => l.streamBytes / (l.totalTimeMs / 1000 - rttS)));
  };
  // Every relay leg carries the whole stream: (stream − what QEMU's buffers hold at the end) / total time.
  const relay = legs.filter((l) => l.path === 'relay' && l.totalTimeMs > 0);
  if (relay.length === 0) throw new Error('no relay legs to calibrate from');
  const linkCeilingBytesPerS = median(relay.map((l) => (l.streamBytes - base.directBufferBytes) / (l.totalTimeMs / 1000)));
  // The plain first legs' rate for carried pages, and the share of a core the sender used at that rate:
  // it waited the rest, and zstd (a whole core's rate) runs in that wait.
  const carriedRate = gatewayRate(true);
  const cpu = legs.filter((l) => l.path === 'bfmig-plain' && l.leg === 1 && l.gatewayCpuSecondsSend !== null && l.streamBytes > 0);
  const senderShare = cpu.length === 0 ? 1 : Math.min(1, carriedRate * median(cpu.map((l) => (l.gatewayCpuSecondsSend as number) / l.streamBytes)));
  // A plain first leg within LINK_PACED of the relay's, by when the guest ran at the destination, was
  // paced by the link: it says nothing of the gateways' rate for carried pages but that it is at least
  // the link's, nor of the CPU they had to spare for zstd. A gateway with a core to spare has the
  // machine's own rates then (BENCH_PLATFORM's, where base's are lower: the share of a core a plain
  // gateway used while it waited for the link is not what it takes when it compresses).
  let platform: Platform = { ...base, linkCeilingBytesPerS };
  if (firstUntilRunning(legs, 'bfmig-plain') <= LINK_PACED * firstUntilRunning(legs, 'relay')) {
    platform = {
      ...platform,
      gatewayLiteralBytesPerS: Math.max(base.gatewayLiteralBytesPerS, BENCH_PLATFORM.gatewayLiteralBytesPerS),
      compressorBytesPerS: Math.max(base.compressorBytesPerS, BENCH_PLATFORM.compressorBytesPerS),
      senderCoreShare: BENCH_PLATFORM.senderCoreShare,
    };
  } else {
    platform = { ...platform, gatewayLiteralBytesPerS: carriedRate, compressorBytesPerS: BENCH_PLATFORM.compressorBytesPerS, senderCoreShare: senderShare };
  }
  // Held pages: where the back legs' inputs are known, the rate at which the model gives each its
  // measured time (the pages a plain back leg carried cross the link meanwhile, and QEMU stops at its
  // threshold: stream / time would charge both to the held pages); else stream / (time − round trip).
  const back = legs.filter((l) => l.path === 'bfmig-plain' && l.leg > 1 && l.totalTimeMs > 0);
  const gatewayBytesPerS = back.length > 0 && back.every((l) => l.inputs !== undefined)
    ? median(back.map((l) => heldRateFor(l.inputs as ModelInputs, l.totalTimeMs / 1000, platform)))
    : gatewayRate(false);
  return { ...platform, gatewayBytesPerS };
}

/** The median time until the guest ran at the destination of `path`'s first legs (those where it was seen). */
function firstUntilRunning(legs: readonly BaselineLeg[], path: string): number {
  const seen = legs.filter((l) => l.path === path && l.leg === 1 && l.untilRunningMs !== null).map((l) => l.untilRunningMs as number);
  if (seen.length === 0) throw new Error(`no ${path} first legs whose guest was seen running to calibrate from`);
  return median(seen);
}
