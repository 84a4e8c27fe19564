/**
 * Hand-built migration streams, one per record kind and per bad-input class. They are encoded here
 * byte by byte, independently of src/qemu's writer, from the layouts in QEMU's savevm.c and ram.c.
 * `npm run fixtures` writes them to fixtures/; test/qemu-parser-fixtures.test.ts checks the files still match.
 */

export type Expectation =
  | { outcome: 'ok'; framing: 'current' | 'legacy'; normal: number; zero: number; xbzrle?: number; compressed?: number; sections: number }
  | { outcome: 'fallback'; reasonIncludes: string; offset: number }
  | { outcome: 'error'; code: string; offset: number };

export interface Fixture {
  name: string;
  description: string;
  bytes: Buffer;
  expect: Expectation;
}

const PAGE = 4096;

/** A byte builder that knows the QEMU encodings. */
class B {
  private parts: Buffer[] = [];
  length = 0;
  raw(bytes: Buffer | number[]): this {
    const buf = Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes);
    this.parts.push(buf);
    this.length += buf.length;
    return this;
  }
  u8(v: number): this {
    return this.raw([v & 0xff]);
  }
  be16(v: number): this {
    const b = Buffer.alloc(2);
    b.writeUInt16BE(v);
    return this.raw(b);
  }
  be32(v: number): this {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(v >>> 0);
    return this.raw(b);
  }
  be64(v: bigint): this {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(v);
    return this.raw(b);
  }
  str8(s: string): this {
    return this.u8(s.length).raw(Buffer.from(s, 'latin1'));
  }
  header(version = 3): this {
    return this.raw(Buffer.from('QEVM', 'latin1')).be32(version);
  }
  config(machine: string): this {
    return this.u8(0x07).be32(machine.length).raw(Buffer.from(machine, 'latin1'));
  }
  start(id: number, idstr: string, instance = 0, version = 4, type = 0x01): this {
    return this.u8(type).be32(id).str8(idstr).be32(instance).be32(version);
  }
  part(id: number, type = 0x02): this {
    return this.u8(type).be32(id);
  }
  footer(id: number): this {
    return this.u8(0x7e).be32(id);
  }
  word(offset: number, flags: number): this {
    return this.be64(BigInt(offset) | BigInt(flags));
  }
  memSize(blocks: [string, number][]): this {
    const total = blocks.reduce((s, [, len]) => s + len, 0);
    this.word(total, 0x04);
    for (const [name, len] of blocks) this.str8(name).be64(BigInt(len));
    return this;
  }
  page(offset: number, block: string | null, seed: number): this {
    this.word(offset, 0x08 | (block === null ? 0x20 : 0));
    if (block !== null) this.str8(block);
    return this.raw(pageBytes(seed));
  }
  zero(offset: number, block: string | null): this {
    this.word(offset, 0x02 | (block === null ? 0x20 : 0));
    if (block !== null) this.str8(block);
    return this.u8(0);
  }
  eos(): this {
    return this.word(0, 0x10);
  }
  build(): Buffer {
    return Buffer.concat(this.parts);
  }
}

/** A deterministic non-zero page. */
function pageBytes(seed: number): Buffer {
  const out = Buffer.alloc(PAGE);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < PAGE; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    out.writeUInt32LE(x, i);
  }
  return out;
}

const BLOCKS: [string, number][] = [
  ['pc.ram', 8 * PAGE],
  ['0000:00:02.0/vga.vram', 2 * PAGE],
];

/** RAM setup, one iteration and completion, without framing-specific bits. */
function ramLegacy(b: B): B {
  b.start(2, 'ram').memSize(BLOCKS).eos();
  b.part(2).page(0, 'pc.ram', 1).zero(PAGE, null).page(2 * PAGE, null, 2).page(0, '0000:00:02.0/vga.vram', 3).eos();
  b.part(2, 0x03).page(0, 'pc.ram', 4).zero(7 * PAGE, null).eos();
  return b;
}

/** Device data that contains the byte patterns a footer scanner could trip on. */
function deviceData(id: number): Buffer {
  return Buffer.concat([
    Buffer.from([0x00, 0x7e, 0x00, 0x00, 0x00]),
    Buffer.from([0x7e, 0, 0, 0, id, 0x09, 0x01]), // a footer-looking pattern followed by junk
    Buffer.from([0x7e, 0, 0, 0, id, 0x04, 0, 0, 0, 99, 0]), // ...followed by a zero-length idstr
    Buffer.from('device state \x7e\x00', 'latin1'),
  ]);
}

function legacyBasic(): Fixture {
  const b = new B().header();
  ramLegacy(b);
  b.start(3, 'timer', 0, 2, 0x04).raw(deviceData(3));
  b.start(4, 'apic', 0, 3, 0x04).raw(Buffer.from([1, 2, 3, 0x7e]));
  b.u8(0x00);
  return {
    name: 'legacy-basic',
    description: 'QEMU 2.0 framing: no configuration, no footers, no vmdesc; pages, zero pages, CONTINUE, two blocks, device state',
    bytes: b.build(),
    expect: { outcome: 'ok', framing: 'legacy', normal: 4, zero: 2, sections: 3 },
  };
}

function currentRam(b: B): B {
  b.start(2, 'ram').memSize(BLOCKS).eos().footer(2);
  b.part(2).page(0, 'pc.ram', 1).zero(PAGE, null).page(2 * PAGE, null, 2).page(0, '0000:00:02.0/vga.vram', 3).eos().footer(2);
  b.part(2, 0x03).page(PAGE, null, 5).page(0, 'pc.ram', 4).zero(7 * PAGE, null).eos().footer(2);
  return b;
}

/** The vmdesc trailer naming `devices` (instance 0 each). */
function vmDescription(b: B, devices: string[]): B {
  const json = JSON.stringify({ page_size: 4096, devices: devices.map((name) => ({ name, instance_id: 0 })) });
  return b.u8(0x06).be32(json.length).raw(Buffer.from(json));
}

function currentBasic(): Fixture {
  const b = new B().header().config('pc-i440fx-7.2');
  currentRam(b);
  b.start(3, 'timer', 0, 2, 0x04).raw(deviceData(3)).footer(3);
  b.start(4, 'apic', 0, 3, 0x04).raw(Buffer.from([1, 2, 0x7e, 0, 0, 0, 4])).footer(4);
  b.u8(0x00);
  vmDescription(b, ['timer', 'apic']);
  return {
    name: 'current-basic',
    description: 'QEMU 7.2 framing: configuration, footers, device sections whose data holds footer-like bytes, vmdesc',
    bytes: b.build(),
    expect: { outcome: 'ok', framing: 'current', normal: 5, zero: 2, sections: 3 },
  };
}

function currentNoVmdesc(): Fixture {
  const b = new B().header().config('pc-q35-7.2');
  currentRam(b);
  b.start(3, 'timer', 0, 2, 0x04).raw(Buffer.from([0x7e, 0, 0, 0])).footer(3);
  b.u8(0x00);
  return {
    name: 'current-no-vmdesc',
    description: 'Footers but the vmdesc suppressed: the stream ends at EOF right after a footer',
    bytes: b.build(),
    expect: { outcome: 'ok', framing: 'current', normal: 5, zero: 2, sections: 2 },
  };
}

function configSubsections(): Fixture {
  const b = new B().header().config('pc-i440fx-7.2');
  b.u8(0x05).str8('configuration/target-page-bits').be32(1).be32(12);
  b.u8(0x05).str8('configuration/capabilities').be32(1).be32(1).str8('x-ignore-shared');
  b.u8(0x05).str8('configuration/uuid').be32(1).raw(Buffer.alloc(16, 0xab));
  // x-ignore-shared adds each block's guest address to the block list.
  b.start(2, 'ram').word(3 * PAGE, 0x04).str8('pc.ram').be64(3n * 4096n).be64(0x100000n).eos().footer(2);
  b.part(2, 0x03).page(PAGE, 'pc.ram', 9).eos().footer(2);
  b.start(3, 'timer', 0, 2, 0x04).raw(Buffer.from([5])).footer(3).u8(0);
  return {
    name: 'config-subsections',
    description: 'Configuration with target-page-bits, capabilities (x-ignore-shared) and uuid subsections',
    bytes: b.build(),
    expect: { outcome: 'ok', framing: 'current', normal: 1, zero: 0, sections: 2 },
  };
}

function xbzrleCompressMultifd(): Fixture {
  const b = new B().header().config('pc-i440fx-7.2');
  b.start(2, 'ram').memSize(BLOCKS).eos().footer(2);
  b.part(2).page(0, 'pc.ram', 1);
  b.word(0, 0x40 | 0x20).u8(0x01).be16(5).raw([1, 2, 3, 4, 5]); // XBZRLE, same block
  b.word(PAGE, 0x100).str8('pc.ram').be32(6).raw([0x78, 0x9c, 1, 2, 3, 4]); // COMPRESS_PAGE
  b.word(0, 0x200); // MULTIFD_FLUSH
  b.eos().footer(2);
  b.part(2, 0x03).eos().footer(2);
  b.start(3, 'timer', 0, 2, 0x04).raw(Buffer.from([5])).footer(3).u8(0);
  return {
    name: 'xbzrle-compress-multifd',
    description: 'XBZRLE delta, COMPRESS_PAGE and MULTIFD_FLUSH records',
    bytes: b.build(),
    expect: { outcome: 'ok', framing: 'current', normal: 1, zero: 0, xbzrle: 1, compressed: 1, sections: 2 },
  };
}

function commands(): Fixture {
  const b = new B().header().config('pc-i440fx-7.2');
  b.u8(0x08).be16(1).be16(0); // OPEN_RETURN_PATH
  b.u8(0x08).be16(2).be16(4).be32(7); // PING 7
  currentRam(b);
  b.start(3, 'timer', 0, 2, 0x04).raw(Buffer.from([5])).footer(3);
  b.u8(0x08).be16(2).be16(4).be32(8); // a command after device state
  b.start(4, 'apic', 0, 3, 0x04).raw(Buffer.from([6])).footer(4).u8(0);
  return {
    name: 'commands',
    description: 'Return-path and ping commands, before RAM and between device sections',
    bytes: b.build(),
    expect: { outcome: 'ok', framing: 'current', normal: 5, zero: 2, sections: 3 },
  };
}

/** QEMU 10.0 with postcopy-ram and the return path on: precopy to the end, the commands on the way. */
function commandsQemu10(): Fixture {
  const b = new B().header().config('pc-i440fx-10.0');
  b.u8(0x08).be16(3).be16(16).be64(4096n).be64(4096n); // POSTCOPY_ADVISE: host and target page sizes
  b.u8(0x08).be16(1).be16(0); // OPEN_RETURN_PATH
  b.u8(0x08).be16(2).be16(4).be32(1); // PING 1
  b.start(2, 'ram').memSize(BLOCKS).eos().footer(2);
  b.part(2).page(0, 'pc.ram', 1).zero(PAGE, null).page(2 * PAGE, null, 2).eos().footer(2);
  b.u8(0x08).be16(11).be16(0); // SWITCHOVER_START
  b.part(2, 0x03).page(PAGE, 'pc.ram', 5).eos().footer(2);
  b.start(3, 'timer', 0, 2, 0x04).raw(deviceData(3)).footer(3);
  b.u8(0x00);
  vmDescription(b, ['timer']);
  return {
    name: 'commands-qemu10',
    description: 'QEMU 10.0, postcopy-ram allowed, return path: POSTCOPY_ADVISE, OPEN_RETURN_PATH, PING, SWITCHOVER_START',
    bytes: b.build(),
    expect: { outcome: 'ok', framing: 'current', normal: 3, zero: 1, sections: 2 },
  };
}

/** A migration switched to postcopy: the device state in a package, RAM after it, EOF and no vmdesc. */
function postcopy(): Fixture {
  const b = new B().header().config('pc-i440fx-10.0');
  b.u8(0x08).be16(3).be16(16).be64(4096n).be64(4096n); // POSTCOPY_ADVISE
  b.u8(0x08).be16(1).be16(0); // OPEN_RETURN_PATH
  b.start(2, 'ram').memSize(BLOCKS).eos().footer(2);
  b.part(2).page(0, 'pc.ram', 1).zero(PAGE, null).page(2 * PAGE, null, 2).eos().footer(2);
  b.u8(0x08).be16(11).be16(0); // SWITCHOVER_START
  const discard = Buffer.concat([Buffer.from([0, 6]), Buffer.from('pc.ram'), Buffer.from([0]), Buffer.alloc(16)]);
  discard.writeBigUInt64BE(2n * BigInt(PAGE), 9);
  discard.writeBigUInt64BE(BigInt(PAGE), 17);
  b.u8(0x08).be16(6).be16(discard.length).raw(discard); // POSTCOPY_RAM_DISCARD of page 2
  b.u8(0x08).be16(2).be16(4).be32(2); // PING 2
  const pkg = new B();
  pkg.u8(0x08).be16(4).be16(0); // POSTCOPY_LISTEN
  pkg.start(3, 'timer', 0, 2, 0x04).raw(deviceData(3)).footer(3);
  pkg.u8(0x08).be16(2).be16(4).be32(3); // PING 3
  pkg.u8(0x08).be16(5).be16(0); // POSTCOPY_RUN
  const packaged = pkg.build();
  b.u8(0x08).be16(7).be16(4).be32(packaged.length).raw(packaged); // PACKAGED
  b.part(2).page(2 * PAGE, 'pc.ram', 6).page(0, '0000:00:02.0/vga.vram', 3).eos().footer(2);
  b.part(2, 0x03).eos().footer(2);
  b.u8(0x00);
  return {
    name: 'postcopy',
    description: 'Switched to postcopy: RAM_DISCARD, PACKAGED device state (LISTEN, timer, PING, RUN), RAM after it, EOF without vmdesc',
    bytes: b.build(),
    expect: { outcome: 'ok', framing: 'current', normal: 4, zero: 1, sections: 2 },
  };
}

function fallback(name: string, description: string, build: (b: B) => number, reasonIncludes: string): Fixture {
  const b = new B();
  const offset = build(b);
  return { name, description, bytes: b.build(), expect: { outcome: 'fallback', reasonIncludes, offset } };
}

function error(name: string, description: string, build: (b: B) => number, code: string): Fixture {
  const b = new B();
  const offset = build(b);
  return { name, description, bytes: b.build(), expect: { outcome: 'error', code, offset } };
}

/** A stream whose RAM setup is fine, for bad records after it. */
function ramSetup(b: B): B {
  return b.header().config('pc-i440fx-7.2').start(2, 'ram').memSize(BLOCKS).eos().footer(2).part(2);
}

export function buildFixtures(): Fixture[] {
  return [
    legacyBasic(),
    currentBasic(),
    currentNoVmdesc(),
    configSubsections(),
    xbzrleCompressMultifd(),
    commands(),
    commandsQemu10(),
    postcopy(),
    fallback('fallback-newer-version', 'Stream version 4', (b) => {
      b.header(4).raw([1, 2, 3]);
      return 0;
    }, 'newer'),
    fallback('fallback-unknown-section-type', 'Section type 0x09 after RAM setup', (b) => {
      b.header().config('pc-i440fx-7.2').start(2, 'ram').memSize(BLOCKS).eos().footer(2);
      const at = b.length;
      b.u8(0x09).raw([1, 2, 3, 4]);
      return at;
    }, 'unknown section type 0x9'),
    fallback('fallback-unknown-ram-flag', 'RAM flag 0x400', (b) => {
      ramSetup(b);
      const at = b.length;
      b.word(0, 0x400).raw(pageBytes(1));
      return at;
    }, 'unknown RAM flags 0x400'),
    fallback('fallback-rdma-hook', 'RAM_SAVE_FLAG_HOOK', (b) => {
      ramSetup(b);
      const at = b.length;
      b.word(0, 0x80).raw([9, 9]);
      return at;
    }, 'RDMA'),
    fallback('fallback-colo', 'ENABLE_COLO command: COLO checkpoints follow, which bfmig does not parse', (b) => {
      b.header().config('pc-i440fx-7.2');
      currentRam(b);
      const at = b.length;
      b.u8(0x08).be16(8).be16(0);
      b.start(3, 'timer', 0, 2, 0x04).raw(deviceData(3)).footer(3).u8(0);
      return at;
    }, 'migration command 8'),
    fallback('fallback-block-migration', 'A live section other than ram', (b) => {
      b.header().config('pc-i440fx-7.2');
      const at = b.length;
      b.start(5, 'block', 0, 1).raw([0, 0, 0, 0, 0, 0, 0, 2]);
      return at;
    }, 'live section "block"'),
    fallback('fallback-unknown-subsection', 'Configuration subsection QEMU 7.2 does not send', (b) => {
      b.header().config('pc-i440fx-9.2');
      b.u8(0x05).str8('configuration/future').be32(1).raw([1, 2, 3]);
      return 8;
    }, 'configuration/future'),
    fallback('fallback-trailing-bytes', 'Bytes after the vmdesc trailer', (b) => {
      b.header().config('pc-i440fx-7.2').start(2, 'ram').memSize(BLOCKS).eos().footer(2).part(2, 0x03).eos().footer(2);
      b.start(3, 'timer', 0, 2, 0x04).raw([1]).footer(3).u8(0).u8(0x06).be32(2).raw(Buffer.from('{}'));
      const at = b.length;
      b.raw([1, 2, 3]);
      return at;
    }, 'after the end'),
    error('error-bad-magic', 'Not a migration stream', (b) => {
      b.raw(Buffer.from('GET / HTTP/1.1\r\n'));
      return 0;
    }, 'BAD_MAGIC'),
    error('error-obsolete-version', 'Stream version 2', (b) => {
      b.header(2).u8(0);
      return 4;
    }, 'BAD_VERSION'),
    error('error-truncated-page', 'Ends in the middle of a page', (b) => {
      ramSetup(b).word(0, 0x08).str8('pc.ram').raw(Buffer.alloc(100, 1));
      return b.length;
    }, 'TRUNCATED'),
    error('error-truncated-idstr', 'An idstr length that runs past the end of the input', (b) => {
      b.header().config('pc-i440fx-7.2').u8(0x01).be32(2).u8(200).raw(Buffer.from('ram'));
      return b.length;
    }, 'TRUNCATED'),
    error('error-truncated-no-eof', 'Legacy framing whose device state does not end in EOF', (b) => {
      ramLegacy(b.header()).start(3, 'timer', 0, 2, 0x04).raw([1, 2, 3]);
      return b.length;
    }, 'TRUNCATED'),
    error('error-absurd-ram-size', 'A block list claiming exabytes', (b) => {
      b.header().config('pc-i440fx-7.2').start(2, 'ram');
      const at = b.length;
      b.be64((1n << 60n) | 0x04n).str8('pc.ram').be64(1n << 60n);
      return at;
    }, 'ABSURD_LENGTH'),
    error('error-block-exceeds-total', 'A RAM block larger than the total announced', (b) => {
      b.header().config('pc-i440fx-7.2').start(2, 'ram').word(PAGE, 0x04);
      const at = b.length;
      b.str8('pc.ram').be64(BigInt(2 * PAGE));
      return at;
    }, 'ABSURD_LENGTH'),
    error('error-page-out-of-range', 'A page offset beyond its block', (b) => {
      ramSetup(b);
      const at = b.length;
      b.page(8 * PAGE, 'pc.ram', 1);
      return at;
    }, 'PAGE_OUT_OF_RANGE'),
    error('error-unknown-block', 'A page in a block missing from the block list', (b) => {
      ramSetup(b);
      const at = b.length;
      b.page(0, 'pc.bios', 1);
      return at;
    }, 'UNKNOWN_BLOCK'),
    error('error-continue-without-block', 'CONTINUE on the first page record', (b) => {
      b.header().config('pc-i440fx-7.2').start(2, 'ram').memSize(BLOCKS);
      const at = b.length;
      b.page(0, null, 1);
      return at;
    }, 'MALFORMED'),
    error('error-footer-mismatch', 'A footer naming another section', (b) => {
      b.header().config('pc-i440fx-7.2').start(2, 'ram').memSize(BLOCKS).eos();
      const at = b.length;
      b.footer(7);
      return at;
    }, 'FOOTER_MISMATCH'),
    error('error-missing-footer', 'Footers in use, then a section without one', (b) => {
      b.header().config('pc-i440fx-7.2').start(2, 'ram').memSize(BLOCKS).eos().footer(2).part(2).eos();
      const at = b.length;
      b.part(2).eos().footer(2);
      return at;
    }, 'FOOTER_MISMATCH'),
    error('error-xbzrle-too-long', 'An XBZRLE delta longer than a page', (b) => {
      ramSetup(b);
      const at = b.length;
      b.word(0, 0x40).str8('pc.ram').u8(1).be16(PAGE + 1);
      return at;
    }, 'ABSURD_LENGTH'),
    error('error-compressed-too-long', 'A compressed page longer than zlib can make a page', (b) => {
      ramSetup(b);
      const at = b.length;
      b.word(0, 0x100).str8('pc.ram').be32(1 << 30);
      return at;
    }, 'ABSURD_LENGTH'),
    error('error-absurd-config-name', 'A configuration name of 4 GiB', (b) => {
      b.header().u8(0x07).be32(0xffffffff).raw([1, 2, 3]);
      return 8;
    }, 'ABSURD_LENGTH'),
    error('error-absurd-capabilities', 'A billion capabilities', (b) => {
      b.header().config('pc-i440fx-7.2').u8(0x05).str8('configuration/capabilities').be32(1).be32(1e9);
      return 8;
    }, 'ABSURD_LENGTH'),
    error('error-part-of-unknown-section', 'A PART for a section never started', (b) => {
      b.header().config('pc-i440fx-7.2');
      const at = b.length;
      b.part(9).eos();
      return at;
    }, 'MALFORMED'),
  ];
}
