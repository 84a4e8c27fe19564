import { DIGEST_WORDS, digestWords, sameDigestWords } from '../digest';
import { ContentIndex } from './content-index';

/**
 * Where the receiver holds a page's content in a sibling's retained snapshot (another VM booted from
 * the same image, which the receiver's Offer confirmed it holds at the snapshot the sender named).
 *
 * The sender's view of each sibling is its own store's digest table of that snapshot (both sites
 * committed the same one when the sibling last migrated between them). Two looks, cheapest first: the
 * same page index (a guest's kernel and page cache laid out alike: most of the gain), then the content
 * anywhere in the sibling, through a ContentIndex over its table. Memory per sibling page: 16 B of table
 * plus 8–16 B of index (for a 256 MiB sibling 1 MiB + 512 KiB), for at most MAX_SIBLINGS siblings, held
 * for one migration.
 */
export class SiblingMatch {
  private readonly indexes: ContentIndex[];
  /** After a find() that returned true: the sibling (its place in the Offer's list) and its page. */
  sibling = -1;
  page = -1;

  /** The siblings' digest tables as words (digestWords). */
  private readonly tables: readonly Uint32Array[];

  /** `tables`: the siblings' digest tables (16 B a page, all zero = not held), in the Offer's order. Never changed. */
  constructor(tables: readonly Uint8Array[]) {
    this.tables = tables.map(digestWords);
    this.indexes = this.tables.map((table) => {
      const index = new ContentIndex(table.length / DIGEST_WORDS, table);
      index.addAll();
      return index;
    });
  }

  /** Whether a sibling holds the content of the digest at `digest[at…]` (words), looked for at page `page` first; sets `sibling` and `page`. */
  find(page: number, digest: Uint32Array, at: number): boolean {
    const tables = this.tables;
    const place = page * DIGEST_WORDS;
    for (let s = 0; s < tables.length; s++) {
      if (place + DIGEST_WORDS <= tables[s].length && sameDigestWords(tables[s], place, digest, at)) return this.found(s, page);
    }
    for (let s = 0; s < tables.length; s++) {
      const held = this.indexes[s].find(digest, at);
      if (held >= 0) return this.found(s, held);
    }
    return false;
  }

  private found(sibling: number, page: number): true {
    this.sibling = sibling;
    this.page = page;
    return true;
  }
}
