export * from './precopy';
export { BENCH_PLATFORM, DEFAULT_PLATFORM } from './calibration';
