import { SectionType } from './constants';
import type { ConfigSubsection } from './records';

/** The configuration record: type, u32 name length, name, then its subsections. */
export function encodeConfiguration(machineType: string, subsections: readonly ConfigSubsection[]): Buffer {
  const name = Buffer.from(machineType, 'latin1');
  const parts: Buffer[] = [Buffer.alloc(5), name];
  parts[0][0] = SectionType.Configuration;
  parts[0].writeUInt32BE(name.length, 1);
  for (const sub of subsections) {
    parts.push(encodeSubsectionHeader(sub.name, sub.version));
    switch (sub.name) {
      case 'configuration/target-page-bits': {
        const bits = Buffer.alloc(4);
        bits.writeUInt32BE(sub.targetPageBits);
        parts.push(bits);
        break;
      }
      case 'configuration/capabilities': {
        const count = Buffer.alloc(4);
        count.writeUInt32BE(sub.capabilities.length);
        parts.push(count);
        for (const capability of sub.capabilities) parts.push(encodeShortString(capability));
        break;
      }
      case 'configuration/uuid':
        parts.push(sub.uuid);
        break;
    }
  }
  return Buffer.concat(parts);
}

/** A vmstate subsection header: 0x05, u8 name length, name, u32 version. */
export function encodeSubsectionHeader(name: string, version: number): Buffer {
  const header = Buffer.alloc(1 + 1 + name.length + 4);
  header[0] = SectionType.Subsection;
  header[1] = name.length;
  header.write(name, 2, 'latin1');
  header.writeUInt32BE(version, 2 + name.length);
  return header;
}

/** u8 length + bytes: block names, idstrs, capability names. */
export function encodeShortString(text: string): Buffer {
  const out = Buffer.alloc(1 + text.length);
  out[0] = text.length;
  out.write(text, 1, 'latin1');
  return out;
}

/** Writes u8 length + bytes (a block name, an idstr) at out[at]; returns the next position. */
export function writeShortString(out: Buffer, at: number, text: string): number {
  out[at] = text.length;
  return at + 1 + out.write(text, at + 1, 'latin1');
}

/** Writes a RAM header word (page offset | flags) at out[at]; returns the next position. */
export function writeRamWord(out: Buffer, at: number, offset: number, flags: number): number {
  const high = Math.floor(offset / 0x1_0000_0000);
  const low = (offset - high * 0x1_0000_0000 + flags) >>> 0;
  out.writeUInt32BE(high, at);
  out.writeUInt32BE(low, at + 4);
  return at + 8;
}
