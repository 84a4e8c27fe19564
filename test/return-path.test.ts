import {
  RETURN_PATH_MAX_BODY,
  ReturnPathError,
  ReturnPathErrorCode,
  ReturnPathMessage,
  ReturnPathParser,
  type ReturnPathRecord,
} from '../src/qemu/return-path';

function message(type: number, body: Buffer): Buffer {
  const header = Buffer.alloc(4);
  header.writeUInt16BE(type, 0);
  header.writeUInt16BE(body.length, 2);
  return Buffer.concat([header, body]);
}

function be32(value: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(value);
  return b;
}

function reqPages(start: bigint, length: number, block?: string): Buffer {
  const b = Buffer.alloc(12 + (block === undefined ? 0 : 1 + block.length));
  b.writeBigUInt64BE(start, 0);
  b.writeUInt32BE(length, 8);
  if (block !== undefined) {
    b[12] = block.length;
    b.write(block, 13, 'latin1');
  }
  return b;
}

/** Every type a parser follows, once; SHUT last since nothing may follow it. */
const everyType = Buffer.concat([
  message(ReturnPathMessage.Pong, be32(0xdeadbeef)),
  message(ReturnPathMessage.SwitchoverAck, Buffer.alloc(0)),
  message(ReturnPathMessage.ReqPagesId, reqPages(0x1_0000_2000n, 4096, 'pc.ram')),
  message(ReturnPathMessage.ReqPages, reqPages(0x3000n, 8192)),
  message(ReturnPathMessage.ResumeAck, be32(1)),
  message(ReturnPathMessage.Shut, be32(0)),
]);

/** What a test compares: the fields, with the body (a view into the parser's buffer) copied out. */
function plain(m: ReturnPathRecord): Record<string, unknown> {
  return { ...m, body: Buffer.from(m.body).toString('hex') };
}

function parseIn(chunks: Buffer[]): { messages: Record<string, unknown>[]; parser: ReturnPathParser } {
  const messages: Record<string, unknown>[] = [];
  const parser = new ReturnPathParser((m) => messages.push(plain(m)));
  for (const chunk of chunks) parser.push(chunk);
  parser.end();
  return { messages, parser };
}

function failure(bytes: Buffer, end = false): ReturnPathError {
  const parser = new ReturnPathParser(() => undefined);
  try {
    parser.push(bytes);
    if (end) parser.end();
  } catch (err) {
    if (err instanceof ReturnPathError) return err;
    throw err;
  }
  throw new Error('the parser accepted it');
}

describe('ReturnPathParser', () => {
  test('parses every message type with its fields', () => {
    const { messages, parser } = parseIn([everyType]);
    expect(messages).toEqual([
      { type: ReturnPathMessage.Pong, value: 0xdeadbeef, body: 'deadbeef', streamOffset: 0 },
      { type: ReturnPathMessage.SwitchoverAck, body: '', streamOffset: 8 },
      { type: ReturnPathMessage.ReqPagesId, start: 0x1_0000_2000n, length: 4096, block: 'pc.ram', body: reqPages(0x1_0000_2000n, 4096, 'pc.ram').toString('hex'), streamOffset: 12 },
      { type: ReturnPathMessage.ReqPages, start: 0x3000n, length: 8192, body: reqPages(0x3000n, 8192).toString('hex'), streamOffset: 35 },
      { type: ReturnPathMessage.ResumeAck, value: 1, body: '00000001', streamOffset: 51 },
      { type: ReturnPathMessage.Shut, value: 0, body: '00000000', streamOffset: 59 },
    ]);
    expect(parser.shutValue).toBe(0);
    expect(parser.offset).toBe(everyType.length);
  });

  test('the same messages come out when the input is split at every byte, or fed a byte at a time', () => {
    const whole = parseIn([everyType]).messages;
    for (let cut = 0; cut <= everyType.length; cut++) {
      expect(parseIn([everyType.subarray(0, cut), everyType.subarray(cut)]).messages).toEqual(whole);
    }
    expect(parseIn([...everyType].map((b) => Buffer.from([b]))).messages).toEqual(whole);
  });

  test('SHUT carries its value; nothing has been shut before it', () => {
    const parser = new ReturnPathParser(() => undefined);
    parser.push(message(ReturnPathMessage.Pong, be32(1)));
    expect(parser.shutValue).toBeNull();
    parser.push(message(ReturnPathMessage.Shut, be32(1)));
    expect(parser.shutValue).toBe(1);
  });

  test('a REQ_PAGES_ID name of the most bytes a body allows', () => {
    const name = 'x'.repeat(255);
    const { messages } = parseIn([message(ReturnPathMessage.ReqPagesId, reqPages(0n, 1, name))]);
    expect(messages[0]).toMatchObject({ block: name });
  });

  test.each([
    ['type 0 (INVALID)', message(0, Buffer.alloc(0)), ReturnPathErrorCode.UnknownType],
    ['type 8 (beyond SWITCHOVER_ACK)', message(8, be32(0)), ReturnPathErrorCode.UnknownType],
    ['type 0xffff', message(0xffff, Buffer.alloc(0)), ReturnPathErrorCode.UnknownType],
    ['RECV_BITMAP (its bitmap is unframed)', message(ReturnPathMessage.RecvBitmap, Buffer.from('\x06pc.ram', 'latin1')), ReturnPathErrorCode.Unsupported],
    ['SHUT of 3 bytes', message(ReturnPathMessage.Shut, Buffer.alloc(3)), ReturnPathErrorCode.BadLength],
    ['SHUT of 5 bytes', message(ReturnPathMessage.Shut, Buffer.alloc(5)), ReturnPathErrorCode.BadLength],
    ['PONG of 0 bytes', message(ReturnPathMessage.Pong, Buffer.alloc(0)), ReturnPathErrorCode.BadLength],
    ['REQ_PAGES of 13 bytes', message(ReturnPathMessage.ReqPages, Buffer.alloc(13)), ReturnPathErrorCode.BadLength],
    ['RESUME_ACK of 8 bytes', message(ReturnPathMessage.ResumeAck, Buffer.alloc(8)), ReturnPathErrorCode.BadLength],
    ['SWITCHOVER_ACK with a body', message(ReturnPathMessage.SwitchoverAck, Buffer.alloc(1)), ReturnPathErrorCode.BadLength],
    ['REQ_PAGES_ID shorter than its fixed part', message(ReturnPathMessage.ReqPagesId, Buffer.alloc(12)), ReturnPathErrorCode.BadLength],
    ['REQ_PAGES_ID whose name is longer than the body', message(ReturnPathMessage.ReqPagesId, Buffer.concat([reqPages(0n, 1), Buffer.from([5, 0x61])])), ReturnPathErrorCode.BadLength],
    ['REQ_PAGES_ID with bytes after its name', message(ReturnPathMessage.ReqPagesId, Buffer.concat([reqPages(0n, 1, 'a'), Buffer.from([0])])), ReturnPathErrorCode.BadLength],
    ['a body over 512 bytes', message(ReturnPathMessage.ReqPagesId, Buffer.alloc(RETURN_PATH_MAX_BODY + 1)), ReturnPathErrorCode.BadLength],
    ['bytes after SHUT', Buffer.concat([message(ReturnPathMessage.Shut, be32(0)), message(ReturnPathMessage.Pong, be32(1))]), ReturnPathErrorCode.AfterShut],
    ['one byte after SHUT', Buffer.concat([message(ReturnPathMessage.Shut, be32(0)), Buffer.from([0])]), ReturnPathErrorCode.AfterShut],
  ])('rejects %s', (_what, bytes, code) => {
    const err = failure(bytes);
    expect(err.code).toBe(code);
  });

  test('a rejection says where the bad message starts, and the parser then refuses everything', () => {
    const good = message(ReturnPathMessage.Pong, be32(7));
    const parser = new ReturnPathParser(() => undefined);
    let caught: unknown = null;
    try {
      parser.push(Buffer.concat([good, message(9, Buffer.alloc(0))]));
    } catch (err) {
      caught = err;
    }
    expect(caught).toBeInstanceOf(ReturnPathError);
    expect((caught as ReturnPathError).offset).toBe(good.length);
    expect(() => parser.push(good)).toThrow(ReturnPathError);
    expect(() => parser.end()).toThrow(ReturnPathError);
  });

  test('the input ending inside a message, at every byte of it, is truncation', () => {
    const shut = message(ReturnPathMessage.Shut, be32(0));
    for (let cut = 1; cut < shut.length; cut++) {
      const err = failure(shut.subarray(0, cut), true);
      expect(err.code).toBe(ReturnPathErrorCode.Truncated);
      expect(err.offset).toBe(0);
    }
    expect(() => parseIn([shut])).not.toThrow();
    expect(() => parseIn([])).not.toThrow();
  });

  test('a malformed header is rejected as soon as it is whole, before its body arrives', () => {
    const parser = new ReturnPathParser(() => undefined);
    expect(() => parser.push(Buffer.from([0, ReturnPathMessage.Shut, 0x40, 0]))).toThrow(expect.objectContaining({ code: ReturnPathErrorCode.BadLength }));
  });
});
