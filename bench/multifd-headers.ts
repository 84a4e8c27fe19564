/**
 * What a multifd back leg's channels carry besides their Runs, per guest page: the packets' headers (QEMU
 * 10.0: the fixed part, then an 8-byte offset for every page, normal or zero, 128 pages a packet), which
 * MultifdEncoder sends as Literal bytes, through the gateway's zstd stream (LiteralFrames, one per
 * channel, flushed per 64 KiB of channel as a relay does per source chunk), or as PacketHeader frames
 * (proxy/packet-header.ts). The model's multifd terms (src/model/precopy.ts, MULTIFD_*) are these figures.
 * Usage: node dist/bench/multifd-headers.js [pages=65536] [zero share=0.15] [channels=4]
 */
import { MemoryPages } from '../src/lab/harness/fuzz';
import { guestMemory } from '../src/lab/harness/migration-stream';
import { multifdMigration, multifdRoundTrip } from '../src/lab/harness/multifd-stream';
import { MultifdEncoder } from '../src/proxy/multifd-encoder';
import { MultifdMigration } from '../src/proxy/multifd-migration';
import { MAX_PACKET_HEADER_PAYLOAD, PACKET_HEADER_BYTES, PacketHeaders } from '../src/proxy/packet-header';
import { layoutOf, ReceiverTable } from '../src/proxy/retained';
import { FRAME_HEADER_BYTES } from '../src/wire/frames';
import { LiteralFrames, ZSTD } from '../src/wire/compression';
import { benchPositionals, numberArg } from './command-line';

const argv = benchPositionals();
const pages = numberArg(argv[0], 65536, 'pages');
const zeroShare = numberArg(argv[1], 0.15, 'zero share');
const channelCount = numberArg(argv[2], 4, 'channels');
const CHUNK = numberArg(argv[3], 64 * 1024, 'chunk bytes');

const memory = guestMemory([['pc.ram', pages]], 7, zeroShare);
const layout = layoutOf(memory.blocks);
const all = memory.pages.map((_, i) => i);
const migration = (): ReturnType<typeof multifdMigration> => multifdMigration(memory, { format: 'qemu-10.0', channels: channelCount, rounds: [all], leadingSync: true });
// The first leg fills both stores; the back leg's every normal page is held.
const sender = new MemoryPages();
const receiver = new MemoryPages();
sender.begin(layout);
receiver.begin(layout);
multifdRoundTrip(migration().channels, layout, { store: sender, reference: null }, receiver);
const back = migration();

/**
 * The back leg through the channels' encoders: headers as Literal bytes through each channel's zstd
 * stream, or as PacketHeader frames (Feature.ChannelPacketHeaders) beside the Runs. Their WAN bytes,
 * and the CPU seconds the encoders and compressors took.
 */
function backLeg(packetHeaders: boolean, payloads: Buffer[][] = []): { headerBytes: number; headerWan: number; runBytes: number; wanBytes: number; cpuSeconds: number } {
  const shared = new MultifdMigration(sender, channelCount);
  shared.begin(layout);
  shared.endMain();
  shared.receiverTable = new ReceiverTable(sender.digests);
  shared.packetHeaders = packetHeaders;
  let headerBytes = 0;
  let headerWan = 0;
  let runBytes = 0;
  let wanBytes = 0;
  const started = process.cpuUsage();
  for (const channel of back.channels) {
    const sent: Buffer[] = [];
    payloads.push(sent);
    const literals = new LiteralFrames((bytes) => (wanBytes += bytes.length), ZSTD);
    const encoder = new MultifdEncoder(
      {
        literal: (bytes) => {
          headerBytes += bytes.length;
          literals.literal(bytes);
        },
        run: (payload) => {
          literals.flush();
          runBytes += FRAME_HEADER_BYTES + payload.length;
          wanBytes += FRAME_HEADER_BYTES + payload.length;
        },
        packetHeader: (payload) => {
          literals.flush();
          headerBytes += PACKET_HEADER_BYTES;
          headerWan += FRAME_HEADER_BYTES + payload.length;
          wanBytes += FRAME_HEADER_BYTES + payload.length;
          sent.push(Buffer.from(payload));
        },
      },
      shared,
    );
    for (let at = 0; at < channel.length; at += CHUNK) {
      encoder.push(channel.subarray(at, at + CHUNK));
      literals.flush();
    }
    encoder.end();
    literals.flush();
  }
  const used = process.cpuUsage(started);
  // Literal bytes' WAN share: all but the Runs and the PacketHeader frames.
  if (!packetHeaders) headerWan = wanBytes - runBytes;
  return { headerBytes, headerWan, runBytes, wanBytes, cpuSeconds: (used.user + used.system) / 1e6 };
}

const guestPages = back.normalPages + back.zeroPages;
console.log(`QEMU 10.0 back leg, ${channelCount} channels, ${back.normalPages} normal and ${back.zeroPages} zero pages, every normal page held:`);
// Each way twice, the second timed: the first warms the code up.
for (const packetHeaders of [false, true]) backLeg(packetHeaders);
for (const packetHeaders of [false, true]) {
  const leg = backLeg(packetHeaders);
  const how = packetHeaders ? 'as PacketHeader frames' : 'as Literal bytes, zstd';
  console.log(`  packet headers ${how}: ${(leg.headerBytes / guestPages).toFixed(2)} B a guest page, over the WAN ${(leg.headerWan / guestPages).toFixed(3)} (${(leg.headerWan / leg.headerBytes).toFixed(3)}×)`);
  console.log(`    Runs ${(leg.runBytes / back.normalPages).toFixed(3)} B a held page; WAN in all ${leg.wanBytes} B, ${(leg.wanBytes / guestPages).toFixed(2)} B a guest page; encoders' CPU ${(leg.cpuSeconds * 1000).toFixed(1)} ms`);
}

/**
 * The PacketHeader form's own cost, each channel's headers in order through a fresh PacketHeaders pair:
 * the receiver's decoding of the payloads the back leg sent, and the sender's encoding of what they stand for.
 */
function formCost(payloads: Buffer[][], rounds: number): { encodeNs: number; decodeNs: number; headers: number } {
  const rebuilt = payloads.map((channel) => {
    const side = new PacketHeaders();
    return channel.map((payload) => {
      const out = Buffer.alloc(PACKET_HEADER_BYTES);
      side.decode(payload, out);
      return out;
    });
  });
  const headers = rebuilt.reduce((n, channel) => n + channel.length, 0);
  const out = Buffer.alloc(PACKET_HEADER_BYTES);
  const payloadOut = Buffer.alloc(MAX_PACKET_HEADER_PAYLOAD);
  let started = process.hrtime.bigint();
  for (let r = 0; r < rounds; r++) {
    for (const channel of payloads) {
      const side = new PacketHeaders();
      for (const payload of channel) side.decode(payload, out);
    }
  }
  const decodeNs = Number(process.hrtime.bigint() - started) / (rounds * headers);
  started = process.hrtime.bigint();
  for (let r = 0; r < rounds; r++) {
    for (const channel of rebuilt) {
      const side = new PacketHeaders();
      for (const header of channel) side.encode(header, payloadOut);
    }
  }
  const encodeNs = Number(process.hrtime.bigint() - started) / (rounds * headers);
  return { encodeNs, decodeNs, headers };
}

const sentPayloads: Buffer[][] = [];
backLeg(true, sentPayloads);
formCost(sentPayloads, 3); // warm-up
const form = formCost(sentPayloads, 20);
console.log(`  the PacketHeader form over the leg's ${form.headers} headers: encode ${form.encodeNs.toFixed(0)} ns, decode ${form.decodeNs.toFixed(0)} ns a header`);
