/**
 * Synthetic pre-copy migration streams of a guest memory image, in QEMU 7.2 framing, for tests of
 * the proxy: a bulk round over every page (fill records for zero pages), further rounds over dirtied
 * pages, then device state and the vmdesc trailer.
 */
import { RamFlag, type RamBlock, RecordKind, SectionType, StreamWriter } from '../../qemu';

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

/** A whole migration: bulk round over every page, then each later round over the pages listed. */
export function migrationStream(memory: GuestMemory, laterRounds: number[][], machine = 'pc-i440fx-7.2'): Buffer {
  const parts: Buffer[] = [];
  const w = new StreamWriter((b) => parts.push(Buffer.from(b)), 64 * 1024);
  const ram = { kind: RecordKind.SectionHeader, sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 } as const;
  w.write({ kind: RecordKind.FileHeader, version: 3, streamOffset: 0 });
  w.write({ kind: RecordKind.Configuration, machineType: machine, subsections: [], streamOffset: 0 });
  w.write({ ...ram, type: SectionType.Start, streamOffset: 0 });
  const total = memory.blocks.reduce((s, b) => s + b.length, 0);
  w.write({ kind: RecordKind.RamBlockList, flags: RamFlag.MemSize, totalBytes: total, blocks: memory.blocks, streamOffset: 0 });
  const endSection = (): void => {
    w.write({ kind: RecordKind.RamEos, flags: RamFlag.Eos, offset: 0, streamOffset: 0 });
    w.write({ kind: RecordKind.SectionFooter, sectionId: 2, streamOffset: 0 });
  };
  endSection();
  let lastBlock = -1;
  const sendPage = (index: number): void => {
    const block = memory.blocks.find((b) => index >= b.firstPage && index < b.firstPage + b.pages) as RamBlock;
    const page = memory.pages[index];
    const zero = page.every((v) => v === 0);
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
  rounds.forEach((round, r) => {
    // Sections of at most 200 pages, as QEMU's rate-limited iterations cut them.
    for (let at = 0; at < round.length || (at === 0 && r === rounds.length - 1); at += 200) {
      const last = r === rounds.length - 1 && at + 200 >= round.length;
      w.write({ ...ram, type: last ? SectionType.End : SectionType.Part, streamOffset: 0 });
      for (const index of round.slice(at, at + 200)) sendPage(index);
      endSection();
      if (last) break;
    }
  });
  w.write({ kind: RecordKind.SectionHeader, type: SectionType.Full, sectionId: 3, idstr: 'timer', instanceId: 0, versionId: 2, streamOffset: 0 });
  w.write({ kind: RecordKind.SectionData, sectionId: 3, bytes: Buffer.from([1, 2, 3, 0x7e, 0, 0, 0, 3]), streamOffset: 0 });
  w.write({ kind: RecordKind.SectionFooter, sectionId: 3, streamOffset: 0 });
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
