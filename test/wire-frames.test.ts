import {
  decodeHello,
  MAX_SIBLINGS,
  decodeOffer,
  Feature,
  offers,
  encodeFrame,
  encodeJson,
  FrameParser,
  frameHeader,
  FrameType,
  MAX_FRAME_PAYLOAD,
  WireError,
} from '../src/wire/frames';

function collect(): { frames: [FrameType, string][]; parser: FrameParser } {
  const frames: [FrameType, string][] = [];
  const parser = new FrameParser((type, payload) => frames.push([type, payload.toString('latin1')]));
  return { frames, parser };
}

const sample = Buffer.concat([
  encodeJson(FrameType.Hello, { protocol: 1, site: 'a', vm: 'vm1', target: '127.0.0.1:4444' }),
  encodeFrame(FrameType.Literal, Buffer.from('QEVM\x00\x00\x00\x03', 'latin1')),
  encodeFrame(FrameType.TableRequest),
  encodeFrame(FrameType.Run, Buffer.alloc(20, 7)),
]);

describe('frames', () => {
  test('the same frames come out whatever the chunking', () => {
    const whole = collect();
    whole.parser.push(sample);
    expect(whole.frames.map(([t]) => t)).toEqual([FrameType.Hello, FrameType.Literal, FrameType.TableRequest, FrameType.Run]);
    for (let cut = 0; cut <= sample.length; cut++) {
      const split = collect();
      split.parser.push(sample.subarray(0, cut));
      split.parser.push(sample.subarray(cut));
      expect(split.frames).toEqual(whole.frames);
      expect(split.parser.atBoundary).toBe(true);
    }
    const bytewise = collect();
    for (const b of sample) bytewise.parser.push(Buffer.of(b));
    expect(bytewise.frames).toEqual(whole.frames);
  });

  test('pause stops delivery mid-chunk and resume picks up where it stopped', () => {
    const seen: FrameType[] = [];
    const parser: FrameParser = new FrameParser((type) => {
      seen.push(type);
      if (type === FrameType.Literal) parser.pause();
    });
    parser.push(sample);
    expect(seen).toEqual([FrameType.Hello, FrameType.Literal]);
    expect(parser.pending).toBe(5 + 5 + 20);
    parser.resume();
    expect(seen).toEqual([FrameType.Hello, FrameType.Literal, FrameType.TableRequest, FrameType.Run]);
  });

  test('an oversized frame is refused from its header, before its payload is buffered', () => {
    const { parser } = collect();
    const header = Buffer.alloc(5);
    header[0] = FrameType.Literal;
    header.writeUInt32BE(MAX_FRAME_PAYLOAD + 1, 1);
    expect(() => parser.push(header)).toThrow(WireError);
    expect(() => frameHeader(FrameType.Literal, MAX_FRAME_PAYLOAD + 1)).toThrow(WireError);
  });

  test('control messages are validated', () => {
    expect(decodeHello(Buffer.from(JSON.stringify({ protocol: 1, site: 's', vm: 'v', target: 'h:1' })))).toEqual({ protocol: 1, site: 's', vm: 'v', target: 'h:1' });
    expect(() => decodeHello(Buffer.from('{"protocol":1}'))).toThrow(/site/);
    expect(() => decodeHello(Buffer.from('not json'))).toThrow(WireError);
    expect(() => decodeOffer(Buffer.from(JSON.stringify({ site: 's', snapshotId: 5, layoutId: null, pageCount: 1, presentPages: 0 })))).toThrow(/snapshotId/);
    expect(() => decodeOffer(Buffer.from(JSON.stringify({ site: 's', snapshotId: null, layoutId: null, pageCount: -1, presentPages: 0 })))).toThrow(/pageCount/);
  });

  test('an Offer lists the features its receiver takes; an older receiver lists none', () => {
    const base = { site: 's', snapshotId: null, layoutId: null, pageCount: 1, presentPages: 0 };
    expect(offers(decodeOffer(Buffer.from(JSON.stringify(base))), Feature.Delta)).toBe(false);
    expect(offers(decodeOffer(Buffer.from(JSON.stringify({ ...base, features: ['delta'] }))), Feature.Delta)).toBe(true);
    expect(offers(decodeOffer(Buffer.from(JSON.stringify({ ...base, features: ['later-feature'] }))), Feature.Delta)).toBe(false);
    expect(() => decodeOffer(Buffer.from(JSON.stringify({ ...base, features: 'delta' })))).toThrow(/features/);
    expect(() => decodeOffer(Buffer.from(JSON.stringify({ ...base, features: [1] })))).toThrow(/features/);
  });

  test("a Hello's siblings and an Offer's are short lists of names; older peers send neither", () => {
    const hello = (more: object): Buffer => Buffer.from(JSON.stringify({ protocol: 4, site: 's', vm: 'v', target: 'h:1', ...more }));
    const sibling = { vm: 'w', snapshotId: 'snap' };
    expect(decodeHello(hello({})).siblings).toBeUndefined();
    expect(decodeHello(hello({ siblings: [sibling] })).siblings).toEqual([sibling]);
    expect(() => decodeHello(hello({ siblings: 'w' }))).toThrow(/field siblings/);
    expect(() => decodeHello(hello({ siblings: [{ vm: 'w' }] }))).toThrow(/field siblings/);
    expect(() => decodeHello(hello({ siblings: Array.from({ length: MAX_SIBLINGS + 1 }, () => sibling) }))).toThrow(/at most 4/);
    const offer = (more: object): Buffer => Buffer.from(JSON.stringify({ site: 's', snapshotId: null, layoutId: null, pageCount: 1, presentPages: 0, ...more }));
    expect(decodeOffer(offer({})).siblings).toBeUndefined();
    expect(decodeOffer(offer({ siblings: ['w'] })).siblings).toEqual(['w']);
    expect(() => decodeOffer(offer({ siblings: [1] }))).toThrow(/field siblings/);
    expect(() => decodeOffer(offer({ siblings: ['a', 'b', 'c', 'd', 'e'] }))).toThrow(/at most 4/);
  });

  test("a Hello's channel names its migration and a kind and index QEMU could use", () => {
    const hello = (more: object): Buffer => Buffer.from(JSON.stringify({ protocol: 5, site: 's', vm: 'v', target: 'h:1', ...more }));
    expect(decodeHello(hello({ migration: 'm', channel: { kind: 'multifd', index: 3 } })).channel).toEqual({ kind: 'multifd', index: 3 });
    expect(decodeHello(hello({ migration: 'm' })).channel).toBeUndefined();
    expect(() => decodeHello(hello({ channel: { kind: 'multifd', index: 3 } }))).toThrow(/without its migration/);
    expect(() => decodeHello(hello({ migration: 7 }))).toThrow(/migration/);
    for (const channel of [{ kind: 'multifd', index: 256 }, { kind: 'rdma', index: 0 }, { kind: 'preempt', index: 0.5 }, null]) {
      expect(() => decodeHello(hello({ migration: 'm', channel }))).toThrow(/field channel/);
    }
  });

  test("a multifd channel's Hello may say its channel is checked after every SYNC packet; an older sender's says nothing", () => {
    const hello = (more: object): Buffer => Buffer.from(JSON.stringify({ protocol: 5, site: 's', vm: 'v', target: 'h:1', migration: 'm', channel: { kind: 'multifd', index: 0 }, ...more }));
    expect(decodeHello(hello({ channelChecks: true })).channelChecks).toBe(true);
    expect(decodeHello(hello({})).channelChecks).toBeUndefined();
    expect(() => decodeHello(hello({ channelChecks: 'yes' }))).toThrow(/field channelChecks/);
  });
});

describe('streamed frames', () => {
  test('Literal payloads arrive as views, piece by piece, and join up to the payload whatever the chunking', () => {
    const literal = Buffer.from('0123456789abcdefghijklmnopqrstuvwxyz'.repeat(50));
    const input = Buffer.concat([encodeFrame(FrameType.Literal, literal), encodeFrame(FrameType.Run, Buffer.alloc(20, 9)), encodeFrame(FrameType.Literal, literal.subarray(0, 7))]);
    for (const size of [1, 2, 5, 13, 100, 4096]) {
      const pieces: Buffer[] = [];
      const others: FrameType[] = [];
      const parser = new FrameParser(
        (type, payload) => (type === FrameType.Literal ? pieces.push(Buffer.from(payload)) : others.push(type)),
        (type) => type === FrameType.Literal,
      );
      for (let at = 0; at < input.length; at += size) parser.push(input.subarray(at, at + size));
      expect(Buffer.concat(pieces).equals(Buffer.concat([literal, literal.subarray(0, 7)]))).toBe(true);
      expect(others).toEqual([FrameType.Run]);
      expect(parser.atBoundary).toBe(true);
      if (size >= 4096) expect(pieces.length).toBe(2);
    }
  });
});

describe('lookahead', () => {
  test('each wanted frame is looked at once, with its payload head, and its batch closed before it is delivered, whatever the chunking and pauses', () => {
    const delta = (n: number): Buffer => {
      const p = Buffer.alloc(40 + (n % 3) * 7, n);
      p.writeUInt32BE(n, 0);
      return encodeFrame(FrameType.Delta, p);
    };
    const literal = Buffer.alloc(5000, 0x4c);
    const frames: Buffer[] = [];
    for (let n = 0; n < 30; n++) {
      frames.push(delta(n));
      if (n % 4 === 0) frames.push(encodeFrame(FrameType.Literal, literal.subarray(0, 100 + n * 150)));
      if (n % 5 === 0) frames.push(encodeFrame(FrameType.Run, Buffer.alloc(3 + n, 1)));
      if (n % 7 === 0) frames.push(encodeFrame(FrameType.Delta, Buffer.alloc(2, 0xee))); // shorter than the head
    }
    const input = Buffer.concat(frames);
    for (const size of [1, 3, 7, 64, 999, 4096, input.length]) {
      for (const pauseEvery of [0, 3]) {
        const events: string[] = [];
        const looked = new Set<number>();
        let delivered = 0;
        const parser: FrameParser = new FrameParser(
          (type, payload) => {
            if (type !== FrameType.Delta) return;
            delivered++;
            if (payload.length >= 8) events.push(`deliver ${payload.readUInt32BE(0)}`);
            if (pauseEvery > 0 && delivered % pauseEvery === 0) parser.pause();
          },
          (type) => type === FrameType.Literal,
          {
            headBytes: 8,
            wants: (type) => type === FrameType.Delta,
            look: (type, buffer, length) => {
              const head = buffer.subarray(0, length);
              expect(type).toBe(FrameType.Delta);
              if (head.length < 8) return events.push(`short ${head.toString('hex')}`);
              const n = head.readUInt32BE(0);
              expect(head.subarray(4, 8).equals(Buffer.alloc(4, n))).toBe(true);
              expect(looked.has(n)).toBe(false);
              looked.add(n);
              events.push(`look ${n}`);
            },
            looked: () => events.push('batch'),
          },
        );
        for (let at = 0; at < input.length; at += size) {
          parser.push(input.subarray(at, at + size));
          while (parser.isPaused) parser.resume();
        }
        expect(parser.atBoundary).toBe(true);
        // Every Delta looked at before it is delivered; a batch closes each group of looks.
        const order = events.filter((e) => !e.startsWith('short'));
        for (let n = 0; n < 30; n++) {
          const l = order.indexOf(`look ${n}`);
          const d = order.indexOf(`deliver ${n}`);
          expect(l).toBeGreaterThanOrEqual(0);
          expect(order.indexOf('batch', l)).toBeGreaterThan(l);
          expect(d).toBeGreaterThan(order.indexOf('batch', l));
        }
        expect(events.filter((e) => e.startsWith('short'))).toEqual(Array(5).fill('short eeee'));
        expect(delivered).toBe(35);
      }
    }
  });
  test('a frame wanted whole is handed over whole, once, before it is delivered, whatever the chunking; one over the limit is refused', () => {
    const batch = (n: number): Buffer => encodeFrame(FrameType.CompressedFrames, Buffer.alloc(50 + n * 301, n));
    const frames: Buffer[] = [];
    for (let n = 0; n < 12; n++) {
      frames.push(batch(n));
      frames.push(encodeFrame(FrameType.Literal, Buffer.alloc(100 + n * 97, 0x4c)));
      if (n % 3 === 0) frames.push(encodeFrame(FrameType.CompressedFrames)); // an empty payload
    }
    const input = Buffer.concat(frames);
    for (const size of [1, 5, 100, 1000, input.length]) {
      const events: string[] = [];
      const parser = new FrameParser(
        (type, payload) => {
          if (type === FrameType.CompressedFrames) events.push(`deliver ${payload.length}`);
        },
        (type) => type === FrameType.Literal,
        {
          headBytes: 4,
          wants: () => false,
          look: () => undefined,
          looked: () => events.push('batch'),
          wantsWhole: (type) => type === FrameType.CompressedFrames,
          lookWhole: (type, payload) => {
            expect(type).toBe(FrameType.CompressedFrames);
            // Exactly the payload: n + 1 ... n bytes of n.
            const n = payload.length === 0 ? -1 : payload[0];
            if (n >= 0) expect(payload.equals(Buffer.alloc(50 + n * 301, n))).toBe(true);
            events.push(`whole ${payload.length}`);
            return n % 2 === 0;
          },
        },
      );
      for (let at = 0; at < input.length; at += size) parser.push(input.subarray(at, at + size));
      expect(parser.atBoundary).toBe(true);
      const lengths = [...Array(12).keys()].flatMap((n) => (n % 3 === 0 ? [50 + n * 301, 0] : [50 + n * 301]));
      expect(events.filter((e) => e.startsWith('whole'))).toEqual(lengths.map((l) => `whole ${l}`));
      expect(events.filter((e) => e.startsWith('deliver'))).toEqual(lengths.map((l) => `deliver ${l}`));
      for (const l of lengths) expect(events.indexOf(`whole ${l}`)).toBeLessThan(events.indexOf(`deliver ${l}`));
      // looked() follows the frames whose carried frames were looked at (even n), once per push.
      expect(events.includes('batch')).toBe(true);
    }
    // Larger than the parser takes: refused as it arrives, not copied.
    const small = new FrameParser(() => undefined, () => false, {
      headBytes: 0,
      wants: () => false,
      look: () => undefined,
      looked: () => undefined,
      wantsWhole: (type) => type === FrameType.CompressedFrames,
      lookWhole: () => {
        throw new Error('looked at');
      },
    });
    small.maxPayload = 100;
    const big = encodeFrame(FrameType.CompressedFrames, Buffer.alloc(101));
    expect(() => small.push(Buffer.concat([encodeFrame(FrameType.Literal, Buffer.alloc(3)), big]))).toThrow(/exceeds 100/);
  });
});
