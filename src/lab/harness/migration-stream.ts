/**
 * Synthetic migration streams of a guest memory image, in QEMU 7.2 framing, for tests of the proxy:
 * a bulk round over every page (fill records for zero pages), further rounds over dirtied pages, then
 * device state and the vmdesc trailer; optionally with QEMU 10's SWITCHOVER_START, postcopy's ADVISE,
 * or a switch to postcopy (the device state in a package, the later rounds after it).
 */
import { RamFlag, type RamBlock, RecordKind, SectionType, StreamWriter, VmCommand } from '../../qemu';

export const PAGE = 4096;

export interface GuestMemory {
  blocks: RamBlock[];
  pages: Buffer[];
}

export function guestMemory(layout: [string, number][], seed: number, zeroShare = 0.3): GuestMemory {
  const blocks: RamBlock[] = [];
  let first = 0;
  for (const [name, pages] of layout) {
    blocks.push({ index: blocks.length, name, length: pages * PAGE, firstPage: first, pages });
    first += pages;
  }
  let x = seed >>> 0 || 1;
  const rand = (): number => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
  const pages: Buffer[] = [];
  for (let i = 0; i < first; i++) {
    const page = Buffer.alloc(PAGE);
    if (rand() / 2 ** 32 >= zeroShare) for (let w = 0; w < PAGE; w += 4) page.writeUInt32LE(rand(), w);
    pages.push(page);
  }
  return { blocks, pages };
}

/** Rewrites `share` of the pages with new content; returns their indexes. */
export function dirty(memory: GuestMemory, share: number, seed: number): number[] {
  const changed: number[] = [];
  let x = seed >>> 0 || 7;
  for (let i = 0; i < memory.pages.length; i++) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    if (x / 2 ** 32 < share) {
      const page = Buffer.alloc(PAGE);
      for (let w = 0; w < PAGE; w += 4) {
        x = (Math.imul(x, 1103515245) + 12345) >>> 0;
        page.writeUInt32LE(x, w);
      }
      memory.pages[i] = page;
      changed.push(i);
    }
  }
  return changed;
}

/**
 * Rewrites `bytes` bytes at pseudo-random offsets inside a `share` of the pages, as a database or a
 * key-value store changes records in place; returns the pages changed.
 */
export function patchPages(memory: GuestMemory, share: number, bytes: number, seed: number): number[] {
  const changed: number[] = [];
  let x = seed >>> 0 || 7;
  const next = (): number => (x = (Math.imul(x, 1103515245) + 12345) >>> 0);
  for (let i = 0; i < memory.pages.length; i++) {
    if (next() / 2 ** 32 >= share) continue;
    const page = Buffer.from(memory.pages[i]);
    for (let b = 0; b < bytes; b++) page[next() % PAGE] ^= 1 + (next() % 255);
    memory.pages[i] = page;
    changed.push(i);
  }
  return changed;
}

/**
 * Makes pages to…to+count-1 copies of pages from…from+count-1, each with a 16-byte header of its own, as
 * the test guest's heap holds file pages: alike in all but their first bytes. Zero pages are passed over
 * (a copy of one would be a zero page with a header). Returns the pages made.
 */
export function copiesWithHeaders(memory: GuestMemory, from: number, to: number, count: number): number[] {
  const made: number[] = [];
  for (let i = 0; i < count; i++) {
    const source = memory.pages[from + i];
    if (source.every((byte) => byte === 0)) continue;
    const page = Buffer.from(source);
    page.writeUInt32LE(0x574b4c44, 0);
    page.writeUInt32LE(to + i, 4);
    page.writeUInt32LE(7, 8);
    memory.pages[to + i] = page;
    made.push(to + i);
  }
  return made;
}

export interface StreamShape {
  machine?: string;
  /** The source says SWITCHOVER_START as it stops the guest (QEMU 10.0 machine types). */
  switchoverStart?: boolean;
  /** postcopy-ram on: POSTCOPY_ADVISE opens the stream. */
  postcopyAdvise?: boolean;
  /**
   * Postcopy starts before later round `postcopyAt` (0: before the first later round): the device state
   * goes in a package, and the remaining rounds follow it, ending with RAM's END, EOF and no vmdesc.
   */
  postcopyAt?: number;
  /**
   * The main channel of a multifd migration (multifd-stream.ts has its channels): one RAM section (one
   * EOS, matching one SYNC on every channel) per round, with the zero pages only (7.2) or no page (10.0).
   */
  multifd?: 'qemu-7.2' | 'qemu-10.0';
  /** Page memory as each round sees it (default: memory.pages throughout). */
  pagesOf?: (round: number) => Buffer[];
}

const command = (w: StreamWriter, code: number, data: Buffer = Buffer.alloc(0)): void =>
  w.write({ kind: RecordKind.Command, command: code, data, streamOffset: 0 });

/** The one device section of these streams, with a footer-like byte pair inside its data. */
function writeDeviceState(w: StreamWriter): void {
  w.write({ kind: RecordKind.SectionHeader, type: SectionType.Full, sectionId: 3, idstr: 'timer', instanceId: 0, versionId: 2, streamOffset: 0 });
  w.write({ kind: RecordKind.SectionData, sectionId: 3, bytes: Buffer.from([1, 2, 3, 0x7e, 0, 0, 0, 3]), streamOffset: 0 });
  w.write({ kind: RecordKind.SectionFooter, sectionId: 3, streamOffset: 0 });
}

/** The postcopy package as QEMU builds it: LISTEN, the device state, PING 3, RUN. */
function postcopyPackage(): Buffer {
  const parts: Buffer[] = [];
  const p = new StreamWriter((b) => parts.push(Buffer.from(b)), 64 * 1024);
  command(p, VmCommand.PostcopyListen);
  writeDeviceState(p);
  command(p, VmCommand.Ping, Buffer.of(0, 0, 0, 3));
  command(p, VmCommand.PostcopyRun);
  p.flush();
  return Buffer.concat(parts);
}

/**
 * A whole migration: bulk round over every page, then each later round over the pages listed; with
 * `shape`, the commands of current QEMU and postcopy.
 */
export function migrationStream(memory: GuestMemory, laterRounds: number[][], machineOrShape: string | StreamShape = 'pc-i440fx-7.2'): Buffer {
  const shape: StreamShape = typeof machineOrShape === 'string' ? { machine: machineOrShape } : machineOrShape;
  const parts: Buffer[] = [];
  const w = new StreamWriter((b) => parts.push(Buffer.from(b)), 64 * 1024);
  const ram = { kind: RecordKind.SectionHeader, sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 } as const;
  w.write({ kind: RecordKind.FileHeader, version: 3, streamOffset: 0 });
  w.write({ kind: RecordKind.Configuration, machineType: shape.machine ?? 'pc-i440fx-7.2', subsections: [], streamOffset: 0 });
  if (shape.postcopyAdvise || shape.postcopyAt !== undefined) {
    const pageSizes = Buffer.alloc(16);
    pageSizes.writeBigUInt64BE(BigInt(PAGE), 0);
    pageSizes.writeBigUInt64BE(BigInt(PAGE), 8);
    command(w, VmCommand.PostcopyAdvise, pageSizes);
  }
  w.write({ ...ram, type: SectionType.Start, streamOffset: 0 });
  const total = memory.blocks.reduce((s, b) => s + b.length, 0);
  w.write({ kind: RecordKind.RamBlockList, flags: RamFlag.MemSize, totalBytes: total, blocks: memory.blocks, streamOffset: 0 });
  const endSection = (): void => {
    w.write({ kind: RecordKind.RamEos, flags: RamFlag.Eos, offset: 0, streamOffset: 0 });
    w.write({ kind: RecordKind.SectionFooter, sectionId: 2, streamOffset: 0 });
  };
  endSection();
  let lastBlock = -1;
  let round = 0;
  const sendPage = (index: number): void => {
    const block = memory.blocks.find((b) => index >= b.firstPage && index < b.firstPage + b.pages) as RamBlock;
    const page = (shape.pagesOf ? shape.pagesOf(round) : memory.pages)[index];
    const zero = page.every((v) => v === 0);
    if (shape.multifd !== undefined && (!zero || shape.multifd === 'qemu-10.0')) return;
    const flags = (zero ? RamFlag.Zero : RamFlag.Page) | (block.index === lastBlock ? RamFlag.Continue : 0);
    lastBlock = block.index;
    w.write({
      kind: zero ? RecordKind.RamZero : RecordKind.RamPage,
      flags,
      block,
      offset: (index - block.firstPage) * PAGE,
      pageIndex: index,
      byteValue: 0,
      data: page,
      dataStart: 0,
      dataLength: zero ? 0 : PAGE,
      streamOffset: 0,
    });
  };
  const rounds = [memory.pages.map((_, i) => i), ...laterRounds];
  const postcopyRound = shape.postcopyAt === undefined ? -1 : shape.postcopyAt + 1;
  const perSection = shape.multifd !== undefined ? Infinity : 200;
  rounds.forEach((pages, r) => {
    round = r;
    // QEMU stops the guest and says so before the last round (precopy) or before the package.
    if (shape.switchoverStart && r === (postcopyRound >= 0 ? postcopyRound : rounds.length - 1)) command(w, VmCommand.SwitchoverStart);
    if (r === postcopyRound) {
      const discard = Buffer.concat([Buffer.of(0, memory.blocks[0].name.length), Buffer.from(memory.blocks[0].name), Buffer.of(0), Buffer.alloc(16)]);
      discard.writeBigUInt64BE(BigInt(PAGE), discard.length - 8);
      command(w, VmCommand.PostcopyRamDiscard, discard);
      command(w, VmCommand.Ping, Buffer.of(0, 0, 0, 2));
      const pkg = postcopyPackage();
      const length = Buffer.alloc(4);
      length.writeUInt32BE(pkg.length);
      command(w, VmCommand.Packaged, length);
      w.flush();
      parts.push(pkg);
    }
    // Sections of at most 200 pages, as QEMU's rate-limited iterations cut them.
    for (let at = 0; at < pages.length || (at === 0 && r === rounds.length - 1); at += perSection) {
      const last = r === rounds.length - 1 && at + perSection >= pages.length;
      w.write({ ...ram, type: last ? SectionType.End : SectionType.Part, streamOffset: 0 });
      for (const index of pages.slice(at, at + perSection)) sendPage(index);
      endSection();
      if (last) break;
    }
  });
  if (postcopyRound >= 0) {
    w.write({ kind: RecordKind.Eof, streamOffset: 0 });
    w.flush();
    return Buffer.concat(parts);
  }
  writeDeviceState(w);
  w.write({ kind: RecordKind.Eof, streamOffset: 0 });
  const json = Buffer.from(JSON.stringify({ page_size: PAGE, devices: [{ name: 'timer', instance_id: 0 }] }));
  w.write({ kind: RecordKind.VmDescriptionHeader, length: json.length, streamOffset: 0 });
  w.write({ kind: RecordKind.VmDescriptionData, sectionId: 0, bytes: json, streamOffset: 0 });
  w.flush();
  return Buffer.concat(parts);
}

/** The first records of a stream, up to the RAM block list: what a receiver needs to lay out its store. */
export function streamStart(blocks: [string, number][], machine = 'pc-i440fx-7.2'): Buffer {
  const parts: Buffer[] = [];
  const w = new StreamWriter((b) => parts.push(Buffer.from(b)), 64 * 1024);
  const layout: RamBlock[] = [];
  let first = 0;
  for (const [name, bytes] of blocks) {
    layout.push({ index: layout.length, name, length: bytes, firstPage: first, pages: bytes / PAGE });
    first += bytes / PAGE;
  }
  w.write({ kind: RecordKind.FileHeader, version: 3, streamOffset: 0 });
  w.write({ kind: RecordKind.Configuration, machineType: machine, subsections: [], streamOffset: 0 });
  w.write({ kind: RecordKind.SectionHeader, type: SectionType.Start, sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4, streamOffset: 0 });
  const total = layout.reduce((s, b) => s + b.length, 0);
  w.write({ kind: RecordKind.RamBlockList, flags: RamFlag.MemSize, totalBytes: total, blocks: layout, streamOffset: 0 });
  w.flush();
  return Buffer.concat(parts);
}
