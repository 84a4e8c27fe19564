/**
 * Hand-built multifd channels (the format is in src/qemu/multifd.ts), for tests and benchmarks: single
 * packets of QEMU 7.2's or 10.0's kind, and whole migrations of a guest memory image spread over N
 * channels in rounds, each round closed by a SYNC packet on every channel, as QEMU sends them.
 */
import { MULTIFD_BLOCK_NAME_AT, MULTIFD_HEADER_BYTES, MULTIFD_INIT_BYTES, MULTIFD_MAGIC, MULTIFD_SLOTS, MULTIFD_VERSION, MultifdFlag } from '../../qemu/multifd';
import { MultifdDecoder } from '../../proxy/multifd-decoder';
import { MultifdEncoder } from '../../proxy/multifd-encoder';
import { MultifdMigration } from '../../proxy/multifd-migration';
import { type PageLayout, ReceiverTable, type RetainedPages, type SiblingPages } from '../../proxy/retained';
import { CHANNEL_AHEAD_BYTES } from '../../proxy/channel-codec';
import { SiblingMatch } from '../../proxy/sibling-match';
import { StreamEncoder } from '../../proxy/encoder';
import { decodeSeal, encodeJson, FRAME_HEADER_BYTES, FrameType } from '../../wire/frames';
import { type GuestMemory, PAGE } from './migration-stream';

/** 7.2: no zero pages in packets (they go on the main channel). 10.0: zero pages as offsets. */
export type MultifdFormat = 'qemu-7.2' | 'qemu-10.0';

export function multifdInit(channel: number, version = MULTIFD_VERSION): Buffer {
  const out = Buffer.alloc(MULTIFD_INIT_BYTES);
  out.writeUInt32BE(MULTIFD_MAGIC, 0);
  out.writeUInt32BE(version, 4);
  out.fill(0xab, 8, 24); // the VM's UUID
  out[24] = channel;
  return out;
}

export interface PacketSpec {
  format: MultifdFormat;
  packetNumber: number;
  block: string;
  /** The normal pages, each a whole page. */
  pages: { offset: number; data: Buffer }[];
  /** Offsets of zero pages (10.0 only). */
  zeroOffsets?: number[];
  sync?: boolean;
  /** Extra flag bits (compression, device state) and a version, to build packets the parser refuses. */
  extraFlags?: number;
  version?: number;
}

export function multifdPacket(spec: PacketSpec): Buffer {
  const zero = spec.zeroOffsets ?? [];
  if (spec.format === 'qemu-7.2' && zero.length > 0) throw new Error('QEMU 7.2 packets carry no zero pages');
  const header = Buffer.alloc(MULTIFD_HEADER_BYTES + MULTIFD_SLOTS * 8);
  // 10.0 leaves pages_alloc 0 in a SYNC packet; 7.2 sends it always, and a stale next_packet_size.
  const bare = spec.sync === true && spec.pages.length === 0;
  header.writeUInt32BE(MULTIFD_MAGIC, 0);
  header.writeUInt32BE(spec.version ?? MULTIFD_VERSION, 4);
  header.writeUInt32BE((spec.sync ? MultifdFlag.Sync : 0) | (spec.extraFlags ?? 0), 8);
  header.writeUInt32BE(bare && spec.format === 'qemu-10.0' ? 0 : MULTIFD_SLOTS, 12);
  header.writeUInt32BE(spec.pages.length, 16);
  header.writeUInt32BE(bare && spec.format === 'qemu-7.2' ? MULTIFD_SLOTS * PAGE : spec.pages.length * PAGE, 20);
  header.writeBigUInt64BE(BigInt(spec.packetNumber), 24);
  header.writeUInt32BE(zero.length, 32);
  header.write(spec.block, MULTIFD_BLOCK_NAME_AT, 'latin1');
  const offsets = [...spec.pages.map((p) => p.offset), ...zero];
  offsets.forEach((offset, i) => header.writeBigUInt64BE(BigInt(offset), MULTIFD_HEADER_BYTES + i * 8));
  return Buffer.concat([header, ...spec.pages.map((p) => p.data)]);
}

export interface MultifdMigrationShape {
  format: MultifdFormat;
  channels: number;
  /** The page indexes each round sends, in order (round 0 is usually every page). */
  rounds: number[][];
  /** Page memory as each round sees it: pagesOf(round)[i]; default: memory.pages throughout. */
  pagesOf?: (round: number) => Buffer[];
  pagesPerPacket?: number;
  /** A SYNC on every channel before the first round, as QEMU's setup sends it (main channel: its first EOS). */
  leadingSync?: boolean;
}

/** What one migration put on its channels, and what QEMU would count. */
export interface MultifdChannels {
  channels: Buffer[];
  normalPages: number;
  zeroPages: number;
}

const isZero = (page: Buffer): boolean => page.every((b) => b === 0);

/**
 * A migration's multifd channels: packets of up to pagesPerPacket pages of one block, dealt to the
 * channels in turn (one packet number sequence, as QEMU's), every round closed by a SYNC packet on each
 * channel. 7.2 leaves zero pages out (they go on its main channel); 10.0 lists them as zero offsets.
 */
export function multifdMigration(memory: GuestMemory, shape: MultifdMigrationShape): MultifdChannels {
  const parts: Buffer[][] = Array.from({ length: shape.channels }, (_, c) => [multifdInit(c)]);
  const perPacket = shape.pagesPerPacket ?? MULTIFD_SLOTS;
  let packetNumber = 0;
  let next = 0;
  let normalPages = 0;
  let zeroPages = 0;
  const emit = (packet: Omit<PacketSpec, 'format' | 'packetNumber'>): void => {
    parts[next].push(multifdPacket({ ...packet, format: shape.format, packetNumber: packetNumber++ }));
    next = (next + 1) % shape.channels;
  };
  const sync = (): void => {
    for (let c = 0; c < shape.channels; c++) {
      parts[c].push(multifdPacket({ format: shape.format, packetNumber: packetNumber++, block: '', pages: [], sync: true }));
    }
  };
  if (shape.leadingSync) sync();
  shape.rounds.forEach((round, r) => {
    const pages = shape.pagesOf ? shape.pagesOf(r) : memory.pages;
    let block = -1;
    let normal: { offset: number; data: Buffer }[] = [];
    let zero: number[] = [];
    const flush = (): void => {
      if (normal.length + zero.length > 0) emit({ block: memory.blocks[block].name, pages: normal, zeroOffsets: zero });
      normal = [];
      zero = [];
    };
    for (const index of round) {
      const b = memory.blocks.findIndex((x) => index >= x.firstPage && index < x.firstPage + x.pages);
      if (b !== block || normal.length + zero.length === perPacket) {
        flush();
        block = b;
      }
      const offset = (index - memory.blocks[b].firstPage) * PAGE;
      if (!isZero(pages[index])) {
        normal.push({ offset, data: pages[index] });
        normalPages++;
      } else if (shape.format === 'qemu-10.0') {
        zero.push(offset);
        zeroPages++;
      }
    }
    flush();
    sync();
  });
  return { channels: parts.map((p) => Buffer.concat(p)), normalPages, zeroPages };
}

/** A channel's frames as MultifdEncoder sent them: Literal bytes, Run and Delta payloads, checks (a Seal frame's JSON). */
export interface ChannelFrames {
  frames: { kind: 'literal' | 'run' | 'delta' | 'sibling' | 'keep' | 'header' | 'check'; payload: Buffer }[];
  streamBytes: number;
  streamCheck: string;
}

/**
 * Runs a migration's channels through one gateway pair's multifd codecs, in memory: every channel is
 * pushed to its encoder in `chunk`-byte pieces, the channels taken whole one after the other in `order`
 * (a parked channel's input waits in its codec), or with `interleave` a piece of each in turn (with
 * `cuts`, pieces that end at those stream offsets, the same on every channel), then
 * every channel's frames to its decoder in `decodeOrder` (default: the same). Returns the rebuilt channels (empty with `discardOutput`, for
 * benchmarks) and both sides' codecs. With `readAhead`, each decoder is shown its channel's Run frames
 * before it rebuilds them, as a receiving gateway shows it those of each chunk it reads (aheadOfRun).
 *
 * With `reuseInput`, each codec is fed as a gateway reading into reused buffers feeds it: every piece is
 * copied into one buffer, pushed, released (releaseInput), and the buffer is then overwritten; what the
 * codecs hand on is copied at once (a gateway writes it to a socket that holds the buffer meanwhile).
 * With `deltas`, the receiver takes Delta frames on the channels (Feature.ChannelDeltas); `tamperDelta`
 * changes each Delta payload on its way to the decoder. With `siblings`, both sides hold those
 * snapshots (the sender their digest tables) and the receiver takes SiblingDelta frames on the channels
 * (Feature.ChannelSiblings), noting any whose page does not match its digest in `damagedSiblings`.
 * With `matches`, the receiver takes Deltas against other pages written in the same epoch on the
 * channels (Feature.ChannelMatches), found by a main-channel encoder of the sender's store that sees no
 * page of its own; with `earlierBases` too, against other pages' versions of earlier epochs
 * (Feature.ChannelEarlierBases; `dropKeepVersions` withholds its KeepVersion frames from the decoders).
 * `beforeDecode` is called with the receiving side's MultifdMigration before any channel is decoded:
 * what the main channel did there first, such as writing a page of a later epoch. `alterFrames` gives
 * what reaches each decoder in place of its channel's frames (the fuzzer's damaged wire). With `checks`,
 * the sender checks each channel after every SYNC packet and the receiver holds SYNC packets back until
 * those checks pass (Feature.ChannelChecks); `out` then sees what each decoder handed on as it did.
 * With `packetHeaders`, each packet's header and offsets go as a PacketHeader frame
 * (Feature.ChannelPacketHeaders).
 */
export function multifdRoundTrip(
  channels: readonly Buffer[],
  layout: PageLayout,
  sender: { store: RetainedPages | null; reference: Uint8Array | null },
  receiver: RetainedPages | null,
  options: { chunk?: number; cuts?: readonly number[]; order?: readonly number[]; decodeOrder?: readonly number[]; interleave?: boolean; discardOutput?: boolean; reuseInput?: boolean; readAhead?: boolean; deltas?: boolean; tamperDelta?: (payload: Buffer) => void; siblings?: readonly SiblingPages[]; damagedSiblings?: SiblingPages[]; beforeDecode?: (receiving: MultifdMigration) => void; matches?: boolean; earlierBases?: boolean; dropKeepVersions?: boolean; alterFrames?: (channel: number, frames: ChannelFrames['frames']) => ChannelFrames['frames']; checks?: boolean; packetHeaders?: boolean; out?: (channel: number, bytes: Buffer) => void; allocate?: (channel: number, size: number) => Buffer } = {},
): { rebuilt: Buffer[]; encoders: MultifdEncoder[]; decoders: MultifdDecoder[] } {
  const order = options.order ?? channels.map((_, i) => i);
  const chunk = options.chunk ?? 64 * 1024;
  const sending = new MultifdMigration(sender.store, channels.length);
  sending.begin(layout);
  // No main channel here: nothing on it for a Run to wait for.
  sending.endMain();
  sending.receiverTable = sender.reference === null ? null : new ReceiverTable(sender.reference);
  sending.channelDeltas = options.deltas === true;
  sending.channelChecks = options.checks === true;
  sending.packetHeaders = options.packetHeaders === true;
  if (options.siblings !== undefined) sending.siblings = new SiblingMatch(options.siblings.map((sibling) => sibling.digests));
  if (options.matches) {
    const main = new StreamEncoder({ literal: () => undefined, run: () => undefined }, sender.store);
    main.layout = layout;
    sending.elsewhere = main;
    sending.earlierBases = options.earlierBases === true;
  }
  const reuse = options.reuseInput === true;
  // Without reuseInput, views of the channels' bytes, which nothing changes: no copy is needed.
  const keep = (bytes: Buffer): Buffer => (reuse ? Buffer.from(bytes) : bytes);
  const sent: ChannelFrames[] = channels.map(() => ({ frames: [], streamBytes: 0, streamCheck: '' }));
  const encoders = sent.map(
    (out) =>
      new MultifdEncoder(
        {
          literal: (bytes) => out.frames.push({ kind: 'literal', payload: keep(bytes) }),
          run: (payload) => out.frames.push({ kind: 'run', payload: keep(payload) }),
          delta: (payload) => out.frames.push({ kind: 'delta', payload: keep(payload) }),
          siblingDelta: (payload) => out.frames.push({ kind: 'sibling', payload: keep(payload) }),
          keepVersion: (payload) => out.frames.push({ kind: 'keep', payload: keep(payload) }),
          packetHeader: (payload) => out.frames.push({ kind: 'header', payload: keep(payload) }),
          check: (streamBytes, streamCheck) => out.frames.push({ kind: 'check', payload: encodeJson(FrameType.Seal, { streamBytes, streamCheck }).subarray(FRAME_HEADER_BYTES) }),
        },
        sending,
      ),
  );
  let scratch = Buffer.alloc(chunk);
  /** Gives `bytes` to `take`, through the one reused buffer when reuseInput asks for it. */
  const feed = (bytes: Buffer, take: (piece: Buffer) => void, release: () => void): void => {
    if (!reuse) return take(bytes);
    if (bytes.length > scratch.length) scratch = Buffer.alloc(bytes.length);
    const piece = scratch.subarray(0, bytes.length);
    bytes.copy(piece);
    take(piece);
    release();
    piece.fill(0xa5);
  };
  const push = (c: number, bytes: Buffer): void => feed(bytes, (piece) => encoders[c].push(piece), () => encoders[c].releaseInput());
  let ended = 0;
  // A channel closes as soon as its bytes are in; one parked at its last SYNC ends when let go.
  const end = (c: number): void =>
    encoders[c].end(() => {
      sent[c].streamBytes = encoders[c].sentBytes;
      sent[c].streamCheck = encoders[c].streamCheck;
      ended++;
    });
  if (options.interleave) {
    const longest = Math.max(...channels.map((b) => b.length));
    // Pieces end at `cuts` where given, else every `chunk` bytes.
    const ends = options.cuts !== undefined ? [...options.cuts, longest] : Array.from({ length: Math.ceil(longest / chunk) }, (_, k) => Math.min(longest, (k + 1) * chunk));
    let at = 0;
    for (const to of ends) {
      for (const c of order) if (at < channels[c].length) push(c, channels[c].subarray(at, to));
      at = to;
    }
    order.forEach(end);
  } else {
    for (const c of order) {
      for (let at = 0; at < channels[c].length; at += chunk) push(c, channels[c].subarray(at, at + chunk));
      end(c);
    }
  }
  if (ended !== channels.length) throw new Error(`${channels.length - ended} multifd channels never finished`);
  const receiving = new MultifdMigration(receiver, channels.length);
  receiving.begin(layout);
  receiving.endMain();
  receiving.siblingPages = options.siblings ?? [];
  if (options.damagedSiblings) receiving.damagedSiblings = options.damagedSiblings;
  const rebuilt: Buffer[][] = channels.map(() => []);
  // The decoder hands over buffers of its own, or views of the frames', which nothing changes.
  const decoders = rebuilt.map((out, c) => {
    const allocate = options.allocate;
    const decoder = new MultifdDecoder(
      (bytes) => {
        options.out?.(c, bytes);
        if (!options.discardOutput) out.push(keep(bytes));
      },
      receiving,
      allocate === undefined ? undefined : (size) => allocate(c, size),
    );
    decoder.holdsSyncs = options.checks === true;
    return decoder;
  });
  options.beforeDecode?.(receiving);
  for (const c of options.decodeOrder ?? order) {
    const frames = options.alterFrames ? options.alterFrames(c, sent[c].frames) : sent[c].frames;
    if (options.readAhead) {
      for (const frame of frames) {
        const head = frame.payload.subarray(0, CHANNEL_AHEAD_BYTES);
        if (frame.kind === 'run') decoders[c].aheadOfRun(head, head.length);
        if (frame.kind === 'delta') decoders[c].aheadOfDelta(head, head.length);
        if (frame.kind === 'sibling') decoders[c].aheadOfSibling(head, head.length);
      }
      decoders[c].prefetchAhead();
    }
    for (const frame of frames) {
      if (frame.kind === 'run') decoders[c].run(frame.payload);
      else if (frame.kind === 'sibling') decoders[c].siblingDelta(frame.payload);
      else if (frame.kind === 'header') decoders[c].packetHeader(frame.payload);
      else if (frame.kind === 'keep') {
        if (!options.dropKeepVersions) decoders[c].keepVersion(frame.payload);
      }
      else if (frame.kind === 'check') {
        const check = decodeSeal(frame.payload);
        decoders[c].check(check.streamBytes, check.streamCheck);
      }
      else if (frame.kind === 'delta') {
        const payload = options.tamperDelta ? Buffer.from(frame.payload) : frame.payload;
        options.tamperDelta?.(payload);
        decoders[c].delta(payload);
      }
      else feed(frame.payload, (piece) => decoders[c].literal(piece), () => decoders[c].releaseInput());
    }
    decoders[c].end(sent[c].streamBytes, sent[c].streamCheck);
  }
  if (decoders.some((d) => d.synchronising)) throw new Error('a multifd channel never finished rebuilding');
  return { rebuilt: rebuilt.map((parts) => Buffer.concat(parts)), encoders, decoders };
}
