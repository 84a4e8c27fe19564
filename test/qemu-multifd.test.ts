import { StreamError, StreamErrorCode } from '../src/qemu/errors';
import { MultifdFlag, MultifdParser, type MultifdRecord, MultifdRecordKind } from '../src/qemu/multifd';
import { multifdInit, multifdPacket, type MultifdFormat } from '../src/lab/harness/multifd-stream';

const PAGE = 4096;
const page = (byte: number): Buffer => Buffer.alloc(PAGE, byte);

/** What the parser saw, as plain values: one line per record. */
function parse(bytes: Buffer, cut: number): string[] {
  const seen: string[] = [];
  const parser = new MultifdParser((r: MultifdRecord) => {
    switch (r.kind) {
      case MultifdRecordKind.Init:
        seen.push(`init v${r.version} ch${r.channel}`);
        break;
      case MultifdRecordKind.Packet:
        seen.push(`packet #${r.packetNumber} ${r.block} n${r.normalPages} z${r.zeroPages} sync=${r.sync} @${r.streamOffset} [${Array.from(r.offsets.subarray(0, r.normalPages + r.zeroPages)).join(',')}]`);
        break;
      case MultifdRecordKind.Page:
        seen.push(`page ${r.index} 0x${r.offset.toString(16)} byte=${r.data[r.dataStart]}/${r.data[r.dataStart + PAGE - 1]} @${r.streamOffset}`);
        break;
      case MultifdRecordKind.ZeroPage:
        seen.push(`zero ${r.index} 0x${r.offset.toString(16)}`);
        break;
      case MultifdRecordKind.PacketEnd:
        seen.push(`end sync=${r.sync} @${r.streamOffset}`);
        break;
      case MultifdRecordKind.Fallback:
        seen.push(`fallback ${r.code} @${r.streamOffset}`);
        break;
    }
  });
  for (let at = 0; at < bytes.length; at += cut) parser.push(bytes.subarray(at, at + cut));
  parser.end();
  return seen;
}

function channel(format: MultifdFormat): Buffer {
  return Buffer.concat([
    multifdInit(3),
    multifdPacket({ format, packetNumber: 7, block: 'pc.ram', pages: [{ offset: 0x2000, data: page(1) }, { offset: 0x1000, data: page(2) }], zeroOffsets: format === 'qemu-10.0' ? [0x5000] : [] }),
    multifdPacket({ format, packetNumber: 9, block: '', pages: [], sync: true }),
  ]);
}

describe('MultifdParser', () => {
  test.each<[MultifdFormat, string[]]>([
    [
      'qemu-10.0',
      [
        'init v1 ch3',
        'packet #7 pc.ram n2 z1 sync=false @64 [8192,4096,20480]',
        'page 0 0x2000 byte=1/1 @1408',
        'page 1 0x1000 byte=2/2 @5504',
        'zero 2 0x5000',
        'end sync=false @9600',
        'packet #9  n0 z0 sync=true @9600 []',
        'end sync=true @10944',
      ],
    ],
    [
      'qemu-7.2',
      [
        'init v1 ch3',
        'packet #7 pc.ram n2 z0 sync=false @64 [8192,4096]',
        'page 0 0x2000 byte=1/1 @1408',
        'page 1 0x1000 byte=2/2 @5504',
        'end sync=false @9600',
        'packet #9  n0 z0 sync=true @9600 []',
        'end sync=true @10944',
      ],
    ],
  ])('reads a %s channel the same whichever way it is cut', (format, expected) => {
    const bytes = channel(format);
    for (const cut of [1, 7, 320, 4096, bytes.length]) expect(parse(bytes, cut)).toEqual(expected);
  });

  test.each<[string, Buffer, string]>([
    ['a compressed packet', multifdPacket({ format: 'qemu-10.0', packetNumber: 1, block: 'pc.ram', pages: [], extraFlags: 2 << 1 }), 'multifd-compression'],
    ['a device-state packet', multifdPacket({ format: 'qemu-10.0', packetNumber: 1, block: 'pc.ram', pages: [], extraFlags: MultifdFlag.DeviceState }), 'multifd-flags'],
    ['a newer packet version', multifdPacket({ format: 'qemu-10.0', packetNumber: 1, block: 'pc.ram', pages: [], version: 2 }), 'multifd-version'],
  ])('falls back at %s, and reads nothing after it', (_, packet, code) => {
    const bytes = Buffer.concat([multifdInit(0), packet, Buffer.from('anything at all')]);
    expect(parse(bytes, 100)).toEqual(['init v1 ch0', `fallback ${code} @64`]);
  });

  test('falls back on an init packet of another version', () => {
    expect(parse(Buffer.concat([multifdInit(1, 2), Buffer.alloc(500)]), 64)).toEqual(['init v2 ch1', 'fallback multifd-version @0']);
  });

  function rejection(bytes: Buffer): StreamErrorCode {
    try {
      parse(bytes, 1000);
    } catch (err) {
      if (err instanceof StreamError) return err.code;
      throw err;
    }
    throw new Error('accepted');
  }

  test('bounds every length field before gathering for it', () => {
    const good = multifdPacket({ format: 'qemu-10.0', packetNumber: 1, block: 'pc.ram', pages: [{ offset: 0, data: page(1) }] });
    const mutate = (at: number, value: number): Buffer => {
      const bad = Buffer.concat([multifdInit(0), good]);
      bad.writeUInt32BE(value, 64 + at);
      return bad;
    };
    expect(rejection(mutate(12, 0x10000))).toBe(StreamErrorCode.AbsurdLength); // pages_alloc
    expect(rejection(mutate(12, 129))).toBe(StreamErrorCode.AbsurdLength);
    expect(rejection(mutate(12, 0))).toBe(StreamErrorCode.Malformed); // normal > alloc
    expect(rejection(mutate(16, 129))).toBe(StreamErrorCode.Malformed);
    expect(rejection(mutate(32, 128))).toBe(StreamErrorCode.Malformed); // normal + zero > alloc
    expect(rejection(mutate(20, 4095))).toBe(StreamErrorCode.Malformed); // next_packet_size
    expect(rejection(mutate(320 + 4, 0x800))).toBe(StreamErrorCode.PageOutOfRange); // unaligned offset
    expect(rejection(mutate(320, 0x40000))).toBe(StreamErrorCode.PageOutOfRange); // beyond 1 PiB
    expect(rejection(mutate(0, 0x11223345))).toBe(StreamErrorCode.BadMagic);
    expect(rejection(Buffer.concat([multifdInit(0), good.subarray(0, good.length - 1)]))).toBe(StreamErrorCode.Truncated);
  });

  test('stops at a pause and reads on from there', () => {
    const bytes = Buffer.concat([channel('qemu-10.0'), channel('qemu-10.0').subarray(64)]);
    const ends: number[] = [];
    const parser = new MultifdParser((r) => {
      if (r.kind !== MultifdRecordKind.PacketEnd) return;
      ends.push(r.streamOffset);
      if (r.sync) parser.pause();
    });
    parser.push(bytes);
    expect(parser.isPaused).toBe(true);
    expect(parser.offset).toBe(10944);
    parser.resume();
    expect(ends).toEqual([9600, 10944, 20480, 21824]);
    expect(parser.offset).toBe(bytes.length);
  });
});
