/**
 * What the gateways add to a postcopy page request: once a postcopy destination runs the guest, a page
 * it lacks stalls a vCPU until the source has sent it, so each request is on the guest's critical path.
 *
 * A source stand-in sends a postcopy stream up to its package, then serves page requests as QEMU does:
 * for each REQ_PAGES on the return path, one RAM section with that page. A destination stand-in asks
 * for one page at a time and times the round trip, from writing the request to parsing the page. The
 * same stand-ins are joined three ways in one run: directly, through a plain TCP relay pair (two hops,
 * as two gateways are), and through a bfmig gateway pair in this process. Loopback, no WAN shaping:
 * what is measured is the processing the hops add, to be added to the WAN's own round trip.
 *   node dist/bench/postcopy-latency.js [--requests 2000]
 */
import * as net from 'node:net';
import { type Endpoint } from '../src/gateway/address';
import { startPair, stopPair } from '../src/lab/harness/gateway-pair';
import { withTempDir } from '../src/lab/harness/temp-dir';
import { guestMemory, migrationStream, type GuestMemory } from '../src/lab/harness/migration-stream';
import { TcpRelay } from '../src/lab/wan/relay';
import { RamFlag, SectionType, VmCommand } from '../src/qemu/constants';
import { StreamParser } from '../src/qemu/parser';
import { ReturnPathMessage, ReturnPathParser } from '../src/qemu/return-path';
import { RecordKind } from '../src/qemu/records';
import { writeRamWord, writeShortString } from '../src/qemu/encode';
import { benchOptions, numberArg } from './command-line';

const PAGE = 4096;
const RAM_SECTION = 2;

/** The stream up to the end of its postcopy package, and the RAM section id and block of the guest. */
function streamHead(memory: GuestMemory): Buffer {
  const stream = migrationStream(memory, [[0]], { postcopyAt: 0, switchoverStart: true });
  let end = -1;
  const parser = new StreamParser((r) => {
    if (r.kind === RecordKind.PackageEnd) end = r.streamOffset;
  });
  parser.push(stream);
  if (end < 0) throw new Error('no postcopy package in the stream');
  return stream.subarray(0, end);
}

/** One RAM section carrying page `index` (what QEMU sends for a page request), or the stream's end. */
function pageSection(memory: GuestMemory, index: number | null): Buffer {
  const block = memory.blocks[0];
  const out = Buffer.alloc(5 + 8 + 1 + block.name.length + PAGE + 8 + 5 + 1);
  out[0] = index === null ? SectionType.End : SectionType.Part;
  out.writeUInt32BE(RAM_SECTION, 1);
  let at = 5;
  if (index !== null) {
    at = writeRamWord(out, at, index * PAGE, RamFlag.Page);
    at = writeShortString(out, at, block.name);
    at += memory.pages[index].copy(out, at);
  }
  at = writeRamWord(out, at, 0, RamFlag.Eos);
  out[at] = SectionType.Footer;
  out.writeUInt32BE(RAM_SECTION, at + 1);
  at += 5;
  if (index === null) out[at++] = SectionType.Eof;
  return out.subarray(0, at);
}

/** A postcopy source: the head, then a page section per request, then the end once `requests` are served. */
function servePostcopy(at: Endpoint, memory: GuestMemory, requests: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(at.port, at.host, () => socket.write(streamHead(memory)));
    socket.setNoDelay(true);
    let served = 0;
    const rp = new ReturnPathParser((m) => {
      if (m.type !== ReturnPathMessage.ReqPagesId && m.type !== ReturnPathMessage.ReqPages) return;
      socket.write(pageSection(memory, Number(m.start / BigInt(PAGE))));
      if (++served === requests) socket.end(pageSection(memory, null));
    });
    socket.on('data', (b: Buffer) => rp.push(b));
    socket.on('close', () => (served === requests ? resolve() : reject(new Error(`source closed after ${served} of ${requests} requests`))));
    socket.on('error', reject);
  });
}

/** A postcopy destination on `server`: once the package is in, asks for `requests` pages one at a time. */
function askForPages(server: net.Server, memory: GuestMemory, requests: number): Promise<number[]> {
  return new Promise((resolve, reject) => {
    server.once('connection', (socket) => {
      socket.setNoDelay(true);
      const rtts: number[] = [];
      const block = memory.blocks[0];
      let waitingFor = -1;
      let sentAt = 0n;
      let x = 7;
      const ask = (): void => {
        x = (Math.imul(x, 1103515245) + 12345) >>> 0;
        waitingFor = 1 + (x % (block.pages - 1));
        const body = Buffer.alloc(13 + block.name.length);
        body.writeBigUInt64BE(BigInt(waitingFor * PAGE), 0);
        body.writeUInt32BE(PAGE, 8);
        body[12] = block.name.length;
        body.write(block.name, 13, 'latin1');
        const header = Buffer.alloc(4);
        header.writeUInt16BE(ReturnPathMessage.ReqPagesId, 0);
        header.writeUInt16BE(body.length, 2);
        sentAt = process.hrtime.bigint();
        socket.write(Buffer.concat([header, body]));
      };
      const parser = new StreamParser((r) => {
        if (r.kind === RecordKind.Command && r.command === VmCommand.OpenReturnPath) return;
        if (r.kind === RecordKind.PackageEnd) ask();
        if (r.kind === RecordKind.RamPage && r.pageIndex === waitingFor) {
          rtts.push(Number(process.hrtime.bigint() - sentAt) / 1e3);
          waitingFor = -1;
          if (rtts.length < requests) ask();
        }
      });
      socket.on('data', (b: Buffer) => parser.push(b));
      socket.on('end', () => {
        socket.end();
        if (rtts.length === requests) resolve(rtts);
        else reject(new Error(`the stream ended after ${rtts.length} of ${requests} pages`));
      });
      socket.on('error', reject);
    });
  });
}

function listen(server: net.Server, port = 0): Promise<number> {
  return new Promise((resolve) => server.listen(port, '127.0.0.1', () => resolve((server.address() as net.AddressInfo).port)));
}

const quantile = (sorted: number[], q: number): number => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];

function summary(label: string, rtts: number[]): string {
  const s = [...rtts].sort((a, b) => a - b);
  return `${label.padEnd(34)} median ${quantile(s, 0.5).toFixed(0).padStart(6)} µs   p90 ${quantile(s, 0.9).toFixed(0).padStart(6)} µs   p99 ${quantile(s, 0.99).toFixed(0).padStart(6)} µs`;
}

async function main(): Promise<void> {
  const { values } = benchOptions({ requests: { type: 'string' } });
  const requests = numberArg(values.requests, 2000, '--requests');
  const memory = guestMemory([['pc.ram', 4096]], 3);
  const results: Array<[string, number[]]> = [];

  // Directly: the source dials the destination.
  {
    const server = net.createServer({ noDelay: true });
    const port = await listen(server);
    const asked = askForPages(server, memory, requests);
    await Promise.all([servePostcopy({ host: '127.0.0.1', port }, memory, requests), asked]);
    results.push(['direct', await asked]);
    server.close();
  }
  // Through two plain TCP relays.
  {
    const server = net.createServer({ noDelay: true });
    const port = await listen(server);
    const second = new TcpRelay({ listen: { host: '127.0.0.1', port: 0 }, target: { host: '127.0.0.1', port } });
    const secondAt = await second.listen();
    const first = new TcpRelay({ listen: { host: '127.0.0.1', port: 0 }, target: secondAt });
    const firstAt = await first.listen();
    const asked = askForPages(server, memory, requests);
    await Promise.all([servePostcopy(firstAt, memory, requests), asked]);
    results.push(['plain TCP relay pair', await asked]);
    await first.close();
    await second.close();
    server.close();
  }
  // Through a bfmig gateway pair: a first migration (nothing reused), then one back (pages reused).
  await withTempDir('bfmig-postcopy-latency-', async (tmp) => {
  const [a, b] = await startPair(tmp);
  try {
    for (const [from, to, label] of [
      [a, b, 'bfmig gateway pair, first leg'],
      [b, a, 'bfmig gateway pair, back leg'],
    ] as const) {
      const server = net.createServer({ noDelay: true });
      await listen(server, to.destPort);
      const asked = askForPages(server, memory, requests);
      await Promise.all([servePostcopy({ host: '127.0.0.1', port: from.routePort }, memory, requests), asked]);
      results.push([label, await asked]);
      server.close();
    }
  } finally {
    await stopPair([a, b]);
  }
  });
  console.log(`postcopy page requests, one at a time, ${requests} per path, loopback (round trip: request written → page parsed)`);
  for (const [label, rtts] of results) console.log(summary(label, rtts));
  const median = (label: string): number => quantile([...(results.find((r) => r[0] === label)?.[1] ?? [])].sort((x, y) => x - y), 0.5);
  console.log(
    `added by the gateway pair (median): ${(median('bfmig gateway pair, first leg') - median('plain TCP relay pair')).toFixed(0)} µs over a plain relay pair, ` +
      `${(median('bfmig gateway pair, first leg') - median('direct')).toFixed(0)} µs over a direct connection`,
  );
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
