import type { Platform } from './precopy';

/**
 * Constants of the machine the benchmarks ran on (2 shared cores, QEMU 7.2 under TCG, the user-space
 * WAN emulator on loopback), each calibrated from one named measurement of docs/benchmarks/backforth.json
 * (run r100-d20-m256, legs 1 and 2), not fitted per row; docs/model.md says how.
 */
export const BENCH_PLATFORM: Platform = {
  // Direct leg 1: WAN bytes − QEMU's ram.transferred = 114 kB (device state, header, block list, vmdesc).
  deviceStateBytes: 114_000,
  // Direct leg 1: 192.14 MB at 12.5 MB/s is 15.37 s of link time; QEMU's total-time was 15.04 s with a
  // 0.39 s downtime: the source finished ≈ 4 MB ahead of the link (QEMU's send buffer, ≤ 4 MiB here,
  // and the emulator's queue, BDP + 512 KiB).
  directBufferBytes: 4_200_000,
  // bfmig leg 1: 191.97 MB over the WAN, total 14.55 s: ≈ 10 MB ahead of the link (two more sockets).
  bfmigBufferBytes: 10_000_000,
  // bfmig leg 2 (idle guest, everything held): 192 MB of stream in 0.33 s including a 0.09 s downtime
  // → the source QEMU and the gateway pair together pass ≈ 0.8 GB/s of held pages on this host.
  sourceBytesPerS: Infinity,
  gatewayBytesPerS: 800e6,
  stopSeconds: 0.05,
  setupSeconds: 0.01,
  // Hello/Offer/End/Done JSON frames, both ways.
  bfmigControlBytes: 600,
};
