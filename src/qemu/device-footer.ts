import { SectionType, VmCommand } from './constants';

/**
 * Where a device section ends. A non-RAM section's data is opaque and has no length: with footers
 * in use it ends at `0x7e <section id>`, but those five bytes may as well occur inside the data. A
 * candidate is taken for the footer only when what follows it reads as a record that can follow a
 * section: a new section's header with a plausible name, a PART or END of a known section, a known
 * command, or EOF followed by the vmdesc trailer.
 */

/** Bytes from a candidate footer's first byte that always suffice to decide: footer, a START header with the longest name, and its instance and version. */
export const FOOTER_LOOKAHEAD = 5 + 1 + 4 + 1 + 255 + 8;

export const enum FooterVerdict {
  /** The candidate ends the section. */
  Footer,
  /** The candidate's first byte is device data. */
  Data,
  /** Undecided: more bytes are needed (at most FOOTER_LOOKAHEAD from the candidate). */
  NeedMore,
}

/** The sections the stream has started so far. */
export interface KnownSections {
  has(sectionId: number): boolean;
}

/** Finds and judges the candidate footers of one device section at a time. */
export class DeviceFooterScanner {
  /** `0x7e <section id>`: the footer that would end the current section. */
  private readonly pattern = Buffer.alloc(5);

  constructor(private readonly sections: KnownSections) {}

  /** From now on, looks for the footer of `sectionId`. */
  expect(sectionId: number): void {
    this.pattern[0] = SectionType.Footer;
    this.pattern.writeUInt32BE(sectionId, 1);
  }

  /**
   * Where the next candidate in chunk[from..] begins, or -1 for none: the whole footer, or a 0x7e
   * in the last four bytes, which may begin a footer that ends in the next chunk.
   */
  nextCandidate(chunk: Buffer, from: number): number {
    const whole = chunk.indexOf(this.pattern, from);
    if (whole >= 0) return whole;
    return chunk.indexOf(SectionType.Footer, Math.max(from, chunk.length - 4));
  }

  /**
   * Whether the candidate at buf[p] ends the current section, judged on buf[p..end). `final` says
   * the stream ends at `end`, so nothing more will come to decide on.
   */
  verdict(buf: Buffer, p: number, end: number, final: boolean): FooterVerdict {
    const more = final ? FooterVerdict.Data : FooterVerdict.NeedMore;
    if (end - p < 5) return more;
    if (buf.compare(this.pattern, 0, 5, p, p + 5) !== 0) return FooterVerdict.Data;
    const q = p + 5;
    // A footer as the very last bytes leaves a truncated stream either way; call it a footer.
    if (q >= end) return final ? FooterVerdict.Footer : FooterVerdict.NeedMore;
    switch (buf[q]) {
      case SectionType.Eof:
        if (end - q < 2) return final ? FooterVerdict.Footer : more;
        return buf[q + 1] === SectionType.VmDescription ? FooterVerdict.Footer : FooterVerdict.Data;
      case SectionType.Full:
      case SectionType.Start: {
        if (end - q < 6) return more;
        const id = buf.readUInt32BE(q + 1);
        const length = buf[q + 5];
        if (length === 0 || this.sections.has(id)) return FooterVerdict.Data;
        if (end - q < 6 + length + 8) return more;
        for (let i = q + 6; i < q + 6 + length; i++) {
          const c = buf[i];
          if (c < 0x21 || c > 0x7e) return FooterVerdict.Data;
        }
        return FooterVerdict.Footer;
      }
      case SectionType.Part:
      case SectionType.End: {
        if (end - q < 5) return more;
        return this.sections.has(buf.readUInt32BE(q + 1)) ? FooterVerdict.Footer : FooterVerdict.Data;
      }
      case SectionType.Command: {
        if (end - q < 3) return more;
        const command = buf.readUInt16BE(q + 1);
        return command >= VmCommand.OpenReturnPath && command <= VmCommand.SwitchoverStart ? FooterVerdict.Footer : FooterVerdict.Data;
      }
      default:
        return FooterVerdict.Data;
    }
  }
}
