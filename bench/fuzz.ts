/**
 * The long fuzz run: mutated real-shaped inputs against the codec, the frame parser and the proxy
 * pair, with per-input timing, a watchdog for inputs that never finish, and peak memory.
 *
 *   node dist/bench/fuzz.js [--inputs 100000] [--seed N]
 *                           [--target codec,frames,proxy-stream,proxy-wire,multifd-codec,multifd-stream,multifd-wire]
 *                           [--stream FILE]... [--hang-ms 2000] [--replay INDEX --dump FILE]
 *
 * --stream adds a captured stream (e.g. from `bfmig capture`) to the seeds. --replay runs one input of
 * a run alone (same --seed) and --dump writes its bytes, to minimise and keep as a regression case.
 * Exit status 1 when any property broke or an input ran past --hang-ms.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { performance } from 'node:perf_hooks';
import { Worker } from 'node:worker_threads';
import { buildCorpus, FuzzFailure, inputSeed, makeInput, type Outcome, runInput, type TargetName, TARGETS } from '../src/lab/harness/fuzz';
import { buildMultifdCorpus, makeMultifdInput, MULTIFD_TARGETS, type MultifdTargetName, runMultifdInput } from '../src/lab/harness/fuzz-multifd';
import { benchOptions, numberArg } from './command-line';

const text = { type: 'string' } as const;
const { values: options } = benchOptions({ inputs: text, seed: text, target: text, 'hang-ms': text, replay: text, dump: text, stream: { type: 'string', multiple: true } });
const inputs = numberArg(options.inputs, 100_000, '--inputs');
const runSeed = numberArg(options.seed, Date.now() % 1_000_000, '--seed');
type AnyTarget = TargetName | MultifdTargetName;
const ALL_TARGETS: readonly AnyTarget[] = [...TARGETS, ...MULTIFD_TARGETS];
const isMultifd = (t: AnyTarget): t is MultifdTargetName => (MULTIFD_TARGETS as readonly string[]).includes(t);
const targets = (options.target?.split(',') ?? [...ALL_TARGETS]) as AnyTarget[];
const hangMs = numberArg(options['hang-ms'], 2000, '--hang-ms');
const replay = options.replay;
const dump = options.dump;
for (const t of targets) if (!ALL_TARGETS.includes(t)) throw new Error(`unknown target ${t}; targets: ${ALL_TARGETS.join(', ')}`);

const extra = (options.stream ?? []).map((file) => ({ name: path.basename(file), bytes: fs.readFileSync(file) }));
const corpus = buildCorpus(extra);
const multifdCorpus = buildMultifdCorpus();
const run = (target: AnyTarget, seed: number): { outcome: Outcome; bytes: number; from: string } =>
  isMultifd(target) ? runMultifdInput(target, multifdCorpus, seed) : runInput(target, corpus, seed);

if (replay !== undefined) {
  const target = targets[0];
  const seed = inputSeed(runSeed, Number(replay));
  const made = isMultifd(target) ? makeMultifdInput(target, multifdCorpus, seed) : makeInput(target, corpus, seed);
  console.log(`${target} input ${replay} of seed ${runSeed}: ${made.input.length} bytes from ${made.from}, mutations ${JSON.stringify(made.mutations)}`);
  if (dump) fs.writeFileSync(dump, made.input);
  try {
    console.log(run(target, seed));
  } catch (err) {
    console.log(err instanceof Error ? err.stack : err);
    process.exitCode = 1;
  }
} else {
  // The watchdog: a thread that notices when the current input has run for too long. A synchronous
  // infinite loop cannot be interrupted from inside; the watchdog names the input and ends the run.
  const progress = new Int32Array(new SharedArrayBuffer(8));
  const watchdog = new Worker(
    `const { workerData } = require('node:worker_threads');
     const p = new Int32Array(workerData.buffer);
     let last = -1, since = Date.now();
     setInterval(() => {
       const now = Atomics.load(p, 0);
       if (now !== last) { last = now; since = Date.now(); return; }
       if (now >= 0 && Date.now() - since > workerData.limitMs) {
         process._rawDebug('HANG: ' + workerData.names[Atomics.load(p, 1)] + ' input ' + now + ' of seed ' + workerData.seed + ' ran over ' + workerData.limitMs + ' ms');
         process.kill(process.pid, 'SIGKILL');
       }
     }, 250).unref();`,
    { eval: true, workerData: { buffer: progress.buffer, limitMs: Math.max(30_000, hangMs * 10), seed: runSeed, names: targets } },
  );
  watchdog.unref();

  console.log(
    `fuzz: seed ${runSeed}, ${inputs.toLocaleString('en-US')} inputs per target, ${corpus.streams.length} stream seeds, ${corpus.frames.length} frame seeds, ` +
      `${multifdCorpus.channels.length} multifd channel seeds`,
  );
  let failedAny = false;
  let peakRss = process.memoryUsage().rss;
  let peakHeap = process.memoryUsage().heapUsed;
  for (const [t, target] of targets.entries()) {
    Atomics.store(progress, 1, t);
    const outcomes: Record<Outcome, number> = { rebuilt: 0, verbatim: 0, rejected: 0 };
    const failures = new Map<string, { count: number; first: number; message: string }>();
    let slowest = { ms: 0, index: -1, bytes: 0, from: '' };
    let hangs = 0;
    let bytes = 0;
    const start = performance.now();
    for (let i = 0; i < inputs; i++) {
      Atomics.store(progress, 0, i);
      const t0 = performance.now();
      let result: { bytes: number; from: string } | null = null;
      try {
        const r = run(target, inputSeed(runSeed, i));
        outcomes[r.outcome]++;
        result = r;
        bytes += r.bytes;
      } catch (err) {
        const kind = err instanceof FuzzFailure ? err.kind : 'harness';
        const message = err instanceof Error ? err.message.split('\n')[0] : String(err);
        const key = `${kind}: ${message.replace(/\d+/g, 'N').slice(0, 160)}`;
        const seen = failures.get(key);
        if (seen) seen.count++;
        else failures.set(key, { count: 1, first: i, message });
      }
      const ms = performance.now() - t0;
      if (ms > slowest.ms) slowest = { ms, index: i, bytes: result?.bytes ?? 0, from: result?.from ?? '' };
      if (ms > hangMs) hangs++;
      if ((i & 255) === 0) {
        const m = process.memoryUsage();
        peakRss = Math.max(peakRss, m.rss);
        peakHeap = Math.max(peakHeap, m.heapUsed);
      }
    }
    const seconds = (performance.now() - start) / 1000;
    const crashes = [...failures.entries()].filter(([k]) => k.startsWith('crash') || k.startsWith('harness')).reduce((s, [, v]) => s + v.count, 0);
    const broken = [...failures.values()].reduce((s, v) => s + v.count, 0);
    console.log(
      `${target.padEnd(12)} ${inputs.toLocaleString('en-US')} inputs in ${seconds.toFixed(1)} s = ${Math.round(inputs / seconds).toLocaleString('en-US')} inputs/s, ` +
        `${(bytes / 2 ** 20).toFixed(0)} MiB; rebuilt ${outcomes.rebuilt}, relayed verbatim ${outcomes.verbatim}, typed error ${outcomes.rejected}; ` +
        `crashes ${crashes}, other property failures ${broken - crashes}, hangs (> ${hangMs} ms) ${hangs}; ` +
        `slowest input ${slowest.index} (${slowest.bytes} bytes from ${slowest.from}) ${slowest.ms.toFixed(1)} ms`,
    );
    for (const [key, f] of failures) {
      console.log(`  ${f.count} × ${key}\n    first: input ${f.first}: ${f.message}\n    replay: node dist/bench/fuzz.js --seed ${runSeed} --target ${target} --replay ${f.first}`);
    }
    if (failures.size > 0 || hangs > 0) failedAny = true;
  }
  Atomics.store(progress, 0, -1);
  const m = process.memoryUsage();
  peakRss = Math.max(peakRss, m.rss);
  peakHeap = Math.max(peakHeap, m.heapUsed);
  console.log(`peak RSS ${(peakRss / 2 ** 20).toFixed(0)} MiB, peak heap ${(peakHeap / 2 ** 20).toFixed(0)} MiB`);
  process.exitCode = failedAny ? 1 : 0;
}
