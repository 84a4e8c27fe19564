import { randomFillSync } from 'node:crypto';
import { X86_PAGE_SIZE as PAGE } from '../../qemu/constants';

/**
 * Builds an in-memory QEMU 7.2-framed migration stream of about `gib` GiB of normal pages, laid out
 * as QEMU lays out a first migration: setup, iterations of `pagesPerPart` pages with CONTINUE
 * headers, completion, a device section and EOF. Page contents come from a random pool, so hashing
 * sees realistic, incompressible data.
 */
export function syntheticStream(gib: number, pagesPerPart = 4096): { stream: Buffer; pages: number } {
  const pages = Math.floor((gib * 1024 * 1024 * 1024) / (PAGE + 8));
  const blockBytes = pages * PAGE;
  const parts = Math.ceil(pages / pagesPerPart);
  const size = 8 + 18 + (20 + 8 + 1 + 6 + 8 + 8 + 8 + 5) + parts * (5 + 8 + 5) + pages * (PAGE + 8) + 7 + (5 + 8 + 5) + 64;
  const out = Buffer.allocUnsafe(size);
  const pool = randomFillSync(Buffer.allocUnsafe(64 * 1024 * 1024));
  let p = 0;
  const u8 = (v: number): void => {
    out[p++] = v;
  };
  const be32 = (v: number): void => {
    p = out.writeUInt32BE(v, p);
  };
  const word = (offset: number, flags: number): void => {
    be32(Math.floor(offset / 2 ** 32));
    be32(((offset % 2 ** 32) + flags) >>> 0);
  };
  out.write('QEVM', p, 'latin1');
  p += 4;
  be32(3);
  u8(0x07);
  be32(13);
  p += out.write('pc-i440fx-7.2', p, 'latin1');
  // START ram: block list, EOS, footer.
  u8(0x01);
  be32(2);
  u8(3);
  p += out.write('ram', p, 'latin1');
  be32(0);
  be32(4);
  word(blockBytes, 0x04);
  u8(6);
  p += out.write('pc.ram', p, 'latin1');
  word(blockBytes, 0);
  word(0, 0x10);
  u8(0x7e);
  be32(2);
  let page = 0;
  let poolAt = 0;
  for (let part = 0; part < parts; part++) {
    u8(part === parts - 1 ? 0x03 : 0x02);
    be32(2);
    const end = Math.min(pages, page + pagesPerPart);
    for (; page < end; page++) {
      const first = page === 0;
      word(page * PAGE, 0x08 | (first ? 0 : 0x20));
      if (first) {
        u8(6);
        p += out.write('pc.ram', p, 'latin1');
      }
      if (poolAt + PAGE > pool.length) poolAt = (poolAt + 4099) % PAGE;
      pool.copy(out, p, poolAt, poolAt + PAGE);
      poolAt += PAGE;
      p += PAGE;
    }
    word(0, 0x10);
    u8(0x7e);
    be32(2);
  }
  u8(0x04);
  be32(3);
  u8(5);
  p += out.write('timer', p, 'latin1');
  be32(0);
  be32(2);
  p += out.write('\x00\x01\x02\x03\x04', p, 'latin1');
  u8(0x7e);
  be32(3);
  u8(0x00);
  return { stream: out.subarray(0, p), pages };
}
