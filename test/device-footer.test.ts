import { DeviceFooterScanner, FOOTER_LOOKAHEAD, FooterVerdict } from '../src/qemu/device-footer';

/** Sections 2 (ram) and 3 (the device whose data is being scanned) have been started. */
function scanner(): DeviceFooterScanner {
  const s = new DeviceFooterScanner(new Set([2, 3]));
  s.expect(3);
  return s;
}

const FOOTER_3 = [0x7e, 0, 0, 0, 3];
const be32 = (n: number): number[] => [n >>> 24, (n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff];
const startHeader = (type: number, id: number, name: string): number[] => [type, ...be32(id), name.length, ...Buffer.from(name, 'latin1'), ...be32(0), ...be32(1)];

/** The verdict on a candidate at index 2 of `[0xaa, 0xbb, ...bytes]`, the stream going on or ending there. */
function judge(bytes: number[], final = false): FooterVerdict {
  const buf = Buffer.from([0xaa, 0xbb, ...bytes]);
  return scanner().verdict(buf, 2, buf.length, final);
}

describe('DeviceFooterScanner.verdict: a candidate is a footer only when a record that may follow a section follows it', () => {
  test('EOF then the vmdesc trailer', () => {
    expect(judge([...FOOTER_3, 0x00, 0x06])).toBe(FooterVerdict.Footer);
    expect(judge([...FOOTER_3, 0x00, 0x07])).toBe(FooterVerdict.Data);
  });

  test('a new section with a printable name', () => {
    expect(judge([...FOOTER_3, ...startHeader(0x04, 4, 'apic')])).toBe(FooterVerdict.Footer);
    expect(judge([...FOOTER_3, ...startHeader(0x01, 9, 'block')])).toBe(FooterVerdict.Footer);
    // An id already started, an empty name, a name with a control byte or a space: device data.
    expect(judge([...FOOTER_3, ...startHeader(0x04, 2, 'apic')])).toBe(FooterVerdict.Data);
    expect(judge([...FOOTER_3, ...startHeader(0x04, 4, '')])).toBe(FooterVerdict.Data);
    expect(judge([...FOOTER_3, ...startHeader(0x04, 4, 'ap\x01c')])).toBe(FooterVerdict.Data);
    expect(judge([...FOOTER_3, ...startHeader(0x04, 4, 'a pic')])).toBe(FooterVerdict.Data);
  });

  test('PART or END of a known section', () => {
    expect(judge([...FOOTER_3, 0x02, ...be32(2)])).toBe(FooterVerdict.Footer);
    expect(judge([...FOOTER_3, 0x03, ...be32(2)])).toBe(FooterVerdict.Footer);
    expect(judge([...FOOTER_3, 0x02, ...be32(7)])).toBe(FooterVerdict.Data);
  });

  test('a command QEMU sends on the main channel', () => {
    expect(judge([...FOOTER_3, 0x08, 0, 2])).toBe(FooterVerdict.Footer);
    expect(judge([...FOOTER_3, 0x08, 0, 11])).toBe(FooterVerdict.Footer);
    expect(judge([...FOOTER_3, 0x08, 0, 0])).toBe(FooterVerdict.Data);
    expect(judge([...FOOTER_3, 0x08, 0, 12])).toBe(FooterVerdict.Data);
    expect(judge([...FOOTER_3, 0x08, 1, 2])).toBe(FooterVerdict.Data);
  });

  test('anything else after it, or another section\'s footer, is device data', () => {
    expect(judge([...FOOTER_3, 0x09, 0x01])).toBe(FooterVerdict.Data);
    expect(judge([...FOOTER_3, 0x7e, 0, 0, 0, 3])).toBe(FooterVerdict.Data);
    expect(judge([0x7e, 0, 0, 0, 2, 0x00, 0x06])).toBe(FooterVerdict.Data);
  });

  test('too few bytes: more are needed, or at the stream\'s end it is decided', () => {
    expect(judge([0x7e, 0, 0])).toBe(FooterVerdict.NeedMore);
    expect(judge([0x7e, 0, 0], true)).toBe(FooterVerdict.Data);
    // A footer as the last bytes of the stream, or followed only by EOF: the stream ends there.
    expect(judge(FOOTER_3)).toBe(FooterVerdict.NeedMore);
    expect(judge(FOOTER_3, true)).toBe(FooterVerdict.Footer);
    expect(judge([...FOOTER_3, 0x00])).toBe(FooterVerdict.NeedMore);
    expect(judge([...FOOTER_3, 0x00], true)).toBe(FooterVerdict.Footer);
    // A header cut short cannot be judged until the rest arrives; at the end it is data.
    const header = [...FOOTER_3, ...startHeader(0x04, 4, 'apic')];
    for (const cut of [6, 10, 12, header.length - 1]) {
      expect(judge(header.slice(0, cut))).toBe(FooterVerdict.NeedMore);
      expect(judge(header.slice(0, cut), true)).toBe(FooterVerdict.Data);
    }
    expect(judge([...FOOTER_3, 0x02, 0, 0])).toBe(FooterVerdict.NeedMore);
    expect(judge([...FOOTER_3, 0x08, 0])).toBe(FooterVerdict.NeedMore);
  });

  test('FOOTER_LOOKAHEAD bytes decide even a header with the longest name', () => {
    const longest = [...FOOTER_3, ...startHeader(0x04, 4, 'x'.repeat(255))];
    expect(longest.length).toBe(FOOTER_LOOKAHEAD);
    const buf = Buffer.from(longest);
    expect(scanner().verdict(buf, 0, FOOTER_LOOKAHEAD, false)).toBe(FooterVerdict.Footer);
    expect(scanner().verdict(buf, 0, FOOTER_LOOKAHEAD - 1, false)).toBe(FooterVerdict.NeedMore);
  });

  test('expect() switches the section whose footer is looked for', () => {
    const s = scanner();
    const buf = Buffer.from([0x7e, 0, 0, 1, 0, 0x00, 0x06]);
    expect(s.verdict(buf, 0, buf.length, false)).toBe(FooterVerdict.Data);
    s.expect(256);
    expect(s.verdict(buf, 0, buf.length, false)).toBe(FooterVerdict.Footer);
  });
});

describe('DeviceFooterScanner.nextCandidate', () => {
  test('finds the whole footer of the current section, skipping other 0x7e bytes', () => {
    const chunk = Buffer.from([1, 0x7e, 0, 0, 0, 2, 0x7e, 9, ...FOOTER_3, 0, 0, 0, 0, 0]);
    expect(scanner().nextCandidate(chunk, 0)).toBe(8);
    expect(scanner().nextCandidate(chunk, 9)).toBe(-1);
  });

  test('a 0x7e among the last four bytes may begin a footer that ends in the next chunk', () => {
    expect(scanner().nextCandidate(Buffer.from([1, 2, 3, 4, 5, 0x7e, 0, 0]), 0)).toBe(5);
    expect(scanner().nextCandidate(Buffer.from([1, 2, 3, 4, 5, 6, 7, 0x7e]), 0)).toBe(7);
    // Five bytes from the end it would be whole already: not the footer, so not a candidate.
    expect(scanner().nextCandidate(Buffer.from([1, 2, 0x7e, 0, 0, 0, 9]), 0)).toBe(-1);
    // Not before where scanning starts.
    expect(scanner().nextCandidate(Buffer.from([1, 2, 3, 4, 5, 0x7e, 0, 0]), 6)).toBe(-1);
  });
});
