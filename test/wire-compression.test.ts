/**
 * zstd compression of Literal bytes (wire/compression.ts) without sockets: what LiteralFrames writes is
 * parsed by a FrameParser and inflated by a LiteralInflater, as the receiving gateway does, and must
 * give back the exact bytes; frames never grow; the negotiation; hostile Compressed frames; and the
 * adaptive policy (compression-policy.ts) from the observations it is given.
 */
import { randomBytes } from 'node:crypto';
import { BatchesAhead, chooseCompression, COMPRESSED_HEADER_BYTES, helloCompression, LiteralFrames, LiteralInflater, MAX_BATCH_BYTES, offeredCompression, ZSTD } from '../src/wire/compression';
import { BUSY_LOOP_SHARE, CompressionPolicy, DRAINED_BYTES, MAX_REJOIN, MAX_SKIP, SPARSE_SHARE, SWING_BYTES, WORTH_FACTOR } from '../src/wire/compression-policy';
import { carriedInBatches, checkCarriedFrames, FRAME_HEADER_BYTES, FrameParser, frameHeader, FrameType, WireError } from '../src/wire/frames';

/** Text-like bytes: words from a small vocabulary, as logs and source files are. */
function textBytes(length: number, seed: number): Buffer {
  const words = ['migration', 'page', 'guest', 'kernel', 'memory', 'the', 'of', 'a', 'store', 'digest', '\n', 'static', 'int', '{', '}', ';'];
  const out = Buffer.alloc(length);
  let x = seed >>> 0 || 1;
  let at = 0;
  while (at < length) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    at += out.write(`${words[x >>> 28]} `, at);
  }
  return out;
}

interface Wire {
  bytes: number;
  frames: Array<{ type: FrameType; length: number }>;
  /** The Literal bytes the receiving side got back, in order. */
  received: Buffer[];
  inflater: LiteralInflater;
  parser: FrameParser;
}

/** A receiving side as ReceiveSession is one: Literal frames restart the inflater, Compressed frames inflate. */
function receiver(): Wire {
  const inflater = new LiteralInflater();
  const wire: Wire = { bytes: 0, frames: [], received: [], inflater, parser: undefined as unknown as FrameParser };
  wire.parser = new FrameParser((type, payload) => {
    wire.frames.push({ type, length: payload.length });
    if (type === FrameType.Literal) {
      inflater.raw();
      wire.received.push(Buffer.from(payload));
    } else if (type === FrameType.Compressed) {
      wire.received.push(inflater.inflate(payload));
    } else {
      throw new Error(`unexpected frame ${type}`);
    }
  });
  return wire;
}

function sender(wire: Wire, compression: typeof ZSTD | null): LiteralFrames {
  return new LiteralFrames((bytes) => {
    wire.bytes += bytes.length;
    // A copy: the frames are parsed as the peer would, from bytes of their own.
    wire.parser.push(Buffer.from(bytes));
  }, compression);
}

describe('Literal bytes compressed across the WAN', () => {
  test('a mix of text, zero, random and repeated batches comes back byte-identical, and smaller', () => {
    const wire = receiver();
    const frames = sender(wire, ZSTD);
    const plain = receiver();
    const uncompressed = sender(plain, null);
    const sent: Buffer[] = [];
    const text = textBytes(3 * MAX_BATCH_BYTES + 1234, 5);
    const pieces = [
      text.subarray(0, 4096),
      text.subarray(4096, 100_000),
      Buffer.alloc(70_000),
      randomBytes(300_000), // larger than a batch: split, goes raw, restarts the stream
      text.subarray(100_000), // larger than a batch too, compressed after the restart
      text.subarray(5000, 9000), // repeats earlier text: within the window
      randomBytes(10),
    ];
    for (const [i, piece] of pieces.entries()) {
      frames.literal(piece);
      uncompressed.literal(piece);
      sent.push(piece);
      if (i % 2 === 1) frames.flush(); // as a Run or the end of a source chunk would
    }
    frames.flush();
    expect(Buffer.concat(wire.received).equals(Buffer.concat(sent))).toBe(true);
    const types = new Set(wire.frames.map((f) => f.type));
    expect(types).toEqual(new Set([FrameType.Literal, FrameType.Compressed]));
    expect(wire.frames.every((f) => f.type !== FrameType.Compressed || f.length <= MAX_BATCH_BYTES + COMPRESSED_HEADER_BYTES)).toBe(true);
    expect(wire.bytes).toBeLessThan(plain.bytes * 0.6);
    expect(frames.savedBytes).toBe(wire.inflater.savedBytes);
    expect(frames.savedBytes).toBeGreaterThan(0);
  });

  test('incompressible bytes cost exactly what they cost uncompressed', () => {
    const wire = receiver();
    const frames = sender(wire, ZSTD);
    const plain = receiver();
    const uncompressed = sender(plain, null);
    for (let i = 0; i < 200; i++) {
      const piece = randomBytes(1000 + ((i * 7919) % 60_000));
      frames.literal(piece);
      uncompressed.literal(piece);
      frames.flush();
    }
    expect(wire.bytes).toBe(plain.bytes);
    expect(wire.frames.every((f) => f.type === FrameType.Literal)).toBe(true);
    expect(frames.savedBytes).toBe(0);
  });

  test('without compression every Literal leaves at once, as a Literal frame', () => {
    const wire = receiver();
    const frames = sender(wire, null);
    frames.literal(textBytes(10_000, 3));
    expect(wire.frames).toEqual([{ type: FrameType.Literal, length: 10_000 }]);
    expect(frames.compressing).toBe(false);
  });
});

/** A stream frame as the receiving session is handed it: its type, and a copy of its payload. */
interface Delivered {
  type: FrameType;
  payload: Buffer;
}

/**
 * A receiving side as ReceiveSession and ChannelReceiver are with a sender that batches whole frames:
 * the parser's lookahead hands each CompressedFrames batch to a BatchesAhead as it arrives (inflated
 * there, its Runs looked at), one declaring 0 bytes restarts the inflater, and once one has come a
 * Literal frame outside a batch no longer does. `pauseOn`: the handler pauses at each carried frame of
 * this type, as a slow destination would, and the test resumes it. `lookedRuns`: the carried Runs'
 * payloads, as the lookahead saw them (the first of them shown when the batch arrived or was delivered).
 */
function framedReceiver(pauseOn?: FrameType, onFrame?: (type: FrameType, payload: Buffer, carried: boolean) => void): { wire: Wire; delivered: Delivered[]; lookedRuns: string[] } {
  const inflater = new LiteralInflater();
  const delivered: Delivered[] = [];
  const lookedRuns: string[] = [];
  const wire: Wire = { bytes: 0, frames: [], received: [], inflater, parser: undefined as unknown as FrameParser };
  const batches = new BatchesAhead(() => inflater);
  const look = (type: FrameType, batch: Buffer, at: number, length: number): boolean => {
    if (type !== FrameType.Run) return false;
    lookedRuns.push(batch.toString('hex', at, at + length));
    return true;
  };
  wire.parser = new FrameParser(
    (type, payload, carried) => {
      onFrame?.(type, payload, carried);
      if (!carried) wire.frames.push({ type, length: payload.length });
      if (type === FrameType.Literal && !carried) inflater.rawLiteral();
      if (type === FrameType.CompressedFrames) {
        batches.nest(inflater, payload, wire.parser, look);
        return;
      }
      if (!carriedInBatches(type)) throw new Error(`unexpected frame ${type}`);
      delivered.push({ type, payload: Buffer.from(payload) });
      if (carried && type === pauseOn) wire.parser.pause();
    },
    (type) => type === FrameType.Literal,
    {
      headBytes: 0,
      wants: () => false,
      look: () => undefined,
      looked: () => undefined,
      wantsWhole: (type) => type === FrameType.CompressedFrames,
      lookWhole: (_type, payload) => batches.arrived(payload, look),
    },
  );
  return { wire, delivered, lookedRuns };
}

/** What a sequence of frames comes to: its Literal bytes joined between the other frames. */
function joinLiterals(frames: Delivered[]): Delivered[] {
  const out: Delivered[] = [];
  let literal: Buffer[] = [];
  const endLiteral = (): void => {
    if (literal.length > 0) out.push({ type: FrameType.Literal, payload: Buffer.concat(literal) });
    literal = [];
  };
  for (const f of frames) {
    if (f.type === FrameType.Literal) {
      if (f.payload.length > 0) literal.push(f.payload);
      continue;
    }
    endLiteral();
    out.push(f);
  }
  endLiteral();
  return out;
}

/** Whether two sequences of frames carry the same frames, byte for byte (Literal frames split anywhere). */
function sameFrames(a: Delivered[], b: Delivered[]): boolean {
  const x = joinLiterals(a);
  const y = joinLiterals(b);
  return x.length === y.length && x.every((f, i) => f.type === y[i].type && f.payload.equals(y[i].payload));
}

describe('whole frames in the batches (compressed-frames)', () => {
  /** A kernel's pages as a sender sees them: a page that crosses, then a Run or a Delta, over and over. */
  function alternating(pages: number, seed: number): Delivered[] {
    const text = textBytes(pages * 4096, seed);
    const out: Delivered[] = [];
    for (let i = 0; i < pages; i++) {
      out.push({ type: FrameType.Literal, payload: text.subarray(i * 4096, (i + 1) * 4096) });
      const other = i % 3 === 0 ? FrameType.Delta : i % 3 === 1 ? FrameType.Run : FrameType.SiblingDelta;
      out.push({ type: other, payload: randomBytes(40 + (i % 50)) });
    }
    return out;
  }

  function send(frames: LiteralFrames, sequence: Delivered[], flushEvery = 16): void {
    sequence.forEach((f, i) => {
      if (f.type === FrameType.Literal) frames.literal(f.payload);
      else frames.frame(frameHeader(f.type, f.payload.length), f.payload);
      if (i % flushEvery === flushEvery - 1) frames.flush(); // the end of a source chunk
    });
    frames.flush();
  }

  test('Literal bytes, Runs and Deltas come back in their order, byte for byte, in batches the Runs and Deltas do not cut', () => {
    const { wire, delivered } = framedReceiver();
    const frames = sender(wire, ZSTD);
    frames.carryFrames();
    expect(frames.carriesFrames).toBe(true);
    const sequence = alternating(600, 7);
    send(frames, sequence, 64);
    expect(sameFrames(delivered, sequence)).toBe(true);
    // 1,200 frames crossed in a batch per 64 (the chunks), not one per page: and each batch is smaller.
    expect(wire.frames.every((f) => f.type === FrameType.CompressedFrames)).toBe(true);
    expect(wire.frames.length).toBe(Math.ceil(sequence.length / 64));
    const rawBytes = sequence.reduce((n, f) => n + FRAME_HEADER_BYTES + f.payload.length, 0);
    expect(wire.bytes).toBeLessThan(rawBytes * 0.6);
    expect(frames.savedBytes).toBe(wire.inflater.savedBytes);

    // The same pages through a sender whose Runs and Deltas cut the batches, as with a receiver from before.
    const cut = receiver();
    const old = sender(cut, ZSTD);
    let otherBytes = 0;
    for (const f of sequence) {
      if (f.type === FrameType.Literal) {
        old.literal(f.payload);
      } else {
        old.flush();
        otherBytes += FRAME_HEADER_BYTES + f.payload.length; // sent on their own
      }
    }
    old.flush();
    expect(cut.frames.length).toBeGreaterThan(500);
    expect(wire.bytes).toBeLessThan(cut.bytes + otherBytes);
  });

  test('raw batches keep the stream going; a failed attempt restarts it, and says so', () => {
    const { wire, delivered } = framedReceiver();
    const frames = sender(wire, ZSTD);
    frames.carryFrames();
    const text = (seed: number): Delivered[] => alternating(8, seed);
    const light: Delivered[] = [{ type: FrameType.Literal, payload: randomBytes(70) }, { type: FrameType.Run, payload: randomBytes(400) }];
    // Compressible; a batch mostly of a Run (raw, unweighed); the first text again (compressed against
    // the stream, which went on across the raw batch); an incompressible batch (its attempt fails: the
    // stream restarts); one skipped after it (raw); then text compressed on the restarted stream.
    const parts: Delivered[][] = [text(1), light, text(1), [{ type: FrameType.Literal, payload: randomBytes(100_000) }], text(2), text(3)];
    for (const part of parts) send(frames, part, 1000);
    expect(sameFrames(delivered, parts.flat())).toBe(true);
    const kinds = wire.frames.map((f) => (f.type === FrameType.CompressedFrames && f.length === COMPRESSED_HEADER_BYTES ? 'restart' : f.type));
    const batches = wire.frames.filter((f) => f.type === FrameType.CompressedFrames && f.length > COMPRESSED_HEADER_BYTES);
    expect(kinds.slice(0, 4)).toEqual([FrameType.CompressedFrames, FrameType.Literal, FrameType.Run, FrameType.CompressedFrames]);
    expect(batches[1].length).toBeLessThan(batches[0].length / 4);
    expect(kinds.slice(4, 6)).toEqual(['restart', FrameType.Literal]);
    expect(kinds.slice(6, -1).every((k) => k === FrameType.Literal || k === FrameType.Run || k === FrameType.Delta || k === FrameType.SiblingDelta)).toBe(true);
    expect(kinds.at(-1)).toBe(FrameType.CompressedFrames);
    expect(batches).toHaveLength(3);
  });

  test('a batch mostly of Runs and Deltas goes raw, unweighed: it does not make the policy skip the compressible batches after it', () => {
    const { wire, delivered } = framedReceiver();
    const frames = sender(wire, ZSTD);
    frames.carryFrames();
    // A back leg: chunk after chunk of Runs and Deltas (digests, changed bytes) with a record header
    // between them, then the device state.
    const chunks: Delivered[][] = [];
    for (let c = 0; c < 20; c++) {
      const chunk: Delivered[] = [];
      for (let i = 0; i < 6; i++) {
        chunk.push({ type: FrameType.Literal, payload: randomBytes(9) });
        chunk.push({ type: i % 2 === 0 ? FrameType.Delta : FrameType.Run, payload: randomBytes(110) });
      }
      chunks.push(chunk);
    }
    const deviceState: Delivered[] = [{ type: FrameType.Literal, payload: textBytes(100_000, 4) }];
    for (const chunk of [...chunks, deviceState]) send(frames, chunk, 1000);
    expect(sameFrames(delivered, [...chunks.flat(), ...deviceState])).toBe(true);
    const types = wire.frames.map((f) => f.type);
    expect(types.slice(0, -1).every((t) => t !== FrameType.CompressedFrames)).toBe(true);
    expect(types.at(-1)).toBe(FrameType.CompressedFrames);
    expect(frames.savedBytes).toBeGreaterThan(deviceState[0].payload.length / 2);
  });

  test('incompressible batches cost no more than their frames', () => {
    const { wire, delivered } = framedReceiver();
    const frames = sender(wire, ZSTD);
    frames.carryFrames();
    const sequence: Delivered[] = [];
    for (let i = 0; i < 300; i++) {
      sequence.push({ type: FrameType.Literal, payload: randomBytes(1000 + ((i * 7919) % 20_000)) });
      sequence.push({ type: FrameType.Delta, payload: randomBytes(100) });
    }
    send(frames, sequence, 10);
    expect(sameFrames(delivered, sequence)).toBe(true);
    const rawBytes = sequence.reduce((n, f) => n + FRAME_HEADER_BYTES + f.payload.length, 0);
    expect(wire.bytes).toBeLessThanOrEqual(rawBytes);
  });

  /** What a sender puts on the wire for `parts` (each sent, then flushed, as source chunks), gathered. */
  function wireBytes(parts: Delivered[][]): Buffer {
    const out: Buffer[] = [];
    const frames = new LiteralFrames((bytes) => out.push(Buffer.from(bytes)), ZSTD);
    frames.carryFrames();
    for (const part of parts) send(frames, part, 1000);
    return Buffer.concat(out);
  }

  test('batches are inflated as they arrive, in order, ahead of the frames before them, at most 4 of the largest ahead; the same frames come out whatever the chunking and pauses', () => {
    const text = (seed: number): Delivered[] => alternating(40, seed);
    // Batches near the largest (text, with a Run in each), small ones, raw frames between them (a
    // batch mostly of a Run), a failed attempt (the stream restarts): the receiver must inflate them in
    // the stream's order whatever it looks at first.
    const large = (seed: number): Delivered[] => [{ type: FrameType.Literal, payload: textBytes(MAX_BATCH_BYTES - 600, seed) }, { type: FrameType.Run, payload: randomBytes(120) }];
    const light: Delivered[] = [{ type: FrameType.Literal, payload: randomBytes(70) }, { type: FrameType.Run, payload: randomBytes(400) }];
    const parts: Delivered[][] = [text(1), light, text(1), [{ type: FrameType.Literal, payload: randomBytes(100_000) }], text(2)];
    for (let i = 0; i < 8; i++) parts.push(large(10 + i), light);
    parts.push(text(3));
    const input = wireBytes(parts);
    const sequence = parts.flat();
    const runs = sequence.filter((f) => f.type === FrameType.Run).map((f) => f.payload.toString('hex'));

    for (const size of [7, 1000, 65_536, input.length]) {
      // Every carried Run was looked at before it is delivered; the batches are counted as they are.
      let batchesDelivered = 0;
      let lookedAtFirstRun = -1;
      const carriedRuns: string[] = [];
      const { wire, delivered, lookedRuns } = framedReceiver(FrameType.Run, (type, payload, carried) => {
        if (type === FrameType.CompressedFrames) batchesDelivered++;
        if (type !== FrameType.Run || !carried) return;
        expect(lookedRuns).toContain(payload.toString('hex'));
        carriedRuns.push(payload.toString('hex'));
        if (lookedAtFirstRun < 0) lookedAtFirstRun = lookedRuns.length;
      });
      // Each batch is inflated once; the bytes inflated and not yet delivered stay within the bound.
      const inflated: number[] = [];
      let maxAhead = 0;
      const inflate = wire.inflater.inflateBatch.bind(wire.inflater);
      jest.spyOn(wire.inflater, 'inflateBatch').mockImplementation((payload) => {
        const batch = inflate(payload);
        inflated.push(batch?.length ?? 0);
        const ahead = inflated.reduce((n, b, i) => (i >= batchesDelivered ? n + b : n), 0);
        maxAhead = Math.max(maxAhead, ahead);
        return batch;
      });
      for (let at = 0; at < input.length; at += size) {
        wire.parser.push(input.subarray(at, at + size));
        while (wire.parser.isPaused) wire.parser.resume();
      }
      expect(wire.parser.atBoundary).toBe(true);
      expect(sameFrames(delivered, sequence)).toBe(true);
      // Each carried Run looked at once, in order (of the 69 sent, those in batches that did not go raw).
      expect(lookedRuns).toEqual(carriedRuns);
      expect(runs).toHaveLength(69);
      expect(carriedRuns.length).toBeGreaterThan(30);
      const batches = wire.frames.filter((f) => f.type === FrameType.CompressedFrames).length;
      expect(inflated).toHaveLength(batches);
      expect(maxAhead).toBeLessThanOrEqual(4 * MAX_BATCH_BYTES);
      if (size === input.length) {
        // All at once: the Runs of the batches after the first were looked at before its Run was
        // delivered, up to the bound (the large batches past it inflated as they are delivered).
        expect(lookedAtFirstRun).toBeGreaterThan(3);
        expect(lookedAtFirstRun).toBeLessThan(carriedRuns.length);
        expect(maxAhead).toBeGreaterThan(2 * MAX_BATCH_BYTES);
      }
    }
  });

  test('a raw Literal frame delivered after a batch was inflated ahead does not restart the stream', () => {
    // Raw (incompressible) Literal bytes, then text batches: all arrive in one chunk, the batches are
    // inflated before the raw frame is delivered, and a restart then would break the next batch.
    const parts: Delivered[][] = [[{ type: FrameType.Literal, payload: randomBytes(70) }, { type: FrameType.Run, payload: randomBytes(400) }], alternating(40, 5), alternating(40, 5)];
    const input = wireBytes(parts);
    const { wire, delivered } = framedReceiver();
    wire.parser.push(input);
    expect(wire.frames.map((f) => f.type).slice(0, 3)).toEqual([FrameType.Literal, FrameType.Run, FrameType.CompressedFrames]);
    expect(wire.inflater.framed).toBe(true);
    expect(sameFrames(delivered, parts.flat())).toBe(true);
  });

  test('a receiver that pauses at a carried frame gets the rest of the batch, then the frames after it, once resumed', () => {
    const { wire, delivered } = framedReceiver(FrameType.Run);
    const frames = sender(wire, ZSTD);
    frames.carryFrames();
    const sequence = alternating(30, 3);
    send(frames, sequence, 1000); // one batch
    frames.literal(Buffer.from('after the batch'));
    frames.flush();
    let rounds = 0;
    while (wire.parser.isPaused && rounds++ < 100) wire.parser.resume();
    expect(rounds).toBeGreaterThanOrEqual(10); // a Run every third page: paused at each
    expect(sameFrames(delivered, [...sequence, { type: FrameType.Literal, payload: Buffer.from('after the batch') }])).toBe(true);
    expect(wire.parser.atBoundary).toBe(true);
  });

  test('a frame larger than a batch may declare leaves raw, in its place', () => {
    const { wire, delivered } = framedReceiver();
    const frames = sender(wire, ZSTD);
    frames.carryFrames();
    const big: Delivered = { type: FrameType.Run, payload: randomBytes(MAX_BATCH_BYTES + 1) };
    const sequence = [...alternating(10, 5), big, ...alternating(10, 6)];
    send(frames, sequence, 1000);
    expect(sameFrames(delivered, sequence)).toBe(true);
    expect(wire.frames.map((f) => f.type)).toEqual([FrameType.CompressedFrames, FrameType.Run, FrameType.CompressedFrames]);
  });

  test('without compression there is nothing to batch: carryFrames() leaves Runs and Deltas to the caller', () => {
    const frames = sender(receiver(), null);
    frames.carryFrames();
    expect(frames.carriesFrames).toBe(false);
    expect(() => frames.frame(frameHeader(FrameType.Run, 1), Buffer.alloc(1))).toThrow(/no CompressedFrames/);
  });

  const frame = (type: number, payload: Buffer): Buffer => Buffer.concat([frameHeader(type as FrameType, payload.length), payload]);
  test.each<[string, Buffer, RegExp]>([
    ['a frame header cut off', Buffer.concat([frame(FrameType.Literal, Buffer.from('abc')), Buffer.from([FrameType.Run, 0, 0])]), /header cut off/],
    ['a frame running past the batch', Buffer.concat([frame(FrameType.Run, Buffer.alloc(10)).subarray(0, 12)]), /runs past/],
    ['a control frame (End)', frame(FrameType.End, Buffer.from('{}')), /cannot be carried/],
    ['a batch inside a batch', frame(FrameType.CompressedFrames, Buffer.alloc(8)), /cannot be carried/],
    ['a Compressed frame inside a batch', frame(FrameType.Compressed, Buffer.alloc(8)), /cannot be carried/],
    ['an unknown frame type', frame(99, Buffer.alloc(3)), /cannot be carried/],
  ])('a batch holding %s is refused before any of its frames is delivered', (_what, batch, error) => {
    expect(() => checkCarriedFrames(batch, () => undefined)).toThrow(WireError);
    expect(() => checkCarriedFrames(batch, () => undefined)).toThrow(error);
  });
});

describe('negotiation', () => {
  test('the receiver chooses zstd only when the Hello lists it and compression is on here', () => {
    expect(chooseCompression({ compression: helloCompression(true) }, true)).toBe(ZSTD);
    expect(chooseCompression({ compression: helloCompression(true) }, false)).toBeNull();
    expect(chooseCompression({ compression: helloCompression(false) }, true)).toBeNull();
    // A sender from before compression sends no list.
    expect(chooseCompression({}, true)).toBeNull();
    expect(chooseCompression({ compression: 'zstd' }, true)).toBeNull();
    expect(chooseCompression({ compression: [1, 'gzip'] }, true)).toBeNull();
  });

  test('the sender takes only what it offered; a receiver from before compression chooses nothing', () => {
    expect(offeredCompression({ compression: ZSTD }, helloCompression(true))).toBe(ZSTD);
    expect(offeredCompression({}, helloCompression(true))).toBeNull();
    expect(offeredCompression({ compression: null }, helloCompression(true))).toBeNull();
    expect(() => offeredCompression({ compression: ZSTD }, helloCompression(false))).toThrow(/was not offered/);
    expect(() => offeredCompression({ compression: 'gzip' }, helloCompression(true))).toThrow(WireError);
    expect(() => offeredCompression({ compression: 7 }, helloCompression(true))).toThrow(/was not offered/);
  });
});

describe('batches compressed on the thread pool (offThread)', () => {
  /** Until `frames` holds nothing back and has no batch on the pool. */
  async function settled(frames: LiteralFrames): Promise<void> {
    while (frames.heldBytes > 0 || frames.poolBusy) await new Promise((resolve) => setImmediate(resolve));
  }

  /** Every byte a LiteralFrames writes, in order. */
  function recorder(compression: typeof ZSTD | null, offThread: boolean): { frames: LiteralFrames; bytes: Buffer[] } {
    const bytes: Buffer[] = [];
    const frames = new LiteralFrames((b) => bytes.push(Buffer.from(b)), compression, offThread);
    return { frames, bytes };
  }

  /** Text pages between Runs and Deltas, a stretch of random bytes, a control frame now and then: a source chunk's frames, `chunks` times. */
  function chunkOf(i: number): Delivered[] {
    const out: Delivered[] = [];
    const text = textBytes(20 * 4096, i + 1);
    for (let p = 0; p < 20; p++) {
      out.push({ type: FrameType.Literal, payload: text.subarray(p * 4096, (p + 1) * 4096) });
      if (p % 4 === 3) out.push({ type: p % 8 === 3 ? FrameType.Run : FrameType.Delta, payload: randomBytes(40 + p) });
    }
    if (i % 3 === 1) out.push({ type: FrameType.Literal, payload: randomBytes(150_000) });
    return out;
  }

  /** Sends a chunk's frames as a session does; a control frame (`inOrder`) goes after each chunk's flush. */
  function sendChunk(frames: LiteralFrames, chunk: Delivered[], framed: boolean, control: Buffer): void {
    for (const f of chunk) {
      if (f.type === FrameType.Literal) frames.literal(f.payload);
      else if (framed) frames.frame(frameHeader(f.type, f.payload.length), f.payload);
      else {
        frames.flush();
        frames.inOrder(frameHeader(f.type, f.payload.length));
        frames.inOrder(f.payload);
      }
    }
    frames.flush();
    frames.inOrder(frameHeader(FrameType.Run, control.length));
    frames.inOrder(control);
  }

  test('the addon compresses on the pool', () => {
    const { frames } = recorder(ZSTD, true);
    expect(frames.offThread).toBe(true);
    expect(recorder(ZSTD, false).frames.offThread).toBe(false);
    expect(recorder(null, true).frames.offThread).toBe(false);
  });

  test.each([true, false])('framed %s: when each batch is back before the next, the WAN bytes are those of compressing on the event loop, byte for byte', async (framed) => {
    const onLoop = recorder(ZSTD, false);
    const pooled = recorder(ZSTD, true);
    if (framed) {
      onLoop.frames.carryFrames();
      pooled.frames.carryFrames();
    }
    let sawPool = false;
    for (let i = 0; i < 12; i++) {
      const chunk = chunkOf(i);
      const control = randomBytes(30);
      sendChunk(onLoop.frames, chunk, framed, control);
      sendChunk(pooled.frames, chunk, framed, control);
      sawPool ||= pooled.frames.poolBusy;
      await settled(pooled.frames);
    }
    expect(sawPool).toBe(true);
    const a = Buffer.concat(onLoop.bytes);
    const b = Buffer.concat(pooled.bytes);
    expect(b.length).toBe(a.length);
    expect(b.equals(a)).toBe(true);
    expect(pooled.frames.savedBytes).toBe(onLoop.frames.savedBytes);
    expect(pooled.frames.savedBytes).toBeGreaterThan(0);
  });

  test('batches queued behind the one on the pool, and frames written meanwhile, reach the receiver in order; the session is told to stop reading and when to read on', async () => {
    const { wire, delivered } = framedReceiver();
    const frames = new LiteralFrames((b) => {
      wire.bytes += b.length;
      wire.parser.push(Buffer.from(b));
    }, ZSTD, true);
    frames.carryFrames();
    // What the session sees each time held bytes were written: whether it may read on.
    const readOn: boolean[] = [];
    frames.onWritten = () => readOn.push(!frames.backlogged);
    const sequence: Delivered[] = [];
    let backlogged = false;
    for (let i = 0; i < 24; i++) {
      const chunk = chunkOf(i);
      const control = randomBytes(20 + i);
      sendChunk(frames, chunk, true, control);
      sequence.push(...chunk, { type: FrameType.Run, payload: control });
      backlogged ||= frames.backlogged;
    }
    // Nothing waited for: the batches queued up behind the first.
    expect(backlogged).toBe(true);
    await settled(frames);
    expect(readOn).toContain(false);
    expect(readOn[readOn.length - 1]).toBe(true);
    expect(frames.backlogged).toBe(false);
    expect(sameFrames(delivered, sequence)).toBe(true);
    expect(frames.savedBytes).toBe(wire.inflater.savedBytes);
    expect(frames.savedBytes).toBeGreaterThan(0);
  });

  test('to a receiver of Compressed frames (no whole frames), batches queued on the pool, raw ones among them, come back byte for byte', async () => {
    const wire = receiver();
    const pooled = new LiteralFrames((b) => {
      wire.bytes += b.length;
      wire.parser.push(Buffer.from(b));
    }, ZSTD, true);
    const sent: Buffer[] = [];
    for (let i = 0; i < 16; i++) {
      const piece = i % 4 === 2 ? randomBytes(100_000) : textBytes(90_000 + i * 1000, i);
      pooled.literal(piece);
      pooled.flush();
      sent.push(piece);
    }
    await settled(pooled);
    expect(Buffer.concat(wire.received).equals(Buffer.concat(sent))).toBe(true);
    expect(wire.frames.some((f) => f.type === FrameType.Compressed)).toBe(true);
    expect(wire.frames.some((f) => f.type === FrameType.Literal)).toBe(true);
    expect(pooled.savedBytes).toBe(wire.inflater.savedBytes);
  });

  test('a batch on its way to the pool is reserved at its raw size, and handed back before its frame is written', async () => {
    const written: number[] = [];
    let reserved = 0;
    let reservedWhenWritten = -1;
    const pooled = new LiteralFrames((b) => {
      written.push(b.length);
      if (reservedWhenWritten < 0) reservedWhenWritten = reserved;
    }, ZSTD, true);
    pooled.onReserve = (bytes) => (reserved += bytes);
    pooled.literal(textBytes(100_000, 8));
    pooled.flush();
    expect(reserved).toBe(100_000);
    expect(written).toHaveLength(0);
    await settled(pooled);
    expect(reservedWhenWritten).toBe(0);
    expect(reserved).toBe(0);
    expect(written.reduce((a, b) => a + b, 0)).toBeLessThan(100_000 / 2);
  });

  test('a batch back from the pool, and what waited behind it, are written with the writer corked (one writev)', async () => {
    let corkedNow = false;
    const writes: Array<{ bytes: number; corked: boolean }> = [];
    const pooled = new LiteralFrames(
      (b) => writes.push({ bytes: b.length, corked: corkedNow }),
      ZSTD,
      true,
      (run) => {
        corkedNow = true;
        try {
          run();
        } finally {
          corkedNow = false;
        }
      },
    );
    pooled.literal(textBytes(100_000, 12));
    pooled.flush();
    for (let i = 0; i < 10; i++) pooled.inOrder(randomBytes(40));
    expect(writes).toHaveLength(0);
    await settled(pooled);
    expect(writes).toHaveLength(11);
    expect(writes.every((w) => w.corked)).toBe(true);
  });

  test('the bytes of a batch on the pool may be read into again as soon as flush() returns', async () => {
    const wire = receiver();
    const pooled = new LiteralFrames((b) => wire.parser.push(Buffer.from(b)), ZSTD, true);
    const readBuffer = textBytes(200_000, 3);
    const original = Buffer.from(readBuffer);
    pooled.literal(readBuffer);
    pooled.flush();
    expect(pooled.poolBusy).toBe(true);
    readBuffer.fill(0x55); // the next read into the same buffer
    await settled(pooled);
    expect(Buffer.concat(wire.received).equals(original)).toBe(true);
  });

  test('after close() nothing more is written, not even the batch that was on the pool', async () => {
    const { frames, bytes } = recorder(ZSTD, true);
    frames.literal(textBytes(100_000, 4));
    frames.flush();
    frames.inOrder(Buffer.from('after'));
    expect(frames.poolBusy).toBe(true);
    frames.close();
    expect(frames.heldBytes).toBe(0);
    await settled(frames);
    frames.inOrder(Buffer.from('later'));
    expect(bytes).toHaveLength(0);
  });
});

describe('hostile Compressed frames', () => {
  /** The payload of one honest Compressed frame of `bytes`, from a fresh stream. */
  function compressedPayload(bytes: Buffer): Buffer {
    const wire = receiver();
    let payload: Buffer | null = null;
    const frames = new LiteralFrames((b) => {
      if (b[0] === FrameType.Compressed && b.length > FRAME_HEADER_BYTES) payload = Buffer.from(b.subarray(FRAME_HEADER_BYTES));
      wire.parser.push(Buffer.from(b));
    }, ZSTD);
    frames.literal(bytes);
    frames.flush();
    if (payload === null) throw new Error('not compressed');
    return payload;
  }
  const text = textBytes(50_000, 9);
  const honest = compressedPayload(text);

  const withLength = (payload: Buffer, length: number): Buffer => {
    const copy = Buffer.from(payload);
    copy.writeUInt32BE(length, 0);
    return copy;
  };

  test.each<[string, () => Buffer, RegExp]>([
    ['an empty payload', () => Buffer.alloc(0), /Compressed frame of 0 bytes/],
    ['a raw length and nothing else', () => Buffer.from([0, 0, 1, 0]), /Compressed frame of 4 bytes/],
    ['a declared length of zero', () => withLength(honest, 0), /declares 0 bytes/],
    ['a declared length over the batch limit', () => withLength(honest, MAX_BATCH_BYTES + 1), /declares/],
    ['a declared length of 4 GiB', () => withLength(honest, 0xffffffff), /declares/],
    ['a declared length shorter than the content', () => withLength(honest, text.length - 1), /more bytes than its frame declared/],
    ['a declared length longer than the content', () => withLength(honest, text.length + 1), /fewer bytes than its frame declared/],
    ['garbage instead of zstd', () => Buffer.concat([Buffer.from([0, 0, 16, 0]), randomBytes(200)]), /zstd decompress/],
    ['a zstd stream cut short', () => honest.subarray(0, honest.length >> 1), /fewer bytes|zstd decompress/],
    [
      'a zstd frame asking for a 128 MiB window',
      () => {
        // Frame header: magic, descriptor with a window byte and no content size, window 2^27.
        const header = Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0x00, (27 - 10) << 3]);
        return Buffer.concat([Buffer.from([0, 0, 16, 0]), header, Buffer.from([1, 0, 0, 0])]);
      },
      /zstd decompress/,
    ],
  ])('%s ends the migration', (_what, payload, error) => {
    const inflater = new LiteralInflater();
    expect(() => inflater.inflate(payload())).toThrow(WireError);
    expect(() => new LiteralInflater().inflate(payload())).toThrow(error);
  });

  test('a batch replayed out of its stream is refused or decodes to other bytes, never accepted as if in place', () => {
    // The second batch refers to the first (same text): on a fresh stream it cannot decode.
    const wire = receiver();
    const payloads: Buffer[] = [];
    const frames = new LiteralFrames((b) => {
      if (b[0] === FrameType.Compressed && b.length > FRAME_HEADER_BYTES) payloads.push(Buffer.from(b.subarray(FRAME_HEADER_BYTES)));
      wire.parser.push(Buffer.from(b));
    }, ZSTD);
    frames.literal(text);
    frames.flush();
    frames.literal(text);
    frames.flush();
    expect(payloads).toHaveLength(2);
    expect(payloads[1].length).toBeLessThan(payloads[0].length / 4);
    const fresh = new LiteralInflater();
    let out: Buffer | null = null;
    try {
      out = fresh.inflate(payloads[1]);
    } catch (err) {
      expect(err).toBeInstanceOf(WireError);
    }
    if (out !== null) expect(out.equals(text)).toBe(false);
  });
});

describe('CompressionPolicy', () => {
  /** A source chunk, and a batch of as many Literal bytes: everything read goes as Literal bytes. */
  const CHUNK = 64 * 1024;
  /** Chunks in a row the WAN must not hold the session back for before compression backs off. */
  const DRAINED_CHUNKS = DRAINED_BYTES / CHUNK;
  const SWING_CHUNKS = SWING_BYTES / CHUNK;
  /** A session's policy: every session tells it the link's rate, here measured at 125 MB/s (1 Gbit/s). */
  function sessionPolicy(): CompressionPolicy {
    const policy = new CompressionPolicy();
    policy.observeLinkRate(125e6);
    return policy;
  }

  test('compresses while the WAN socket keeps bytes queued', () => {
    const policy = sessionPolicy();
    for (let i = 0; i < 100; i++) {
      policy.observeWan(true, CHUNK);
      expect(policy.compressNext(CHUNK)).toBe(true);
      policy.shrank();
    }
  });

  test('backs off once the WAN has not held it back across DRAINED_BYTES of input in a row; after a swing it takes two held-back chunks in a row to come back', () => {
    const policy = sessionPolicy();
    for (let i = 0; i < DRAINED_CHUNKS - 1; i++) {
      policy.observeWan(false, CHUNK);
      expect(policy.compressNext(CHUNK)).toBe(true);
    }
    // One held-back observation starts the count again.
    policy.observeWan(true, CHUNK);
    for (let i = 0; i < DRAINED_CHUNKS - 1; i++) policy.observeWan(false, CHUNK);
    expect(policy.compressNext(CHUNK)).toBe(true);
    policy.observeWan(false, CHUNK);
    expect(policy.compressNext(CHUNK)).toBe(false);
    for (let i = 0; i < 50; i++) {
      policy.observeWan(false, CHUNK);
      expect(policy.compressNext(CHUNK)).toBe(false);
    }
    expect(policy.wanIsBottleneck).toBe(false);
    // That back-off followed the start: one held-back chunk brings compression back.
    policy.observeWan(true, CHUNK);
    expect(policy.compressNext(CHUNK)).toBe(true);
    // Backing off again at once is a swing: now two in a row bring it back, a drained one between starts over.
    for (let i = 0; i < DRAINED_CHUNKS; i++) policy.observeWan(false, CHUNK);
    expect(policy.compressNext(CHUNK)).toBe(false);
    policy.observeWan(true, CHUNK);
    expect(policy.compressNext(CHUNK)).toBe(false);
    policy.observeWan(false, CHUNK);
    policy.observeWan(true, CHUNK);
    expect(policy.compressNext(CHUNK)).toBe(false);
    policy.observeWan(true, CHUNK);
    expect(policy.wanIsBottleneck).toBe(true);
    expect(policy.compressNext(CHUNK)).toBe(true);
  });

  /**
   * A gateway whose CPU sets the pace: while it compresses, it is slower than the link (the socket
   * drains); while it does not, it fills the link (the socket queues). Returns the raw chunks between
   * one compressing stretch and the next, `backOffs` times.
   */
  function swings(policy: CompressionPolicy, backOffs: number): number[] {
    const raw: number[] = [];
    for (let b = 0; b < backOffs; b++) {
      while (policy.wanIsBottleneck) policy.observeWan(false, CHUNK);
      let chunks = 0;
      while (!policy.wanIsBottleneck) {
        policy.observeWan(true, CHUNK);
        chunks++;
      }
      raw.push(chunks);
    }
    return raw;
  }

  test('a gateway whose own CPU sets the pace: each back-off doubles the queued chunks it takes to compress again, up to MAX_REJOIN', () => {
    // The first back-off follows the start, not a return: no swing yet.
    expect(swings(sessionPolicy(), 8)).toEqual([1, 2, 4, 8, 16, 32, 64, 64]);
    expect(MAX_REJOIN).toBe(64);
  });

  test('a back-off after a long stretch of compressing with the link busy (the source went quiet): one queued chunk brings it back', () => {
    const policy = sessionPolicy();
    expect(swings(policy, 7)).toEqual([1, 2, 4, 8, 16, 32, 64]);
    // Back in, and the link stays the bottleneck while it compresses, SWING_CHUNKS chunks and more.
    for (let i = 0; i <= SWING_CHUNKS; i++) {
      policy.observeWan(true, CHUNK);
      expect(policy.compressNext(CHUNK)).toBe(true);
    }
    // Zero pages: nothing to send, the socket drains.
    for (let i = 0; i < DRAINED_CHUNKS; i++) policy.observeWan(false, CHUNK);
    expect(policy.compressNext(CHUNK)).toBe(false);
    policy.observeWan(true, CHUNK);
    expect(policy.compressNext(CHUNK)).toBe(true);
    // A swing from here doubles again from 1.
    expect(swings(policy, 2)).toEqual([2, 4]);
  });

  test('at a WAN-bound link whose socket drains now and then, compression stays on', () => {
    const policy = sessionPolicy();
    // Queued, queued, drained, drained, drained: never DRAINED_CHUNKS drained in a row.
    for (let i = 0; i < 1000; i++) {
      policy.observeWan(i % 5 < 2, CHUNK);
      expect(policy.wanIsBottleneck).toBe(true);
    }
  });

  test('at a WAN-bound link whose kernel buffers take several chunks in a row as they grow, compression stays on', () => {
    // Whether the peer socket held each 256 KiB chunk back, as a gateway saw it sending a compressible
    // 12 MB stream into a 40 Mbit/s link on loopback: runs of 4 drained chunks while the buffers filled.
    const trace = 'DDDDHHHHHHDDDDHDHDHDHDDHHDDDDHHDD';
    const policy = sessionPolicy();
    for (const c of trace) {
      policy.observeWan(c === 'H', 256 * 1024);
      expect(policy.wanIsBottleneck).toBe(true);
    }
  });

  /** Drained chunks, each after the loop was busy `busyMs` and idle `idleMs`, each going as Literal bytes. */
  function drained(policy: CompressionPolicy, chunks: number, busyMs: number, idleMs: number): void {
    for (let i = 0; i < chunks; i++) {
      policy.observeLoop(busyMs, idleMs);
      policy.observeWan(false, CHUNK);
      policy.noteLiteral(CHUNK);
    }
  }

  test('the source sets the pace (the loop waited between its chunks): the WAN drains, and compression and Deltas stay on', () => {
    const policy = sessionPolicy();
    // Busy half the time, stretch after stretch: compressing costs the migration nothing it waits for.
    drained(policy, 10 * DRAINED_CHUNKS, 1, 1);
    expect(policy.wanIsBottleneck).toBe(false);
    expect(policy.savingPays).toBe(true);
    expect(policy.compressNext(CHUNK)).toBe(true);
    // Just under the share: still the source's pace.
    const busy = BUSY_LOOP_SHARE - 0.01;
    drained(policy, DRAINED_CHUNKS, busy, 1 - busy);
    expect(policy.compressNext(CHUNK)).toBe(true);
  });

  test('a stretch in which the loop was busy for BUSY_LOOP_SHARE of the time or more is the gateway\'s pace: compression backs off', () => {
    const policy = sessionPolicy();
    drained(policy, 3 * DRAINED_CHUNKS, 1, 1);
    expect(policy.savingPays).toBe(true);
    // A stretch judged on its own: the idle stretches before it do not dilute it.
    drained(policy, DRAINED_CHUNKS - 1, BUSY_LOOP_SHARE, 1 - BUSY_LOOP_SHARE);
    expect(policy.savingPays).toBe(true);
    drained(policy, 1, BUSY_LOOP_SHARE, 1 - BUSY_LOOP_SHARE);
    expect(policy.savingPays).toBe(false);
    expect(policy.compressNext(CHUNK)).toBe(false);
    // Backed off, an idle loop alone brings nothing back: only the WAN holding the session back does.
    drained(policy, 3 * DRAINED_CHUNKS, 0, 1);
    expect(policy.savingPays).toBe(false);
    policy.observeWan(true, CHUNK);
    expect(policy.compressNext(CHUNK)).toBe(true);
  });

  test('CPU time compression took on the thread pool counts as the event loop busy: a stretch whose loop idled while the pool compressed backs compression off', () => {
    const pooled = sessionPolicy();
    const onLoop = sessionPolicy();
    const sourcePaced = sessionPolicy();
    // Per chunk: the same zstd work (1 ms), on the pool for one policy, on the loop for another; the
    // third's loop waited that millisecond for the source.
    for (let i = 0; i < DRAINED_CHUNKS; i++) {
      pooled.observeOffLoopWork(1);
      pooled.observeLoop(1, 1);
      onLoop.observeLoop(2, 0);
      sourcePaced.observeLoop(1, 1);
      for (const policy of [pooled, onLoop, sourcePaced]) {
        policy.observeWan(false, CHUNK);
        policy.noteLiteral(CHUNK);
      }
    }
    expect(sourcePaced.savingPays).toBe(true);
    expect(onLoop.savingPays).toBe(false);
    expect(pooled.savingPays).toBe(false);
    // Pool time beyond the loop's idle time counts as that idle time only, and is not carried into the next stretch.
    const policy = sessionPolicy();
    policy.observeOffLoopWork(1000);
    drained(policy, DRAINED_CHUNKS, 1, 1);
    expect(policy.savingPays).toBe(true);
  });

  test('a stretch the gateway set the pace of, in which it took in the source as fast as the link takes it raw, keeps compression on', () => {
    const policy = sessionPolicy();
    // 125 MB/s measured at the link; the loop always busy.
    policy.observeLinkRate(125e6);
    // DRAINED_BYTES (4 MiB) in 30 ms: 140 MB/s taken in while compressing, more than raw could.
    drained(policy, DRAINED_CHUNKS, 30 / DRAINED_CHUNKS, 0);
    expect(policy.savingPays).toBe(true);
    expect(policy.wanIsBottleneck).toBe(false);
    // In 40 ms: 105 MB/s, less than the link would take raw: backs off.
    drained(policy, DRAINED_CHUNKS, 40 / DRAINED_CHUNKS, 0);
    expect(policy.savingPays).toBe(false);
  });

  test('compression comes back after a back-off only once the link is measured', () => {
    const policy = sessionPolicy();
    policy.observeLinkRate(-1);
    drained(policy, DRAINED_CHUNKS, 1, 0);
    expect(policy.savingPays).toBe(false);
    // Held back, but the link not measured yet: the next gateway-paced stretch could not be weighed.
    for (let i = 0; i < 10; i++) policy.observeWan(true, CHUNK);
    expect(policy.savingPays).toBe(false);
    policy.observeLinkRate(125e6);
    policy.observeWan(true, CHUNK);
    expect(policy.savingPays).toBe(true);
  });

  test('a connection that starts at full rate does not weigh a stretch in its first SWING_BYTES before the link is measured: compression stays on', () => {
    // A multifd channel starts with RAM at full speed: its first megabytes fill the kernel's buffers,
    // its gateway busy throughout, before the WAN has held it back long enough to measure the link.
    const policy = sessionPolicy();
    policy.startsAtFullRate();
    policy.observeLinkRate(-1);
    drained(policy, SWING_CHUNKS - DRAINED_CHUNKS, 1, 0);
    expect(policy.savingPays).toBe(true);
    // Past them, still unmeasured: the gateway's pace, backs off.
    drained(policy, 2 * DRAINED_CHUNKS, 1, 0);
    expect(policy.savingPays).toBe(false);
    // Measured meanwhile, the stretch is weighed against the link instead: taken in faster, it stays on.
    const measured = sessionPolicy();
    measured.startsAtFullRate();
    measured.observeLinkRate(-1);
    drained(measured, DRAINED_CHUNKS, 1, 0);
    measured.observeLinkRate(31e6);
    drained(measured, 3 * SWING_CHUNKS, 1, 0); // 64 KiB a ms: 65 MB/s
    expect(measured.savingPays).toBe(true);
    // The main channel's, which starts with QEMU's setup, weighs its first stretch as any other.
    const main = sessionPolicy();
    main.observeLinkRate(-1);
    drained(main, DRAINED_CHUNKS, 1, 0);
    expect(main.savingPays).toBe(false);
  });

  test('a chunk the WAN held back starts the stretch over, the loop\'s time with it', () => {
    const policy = sessionPolicy();
    // Busy through most of a stretch, then held back: that busy time was the WAN's pace, not the gateway's.
    drained(policy, DRAINED_CHUNKS - 1, 1, 0);
    policy.observeLoop(1, 0);
    policy.observeWan(true, CHUNK);
    drained(policy, DRAINED_CHUNKS, 1, 9);
    expect(policy.savingPays).toBe(true);
  });

  test('a source paused for the WAN counts as held back at its next chunk (the socket has drained by then), and at that one only', () => {
    const policy = sessionPolicy();
    for (let i = 0; i < DRAINED_CHUNKS; i++) policy.observeWan(false, CHUNK);
    expect(policy.wanIsBottleneck).toBe(false);
    policy.pausedForWan();
    policy.observeWan(false, CHUNK);
    expect(policy.wanIsBottleneck).toBe(true);
    for (let i = 0; i < DRAINED_CHUNKS; i++) policy.observeWan(false, CHUNK);
    expect(policy.wanIsBottleneck).toBe(false);
    policy.pausedForWan();
    policy.observeWan(false, CHUNK);
    // A swing: two held-back chunks in a row bring it back now, and the pause counted once.
    policy.observeWan(false, CHUNK);
    expect(policy.wanIsBottleneck).toBe(false);
  });

  test('after batches that did not shrink it skips 1, 2, 4 … up to MAX_SKIP batches; one that shrinks ends the skipping', () => {
    const policy = sessionPolicy();
    const skips: number[] = [];
    expect(policy.compressNext(CHUNK)).toBe(true);
    policy.didNotShrink();
    for (let probe = 0; probe < 9; probe++) {
      let skipped = 0;
      while (!policy.compressNext(CHUNK)) skipped++;
      skips.push(skipped);
      policy.didNotShrink(); // the probe did not shrink either
    }
    expect(skips).toEqual([1, 2, 4, 8, 16, 32, MAX_SKIP, MAX_SKIP, MAX_SKIP]);
    while (!policy.compressNext(CHUNK));
    policy.shrank();
    policy.didNotShrink();
    expect(policy.compressNext(CHUNK)).toBe(false);
    expect(policy.compressNext(CHUNK)).toBe(true);
  });

  test('batches that shrank by less than they cost (saved bytes\' WAN time against WORTH_FACTOR times the CPU time) skip as ones that did not shrink, judged as a running average', () => {
    const policy = sessionPolicy();
    /** The batch after the next `skipped` ones the policy compresses, and how many it skipped before it. */
    const nextCompressed = (): number => {
      let skipped = 0;
      while (!policy.compressNext(CHUNK)) skipped++;
      return skipped;
    };
    const MB = 1e6;
    // Not measured yet: any saving pays.
    expect(nextCompressed()).toBe(0);
    policy.compressedBatch(1, 1);
    expect(nextCompressed()).toBe(0);
    // At 125 MB/s (1 Gbit/s), 6,500 bytes saved took the WAN 52 µs: a batch that took a little more than
    // that over WORTH_FACTOR to compress did not pay, one that took a little less did.
    const worth = 6500 / (125 * MB) / WORTH_FACTOR;
    policy.observeWanRate(125 * MB);
    policy.compressedBatch(6500, 1.2 * worth);
    expect(nextCompressed()).toBe(1);
    policy.compressedBatch(6500, 1.2 * worth);
    expect(nextCompressed()).toBe(2);
    // One that paid by less than the others lost: the average is still short, and the skipping doubles on.
    policy.compressedBatch(6500, 0.9 * worth);
    expect(nextCompressed()).toBe(4);
    // One that paid well brings the average up: compression goes on.
    policy.compressedBatch(6500, 0.1 * worth);
    expect(nextCompressed()).toBe(0);
    // Among batches that paid well, one that lost by as much does not stop it...
    for (let i = 0; i < 8; i++) policy.compressedBatch(6500, 0.2 * worth);
    policy.compressedBatch(6500, 1.5 * worth);
    expect(nextCompressed()).toBe(0);
    // ...a run of them does.
    policy.compressedBatch(6500, 1.5 * worth);
    policy.compressedBatch(6500, 1.5 * worth);
    policy.compressedBatch(6500, 1.5 * worth);
    expect(nextCompressed()).toBeGreaterThan(0);
    // At 12.5 MB/s (100 Mbit/s) the same bytes are worth ten times as much: those batches pay.
    policy.observeWanRate(12.5 * MB);
    for (let i = 0; i < 4; i++) policy.compressedBatch(6500, 1.2 * worth);
    expect(nextCompressed()).toBe(0);
  });

  test('with the WAN not holding it back, compresses Literal bytes only while they are at most 1/SPARSE_SHARE of the input', () => {
    const policy = sessionPolicy();
    for (let i = 0; i < DRAINED_CHUNKS; i++) policy.observeWan(false, CHUNK);
    expect(policy.wanIsBottleneck).toBe(false);
    // DRAINED_BYTES read, 4 KiB of Literal bytes among them (a back leg's headers among Runs): compressed.
    expect(policy.compressNext(4096)).toBe(true);
    // As many Literal bytes as were read (a first leg on a fast link): raw.
    expect(policy.compressNext(DRAINED_BYTES)).toBe(false);
    // Until enough input without Literal bytes has passed that the share is sparse again.
    for (let i = 0; i < SPARSE_SHARE * 2 * DRAINED_CHUNKS; i++) policy.observeWan(false, CHUNK);
    expect(policy.compressNext(4096)).toBe(true);
  });

  test('saving pays (compression, and Deltas the receiver reads a base for) while the WAN holds the session back or little must cross whole', () => {
    const policy = sessionPolicy();
    expect(policy.savingPays).toBe(true); // a first leg starts WAN-bound
    // A first leg whose gateways set the pace: everything read goes as Literal bytes, the WAN never waits.
    for (let i = 0; i < DRAINED_CHUNKS; i++) {
      policy.observeWan(false, CHUNK);
      policy.compressNext(CHUNK);
    }
    expect([policy.wanIsBottleneck, policy.savingPays]).toEqual([false, false]);
    // The link fills: saving pays again.
    policy.observeWan(true, CHUNK);
    expect([policy.wanIsBottleneck, policy.savingPays]).toEqual([true, true]);
    // A back leg on a fast link: the WAN never waits, but little crosses whole, so saving on it pays.
    const back = sessionPolicy();
    for (let i = 0; i < 4 * DRAINED_CHUNKS; i++) {
      back.observeWan(false, CHUNK);
      back.compressNext(CHUNK / (2 * SPARSE_SHARE));
    }
    expect([back.wanIsBottleneck, back.savingPays]).toEqual([false, true]);
    // Without compression the Literal bytes still count: a first leg that sets its own pace, no saving.
    const plain = new LiteralFrames(() => undefined, null);
    const bytes = Buffer.alloc(CHUNK);
    for (let i = 0; i < DRAINED_CHUNKS; i++) {
      plain.policy.observeWan(false, CHUNK);
      plain.literal(bytes);
    }
    expect([plain.compressing, plain.policy.savingPays]).toEqual([false, false]);
  });
});
