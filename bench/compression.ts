/**
 * Which compressor for the Literal bytes that cross the WAN: zstd through the native addon (what the
 * gateways use, wire/compression.ts, one stream per migration) against what Node 20 has built in,
 * zlib's deflate and brotli at their fastest levels (each 256 KiB batch on its own: Node has no
 * synchronous streaming API for them, and a gateway cannot wait for a callback per batch). Input: the
 * kind of memory the test guest's `--content files` holds (executables, libraries, text and
 * already-compressed files of this machine's Debian packages), and pseudo-random bytes.
 *
 * Prints, per compressor and input: the WAN bytes as a share of the input, and MiB/s compressing and
 * decompressing on one core.
 *
 * Usage: node dist/bench/compression.js [MiB per kind = 8]
 */
import { randomFillSync } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import { LiteralFrames, LiteralInflater, MAX_BATCH_BYTES, ZSTD } from '../src/wire/compression';
import { FRAME_HEADER_BYTES, FrameParser, FrameType } from '../src/wire/frames';
import { benchPositionals, numberArg } from './command-line';

const argv = benchPositionals();
const perKind = numberArg(argv[0], 8, 'MiB per kind') * 2 ** 20;
const MiB = 2 ** 20;

/** Files of one kind, in name order, until `budget` bytes (files over 4 MiB skipped). */
function gather(dir: string, match: (name: string) => boolean, budget: number, deep = false): Buffer[] {
  const out: Buffer[] = [];
  let total = 0;
  const walk = (d: string): void => {
    let names: string[];
    try {
      names = fs.readdirSync(d).sort();
    } catch {
      return;
    }
    for (const name of names) {
      if (total >= budget) return;
      const p = path.join(d, name);
      let st: fs.Stats;
      try {
        st = fs.statSync(p);
      } catch {
        continue;
      }
      if (st.isDirectory()) {
        if (deep) walk(p);
        continue;
      }
      if (!st.isFile() || st.size === 0 || st.size > 4 * MiB || total + st.size > budget || !match(name)) continue;
      const bytes = fs.readFileSync(p);
      if ((dir.includes('/bin') || dir.includes('/lib')) && bytes.readUInt32BE(0) !== 0x7f454c46) continue;
      out.push(bytes);
      total += bytes.length;
    }
  };
  walk(dir);
  return out;
}

function realisticMemory(): Buffer {
  return Buffer.concat([
    ...gather('/usr/bin', () => true, perKind),
    ...gather('/usr/lib/x86_64-linux-gnu', (n) => n.includes('.so'), perKind),
    ...gather('/usr/share/doc', (n) => n === 'copyright', perKind / 2, true),
    ...gather('/usr/include', (n) => n.endsWith('.h'), perKind / 2, true),
    ...gather('/usr/share/man', (n) => n.endsWith('.gz'), perKind, true),
  ]);
}

interface Figures {
  wanBytes: number;
  compressSeconds: number;
  decompressSeconds: number;
}

function batches(input: Buffer): Buffer[] {
  const out: Buffer[] = [];
  for (let at = 0; at < input.length; at += MAX_BATCH_BYTES) out.push(input.subarray(at, at + MAX_BATCH_BYTES));
  return out;
}

/** zstd as the gateways run it: LiteralFrames → frames → FrameParser → LiteralInflater. */
function zstdStream(input: Buffer): Figures {
  const frames: Buffer[] = [];
  let wanBytes = 0;
  const sender = new LiteralFrames((b) => {
    wanBytes += b.length;
    frames.push(Buffer.from(b));
  }, ZSTD);
  // The policy backs off when the WAN is idle; here the WAN is always the bottleneck.
  const t0 = process.hrtime.bigint();
  for (const batch of batches(input)) {
    sender.policy.observeWan(true, batch.length);
    sender.literal(batch);
    sender.flush();
  }
  const t1 = process.hrtime.bigint();
  const inflater = new LiteralInflater();
  let outBytes = 0;
  const parser = new FrameParser((type, payload) => {
    if (type === FrameType.Compressed) outBytes += inflater.inflate(payload).length;
    else {
      inflater.raw();
      outBytes += payload.length;
    }
  });
  const t2 = process.hrtime.bigint();
  for (const f of frames) parser.push(f);
  const t3 = process.hrtime.bigint();
  if (outBytes !== input.length) throw new Error(`zstd round trip gave ${outBytes} of ${input.length} bytes`);
  return { wanBytes, compressSeconds: Number(t1 - t0) / 1e9, decompressSeconds: Number(t3 - t2) / 1e9 };
}

/** A per-batch codec of Node's zlib; a batch that would grow goes raw, as the gateways do. */
function perBatch(input: Buffer, compress: (b: Buffer) => Buffer, decompress: (b: Buffer) => Buffer): Figures {
  const out: Array<Buffer | null> = [];
  let wanBytes = 0;
  const parts = batches(input);
  const t0 = process.hrtime.bigint();
  for (const batch of parts) {
    const c = compress(batch);
    const raw = c.length + 4 >= batch.length;
    out.push(raw ? null : c);
    wanBytes += FRAME_HEADER_BYTES + (raw ? batch.length : c.length + 4);
  }
  const t1 = process.hrtime.bigint();
  let outBytes = 0;
  out.forEach((c, i) => (outBytes += c === null ? parts[i].length : decompress(c).length));
  const t2 = process.hrtime.bigint();
  if (outBytes !== input.length) throw new Error(`round trip gave ${outBytes} of ${input.length} bytes`);
  return { wanBytes, compressSeconds: Number(t1 - t0) / 1e9, decompressSeconds: Number(t2 - t1) / 1e9 };
}

const codecs: Array<[string, (input: Buffer) => Figures]> = [
  ['zstd 1, one stream (shipped)', zstdStream],
  ['zlib deflate 1, per batch', (i) => perBatch(i, (b) => zlib.deflateRawSync(b, { level: 1 }), (b) => zlib.inflateRawSync(b))],
  [
    'brotli 1, per batch',
    (i) =>
      perBatch(
        i,
        (b) => zlib.brotliCompressSync(b, { params: { [zlib.constants.BROTLI_PARAM_QUALITY]: 1, [zlib.constants.BROTLI_PARAM_SIZE_HINT]: b.length } }),
        (b) => zlib.brotliDecompressSync(b),
      ),
  ],
];

const inputs: Array<[string, Buffer]> = [
  ['realistic (files of Debian packages)', realisticMemory()],
  ['pseudo-random', randomFillSync(Buffer.allocUnsafe(32 * MiB))],
];

for (const [what, input] of inputs) {
  console.log(`\n${what}: ${(input.length / MiB).toFixed(1)} MiB in ${MAX_BATCH_BYTES / 1024} KiB batches`);
  for (const [name, run] of codecs) {
    run(input.subarray(0, 4 * MiB)); // warm up
    const f = run(input);
    console.log(
      `  ${name.padEnd(30)} WAN ${((f.wanBytes / input.length) * 100).toFixed(1).padStart(5)}% of the input; ` +
        `compress ${(input.length / MiB / f.compressSeconds).toFixed(0).padStart(5)} MiB/s, decompress ${(input.length / MiB / f.decompressSeconds).toFixed(0).padStart(5)} MiB/s`,
    );
  }
}
