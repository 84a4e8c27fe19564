/**
 * The store's note of its VM's last migration through this gateway, whatever became of it: a blob
 * beside the pages that `bfmig snapshots list|show` reads. It says in particular when a stream was
 * relayed verbatim from some point on (nothing after it retained or reused), which otherwise only the
 * gateway's log and metrics would tell. The store knows no QEMU: the fields are plain words.
 */
import * as path from 'node:path';
import { readFileNoFollow } from './fsio';

const RECORD_BLOB = 'last-migration';
/** The blob's file in a store directory (PageStore keeps blob NAME as `blob-NAME`). */
const RECORD_FILE = `blob-${RECORD_BLOB}`;

export interface MigrationRecord {
  /** ISO time the migration ended. */
  at: string;
  direction: 'send' | 'receive';
  result: 'completed' | 'failed';
  error: string | null;
  /** The snapshot the store claims after it (null: none). */
  snapshotId: string | null;
  /**
   * Whether that snapshot is this migration's: false for one that completed with the store keeping
   * the snapshot it held (part of it relayed verbatim, a multifd channel's pages not kept, a failed
   * commit), which is then older than the VM. Absent in records of older versions.
   */
  kept?: boolean;
  /** Where and why the stream stopped being parsed and was relayed as it was; null when it was parsed whole. */
  verbatim: { code: string; reason: string; streamOffset: number } | null;
  /** The migration switched to postcopy. */
  postcopy: boolean;
}

/** Saves the record (atomically) in an open store. */
export function saveMigrationRecord(store: { saveBlob(name: string, data: Buffer): void }, record: MigrationRecord): void {
  store.saveBlob(RECORD_BLOB, Buffer.from(JSON.stringify(record)));
}

/**
 * The record in store directory `dir`, read without opening the store (also while a migration holds
 * it), or null when there is none or it is not one.
 */
export function readMigrationRecord(dir: string): MigrationRecord | null {
  try {
    const parsed: unknown = JSON.parse(readFileNoFollow(path.join(dir, RECORD_FILE)).toString('utf8'));
    return isMigrationRecord(parsed) ? parsed : null;
  } catch {
    return null;
  }
}

function isMigrationRecord(v: unknown): v is MigrationRecord {
  if (typeof v !== 'object' || v === null) return false;
  const r = v as Record<string, unknown>;
  const verbatim = r.verbatim as Record<string, unknown> | null | undefined;
  return (
    typeof r.at === 'string' &&
    (r.direction === 'send' || r.direction === 'receive') &&
    (r.result === 'completed' || r.result === 'failed') &&
    (r.error === null || typeof r.error === 'string') &&
    (r.snapshotId === null || typeof r.snapshotId === 'string') &&
    (r.kept === undefined || typeof r.kept === 'boolean') &&
    typeof r.postcopy === 'boolean' &&
    (verbatim === null || (typeof verbatim === 'object' && typeof verbatim.code === 'string' && typeof verbatim.reason === 'string' && typeof verbatim.streamOffset === 'number'))
  );
}

/** A one-line account of the record, for listings. */
export function describeMigrationRecord(r: MigrationRecord): string {
  const what = `${r.direction === 'send' ? 'sent' : 'received'} ${r.at}: ${r.result}${r.postcopy ? ' (postcopy)' : ''}`;
  return r.verbatim ? `${what}; relayed verbatim from byte ${r.verbatim.streamOffset} (${r.verbatim.reason}), nothing after it retained` : what;
}
