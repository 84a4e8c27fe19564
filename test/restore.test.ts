/**
 * `bfmig restore` against a stand-in destination QEMU (no QEMU here; test/restore.e2e.test.ts has the
 * real one): the rebuilt stream, the return path it opens, and every way the destination can say no.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { digestOne } from '../src/digest';
import { keepStreamParts } from '../src/gateway/session';
import { StreamParts } from '../src/proxy/stream-parts';
import { RecordKind, SectionType, StreamParser, VmCommand } from '../src/qemu';
import { ReturnPathMessage } from '../src/qemu/return-path';
import { CorruptPagesError, restoreSnapshot } from '../src/cli/restore';
import { PageStore } from '../src/store';
import { guestMemory, migrationStream, PAGE, type GuestMemory } from '../src/lab/harness/migration-stream';
import { testTempDir } from './temp-dir';

/** What the stand-in does once it has the whole stream (or, for 'exit', as soon as it has any). */
type Verdict = 'shut0' | 'shut1' | 'close' | 'exit' | 'malformed' | 'silent' | 'shut0-early';

interface Received {
  /** Every record kind in order, with the command number for commands. */
  commands: { command: number; at: number }[];
  configurationEnd: number;
  /** The stream parsed to its end (EOF and the whole vmdesc). */
  whole: boolean;
  reset: boolean;
  pages: Map<number, Buffer>;
}

function rpMessage(type: number, value?: number): Buffer {
  const b = Buffer.alloc(4 + (value === undefined ? 0 : 4));
  b.writeUInt16BE(type, 0);
  b.writeUInt16BE(value === undefined ? 0 : 4, 2);
  if (value !== undefined) b.writeUInt32BE(value, 4);
  return b;
}

/** A destination QEMU stand-in: parses what it gets, answers PING with PONG, gives `verdict`. */
function destination(verdict: Verdict): Promise<{ port: number; received: Promise<Received>; resume: () => void }> {
  return new Promise((listening) => {
    let paused: net.Socket | null = null;
    let done: (r: Received) => void;
    const received = new Promise<Received>((r) => (done = r));
    const server = net.createServer((socket) => {
      server.close();
      const r: Received = { commands: [], configurationEnd: -1, whole: false, reset: false, pages: new Map() };
      let vmdescLeft = -1;
      let returnPath = false;
      const finished = (): void => {
        r.whole = true;
        if (verdict === 'shut0') socket.end(rpMessage(ReturnPathMessage.Shut, 0));
        else if (verdict === 'shut1') socket.end(rpMessage(ReturnPathMessage.Shut, 1));
        else if (verdict === 'close') socket.end();
        else if (verdict === 'malformed') socket.write(rpMessage(9, 0));
      };
      const parser = new StreamParser((record) => {
        switch (record.kind) {
          case RecordKind.Configuration:
            r.configurationEnd = parser.recordsEnd;
            break;
          case RecordKind.Command:
            r.commands.push({ command: record.command, at: record.streamOffset });
            if (record.command === VmCommand.OpenReturnPath) returnPath = true;
            if (record.command === VmCommand.Ping && returnPath) socket.write(rpMessage(ReturnPathMessage.Pong, record.data.readUInt32BE(0)));
            break;
          case RecordKind.RamPage:
          case RecordKind.RamZero: {
            const page = record.kind === RecordKind.RamZero ? Buffer.alloc(PAGE, record.byteValue) : Buffer.from(record.data.subarray(record.dataStart, record.dataStart + record.dataLength));
            r.pages.set(record.pageIndex, page);
            break;
          }
          case RecordKind.VmDescriptionHeader:
            vmdescLeft = record.length;
            break;
          case RecordKind.VmDescriptionData:
            vmdescLeft -= record.bytes.length;
            if (vmdescLeft === 0) finished();
            break;
        }
      });
      if (verdict === 'shut0-early') {
        // Says it loaded the stream before it read a byte of it, and reads no more: restore is held
        // back by a full socket and must not take that for a verdict.
        socket.write(rpMessage(ReturnPathMessage.Shut, 0));
        socket.pause();
        paused = socket;
      }
      socket.on('data', (chunk: Buffer) => {
        if (verdict === 'exit') {
          socket.resetAndDestroy();
          return;
        }
        parser.push(chunk);
      });
      socket.on('error', () => (r.reset = true));
      socket.on('end', () => socket.end());
      socket.on('close', () => done(r));
    });
    server.listen(0, '127.0.0.1', () => listening({ port: (server.address() as net.AddressInfo).port, received, resume: () => paused?.resume() }));
  });
}

describe('bfmig restore (stand-in destination)', () => {
  let data = '';
  let memory: GuestMemory;
  let stream: Buffer;

  /** Keeps a store of `memory` with the head and tail of `source`, as a gateway does. */
  function retain(source: Buffer): void {
    const parts = new StreamParts();
    let footers: boolean | null = null;
    const parser = new StreamParser((record) => parts.record(record));
    for (let at = 0; at < source.length; at += 10_000) {
      const chunk = source.subarray(at, at + 10_000);
      parts.feed(chunk);
      parser.push(chunk);
    }
    parser.end();
    footers = parser.framing.footers;
    const store = PageStore.open(data, 'vm1');
    store.begin({ pageSize: PAGE, pageCount: memory.pages.length, layoutId: 'l1', layout: { blocks: memory.blocks.map((b) => ({ name: b.name, length: b.length })) } });
    const digest = Buffer.alloc(16);
    memory.pages.forEach((page, i) => {
      digestOne(page, 0, PAGE, digest, 0);
      store.writePage(i, page, 0, digest, 0);
    });
    keepStreamParts(store, parts, footers, 'snap-1');
    store.commit('snap-1');
    store.close();
  }

  beforeEach(() => {
    data = testTempDir('bfmig-restore-');
    memory = guestMemory([['pc.ram', 600], ['vga.vram', 40]], 7);
    stream = migrationStream(memory, []);
    retain(stream);
  });

  const to = (port: number): { host: string; port: number } => ({ host: '127.0.0.1', port });

  test('adds OPEN_RETURN_PATH and PING right after the configuration, sends every page, succeeds on SHUT 0', async () => {
    const dest = await destination('shut0');
    const result = await restoreSnapshot(data, 'vm1', to(dest.port));
    const r = await dest.received;
    expect(result).toMatchObject({ snapshotId: 'snap-1', pages: memory.pages.length });
    expect(r.whole).toBe(true);
    expect(r.reset).toBe(false);
    expect(r.configurationEnd).toBeGreaterThan(8);
    expect(r.commands).toEqual([
      { command: VmCommand.OpenReturnPath, at: r.configurationEnd },
      { command: VmCommand.Ping, at: r.configurationEnd + 5 },
    ]);
    expect(r.pages.size).toBe(memory.pages.length);
    for (const [i, page] of memory.pages.entries()) expect(r.pages.get(i)?.equals(page)).toBe(true);
  });

  test('a head that already opens the return path (the migration had it on) is sent as it was', async () => {
    // The source QEMU's own OPEN_RETURN_PATH and PING 1, where QEMU puts them.
    let configurationEnd = -1;
    const find = new StreamParser((record) => {
      if (record.kind === RecordKind.Configuration) configurationEnd = find.recordsEnd;
    });
    find.push(stream);
    const commands = Buffer.from([SectionType.Command, 0, VmCommand.OpenReturnPath, 0, 0, SectionType.Command, 0, VmCommand.Ping, 0, 4, 0, 0, 0, 1]);
    fs.rmSync(path.join(data, 'vm1'), { recursive: true });
    retain(Buffer.concat([stream.subarray(0, configurationEnd), commands, stream.subarray(configurationEnd)]));
    const dest = await destination('shut0');
    await restoreSnapshot(data, 'vm1', to(dest.port));
    const r = await dest.received;
    expect(r.commands).toEqual([
      { command: VmCommand.OpenReturnPath, at: configurationEnd },
      { command: VmCommand.Ping, at: configurationEnd + 5 },
    ]);
    expect(r.whole).toBe(true);
  });

  test.each([
    ['SHUT 1 (QEMU ≥ 8 failing to load)', 'shut1' as const, /failed to load the stream \(return path SHUT 1\)/],
    ['a close without SHUT (QEMU 7.2 exiting)', 'close' as const, /closed the connection before it said it loaded/],
    ['a reset mid-stream', 'exit' as const, /before it said it loaded the stream/],
    ['a malformed return-path message', 'malformed' as const, /malformed return-path message/],
  ])('fails on %s', async (_what, verdict, message) => {
    const dest = await destination(verdict);
    await expect(restoreSnapshot(data, 'vm1', to(dest.port))).rejects.toThrow(message);
    await dest.received;
  });

  test('fails on SHUT 0 before the stream was whole', async () => {
    // 64 MiB of RAM: far more than loopback socket buffers hold, so restore is still sending.
    fs.rmSync(path.join(data, 'vm1'), { recursive: true });
    memory = guestMemory([['pc.ram', 16384]], 9, 0);
    retain(migrationStream(memory, []));
    const dest = await destination('shut0-early');
    await expect(restoreSnapshot(data, 'vm1', to(dest.port))).rejects.toThrow(/said it was done before it had the whole stream/);
    dest.resume();
    expect((await dest.received).reset).toBe(true);
  });

  test('fails when the destination says nothing within the timeout, and resets it', async () => {
    const dest = await destination('silent');
    const t0 = Date.now();
    await expect(restoreSnapshot(data, 'vm1', to(dest.port), { timeoutMs: 500 })).rejects.toThrow(/did not say whether it loaded the stream within 1 s/);
    expect(Date.now() - t0).toBeLessThan(5_000);
    const r = await dest.received;
    expect(r.whole).toBe(true);
    expect(r.reset).toBe(true);
  });

  test('corrupt pages on disk: restore names them all, and the destination gets a reset, not a stream', async () => {
    const fd = fs.openSync(path.join(data, 'vm1', 'pages'), 'r+');
    // Page 300 in the middle of a batch, 601 in the second block: four bytes each.
    for (const index of [300, 601]) fs.writeSync(fd, Buffer.from([1, 2, 3, 4]), 0, 4, index * PAGE + 100);
    fs.closeSync(fd);
    const dest = await destination('shut0');
    const failure = await restoreSnapshot(data, 'vm1', to(dest.port)).then(
      () => null,
      (err: unknown) => err,
    );
    expect(failure).toBeInstanceOf(CorruptPagesError);
    expect((failure as CorruptPagesError).pages).toEqual([300, 601]);
    expect((failure as Error).message).toMatch(/2 corrupt pages .*: 300, 601;/);
    const r = await dest.received;
    expect(r.whole).toBe(false);
    expect(r.reset).toBe(true);
    // Nothing of the batch holding the first corrupt page went out.
    expect(r.pages.has(300)).toBe(false);
    expect(r.pages.has(256)).toBe(false);
  });
});
