/**
 * The performance model's arithmetic on cases small enough to compute by hand (docs/model.md),
 * `bfmig predict`'s flags and output, and the model against the measured legs its constants were not
 * read from.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { BenchResults } from '../src/lab/demo/backforth';
import { checkResults } from '../src/lab/harness/model-check';
import { PACKAGE_ROOT } from '../src/digest/package-root';
import { PREDICT } from '../src/cli/commands';
import { parseCommand } from '../src/cli/parse';
import { predictInputs, runPredict } from '../src/cli/predict';
import { BENCH_PLATFORM, BENCH_PLATFORM_QEMU10, type BaselineLeg, calibrateFromBaseline } from '../src/model/calibration';
import { SPARSE_SHARE } from '../src/wire/compression-policy';
import { type ModelInputs, MULTIFD_HEADER_STREAM_BYTES, MULTIFD_HEADER_WAN_BYTES, MULTIFD_HELD_PAGE_WAN_BYTES, type Platform, predict, predictBfmig, predictDirect, SPARSE_SHARE as MODEL_SPARSE_SHARE } from '../src/model/precopy';

/** No overheads at all: every figure below follows from pages, record sizes and the link rate. */
const BARE: Platform = {
  deviceStateBytes: 0,
  directBufferBytes: 0,
  bfmigBufferBytes: 0,
  sourceBytesPerS: Infinity,
  gatewayBytesPerS: Infinity,
  gatewayLiteralBytesPerS: Infinity,
  gatewaySecondsPerRun: 0,
  linkCeilingBytesPerS: Infinity,
  stopSeconds: 0,
  setupSeconds: 0,
  bfmigControlBytes: 0,
  compressorBytesPerS: Infinity,
  senderCoreShare: 1,
};

/** 1000 pages over a link of 8.208 Mbit/s = 1,026,000 B/s = 250 normal records (4104 B) a second. */
/**
 * The model check (bench/compression-model-check.js, calibrated per file on its baselines) of the files
 * of docs/benchmarks named: each setting's median WAN-bytes and time errors, in percent.
 */
function modelCheckMedians(...args: string[]): { setting: string; wanError: number; timeError: number }[] {
  const paths = args.map((f) => (f.startsWith('--') ? f : path.join(PACKAGE_ROOT, 'docs', 'benchmarks', f)));
  const out = execFileSync(process.execPath, [path.join(PACKAGE_ROOT, 'dist', 'bench', 'compression-model-check.js'), ...paths, '--platform', 'same-run'], { encoding: 'utf8' });
  const lines = out.slice(out.indexOf('medians over the runs')).split('\n').filter((l) => / runs +WAN /.test(l));
  return lines.map((line) => {
    const setting = line.slice(0, line.indexOf(' runs ')).replace(/ \d+$/, '').trim();
    const wanError = Number(/WAN +[\d.]+ MB \( *([-+\d.]+)%/.exec(line)?.[1]);
    const timeError = Number(/time +[\d.]+ s model +[\d.]+ \( *([-+\d.]+)%/.exec(line)?.[1]);
    if (!Number.isFinite(wanError) || !Number.isFinite(timeError)) throw new Error(`unparsed model check line: ${line}`);
    return { setting, wanError, timeError };
  });
}

/**
 * Every setting's WAN bytes and time within 25% of the model's, but the time of the setting named
 * `timeMissed` (when given, it must be among them).
 */
function expectWithin25(medians: { setting: string; wanError: number; timeError: number }[], timeMissed?: string): void {
  if (timeMissed !== undefined) expect(medians.map((m) => m.setting)).toContain(timeMissed);
  for (const { setting, wanError, timeError } of medians) {
    expect(Math.abs(wanError)).toBeLessThanOrEqual(25);
    if (setting !== timeMissed) expect(Math.abs(timeError)).toBeLessThanOrEqual(25);
  }
}

/** The settings of a 1 Gbit/s leg-cost file of both guests, first and back legs through bfmig, as the model check names them. */
const bothGuestsAt1000 = (file: string): string[] =>
  ['files', 'random'].flatMap((content) => [1, 2].map((leg) => `${file} ${content} 1000 Mbit/s, leg ${leg} bfmig`));

const BASE: ModelInputs = {
  ramBytes: 1000 * 4096,
  usedShare: 1,
  rateMbit: 8.208,
  rttMs: 0,
  changedShare: 0.1,
  dirtyMbit: 0,
  hotShare: 1,
  downtimeLimitMs: 300,
  maxBandwidthBytesPerS: Infinity,
  senderHasDigests: true,
  platform: BARE,
};

describe('direct pre-copy', () => {
  test('an idle guest: every page once, at the link rate; the last threshold-worth goes in the downtime', () => {
    const r = predictDirect(BASE);
    // 1000 × (8 + 4096) bytes, plus the 5 bytes of the (empty) device-state frame the model counts.
    expect(r.wanBytes).toBeCloseTo(4_104_005, 0);
    // 4,104,000 B / 1,026,000 B/s.
    expect(r.totalSeconds).toBeCloseTo(4.0, 2);
    // QEMU stops once pending × 4096 < 1,026,000 B/s × 0.3 s, i.e. 75 pages left: 75 × 4104 / 1,026,000 = 0.3 s.
    expect(r.downtimeMs).toBeGreaterThan(295);
    expect(r.downtimeMs).toBeLessThan(305);
    expect(r.pagesSent).toBe(1000);
    expect(r.converged).toBe(true);
  });

  test('zero pages cost QEMU 9 bytes each', () => {
    const r = predictDirect({ ...BASE, usedShare: 0.5 });
    // 500 × 4104 + 500 × 9 (+ 5).
    expect(r.wanBytes).toBeCloseTo(2_056_505, 0);
    expect(r.totalSeconds).toBeCloseTo(2_056_500 / 1_026_000, 2);
  });

  test('bytes the path buffers are bytes the source need not wait for', () => {
    const r = predictDirect({ ...BASE, platform: { ...BARE, directBufferBytes: 1_026_000 } });
    // (4,104,000 − 1,026,000) / 1,026,000.
    expect(r.totalSeconds).toBeCloseTo(3.0, 2);
  });

  test("QEMU's max-bandwidth caps the stream below the link", () => {
    const r = predictDirect({ ...BASE, maxBandwidthBytesPerS: 513_000 });
    expect(r.totalSeconds).toBeCloseTo(8.0, 1);
  });

  test('a guest dirtying faster than the link never converges; a slow one costs extra rounds', () => {
    // 10 Mbit/s of page writes over the whole RAM against an 8.2 Mbit/s link.
    expect(predictDirect({ ...BASE, dirtyMbit: 10 }).converged).toBe(false);
    const slow = predictDirect({ ...BASE, dirtyMbit: 0.5, hotShare: 0.2 });
    expect(slow.converged).toBe(true);
    // 0.5 Mbit/s = 15.3 page writes/s over a 200-page hot set for ~4 s: ≈ 200 × (1 − e^(−61/200)) = 53 pages
    // dirtied before the first sync, fewer than the 75-page threshold: they go in the downtime.
    expect(slow.pagesSent).toBeGreaterThan(1040);
    expect(slow.pagesSent).toBeLessThan(1060);
  });
});

describe('through bfmig', () => {
  test('back to a site with 10% of the pages changed', () => {
    const r = predictBfmig(BASE, true);
    // 100 changed pages, each 4104 + a 5-byte Literal header + 0.9 × a 38-byte Run it breaks off;
    // 900 held pages, each 1/8 byte of bitmap + 1/256 of a 38-byte Run; + 5 (device-state frame).
    const expected = 100 * (4104 + 5 + 0.9 * 38) + 900 * (1 / 8 + 38 / 256) + 5;
    expect(r.wanBytes).toBeCloseTo(expected, 0);
    expect(r.pagesSent).toBe(100);
    // The WAN is the only limit: 414,571 B / 1,026,000 B/s.
    expect(r.totalSeconds).toBeCloseTo(expected / 1_026_000, 2);
  });

  /** The 900 held pages and the device-state frame of BASE's warm leg. */
  const HELD_AND_FRAME = 900 * (1 / 8 + 38 / 256) + 5;

  test('compressed: changed pages cost the ratio of their record, plus the frame and Run as before', () => {
    const r = predictBfmig({ ...BASE, compressionRatio: 0.5 }, true);
    const expected = 100 * (0.5 * 4104 + 5 + 0.9 * 38) + HELD_AND_FRAME;
    expect(r.wanBytes).toBeCloseTo(expected, 0);
    expect(r.totalSeconds).toBeCloseTo(expected / 1_026_000, 2);
    // A first leg shrinks the same way: 1000 × (0.5 × 4104 + 5) + 5.
    expect(predictBfmig({ ...BASE, compressionRatio: 0.5 }, false).wanBytes).toBeCloseTo(1000 * 2057 + 5, 0);
  });

  test('not compressed where the compressor is slower than the link: the policy backs off', () => {
    // zstd at 102,600 B/s takes 0.04 s a page, the link 0.004 s: sending raw lets more through.
    const slowZstd = predictBfmig({ ...BASE, compressionRatio: 0.5, platform: { ...BARE, compressorBytesPerS: 102_600 } }, true);
    expect(slowZstd.wanBytes).toBeCloseTo(predictBfmig(BASE, true).wanBytes, 0);
  });

  test('compressed whatever the compressor costs while the carried pages are sparse (at most 1/SPARSE_SHARE of the stream), as the policy does', () => {
    // 2% changed: 20 carried pages among 980 held ones. zstd 40 times slower than the link, as above.
    const sparse = { ...BASE, changedShare: 0.02, compressionRatio: 0.5, platform: { ...BARE, compressorBytesPerS: 102_600 } };
    const held = 980 * (1 / 8 + 38 / 256) + 5;
    expect(predictBfmig(sparse, true).wanBytes).toBeCloseTo(20 * (0.5 * 4104 + 5 + 0.98 * 38) + held, 0);
    expect(MODEL_SPARSE_SHARE).toBe(SPARSE_SHARE);
  });

  test('the device state crosses at the compression ratio', () => {
    const device = { ...BARE, deviceStateBytes: 10_000 };
    const without = predictBfmig({ ...BASE, compressionRatio: 0.5 }, true).wanBytes;
    expect(predictBfmig({ ...BASE, compressionRatio: 0.5, platform: device }, true).wanBytes - without).toBeCloseTo(5_000, 0);
    expect(predictBfmig({ ...BASE, platform: device }, true).wanBytes - predictBfmig(BASE, true).wanBytes).toBeCloseTo(10_000, 0);
  });

  test('deltas: a page costs its record header and the Delta, in two frames, instead of its record', () => {
    const r = predictBfmig({ ...BASE, delta: { bytes: 300, share: 0.75 } }, true);
    const delta = 5 + 8 + 5 + 300;
    const expected = 100 * (0.75 * delta + 0.25 * (4104 + 5) + 0.9 * 38) + HELD_AND_FRAME;
    expect(r.wanBytes).toBeCloseTo(expected, 0);
    // Deltas and compression together: only the whole pages shrink.
    const both = predictBfmig({ ...BASE, delta: { bytes: 300, share: 0.75 }, compressionRatio: 0.5 }, true);
    expect(both.wanBytes).toBeCloseTo(100 * (0.75 * delta + 0.25 * (0.5 * 4104 + 5) + 0.9 * 38) + HELD_AND_FRAME, 0);
    // A first leg sends whole what has no first-leg share; its deltas (content it sent already elsewhere,
    // pages re-sent after a change) break no Runs.
    expect(predictBfmig({ ...BASE, delta: { bytes: 300, share: 0.5 } }, false).wanBytes).toBeCloseTo(1000 * 4109 + 5, 0);
    expect(predictBfmig({ ...BASE, delta: { bytes: 300, share: 1, firstLegShare: 0.5 } }, false).wanBytes).toBeCloseTo(1000 * (0.5 * delta + 0.5 * 4109) + 5, 0);
  });

  test('nothing retained: every page as a Literal, a round trip for Hello/Offer first', () => {
    const r = predictBfmig({ ...BASE, rttMs: 100 }, false);
    expect(r.wanBytes).toBeCloseTo(1000 * 4109 + 5, 0);
    expect(r.totalSeconds).toBeCloseTo(0.1 + 4_109_000 / 1_026_000, 2);
  });

  test('a sender without the digests fetches the table: 16 bytes a page and another round trip', () => {
    const has = predictBfmig({ ...BASE, rttMs: 100 }, true);
    const lacks = predictBfmig({ ...BASE, rttMs: 100, senderHasDigests: false }, true);
    expect(lacks.wanBytes - has.wanBytes).toBeCloseTo(16_000, 0);
    expect(lacks.totalSeconds - has.totalSeconds).toBeCloseTo(0.1 + 16_000 / 1_026_000, 2);
  });

  test('the gateway ceiling bounds an all-held leg', () => {
    const r = predictBfmig({ ...BASE, changedShare: 0, platform: { ...BARE, gatewayBytesPerS: 410_400 } }, true);
    // 4,104,000 stream bytes at 410,400 B/s.
    expect(r.totalSeconds).toBeCloseTo(10, 1);
  });

  test('a sender that waits for a slower stage compresses in that wait: smaller, no slower; one that does not backs off', () => {
    // A first leg at 8.208 Mbit/s (1,026,000 B/s: 4 ms a page of link). The gateways carry 1,026,000 B/s
    // (4 ms a page), the sender busy 25% of it (1 ms); zstd takes 2 ms a page on a core: it fits the 3 ms wait.
    const waiting = { ...BARE, gatewayLiteralBytesPerS: 1_026_000, compressorBytesPerS: 2_052_000, senderCoreShare: 0.25 };
    const raw = predictBfmig({ ...BASE, platform: waiting }, false);
    const zipped = predictBfmig({ ...BASE, compressionRatio: 0.5, platform: waiting }, false);
    expect(zipped.wanBytes).toBeCloseTo(1000 * (0.5 * 4104 + 5) + 5, 0);
    expect(zipped.totalSeconds).toBeCloseTo(raw.totalSeconds, 2);
    expect(raw.totalSeconds).toBeCloseTo(4, 1);
    // Busy 75% of it: zstd's 2 ms fit the 1 ms wait only in part, a page takes 5 ms compressed: raw, 4 s.
    const busy = predictBfmig({ ...BASE, compressionRatio: 0.5, platform: { ...waiting, senderCoreShare: 0.75 } }, false);
    expect(busy.wanBytes).toBeCloseTo(1000 * 4109 + 5, 0);
    expect(busy.totalSeconds).toBeCloseTo(4, 1);
  });

  test('carried pages cost the gateways more than held ones; compressing them costs the compressor on top', () => {
    // A first leg, the link out of the way: 1000 pages at 410,400 B/s of carried stream = 10 s.
    const fastLink = { ...BASE, rateMbit: 1e6 };
    const carried = { ...BARE, gatewayBytesPerS: 820_800, gatewayLiteralBytesPerS: 410_400 };
    expect(predictBfmig({ ...fastLink, platform: carried }, false).totalSeconds).toBeCloseTo(10, 1);
    // Held pages still go at the ceiling: an idle warm leg, 1000 pages at 820,800 B/s = 5 s.
    expect(predictBfmig({ ...fastLink, changedShare: 0, platform: carried }, true).totalSeconds).toBeCloseTo(5, 1);
    // At 8.208 Mbit/s (1,026,000 B/s) a carried page takes the link 4 ms; with zstd at 1,026,000 B/s on
    // top of 2,052,000 B/s of carrying it takes the gateway 6 ms: raw wins, the bytes are not compressed.
    const busy = { ...BARE, gatewayLiteralBytesPerS: 2_052_000, compressorBytesPerS: 1_026_000 };
    const r = predictBfmig({ ...BASE, compressionRatio: 0.5, platform: busy }, false);
    expect(r.wanBytes).toBeCloseTo(1000 * 4109 + 5, 0);
    // With zstd 4× as fast (1 ms a page) it compresses: 3 ms of the gateway a page, 2 ms of the link, 3 s.
    const zipped = predictBfmig({ ...BASE, compressionRatio: 0.5, platform: { ...busy, compressorBytesPerS: 4_104_000 } }, false);
    expect(zipped.wanBytes).toBeCloseTo(1000 * (0.5 * 4104 + 5) + 5, 0);
    expect(zipped.totalSeconds).toBeCloseTo(3, 1);
  });

  test('break-even: bytes only when nearly every page changed; time where the link outruns the gateway', () => {
    const p = predict(BASE);
    // N·[c·(4109 + 38(1 − c)) + (1 − c)(1/8 + 38/256)] = N·4104 → c = 0.99882.
    expect(p.breakEven.changedShareForBytes).toBeCloseTo(0.99882, 4);
    const slowGateway = predict({ ...BASE, changedShare: 0, platform: { ...BARE, gatewayBytesPerS: 1_026_000 } });
    // Held pages cost the gateway 4104 B of stream each at 1,026,000 B/s, the direct path 4104 B of link:
    // bfmig is slower as soon as the link is faster than 8.208 Mbit/s.
    expect(slowGateway.breakEven.rateMbitForTime).toBeGreaterThan(8.1);
    expect(slowGateway.breakEven.rateMbitForTime).toBeLessThan(8.4);
  });

  test('inputs it has no answer for are refused', () => {
    expect(() => predictDirect({ ...BASE, rateMbit: 0 })).toThrow(/rateMbit/);
    expect(() => predictDirect({ ...BASE, usedShare: Number.NaN })).toThrow(/usedShare/);
    expect(() => predictBfmig({ ...BASE, compressionRatio: 1.5 }, true)).toThrow(/compressionRatio/);
    expect(() => predictBfmig({ ...BASE, delta: { bytes: 5000, share: 1 } }, true)).toThrow(/delta.bytes/);
  });
});

describe('calibration from baseline legs of the same run', () => {
  // The guest runs at the destination as QEMU's total time ends, unless a test says otherwise.
  const leg = (path: string, n: number, streamBytes: number, totalTimeMs: number, cpu: number | null = null, untilRunningMs: number | null = totalTimeMs): BaselineLeg => ({
    path,
    leg: n,
    streamBytes,
    totalTimeMs,
    untilRunningMs,
    gatewayCpuSecondsSend: cpu,
  });
  const legs = [
    // Relay legs: (stream − the 4.2 MB direct buffer) / total time: 100, 120 and 110 MB/s.
    leg('relay', 1, 204.2e6, 2000),
    leg('relay', 2, 244.2e6, 2000),
    leg('relay', 1, 224.2e6, 2000),
    // bfmig-plain first legs, half as long again as the relay's (the gateways set their pace): stream /
    // (total time − 40 ms) = 66.7 and 133.3 MB/s; the sender at 0.5 and 0.3 CPU s per 100 MB.
    leg('bfmig-plain', 1, 200e6, 3040, 1),
    leg('bfmig-plain', 1, 400e6, 3040, 1.2),
    // bfmig-plain back legs: 500 MB/s.
    leg('bfmig-plain', 2, 200e6, 440),
    // Not baseline: never read.
    leg('bfmig', 2, 1, 1),
  ];

  test('the link from the relay legs, the gateways from the bfmig-plain legs, the sender\'s core share from its CPU seconds', () => {
    const p = calibrateFromBaseline(legs, 40, BENCH_PLATFORM_QEMU10);
    expect(p.linkCeilingBytesPerS).toBeCloseTo(110e6, -3);
    expect(p.gatewayBytesPerS).toBeCloseTo(500e6, -3);
    expect(p.gatewayLiteralBytesPerS).toBeCloseTo(100e6, -3);
    // 100 MB/s at the median 0.4 CPU s per 100 MB is 40% of a core; zstd has a core's rate in the rest.
    expect(p.senderCoreShare).toBeCloseTo(0.4, 6);
    expect(p.compressorBytesPerS).toBe(BENCH_PLATFORM.compressorBytesPerS);
    expect(p.deviceStateBytes).toBe(BENCH_PLATFORM_QEMU10.deviceStateBytes);
  });

  test('plain first legs as fast as the relay\'s were paced by the link: the carried-page and zstd rates are a gateway\'s with a core to spare', () => {
    // Relay first leg 2.0 s; plain first legs 2.04 s (within 5%): the link, not the gateways, set their pace.
    const linkPaced = [...legs.filter((l) => !(l.path === 'bfmig-plain' && l.leg === 1)), leg('bfmig-plain', 1, 200e6, 2040, 1)];
    const p = calibrateFromBaseline(linkPaced, 40, BENCH_PLATFORM_QEMU10);
    // Not the loaded base's rates, nor a share of a core the plain sender used while it waited for the link.
    expect(BENCH_PLATFORM.gatewayLiteralBytesPerS).toBeGreaterThan(BENCH_PLATFORM_QEMU10.gatewayLiteralBytesPerS);
    expect(p.gatewayLiteralBytesPerS).toBe(BENCH_PLATFORM.gatewayLiteralBytesPerS);
    expect(p.compressorBytesPerS).toBe(BENCH_PLATFORM.compressorBytesPerS);
    expect(p.senderCoreShare).toBe(BENCH_PLATFORM.senderCoreShare);
    expect(p.linkCeilingBytesPerS).toBeCloseTo(110e6, -3);
    expect(p.gatewayBytesPerS).toBeCloseTo(500e6, -3);
  });

  test('plain first legs whose guests ran up to 4% later than the relay\'s were paced by the link too (a handshake, the stores, a commit), later ones by the gateways', () => {
    const withPlainFirst = (ms: number): BaselineLeg[] => [...legs.filter((l) => !(l.path === 'bfmig-plain' && l.leg === 1)), leg('bfmig-plain', 1, 200e6, ms, 1)];
    // Relay first legs 2.0 s: 2.07 s is the link's pace, 2.12 s the gateways' (200 MB in 2.08 s), and so
    // is 2.18 s (1.09×: the files guest's plain first legs at 1 Gbit/s, docs/model.md).
    expect(calibrateFromBaseline(withPlainFirst(2070), 40, BENCH_PLATFORM_QEMU10).gatewayLiteralBytesPerS).toBe(BENCH_PLATFORM.gatewayLiteralBytesPerS);
    expect(calibrateFromBaseline(withPlainFirst(2120), 40, BENCH_PLATFORM_QEMU10).gatewayLiteralBytesPerS).toBeCloseTo(200e6 / 2.08, -3);
    expect(calibrateFromBaseline(withPlainFirst(2180), 40, BENCH_PLATFORM_QEMU10).gatewayLiteralBytesPerS).toBeCloseTo(200e6 / 2.14, -3);
  });

  test('who paced a plain first leg is read from when its guest ran, not from QEMU\'s total time', () => {
    const withPlainFirst = (totalMs: number, untilRunningMs: number, cpu: number): BaselineLeg[] => [
      ...legs.filter((l) => !(l.path === 'bfmig-plain' && l.leg === 1)),
      leg('bfmig-plain', 1, 200e6, totalMs, cpu, untilRunningMs),
      leg('bfmig-plain', 1, 400e6, totalMs, cpu, untilRunningMs),
    ];
    // Half as long again as the relay's by QEMU's total time, but the guest ran 1% later than the relay's
    // (at 100 Mbit/s with multifd the plain legs took 1.10× by total time and 1.01–1.02× until running:
    // the relays buffer more of the stream, and QEMU counts a leg done once its last byte is buffered).
    const linkPaced = calibrateFromBaseline(withPlainFirst(3040, 2020, 0.1), 40, BENCH_PLATFORM_QEMU10);
    expect(linkPaced.gatewayLiteralBytesPerS).toBe(BENCH_PLATFORM.gatewayLiteralBytesPerS);
    expect(linkPaced.senderCoreShare).toBe(BENCH_PLATFORM.senderCoreShare);
    // Within 4% by total time, but the guest ran 25% later: the gateways set that pace.
    const gatewayPaced = calibrateFromBaseline(withPlainFirst(2040, 2500, 0.6), 40, BENCH_PLATFORM_QEMU10);
    expect(gatewayPaced.gatewayLiteralBytesPerS).toBeCloseTo(150e6, -3); // 200 and 400 MB in 2.0 s
    // A results file that never saw a guest run cannot say who paced it.
    const unseen = legs.map((l) => ({ ...l, untilRunningMs: l.path === 'relay' ? null : l.untilRunningMs }));
    expect(() => calibrateFromBaseline(unseen, 40, BENCH_PLATFORM_QEMU10)).toThrow(/no relay first legs whose guest was seen running/);
  });

  test('the model check calibrates each setting of a leg-cost file from its own baseline legs and checks only the others', () => {
    const file = path.join(PACKAGE_ROOT, 'docs', 'benchmarks', 'leg-cost-1000-quiet.json');
    const out = execFileSync(process.execPath, [path.join(PACKAGE_ROOT, 'dist', 'bench', 'compression-model-check.js'), file, '--platform', 'same-run'], { encoding: 'utf8' });
    expect(out.match(/calibrated from its relay and bfmig-plain legs/g)).toHaveLength(2); // files and random
    const checked = out.split('\n').filter((l) => /^leg \d /.test(l));
    const results = JSON.parse(fs.readFileSync(file, 'utf8')) as BenchResults;
    expect(checked).toHaveLength(results.runs.flatMap((r) => r.legs).filter((l) => l.path === 'bfmig').length);
    expect(checked.every((l) => /^leg \d bfmig +WAN/.test(l))).toBe(true);
  });

  test('a plain back leg whose inputs are given calibrates the held-page rate through the model', () => {
    // A back leg the model itself gives at 400 MB/s of held pages: 2% of the pages changed, carried across
    // the 12.5 MB/s link meanwhile. stream / (time − round trip) would make the held pages slower.
    const others = calibrateFromBaseline(legs, 40, BENCH_PLATFORM_QEMU10); // the rates the other legs give
    const inputs: ModelInputs = { ...BASE, ramBytes: 2 ** 28, rateMbit: 100, rttMs: 40, changedShare: 0.02, platform: { ...others, gatewayBytesPerS: 400e6 } };
    const measured = predictBfmig(inputs, true);
    const withInputs = legs.map((l) => (l.path === 'bfmig-plain' && l.leg > 1 ? { ...l, streamBytes: measured.streamBytes, totalTimeMs: measured.totalSeconds * 1000, inputs } : l));
    const p = calibrateFromBaseline(withInputs, 40, BENCH_PLATFORM_QEMU10);
    expect(p.gatewayBytesPerS / 400e6).toBeCloseTo(1, 2);
    const plain = calibrateFromBaseline(withInputs.map(({ inputs: _, ...l }) => l), 40, BENCH_PLATFORM_QEMU10);
    expect(plain.gatewayBytesPerS).toBeLessThan(0.9 * 400e6);
  });

  test('the model check gives each back leg the compression ratio of its Literal bytes: every setting\'s WAN bytes within 25%', () => {
    // The quiet runs were measured before the compression policy judged who sets the pace (docs/benchmarks.md,
    // "Sixteenth session"), the sixteenth's and eighteenth's after: all within 25%.
    const medians = modelCheckMedians('leg-cost-1000-quiet.json', 'leg-cost-100-quiet.json', 'leg-cost-1000-sixteenth.json', 'leg-cost-100-sixteenth.json', 'leg-cost-1000-eighteenth.json');
    expect(medians).toHaveLength(18); // 4 files × 2 contents × 2 legs, and one of files only
    for (const { wanError } of medians) expect(Math.abs(wanError)).toBeLessThanOrEqual(25);
  });

  test("the eighteenth session's runs, calibrated over all four: every setting's time within 25% too", () => {
    const medians = modelCheckMedians('leg-cost-1000-eighteenth.json');
    expect(medians).toHaveLength(4); // files and random, first and back legs, four runs each
    for (const { timeError } of medians) expect(Math.abs(timeError)).toBeLessThanOrEqual(25);
  });

  test("the nineteenth session's 4-channel multifd legs (QEMU 10.0, headers through zstd): every setting's WAN bytes and time within 25%", () => {
    // The runs were made with leg-cost.js --multifd 4 before it recorded multifdChannels; the field was added to the file.
    // Their gateways sent packet headers as Literal bytes (before PacketHeader frames): as to a peer of that release.
    const medians = modelCheckMedians('leg-cost-1000-multifd-nineteenth.json', '--literal-headers');
    expect(medians).toHaveLength(4); // files and random, first and back legs, three runs each
    expectWithin25(medians);
  });

  test("the thirtieth session's 4-channel multifd legs (QEMU 10.0, headers as PacketHeader frames): every setting's WAN bytes and time within 25%", () => {
    const medians = modelCheckMedians('leg-cost-1000-multifd-thirtieth.json');
    expect(medians.map((m) => m.setting)).toEqual(bothGuestsAt1000('leg-cost-1000-multifd-thirtieth.json'));
    // The files guest's first leg was 46% over on WAN bytes while the model compressed only where that let
    // more through: its gateways compressed throughout, in the time the sender waited anyway.
    expectWithin25(medians);
  });

  test("the thirty-first session's 4-channel multifd legs, held out of the sender's core share: every setting's WAN bytes and time within 25%", () => {
    const medians = modelCheckMedians('leg-cost-1000-multifd-thirty-first.json');
    expect(medians).toHaveLength(4);
    // Its plain first legs of the files guest took 1.08× the relay's: when that counted as the link's pace,
    // the gateways were given a core each and the model sent raw what they compressed, 32% over on WAN
    // bytes and 36% short on time (docs/model.md, "Where the model misses").
    expectWithin25(medians);
  });

  test("the thirty-third session's 4-channel multifd legs, bfmig-uncompressed beside: WAN bytes within 25%, time too but for one back leg", () => {
    const medians = modelCheckMedians('leg-cost-1000-multifd-thirty-third.json');
    // files and random; bfmig first and back legs, bfmig-uncompressed too; three runs each.
    expect(medians).toHaveLength(8);
    // The pseudo-random guest's back leg through bfmig took 0.54 s in two runs of three where bfmig-plain's
    // took 0.35 and 0.46: issue 16's back-leg gap, which the model has no term for (docs/model.md).
    expectWithin25(medians, 'leg-cost-1000-multifd-thirty-third.json random 1000 Mbit/s, leg 2 bfmig');
  });

  test("the thirty-third session's 4-channel multifd legs at 100 Mbit/s: every setting's WAN bytes and time within 25%", () => {
    // Their plain first legs took 1.10 and 1.11 times the relay's with the sender busy 6–7% of them: paced by the link.
    const medians = modelCheckMedians('leg-cost-100-multifd-thirty-third.json');
    expect(medians).toHaveLength(4); // files and random, first and back legs, two runs each
    expectWithin25(medians);
  });

  test("the thirty-fifth session's legs at 1 Gbit/s, one channel: every setting's WAN bytes and time within 25%", () => {
    const medians = modelCheckMedians('leg-cost-1000-thirty-fifth.json');
    expect(medians).toHaveLength(4); // files and random, first and back legs, three runs each
    expectWithin25(medians);
  });

  test("the thirty-fifth session's 4-channel multifd legs: WAN bytes within 25%, time too but for the files guest's first leg", () => {
    const medians = modelCheckMedians('leg-cost-1000-multifd-thirty-fifth.json');
    expect(medians).toHaveLength(4);
    // The files guest's first leg took 1.85 s (its plain leg 1.96 s, the relay's 1.70 s) where the model gives
    // 1.31 s: its sending gateway took 6.3 CPU s/GiB against bfmig-plain's 3.0 (docs/benchmarks.md,
    // "Thirty-fifth session").
    expectWithin25(medians, 'leg-cost-1000-multifd-thirty-fifth.json files 1000 Mbit/s, leg 1 bfmig');
  });

  test("the thirty-ninth session's 4-channel multifd legs, the files first leg's receiver reading its bases alone: every setting's WAN bytes and time within 25%", () => {
    // The thirty-fifth session's settings again: there the files first leg took 1.85 s (model 1.31 s), its
    // receiving gateway reading 67 MB from its store, 4 MiB of stream read-ahead behind lone bases of Deltas.
    // Since the read-ahead follows its reader (docs/benchmarks.md, "Thirty-sixth session") that receiver reads
    // 26 MB and the leg takes 1.39 s (the thirty-first and thirty-third sessions' 1.48 s): the model, which has
    // no term for those reads, is within 25% again.
    const medians = modelCheckMedians('leg-cost-1000-multifd-thirty-ninth.json');
    expect(medians.map((m) => m.setting)).toEqual(bothGuestsAt1000('leg-cost-1000-multifd-thirty-ninth.json'));
    expectWithin25(medians);
  });

  test('with multifd every page brings its packet-header share: a back leg carries more, its stream too', () => {
    const inputs: ModelInputs = { ...BASE, ramBytes: 2 ** 28, rateMbit: 1000, rttMs: 40, changedShare: 0.01, compressionRatio: 0.5, platform: BENCH_PLATFORM_QEMU10 };
    const single = predictBfmig(inputs, true);
    const channels = predictBfmig({ ...inputs, multifdChannels: 4 }, true);
    const pages = 2 ** 28 / 4096;
    expect(channels.streamBytes - single.streamBytes).toBeGreaterThan(0.9 * pages * MULTIFD_HEADER_STREAM_BYTES);
    expect(channels.wanBytes - single.wanBytes).toBeGreaterThan(0.5 * pages * MULTIFD_HEADER_WAN_BYTES);
    expect(channels.wanBytes - single.wanBytes).toBeLessThan(pages * (MULTIFD_HEADER_WAN_BYTES + MULTIFD_HELD_PAGE_WAN_BYTES));
  });

  test('a missing kind of baseline leg is an error, not a guess', () => {
    expect(() => calibrateFromBaseline(legs.filter((l) => l.path !== 'relay'), 40, BENCH_PLATFORM_QEMU10)).toThrow(/no relay legs/);
    expect(() => calibrateFromBaseline(legs.filter((l) => !(l.path === 'bfmig-plain' && l.leg > 1)), 40, BENCH_PLATFORM_QEMU10)).toThrow(/no bfmig-plain back legs/);
  });
});

describe("QEMU's avail-switchover-bandwidth (8.2+)", () => {
  // A 256 MiB guest at 1 Gbit/s with a 500 ms limit, on the QEMU 10.0 bench platform.
  const inputs: ModelInputs = { ...BASE, ramBytes: 2 ** 28, rateMbit: 1000, rttMs: 40, changedShare: 0.01, downtimeLimitMs: 500, platform: BENCH_PLATFORM_QEMU10 };
  const link = BENCH_PLATFORM_QEMU10.linkCeilingBytesPerS;

  test("a back leg through bfmig, QEMU told the link's rate: it stops later, with less left, than when it weighs the gateways' faster pace", () => {
    const measured = predictBfmig(inputs, true);
    const told = predictBfmig({ ...inputs, availSwitchoverBytesPerS: link }, true);
    // Held pages go through the pair faster than the link (the platform's 180 MB/s against 96): weighed at
    // that pace, a 500 ms limit leaves more of the guest for the stop.
    expect(BENCH_PLATFORM_QEMU10.gatewayBytesPerS).toBeGreaterThan(1.5 * link);
    expect(measured.downtimeMs).toBeGreaterThan(400);
    expect(told.downtimeMs).toBeLessThan(0.7 * measured.downtimeMs);
    // The same bytes cross either way: only when the guest stops moves.
    expect(told.wanBytes).toBeCloseTo(measured.wanBytes, -3);
  });

  test('direct, the link sets the rate QEMU measures: told that rate it stops alike, told ten times more it leaves more for the stop', () => {
    const measured = predictDirect(inputs);
    expect(Math.abs(predictDirect({ ...inputs, availSwitchoverBytesPerS: link }).downtimeMs / measured.downtimeMs - 1)).toBeLessThan(0.05);
    expect(predictDirect({ ...inputs, availSwitchoverBytesPerS: 10 * link }).downtimeMs).toBeGreaterThan(2 * measured.downtimeMs);
  });

  test('bfmig predict takes it in bytes a second, as QEMU does', () => {
    const args = (line: string): ReturnType<typeof parseCommand<typeof PREDICT.options>>['values'] => parseCommand(PREDICT, line.split(' ')).values;
    expect(predictInputs(args('--ram 8GiB --mbit 1000 --rtt-ms 40')).availSwitchoverBytesPerS).toBeUndefined();
    expect(predictInputs(args('--ram 8GiB --mbit 1000 --rtt-ms 40 --avail-switchover-bandwidth 125000000')).availSwitchoverBytesPerS).toBe(125e6);
    expect(() => predictInputs(args('--ram 8GiB --mbit 1000 --rtt-ms 40 --avail-switchover-bandwidth fast'))).toThrow(/--avail-switchover-bandwidth/);
  });
});

describe('bfmig predict', () => {
  const args = (line: string): ReturnType<typeof parseCommand<typeof PREDICT.options>>['values'] => parseCommand(PREDICT, line.split(' ')).values;

  test('flags in the units users think in', () => {
    const i = predictInputs(args('--ram 8GiB --mbit 100 --rtt-ms 40 --changed 2% --dirty-mbps 5 --used 75%'));
    expect(i.ramBytes).toBe(8 * 2 ** 30);
    expect(i.changedShare).toBeCloseTo(0.02);
    expect(i.usedShare).toBeCloseTo(0.75);
    expect(i.hotShare).toBeCloseTo(0.75);
    expect(i.downtimeLimitMs).toBe(300);
    expect(i.maxBandwidthBytesPerS).toBe(128 * 2 ** 20);
    expect(() => predictInputs(args('--ram 8GiB --mbit 100'))).toThrow(/--rtt-ms is required/);
    expect(() => predictInputs(args('--ram 8GiB --mbit 100 --rtt-ms 40 --changed 120%'))).toThrow(/percentage/);
  });

  test('compression ratio and delta size', () => {
    const plain = predictInputs(args('--ram 8GiB --mbit 100 --rtt-ms 40'));
    expect(plain.compressionRatio).toBeUndefined();
    expect(plain.delta).toBeUndefined();
    const i = predictInputs(args('--ram 8GiB --mbit 100 --rtt-ms 40 --compression 0.45 --delta-bytes 300 --delta-share 80%'));
    expect(i.compressionRatio).toBeCloseTo(0.45);
    expect(i.delta).toEqual({ bytes: 300, share: 0.8, firstLegShare: 0 });
    expect(predictInputs(args('--ram 8GiB --mbit 100 --rtt-ms 40 --delta-bytes 120')).delta).toEqual({ bytes: 120, share: 1, firstLegShare: 0 });
    expect(predictInputs(args('--ram 8GiB --mbit 100 --rtt-ms 40 --delta-bytes 160 --first-leg-deltas 55%')).delta).toEqual({ bytes: 160, share: 1, firstLegShare: 0.55 });
    expect(() => predictInputs(args('--ram 8GiB --mbit 100 --rtt-ms 40 --first-leg-deltas 50%'))).toThrow(/--first-leg-deltas needs --delta-bytes/);
    expect(() => predictInputs(args('--ram 8GiB --mbit 100 --rtt-ms 40 --compression 45'))).toThrow(/--compression/);
    expect(() => predictInputs(args('--ram 8GiB --mbit 100 --rtt-ms 40 --delta-bytes 5000'))).toThrow(/--delta-bytes/);
    expect(() => predictInputs(args('--ram 8GiB --mbit 100 --rtt-ms 40 --delta-share 50%'))).toThrow(/needs --delta-bytes/);
  });

  test('a first leg whose pages go as deltas: fewer WAN bytes by that share, whole pages for the rest', () => {
    const line = '--ram 1GiB --mbit 100 --rtt-ms 40 --compression 0.5 --delta-bytes 160';
    const cold = (extra: string): number => {
      let out = '';
      runPredict(args(`${line} ${extra} --json`.replace(/ +/g, ' ')), (t) => (out += t));
      return (JSON.parse(out) as { bfmigCold: { wanBytes: number } }).bfmigCold.wanBytes;
    };
    const none = cold('');
    const half = cold('--first-leg-deltas 50%');
    // Half the pages at 160 B and some framing instead of half a page's compressed 2 KiB each.
    expect(half).toBeLessThan(0.6 * none);
    expect(half).toBeGreaterThan(0.45 * none);
  });

  test('--platform picks measured constants; --gateway-gbps scales both gateway ceilings alike', () => {
    const line = '--ram 8GiB --mbit 1000 --rtt-ms 40';
    expect(predictInputs(args(`${line} --platform bench-qemu10`)).platform).toBe(BENCH_PLATFORM_QEMU10);
    expect(predictInputs(args(`${line} --platform bench`)).platform).toBe(BENCH_PLATFORM);
    expect(() => predictInputs(args(`${line} --platform qemu11`))).toThrow(/--platform is default, bench or bench-qemu10/);
    const p = predictInputs(args(`${line} --platform bench-qemu10 --gateway-gbps 0.36`)).platform;
    expect(p.gatewayBytesPerS).toBe(360e6);
    expect(p.gatewayLiteralBytesPerS).toBeCloseTo(2 * BENCH_PLATFORM_QEMU10.gatewayLiteralBytesPerS, 0);
  });

  test('--json gives every path and the break-even', () => {
    let out = '';
    runPredict(args('--ram 1GiB --mbit 100 --rtt-ms 40 --changed 1% --json'), (t) => (out += t));
    const json = JSON.parse(out) as Record<string, { wanBytes: number; totalSeconds: number }> & { breakEven: Record<string, number | null> };
    for (const path of ['direct', 'bfmigCold', 'bfmigWarm']) {
      expect(json[path].wanBytes).toBeGreaterThan(0);
      expect(json[path].totalSeconds).toBeGreaterThan(0);
    }
    expect(json.bfmigWarm.wanBytes).toBeLessThan(json.direct.wanBytes / 20);
    expect(Object.keys(json.breakEven).sort()).toEqual(['changedShareForBytes', 'changedShareForTime', 'rateMbitForTime']);
  });
});

describe('the model against measured legs it was not calibrated on', () => {
  // The constants were read from some legs of the third grid run (calibratedOn names them); the 25%
  // claim is checked here on that run's other legs, which no constant came from.
  const results = JSON.parse(fs.readFileSync(path.join(__dirname, '..', 'docs', 'benchmarks', 'backforth.json'), 'utf8')) as BenchResults;
  const checked = checkResults(results);
  const heldOut = checked.filter((c) => !c.calibration);

  test('most legs are held out, both paths, warm and first legs alike', () => {
    expect(checked.length).toBe(64);
    expect(heldOut.length).toBeGreaterThanOrEqual(32);
    expect(heldOut.some((c) => c.path === 'direct')).toBe(true);
    expect(heldOut.some((c) => c.path === 'bfmig' && c.leg > 1)).toBe(true);
    expect(heldOut.some((c) => c.path === 'bfmig' && c.leg === 1)).toBe(true);
  });

  test('every held-out leg is within 25% on WAN bytes and total time', () => {
    const misses = heldOut.filter((c) => Math.abs(c.wanError) > 0.25 || Math.abs(c.timeError) > 0.25).map((c) => `${c.run} leg ${c.leg} ${c.path}`);
    expect(misses).toEqual([]);
  });
});
