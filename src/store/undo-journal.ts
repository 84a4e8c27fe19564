import * as fs from 'node:fs';
import * as path from 'node:path';
import { DIGEST_BYTES } from '../digest';
import { openNoFollow, preadFully, pwriteFully } from './fsio';

export const UNDO_FILE = 'undo';
const UNDO_MAGIC = 'bfmig-undo/1\n';
/** The header (magic + JSON, zero-padded) occupies this much; entries follow it. */
export const UNDO_HEADER_BYTES = 512;
/** Each entry: page index, then digest, then the page. */
export const INDEX_BYTES = 8;

/** Which snapshot an undo journal protects, and the page geometry its entries use. */
export interface UndoHeader {
  snapshotId: string;
  layoutId: string;
  pageSize: number;
  pageCount: number;
}

/**
 * The undo journal of one migration: a header naming the snapshot it protects, then one entry per
 * page the migration changed, holding that page's index, digest (all zero = absent) and content as the
 * snapshot had them. An entry is appended before the page it saves can reach the pages file (pages
 * are buffered by the store), so after a process crash every changed page has its entry; after a
 * power loss a page may lack its entry, which recovery then finds by re-hashing.
 */
export class UndoJournal {
  private entries = 0;
  private readonly entry: Buffer;

  private constructor(
    private readonly fd: number,
    readonly header: UndoHeader,
  ) {
    this.entry = Buffer.alloc(INDEX_BYTES + DIGEST_BYTES + header.pageSize);
  }

  /** Starts a journal (replacing any earlier one); the header is durable before this returns. */
  static create(dir: string, header: UndoHeader): UndoJournal {
    const fd = openNoFollow(path.join(dir, UNDO_FILE), fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_TRUNC);
    try {
      const head = Buffer.alloc(UNDO_HEADER_BYTES);
      const text = UNDO_MAGIC + JSON.stringify(header);
      if (Buffer.byteLength(text) > UNDO_HEADER_BYTES) throw new Error('undo journal header too long (snapshot id?)');
      head.write(text);
      pwriteFully(fd, head, 0, head.length, 0);
      fs.fsyncSync(fd);
      return new UndoJournal(fd, header);
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
  }

  /**
   * Opens the journal left in dir, or null when there is none or it does not belong to a store of this
   * geometry (a journal that cannot be trusted protects nothing).
   */
  static open(dir: string, expect: { layoutId: string; pageSize: number; pageCount: number }): UndoJournal | null {
    let fd: number;
    try {
      fd = openNoFollow(path.join(dir, UNDO_FILE), fs.constants.O_RDONLY);
    } catch {
      return null;
    }
    const head = Buffer.alloc(UNDO_HEADER_BYTES);
    const got = fs.readSync(fd, head, 0, head.length, 0);
    const text = head.subarray(0, got).toString('latin1');
    const end = text.indexOf('\0');
    let header: unknown = null;
    if (got === UNDO_HEADER_BYTES && text.startsWith(UNDO_MAGIC)) {
      try {
        header = JSON.parse(text.slice(UNDO_MAGIC.length, end < 0 ? undefined : end));
      } catch {
        header = null;
      }
    }
    const h = header as Partial<UndoHeader> | null;
    if (
      h === null ||
      typeof h.snapshotId !== 'string' ||
      h.snapshotId.length === 0 ||
      h.layoutId !== expect.layoutId ||
      h.pageSize !== expect.pageSize ||
      h.pageCount !== expect.pageCount
    ) {
      fs.closeSync(fd);
      return null;
    }
    const journal = new UndoJournal(fd, h as UndoHeader);
    // A torn last entry (the crash hit its write) is ignored: its page never reached the pages file.
    journal.entries = Math.floor((fs.fstatSync(fd).size - UNDO_HEADER_BYTES) / journal.entry.length);
    return journal;
  }

  /** Appends page index's old digest and content (content only when the digest says it is held). */
  append(index: number, digests: Uint8Array, readPage: (dest: Buffer, at: number) => void): void {
    const entry = this.entry;
    entry.writeUInt32BE(Math.floor(index / 0x1_0000_0000), 0);
    entry.writeUInt32BE(index % 0x1_0000_0000, 4);
    const at = index * DIGEST_BYTES;
    entry.set(digests.subarray(at, at + DIGEST_BYTES), INDEX_BYTES);
    if (isZero(entry, INDEX_BYTES, DIGEST_BYTES)) entry.fill(0, INDEX_BYTES + DIGEST_BYTES);
    else readPage(entry, INDEX_BYTES + DIGEST_BYTES);
    pwriteFully(this.fd, entry, 0, entry.length, UNDO_HEADER_BYTES + this.entries * entry.length);
    this.entries++;
  }

  /**
   * Calls restore(index, digest, page, pageStart) for every entry, oldest first; digest is all zero when
   * the page was absent. Returns false, having stopped, at an entry whose index is out of range.
   */
  replay(restore: (index: number, digest: Uint8Array, page: Buffer, pageStart: number) => void): boolean {
    const entry = this.entry;
    for (let e = 0; e < this.entries; e++) {
      preadFully(this.fd, entry, 0, entry.length, UNDO_HEADER_BYTES + e * entry.length);
      const index = entry.readUInt32BE(0) * 0x1_0000_0000 + entry.readUInt32BE(4);
      if (index >= this.header.pageCount) return false;
      restore(index, entry.subarray(INDEX_BYTES, INDEX_BYTES + DIGEST_BYTES), entry, INDEX_BYTES + DIGEST_BYTES);
    }
    return true;
  }

  /** Makes every appended entry durable (before the snapshot's pages may be replaced for good). */
  sync(): void {
    fs.fsyncSync(this.fd);
  }

  close(): void {
    fs.closeSync(this.fd);
  }

  static remove(dir: string): void {
    fs.rmSync(path.join(dir, UNDO_FILE), { force: true });
  }
}

/** Whether b[start, start + length) is all zero bytes. */
export function isZero(b: Uint8Array, start: number, length: number): boolean {
  for (let i = start; i < start + length; i++) if (b[i] !== 0) return false;
  return true;
}
