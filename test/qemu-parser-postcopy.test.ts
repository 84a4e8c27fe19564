/**
 * Current QEMU's main-channel commands and postcopy, in the parser and the codec: SWITCHOVER_START
 * (machine types 10.0+), POSTCOPY_ADVISE (postcopy-ram allowed), and a stream switched to postcopy
 * (RAM_DISCARD, the PACKAGED device state, RAM after it, EOF with no vmdesc) are parsed, not relayed
 * verbatim; the codec holds the package until a Seal covers it and passes postcopy RAM on at once.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { SectionType, VmCommand } from '../src/qemu/constants';
import { StreamError, StreamErrorCode } from '../src/qemu/errors';
import { StreamParser } from '../src/qemu/parser';
import { RecordKind, type StreamRecord } from '../src/qemu/records';
import { StreamWriter } from '../src/qemu/writer';
import { StreamDecoder } from '../src/proxy/decoder';
import { StreamEncoder } from '../src/proxy/encoder';
import { PageStore } from '../src/store';
import { dirty, guestMemory, migrationStream, type StreamShape } from '../src/lab/harness/migration-stream';

interface Parsed {
  records: StreamRecord[];
  parser: StreamParser;
  rewritten: Buffer;
}

/**
 * Parses `stream` in chunks of `chunk` bytes, keeping a copy of every record and rewriting it; `finish`:
 * then tells the parser the input has ended, if it does not know yet.
 */
function parse(stream: Buffer, chunk: number, finish = false): Parsed {
  const records: StreamRecord[] = [];
  const out: Buffer[] = [];
  const writer = new StreamWriter((b) => out.push(Buffer.from(b)));
  const parser = new StreamParser((r) => {
    writer.write(r);
    records.push(r.kind === RecordKind.RamPage || r.kind === RecordKind.RamZero ? { ...r, data: Buffer.from(r.data) } : { ...r });
  });
  for (let at = 0; at < stream.length; at += chunk) parser.push(stream.subarray(at, at + chunk));
  if (finish && !parser.ended) parser.end();
  writer.flush();
  return { records, parser, rewritten: Buffer.concat(out) };
}

const memory = guestMemory([['pc.ram', 300]], 11);
const later = [dirty(memory, 0.2, 1), dirty(memory, 0.1, 2)];
const shapes: Array<[string, StreamShape]> = [
  ['SWITCHOVER_START (machine pc-i440fx-10.0)', { machine: 'pc-i440fx-10.0', switchoverStart: true }],
  ['postcopy-ram allowed, never started', { machine: 'pc-i440fx-10.0', switchoverStart: true, postcopyAdvise: true }],
  ['switched to postcopy after the bulk round', { machine: 'pc-i440fx-10.0', switchoverStart: true, postcopyAt: 0 }],
  ['switched to postcopy on its last round', { postcopyAt: 1 }],
];

describe.each(shapes)('a stream with %s', (_name, shape) => {
  const stream = migrationStream(memory, later, shape);
  const pageRecords = (p: Parsed): number => p.records.filter((r) => r.kind === RecordKind.RamPage || r.kind === RecordKind.RamZero).length;
  const sent = memory.pages.length + later[0].length + later[1].length;

  test.each([1, 7, 4096, 65536, stream.length])('is parsed to its end without a fallback, in chunks of %i bytes, and rewritten byte for byte', (chunk) => {
    // With a tiny vmdesc the footer lookahead of the last device section can wait for the input's end.
    const p = parse(stream, chunk, true);
    expect(p.parser.fallbackReason).toBeNull();
    expect(p.records.some((r) => r.kind === RecordKind.Fallback || r.kind === RecordKind.Verbatim)).toBe(false);
    expect(p.parser.ended).toBe(true);
    expect(pageRecords(p)).toBe(sent);
    expect(p.rewritten.equals(stream)).toBe(true);
  });

  test('says where the postcopy package ends, just past its RUN command', () => {
    const p = parse(stream, 4096);
    const ends = p.records.filter((r) => r.kind === RecordKind.PackageEnd);
    if (shape.postcopyAt === undefined) {
      expect(ends).toHaveLength(0);
      return;
    }
    expect(ends).toHaveLength(1);
    const run = p.records.find((r) => r.kind === RecordKind.Command && r.command === VmCommand.PostcopyRun);
    expect(run?.streamOffset).toBe(ends[0].streamOffset - 5);
    // RAM goes on after the package, and the stream ends at EOF with no vmdesc.
    const after = p.records.slice(p.records.indexOf(ends[0]) + 1);
    expect(after.some((r) => r.kind === RecordKind.RamPage)).toBe(true);
    expect(after[after.length - 1].kind).toBe(RecordKind.Eof);
    expect(p.parser.framing.vmDescription).toBe(false);
    // Postcopy's end is known at EOF, without the input ending (a source on a return path does not
    // close), however the stream was cut.
    expect(parse(stream, 1).parser.ended).toBe(true);
  });
});

describe('postcopy packages the parser refuses', () => {
  const stream = migrationStream(memory, later, { postcopyAt: 0 });
  const packagedAt = (): number => {
    const p = parse(stream, stream.length);
    const cmd = p.records.find((r) => r.kind === RecordKind.Command && r.command === VmCommand.Packaged);
    if (!cmd) throw new Error('no PACKAGED command');
    return cmd.streamOffset;
  };

  test('a package whose length cuts a record is malformed', () => {
    const bad = Buffer.from(stream);
    const at = packagedAt() + 5;
    bad.writeUInt32BE(bad.readUInt32BE(at) - 3, at);
    let error: unknown = null;
    try {
      parse(bad, 4096);
    } catch (err) {
      error = err;
    }
    expect(error).toBeInstanceOf(StreamError);
    expect((error as StreamError).code).toBe(StreamErrorCode.Malformed);
  });

  test('a package larger than QEMU ever sends is relayed verbatim, and says why', () => {
    const bad = Buffer.from(stream);
    bad.writeUInt32BE(0x0200_0000, packagedAt() + 5);
    const p = parse(bad, 4096);
    const fallback = p.records.find((r) => r.kind === RecordKind.Fallback);
    expect(fallback).toMatchObject({ code: 'command', streamOffset: packagedAt() });
    expect(p.rewritten.equals(bad)).toBe(true);
  });

  test('POSTCOPY_RUN outside a package, and ENABLE_COLO, are relayed verbatim with code "command"', () => {
    for (const code of [VmCommand.PostcopyRun, VmCommand.EnableColo]) {
      const bad = Buffer.from(stream);
      bad.writeUInt16BE(code, packagedAt() + 1);
      bad.writeUInt16BE(0, packagedAt() + 3);
      const p = parse(bad, 4096);
      expect(p.records.find((r) => r.kind === RecordKind.Fallback)).toMatchObject({ code: 'command', streamOffset: packagedAt() });
      expect(p.rewritten.equals(bad)).toBe(true);
    }
  });

  test('EOF inside a package is malformed', () => {
    // A package of one byte: the EOF that ends the stream lands inside it.
    const p = parse(stream, stream.length);
    const eof = p.records.filter((r) => r.kind === RecordKind.Eof).pop();
    const end = p.records.find((r) => r.kind === RecordKind.PackageEnd);
    if (!eof || !end) throw new Error('no EOF or package end');
    const bad = Buffer.concat([stream.subarray(0, packagedAt()), Buffer.of(SectionType.Command, 0, VmCommand.Packaged, 0, 4, 0, 0, 0, 2), Buffer.of(SectionType.Eof, SectionType.Eof)]);
    expect(() => parse(bad, 4096)).toThrow(/EOF inside a postcopy package/);
  });
});

describe('the codec over a postcopy stream', () => {
  let root = '';
  beforeEach(() => {
    root = fs.mkdtempSync(path.join(os.tmpdir(), 'bfmig-postcopy-'));
  });
  afterEach(() => fs.rmSync(root, { recursive: true, force: true }));

  test('holds the package until a Seal covers it, then passes postcopy RAM on as it is rebuilt; the stream is rebuilt byte for byte and reused', () => {
    const first = migrationStream(memory, later, { postcopyAt: 0 });
    const second = migrationStream(memory, [dirty(memory, 0.05, 3)], { postcopyAt: 0 });
    const sender = PageStore.open(path.join(root, 'a'), 'vm');
    const receiver = PageStore.open(path.join(root, 'b'), 'vm');
    const results: Array<{ reused: number; rebuilt: Buffer }> = [];
    for (const [n, stream] of [first, second].entries()) {
      const out: Buffer[] = [];
      const decoder = new StreamDecoder((b) => out.push(Buffer.from(b)), receiver);
      const encoder = new StreamEncoder({ literal: (b) => decoder.literal(Buffer.from(b)), run: (p) => decoder.run(p) }, sender, () => {
        if (n > 0) encoder.reference = sender.digests;
      });
      const packageEnd = parse(stream, stream.length).records.find((r) => r.kind === RecordKind.PackageEnd)?.streamOffset ?? -1;
      const packageStart = parse(stream, stream.length).records.find((r) => r.kind === RecordKind.Command && r.command === VmCommand.Packaged)?.streamOffset ?? -1;
      let sealed = false;
      let deliveredAtSeal = -1;
      for (let at = 0; at < stream.length; at += 1000) {
        encoder.push(stream.subarray(at, at + 1000));
        const delivered = (): number => out.reduce((s, b) => s + b.length, 0);
        if (!sealed) {
          // Nothing of the package reaches the destination before its check.
          expect(delivered()).toBeLessThanOrEqual(packageStart);
          if (encoder.sealPoint >= 0) {
            expect(encoder.sealPoint).toBe(packageEnd);
            decoder.seal(encoder.sentBytes, encoder.streamCheck);
            sealed = true;
            deliveredAtSeal = delivered();
            expect(deliveredAtSeal).toBe(encoder.sentBytes);
          }
        } else {
          // After it, every byte the sender has sent is at the destination: the guest runs there.
          expect(delivered()).toBe(encoder.sentBytes);
        }
      }
      expect(sealed).toBe(true);
      expect(deliveredAtSeal).toBeGreaterThanOrEqual(packageEnd);
      encoder.end();
      decoder.end(encoder.sentBytes, encoder.streamCheck);
      const rebuilt = Buffer.concat(out);
      expect(rebuilt.equals(stream)).toBe(true);
      results.push({ reused: encoder.counts.pagesReused, rebuilt });
      sender.commit(`s${n}`);
      receiver.commit(`s${n}`);
    }
    expect(results[0].reused).toBe(0);
    // The second migration reuses every page that did not change since the first: pages sent in
    // precopy and in postcopy alike.
    expect(results[1].reused).toBeGreaterThan(memory.pages.filter((p) => !p.every((v) => v === 0)).length * 0.8);
    sender.close();
    receiver.close();
  });
});
