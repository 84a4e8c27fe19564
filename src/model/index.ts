export * from './precopy';
export { BENCH_PLATFORM, BENCH_PLATFORM_QEMU10, DEFAULT_PLATFORM } from './calibration';
