import type { Platform } from './precopy';

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
};

/**
 * What `bfmig predict` assumes unless told otherwise: this project's gateway and QEMU figures, on a
 * real WAN (no emulator ceiling). `--gateway-gbps` and `--platform bench` change it.
 */
export const DEFAULT_PLATFORM: Platform = { ...BENCH_PLATFORM, linkCeilingBytesPerS: Infinity };
