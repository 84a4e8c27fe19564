import { parseSize } from '../common/units';
import { errorMessage } from '../common/errors';
import { BENCH_PLATFORM, BENCH_PLATFORM_QEMU10, DEFAULT_PLATFORM, type ModelInputs, PAGE_BYTES, type PathPrediction, type Platform, type Prediction, predict } from '../model';
import { PREDICT } from './commands';
import { type OptionValues, UsageError } from './parse';

type PredictArgs = OptionValues<typeof PREDICT.options>;
type TextOption = { [K in keyof PredictArgs]: PredictArgs[K] extends boolean | undefined ? never : K }[keyof PredictArgs];

/** "2%" or "2" → 0.02. */
function percentOption(args: PredictArgs, name: TextOption, fallback: number): number {
  const text = args[name];
  if (text === undefined) return fallback;
  const value = Number(text.trim().replace(/%$/, ''));
  if (!Number.isFinite(value) || value < 0 || value > 100) throw new UsageError(`--${name} takes a percentage from 0 to 100, not "${text}"`);
  return value / 100;
}

function requireOption(args: PredictArgs, name: TextOption): string {
  const text = args[name];
  if (text === undefined) throw new UsageError(`--${name} is required`);
  return text;
}

function numberOption(args: PredictArgs, name: TextOption, fallback?: number): number {
  const text = fallback === undefined ? requireOption(args, name) : args[name];
  if (text === undefined) return fallback as number;
  const value = Number(text);
  if (!Number.isFinite(value) || value < 0) throw new UsageError(`--${name} takes a non-negative number, not "${text}"`);
  return value;
}

function sizeOption(args: PredictArgs, name: TextOption, fallback?: number): number {
  const text = fallback === undefined ? requireOption(args, name) : args[name];
  if (text === undefined) return fallback as number;
  try {
    return parseSize(text);
  } catch (err) {
    throw new UsageError(`--${name}: ${errorMessage(err)}`);
  }
}

/**
 * `--compression 0.45` (WAN bytes per Literal byte, as `bfmig inspect` reports it) and `--delta-bytes 300
 * [--delta-share 90%] [--first-leg-deltas 50%]` (the share of a warm leg's changed pages, and of a first
 * leg's pages, that go as deltas or references; `bfmig inspect` measures the first leg's on a capture).
 */
function compressionAndDelta(args: PredictArgs): Pick<ModelInputs, 'compressionRatio' | 'delta'> {
  const out: Pick<ModelInputs, 'compressionRatio' | 'delta'> = {};
  if (args.compression !== undefined) {
    const ratio = numberOption(args, 'compression');
    if (ratio <= 0 || ratio > 1) throw new UsageError(`--compression takes WAN bytes per Literal byte, above 0 and at most 1, not "${args.compression}"`);
    out.compressionRatio = ratio;
  }
  if (args['delta-bytes'] !== undefined) {
    const bytes = numberOption(args, 'delta-bytes');
    if (bytes > PAGE_BYTES) throw new UsageError(`--delta-bytes takes the mean bytes of a delta, at most ${PAGE_BYTES}, not "${args['delta-bytes']}"`);
    out.delta = { bytes, share: percentOption(args, 'delta-share', 1), firstLegShare: percentOption(args, 'first-leg-deltas', 0) };
  } else if (args['delta-share'] !== undefined || args['first-leg-deltas'] !== undefined) {
    throw new UsageError(`--${args['delta-share'] !== undefined ? 'delta-share' : 'first-leg-deltas'} needs --delta-bytes`);
  }
  return out;
}

export function predictInputs(args: PredictArgs): ModelInputs {
  const platformName = args.platform ?? 'default';
  const platforms: Record<string, Platform> = { default: DEFAULT_PLATFORM, bench: BENCH_PLATFORM, 'bench-qemu10': BENCH_PLATFORM_QEMU10 };
  let platform = platforms[platformName];
  if (!Object.hasOwn(platforms, platformName)) throw new UsageError(`--platform is default, bench or bench-qemu10, not "${platformName}"`);
  const gatewayGbps = args['gateway-gbps'];
  if (gatewayGbps !== undefined) {
    // The ceiling for held pages; carried pages keep their measured proportion to it.
    const gatewayBytesPerS = numberOption(args, 'gateway-gbps') * 1e9;
    platform = { ...platform, gatewayBytesPerS, gatewayLiteralBytesPerS: (platform.gatewayLiteralBytesPerS * gatewayBytesPerS) / platform.gatewayBytesPerS };
  }
  const usedShare = percentOption(args, 'used', 1);
  const inputs: ModelInputs = {
    ramBytes: sizeOption(args, 'ram'),
    usedShare,
    rateMbit: numberOption(args, 'mbit'),
    rttMs: numberOption(args, 'rtt-ms'),
    changedShare: Math.min(usedShare, percentOption(args, 'changed', 0.01)),
    dirtyMbit: numberOption(args, 'dirty-mbps', 0),
    hotShare: percentOption(args, 'hot', usedShare),
    downtimeLimitMs: numberOption(args, 'downtime-limit-ms', 300),
    maxBandwidthBytesPerS: sizeOption(args, 'max-bandwidth', 128 * 2 ** 20),
    ...(args['avail-switchover-bandwidth'] !== undefined ? { availSwitchoverBytesPerS: sizeOption(args, 'avail-switchover-bandwidth') } : {}),
    senderHasDigests: args['no-digests'] !== true,
    ...compressionAndDelta(args),
    ...(args.multifd !== undefined ? { multifdChannels: numberOption(args, 'multifd') } : {}),
    platform,
  };
  if (inputs.multifdChannels !== undefined && (!Number.isInteger(inputs.multifdChannels) || inputs.multifdChannels < 1)) throw new UsageError(`--multifd takes QEMU's multifd-channels, 1 or more, not "${args.multifd}"`);
  if (inputs.rateMbit <= 0) throw new UsageError('--mbit must be above 0');
  if (inputs.usedShare <= 0 || inputs.hotShare <= 0) throw new UsageError('--used and --hot must be above 0%');
  if (inputs.ramBytes < PAGE_BYTES) throw new UsageError('--ram must be at least one page');
  return inputs;
}

const mb = (bytes: number): string => (bytes >= 1e9 ? `${(bytes / 1e9).toFixed(2)} GB` : bytes >= 1e6 ? `${(bytes / 1e6).toFixed(1)} MB` : `${(bytes / 1e3).toFixed(1)} kB`);
const above = (share: number | null): string => (share === null ? 'at no share of RAM changed' : `above ${(share * 100).toFixed(share < 0.1 ? 2 : 1)}% of RAM changed`);

export function formatPrediction(inputs: ModelInputs, p: Prediction): string {
  const row = (name: string, r: PathPrediction): string =>
    `${name.padEnd(26)} ${mb(r.wanBytes).padStart(10)} ${`${r.totalSeconds.toFixed(2)} s`.padStart(10)} ${`${Math.round(r.downtimeMs)} ms`.padStart(10)} ${String(r.rounds).padStart(7)}` +
    (r.converged ? '' : '  (does not converge: QEMU would iterate until stopped)');
  const saving = (a: number, b: number): string => `${((1 - a / b) * 100).toFixed(1)}%`;
  return [
    `guest ${mb(inputs.ramBytes)} RAM (${(inputs.usedShare * 100).toFixed(0)}% non-zero), ${inputs.rateMbit} Mbit/s, RTT ${inputs.rttMs} ms, ` +
      `${(inputs.changedShare * 100).toFixed(2)}% changed since it left the destination, dirtying ${inputs.dirtyMbit} Mbit/s` +
      (inputs.compressionRatio !== undefined ? `, compressing Literal bytes to ${(inputs.compressionRatio * 100).toFixed(0)}%` : '') +
      (inputs.delta ? `, ${(inputs.delta.share * 100).toFixed(0)}% of changed pages as ${inputs.delta.bytes}-byte deltas` : ''),
    '',
    `${'path'.padEnd(26)} ${'WAN'.padStart(10)} ${'total'.padStart(10)} ${'downtime'.padStart(10)} ${'rounds'.padStart(7)}`,
    row('direct QEMU', p.direct),
    row('bfmig, nothing retained', p.bfmigCold),
    row('bfmig, back to a site', p.bfmigWarm),
    '',
    `bfmig back leg saves ${saving(p.bfmigWarm.wanBytes, p.direct.wanBytes)} of the WAN bytes and ${saving(p.bfmigWarm.totalSeconds, p.direct.totalSeconds)} of the time`,
    ...(inputs.maxBandwidthBytesPerS < Math.min(inputs.platform.gatewayBytesPerS, inputs.platform.sourceBytesPerS)
      ? [`QEMU's max-bandwidth (${mb(inputs.maxBandwidthBytesPerS)}/s) caps the stream into the gateway: raise it (--max-bandwidth 10GiB) to see bfmig unthrottled`]
      : []),
    `break-even: bfmig takes longer than direct ${above(p.breakEven.changedShareForTime)}, sends more bytes ${above(p.breakEven.changedShareForBytes)};`,
    `            at this change it takes longer than direct on links faster than ${p.breakEven.rateMbitForTime === null ? 'any up to 100 Gbit/s (never)' : `${p.breakEven.rateMbitForTime.toFixed(0)} Mbit/s`}`,
  ].join('\n');
}

/** `bfmig predict`. */
export function runPredict(args: PredictArgs, write: (text: string) => void): number {
  const inputs = predictInputs(args);
  const prediction = predict(inputs);
  if (args.json === true) {
    const { platform, ...rest } = inputs;
    write(JSON.stringify({ inputs: rest, platform, ...prediction }, (_k, v: unknown) => (v === Infinity ? null : v), 2) + '\n');
  } else {
    write(formatPrediction(inputs, prediction) + '\n');
  }
  return 0;
}
