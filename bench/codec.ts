/**
 * The codecs' own cost per page, in one process, no sockets: a first leg (nothing to reuse) through a
 * StreamEncoder and a StreamDecoder, each with a store of its own on disk as a gateway has, fed in
 * 256 KiB chunks (the size a gateway reads). Prints µs per page: each side's wall time, and the main
 * thread's CPU time for both sides together (from /proc, without the stores' I/O threads): the per-page
 * work a gateway adds to a relay, apart from the sockets. With stores on disk the wall times include the
 * encoder's waits for free write buffers (both stores write to one disk here), the CPU time does not.
 * The stream is in memory, so the figures are the codecs' and the stores', not the loopback's.
 *
 * Usage: node dist/bench/codec.js [GiB=1] [runs=5]
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { DIGEST_BYTES } from '../src/digest';
import { StreamDecoder } from '../src/proxy/decoder';
import { StreamEncoder } from '../src/proxy/encoder';
import { PageStore } from '../src/store';
import { syntheticStream } from '../src/lab/harness/synthetic-stream';
import { median } from '../src/common/median';
import { threadCpuSeconds } from '../src/lab/demo/proc-stats';
import { benchPositionals, numberArg } from './command-line';

const argv = benchPositionals();
const gib = numberArg(argv[0], 1, 'GiB');
const runs = numberArg(argv[1], 5, 'runs');
const CHUNK = 256 * 1024;

/** The main thread's CPU seconds so far: the codecs' own work, without the stores' I/O threads or their waits. */
const mainThreadCpu = (): number => threadCpuSeconds(process.pid, process.pid);

function firstLeg(stream: Buffer, pages: number, root: string, withStore: boolean, readsFree: boolean): { encodeUs: number; decodeUs: number; cpuUs: number } {
  const cpuBefore = mainThreadCpu();
  const sender = withStore ? PageStore.open(path.join(root, 'a'), 'vm') : null;
  const receiver = withStore ? PageStore.open(path.join(root, 'b'), 'vm') : null;
  let decodeUs = 0;
  let encodeUs = 0;
  const out = (): void => undefined;
  const decoder = new StreamDecoder(out, receiver);
  // Frames reach the decoder at the end of each chunk, as a receiving gateway reads them.
  const literals: Buffer[] = [];
  const runs: Buffer[] = [];
  const encoder = new StreamEncoder(
    {
      literal: (bytes) => literals.push(bytes),
      run: (payload) => runs.push(payload),
    },
    sender,
    (layout) => {
      // As a sending gateway does when the far site retains nothing of this VM: an all-absent reference.
      encoder.reference = new Uint8Array(layout.pageCount * DIGEST_BYTES);
      encoder.deltas = true;
      encoder.deltaReadsFree = readsFree;
    },
    true,
  );
  // Each chunk is read into one reused buffer, as a gateway reads its socket: the codecs see it in cache.
  const readBuffer = Buffer.allocUnsafe(CHUNK);
  for (let at = 0; at < stream.length; at += CHUNK) {
    const n = stream.copy(readBuffer, 0, at, at + CHUNK);
    const t0 = process.hrtime.bigint();
    encoder.push(readBuffer.subarray(0, n));
    const t1 = process.hrtime.bigint();
    encodeUs += Number(t1 - t0) / 1e3;
    // A first leg is Literal bytes only: no run can form when the receiver holds nothing.
    if (runs.length > 0) throw new Error('a Run on a first leg');
    for (const bytes of literals) decoder.literal(bytes);
    literals.length = 0;
    decoder.releaseInput();
    decodeUs += Number(process.hrtime.bigint() - t1) / 1e3;
  }
  const t2 = process.hrtime.bigint();
  encoder.end();
  sender?.commit('s1');
  const t3 = process.hrtime.bigint();
  encodeUs += Number(t3 - t2) / 1e3;
  for (const bytes of literals) decoder.literal(bytes);
  decoder.end(stream.length, encoder.streamCheck);
  receiver?.commit('s1');
  decodeUs += Number(process.hrtime.bigint() - t3) / 1e3;
  sender?.close();
  receiver?.close();
  return { encodeUs: encodeUs / pages, decodeUs: decodeUs / pages, cpuUs: ((mainThreadCpu() - cpuBefore) * 1e6) / pages };
}

function main(): void {
  const { stream, pages } = syntheticStream(gib);
  console.log(
    `stream: ${(stream.length / 2 ** 30).toFixed(2)} GiB synthetic QEMU 7.2 stream, ${pages.toLocaleString('en-US')} random pages; ${runs} runs, medians of µs per page: each codec's wall time (with stores, waits for the disk included), and the main thread's CPU time for both`,
  );
  // Store reads are free while the WAN sets the pace (content matches and deltas against other pages are
  // looked for); not while the gateway does (a fast link), as on loopback.
  for (const [withStore, readsFree] of [[false, true], [true, true], [true, false]]) {
    const enc: number[] = [];
    const dec: number[] = [];
    const cpu: number[] = [];
    for (let r = 0; r < runs; r++) {
      const root = fs.mkdtempSync(path.join(os.tmpdir(), 'bfmig-codec-'));
      try {
        const { encodeUs, decodeUs, cpuUs } = firstLeg(stream, pages, root, withStore, readsFree);
        enc.push(encodeUs);
        dec.push(decodeUs);
        cpu.push(cpuUs);
      } finally {
        fs.rmSync(root, { recursive: true, force: true });
      }
    }
    const label = `${withStore ? 'stores on disk' : 'no stores     '}, ${readsFree ? 'the WAN sets the pace   ' : 'the gateway sets the pace'}`;
    console.log(`${label}  encoder ${median(enc).toFixed(2)} µs/page (${Math.min(...enc).toFixed(2)}–${Math.max(...enc).toFixed(2)}), decoder ${median(dec).toFixed(2)} µs/page (${Math.min(...dec).toFixed(2)}–${Math.max(...dec).toFixed(2)}); main thread CPU, both, ${median(cpu).toFixed(2)} µs/page`);
  }
}

main();
