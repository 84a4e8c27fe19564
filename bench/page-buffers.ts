/**
 * What reusing the codecs' page buffers (proxy/reused-buffers.ts) saves a gateway that has migrated
 * before: first legs of a guest whose pages resemble each other (every other page a copy of the one
 * before with a header of its own, as a heap holds file pages), through a StreamEncoder and a
 * StreamDecoder in one process, with stores on disk, the sender looking for pages alike and the receiver
 * keeping the pages it stored last (as when it reads bases ahead). Rounds alternate: "fresh" lets go of
 * every idle buffer first (each migration allocates its resemblance cache and recent pages anew, as before
 * the pool), "reused" takes the buffers the round before gave back. Prints each side's wall time per
 * page (both run on the main thread, the encoder's waits for free store write buffers included), medians
 * over the rounds, after the mechanism alone: pages copied into fresh and into touched memory.
 *
 * Usage: node dist/bench/page-buffers.js [MiB=256] [rounds=6]
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { median } from '../src/common/median';
import { DIGEST_BYTES } from '../src/digest';
import { copiesWithHeaders, guestMemory, migrationStream, PAGE } from '../src/lab/harness/migration-stream';
import { StreamDecoder } from '../src/proxy/decoder';
import { StreamEncoder } from '../src/proxy/encoder';
import { pageBuffers } from '../src/proxy/reused-buffers';
import { PageStore } from '../src/store';
import { benchPositionals, numberArg } from './command-line';

const argv = benchPositionals();
const mib = numberArg(argv[0], 256, 'MiB');
const rounds = numberArg(argv[1], 6, 'rounds');
const CHUNK = 256 * 1024;

function leg(stream: Buffer, root: string): { encodeMs: number; decodeMs: number; deltas: number } {
  const sender = PageStore.open(path.join(root, 'a'), 'vm');
  const receiver = PageStore.open(path.join(root, 'b'), 'vm');
  const decoder = new StreamDecoder(() => undefined, receiver);
  const frames: Array<[kind: 'literal' | 'run' | 'delta', bytes: Buffer]> = [];
  const encoder = new StreamEncoder(
    {
      literal: (bytes) => frames.push(['literal', Buffer.from(bytes)]),
      run: (payload) => frames.push(['run', Buffer.from(payload)]),
      delta: (payload) => frames.push(['delta', Buffer.from(payload)]),
    },
    sender,
    (layout) => {
      // A first leg: the receiver holds nothing; pages alike go as Deltas it reads ahead.
      encoder.reference = new Uint8Array(layout.pageCount * DIGEST_BYTES);
      encoder.deltas = true;
      encoder.receiverReadsAhead = true;
    },
  );
  let encodeNs = 0n;
  let decodeNs = 0n;
  const deliver = (): void => {
    const t = process.hrtime.bigint();
    for (const [kind, bytes] of frames) {
      if (kind === 'literal') decoder.literal(bytes);
      else if (kind === 'run') decoder.run(bytes);
      else decoder.delta(bytes);
    }
    frames.length = 0;
    decodeNs += process.hrtime.bigint() - t;
  };
  for (let at = 0; at < stream.length; at += CHUNK) {
    const t = process.hrtime.bigint();
    encoder.push(stream.subarray(at, at + CHUNK));
    encodeNs += process.hrtime.bigint() - t;
    deliver();
  }
  encoder.end();
  deliver();
  decoder.end(stream.length, encoder.streamCheck);
  const deltas = decoder.counts.pagesDelta;
  encoder.release();
  decoder.release();
  sender.close();
  receiver.close();
  return { encodeMs: Number(encodeNs) / 1e6, decodeMs: Number(decodeNs) / 1e6, deltas };
}

/** Milliseconds to copy 8,192 pages into `into` (32 MiB), a page at a time as the caches do. */
function copyPages(into: Buffer, from: Buffer): number {
  const t = process.hrtime.bigint();
  for (let i = 0; i < 8192; i++) from.copy(into, i * PAGE, (i % 64) * PAGE, ((i % 64) + 1) * PAGE);
  return Number(process.hrtime.bigint() - t) / 1e6;
}

/** The mechanism alone: copying pages into memory the process was just given against memory it touched before. */
function touchCost(): void {
  const from = Buffer.alloc(64 * PAGE, 0x5a);
  const kept = Buffer.allocUnsafeSlow(8192 * PAGE);
  copyPages(kept, from);
  const fresh: number[] = [];
  const reused: number[] = [];
  for (let r = 0; r < 6; r++) {
    fresh.push(copyPages(Buffer.allocUnsafeSlow(8192 * PAGE), from));
    reused.push(copyPages(kept, from));
  }
  console.log(`8,192 pages copied into a fresh 32 MiB buffer ${median(fresh).toFixed(1)} ms, into one touched before ${median(reused).toFixed(1)} ms (medians of 6)`);
}

function main(): void {
  touchCost();
  const pages = (mib * 2 ** 20) / PAGE;
  const memory = guestMemory([['pc.ram', pages]], 3, 0.1);
  for (let page = 0; page + 1 < pages; page += 2) copiesWithHeaders(memory, page, page + 1, 1);
  const stream = migrationStream(memory, []);
  console.log(`guest: ${mib} MiB, every other page a copy of the one before with a header; ${rounds} rounds of each, alternating; stores on disk under ${os.tmpdir()}`);
  const times: Record<'fresh' | 'reused', { enc: number[]; dec: number[] }> = { fresh: { enc: [], dec: [] }, reused: { enc: [], dec: [] } };
  for (let r = 0; r < 2 * rounds; r++) {
    const mode = r % 2 === 0 ? 'fresh' : 'reused';
    if (mode === 'fresh') pageBuffers.clear();
    const root = fs.mkdtempSync(path.join(os.tmpdir(), 'bfmig-page-buffers-'));
    try {
      const { encodeMs, decodeMs, deltas } = leg(stream, root);
      times[mode].enc.push(encodeMs);
      times[mode].dec.push(decodeMs);
      console.log(`round ${r + 1} ${mode.padEnd(6)}: encoder ${encodeMs.toFixed(0)} ms, decoder ${decodeMs.toFixed(0)} ms, ${deltas.toLocaleString('en-US')} Deltas`);
    } finally {
      fs.rmSync(root, { recursive: true, force: true });
    }
  }
  const us = (ms: number): string => ((ms * 1000) / pages).toFixed(2);
  for (const mode of ['fresh', 'reused'] as const) {
    const { enc, dec } = times[mode];
    const ms = (v: number[]): string => `${median(v).toFixed(0)} ms (${Math.min(...v).toFixed(0)}–${Math.max(...v).toFixed(0)})`;
    console.log(`${mode.padEnd(6)} buffers: encoder ${us(median(enc))} µs/page, ${ms(enc)}; decoder ${us(median(dec))} µs/page, ${ms(dec)}`);
  }
}

main();
