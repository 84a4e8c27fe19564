/**
 * The retained snapshot's stream parts, as the store keeps them beside its pages: what `bfmig restore`
 * needs besides the pages to rebuild a whole migration stream. Three blobs: the stream's head (bytes up
 * to the RAM pages), its device-state tail (bytes), and a small JSON description. The store knows no
 * QEMU: the bytes are opaque here and the description is plain fields, which the gateway fills in when
 * a migration completes and the CLI reads back.
 */

const HEAD_BLOB = 'stream-head';
const TAIL_BLOB = 'stream-tail';
const INFO_BLOB = 'stream-info';

/** The `stream-info` blob: which snapshot the parts belong to and what rebuilding the stream needs. */
export interface StreamInfo {
  /** The snapshot these parts belong to: stale when the store now claims another. */
  snapshotId: string;
  /** The RAM section's id, for the section headers written around the pages. */
  ramSectionId: number;
  /** Whether the stream's sections carry footers. */
  footers: boolean;
  /** Where the stream came from (the QEMU stream codec's StreamOrigin fields); absent in older stores. */
  machineType?: string | null;
  minQemuRelease?: string | null;
  framing?: 'legacy' | 'current';
}

/** Everything a retained snapshot needs besides its pages. */
export interface StreamParts {
  head: Buffer;
  tail: Buffer;
  info: StreamInfo;
}

/** Saves the parts beside the pages (each blob written atomically); call before the store commits. */
export function saveStreamParts(store: { saveBlob(name: string, data: Buffer): void }, parts: StreamParts): void {
  store.saveBlob(HEAD_BLOB, parts.head);
  store.saveBlob(TAIL_BLOB, parts.tail);
  store.saveBlob(INFO_BLOB, Buffer.from(JSON.stringify(parts.info)));
}

/** The description alone (null when absent); throws when the blob is not JSON. */
export function loadStreamInfo(store: { loadBlob(name: string): Buffer | null }): StreamInfo | null {
  const blob = store.loadBlob(INFO_BLOB);
  return blob ? (JSON.parse(blob.toString('utf8')) as StreamInfo) : null;
}

/** The parts as saved, each null when absent; throws when the description is not JSON. */
export function loadStreamParts(store: { loadBlob(name: string): Buffer | null }): { head: Buffer | null; tail: Buffer | null; info: StreamInfo | null } {
  const info = loadStreamInfo(store);
  return { head: store.loadBlob(HEAD_BLOB), tail: store.loadBlob(TAIL_BLOB), info };
}
