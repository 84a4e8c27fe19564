import { streamOrigin } from '../qemu';
import type { StreamFallback } from '../qemu/records';
import type { PageIo, PageStore, UndoableStore } from '../store';
import { saveStreamParts } from '../store/snapshot-parts';
import { addCounts, newCounts, type TransferCounts } from '../proxy/transfer-counts';

/** Which way a migration goes through this gateway: 'send' forwards a source QEMU's stream to a peer, 'receive' rebuilds it for a destination QEMU. */
export type Direction = 'send' | 'receive';

/** What a migration that retains nothing did to a store file. */
export const NO_STORE_IO: Readonly<PageIo> = { readBytes: 0, writtenBytes: 0 };

/** How the sender knew what the receiver holds. */
export type ReuseMode = 'shared-snapshot' | 'digest-table' | 'none';

export interface MigrationReport {
  vm: string;
  direction: Direction;
  result: 'completed' | 'failed';
  error: string | null;
  seconds: number;
  /** QEMU stream bytes through this gateway. */
  streamBytes: number;
  /** Bytes this gateway sent over the WAN (frames included). */
  wanBytesOut: number;
  /** Bytes it received over the WAN. */
  wanBytesIn: number;
  /** WAN bytes compression saved (zero when the migration was not compressed). */
  compressionSavedBytes: number;
  /** Bytes of pages the VM's store read from and wrote to its file in this migration (PageStore.pageIo). */
  storeIo: PageIo;
  counts: TransferCounts;
  mode: ReuseMode;
  snapshotId: string | null;
  /** Where and why the stream stopped being parsed and was relayed as it was (null: parsed whole). */
  verbatim: StreamFallback | null;
  /** The migration switched to postcopy. */
  postcopy: boolean;
}

/** One progress tick of a session: cumulative totals since its start. */
export interface ProgressTick {
  /** The session's phase (send.ts and receive.ts name them). */
  phase: string;
  /** When the session began (Date.now() time). */
  startedAt: number;
  /** QEMU stream bytes so far. */
  streamBytes: number;
  /** Bytes this migration put on (send) or took off (receive) the WAN so far. */
  wanBytes: number;
  counts: TransferCounts;
  /** The guest's RAM as the stream's setup declared it, once known. */
  layout: { pageCount: number; pageSize: number } | null;
  /** Bytes of pages the VM's store read from and wrote to its file so far (0 while it retains nothing). */
  storeIo: PageIo;
}

/** What a migration session tells the gateway: log lines, live totals, the outcome. */
export interface SessionObserver {
  /**
   * The VM's store has just begun a migration (nothing written yet): the gateway keeps the store
   * directory within its budget, and may tell the store to go on without its undo journal or without
   * retaining anything (UndoableStore.overBudget) when the budget has no room for it.
   */
  storeGrows(vm: string, retained: UndoableStore | null): void;
  event(vm: string, direction: Direction, message: string, fields?: Record<string, unknown>): void;
  /**
   * The stream stopped being parsed at `at`: from there it is relayed as it is, nothing of it reused or
   * retained. Told once per migration, as soon as it happens.
   */
  relayedVerbatim(vm: string, direction: Direction, at: StreamFallback): void;
  /** No byte moved on the migration's connections for limits.idleSeconds; it fails next. */
  idleTimeout(vm: string, direction: Direction): void;
  /** Cumulative totals so far (about once a second and at the end). */
  progress(vm: string, direction: Direction, tick: ProgressTick): void;
  /**
   * The VM's migration is over as its source may see it (a sender sent End; a receiver handed the
   * destination every byte) and only ends now (the receiver's commit, the stores' sync): `settled`
   * resolves once it has ended, either way, and let the VM go. Meanwhile a new migration of the VM waits.
   */
  settling(vm: string, settled: Promise<void>): void;
  finished(report: MigrationReport): void;
  /** Whether this migration may write the VM's store: false while a full filesystem keeps retention off. */
  retains(vm: string, direction: Direction): boolean;
  /** A store write failed for lack of space; the VM's store needs about `needBytes`. */
  storeFull(vm: string, direction: Direction, needBytes: number, error: string): void;
}

/** Limits on one migration's connections (the configurable ones are in `limits:`, see security-config.ts). */
/** The sender's wait from its Hello to the peer's Offer (the peer dials the destination meanwhile). */
export const HANDSHAKE_TIMEOUT_MS = 15_000;
export const CONNECT_TIMEOUT_MS = 10_000;
export const PROGRESS_INTERVAL_MS = 1_000;
/** Digest-table frames: 64 Ki pages each. */
export const TABLE_FRAME_BYTES = 1024 * 1024;

/** A main channel's codec: its own counts, and its migration's multifd channels once it has some. */
export interface CountingCodec {
  readonly counts: Readonly<TransferCounts>;
  readonly multifd: { channelCounts(): TransferCounts; channelFallback(): StreamFallback | null } | null;
}

/**
 * Where the migration's stream was first relayed as it is, with why: its main channel's, else a
 * multifd channel's (a compressed packet: QEMU's multifd-compression), or null when parsed whole.
 */
export function migrationFallback(codec: (CountingCodec & { fallback: StreamFallback | null }) | null): StreamFallback | null {
  return codec?.fallback ?? codec?.multifd?.channelFallback() ?? null;
}

/** What the whole migration carried so far: the main channel's counts and its multifd channels'. */
export function migrationCounts(codec: CountingCodec | null): TransferCounts {
  const total = newCounts();
  if (codec === null) return total;
  addCounts(total, codec.counts);
  if (codec.multifd) addCounts(total, codec.multifd.channelCounts());
  return total;
}

/** What a session knows when it ends, as the report the observer gets. */
export function migrationReport(
  session: { vm: string; direction: Direction; startedAt: number; wanBytesOut: number; wanBytesIn: number; compressionSavedBytes: number; storeIo: PageIo },
  codec: (CountingCodec & { fallback: StreamFallback | null; postcopy: boolean }) | null,
  outcome: { result: 'completed' | 'failed'; error: string | null; mode: ReuseMode; snapshotId: string | null },
): MigrationReport {
  const c = migrationCounts(codec);
  return {
    vm: session.vm,
    direction: session.direction,
    ...outcome,
    seconds: (Date.now() - session.startedAt) / 1000,
    streamBytes: c.streamBytes,
    wanBytesOut: session.wanBytesOut,
    wanBytesIn: session.wanBytesIn,
    compressionSavedBytes: session.compressionSavedBytes,
    storeIo: session.storeIo,
    counts: c,
    verbatim: migrationFallback(codec),
    postcopy: codec?.postcopy ?? false,
  };
}

/** The most of a peer's own text (an Abort's error) that is logged or sent back. */
export const PEER_TEXT_CHARS = 512;

/**
 * A peer's text as this gateway logs it and echoes it in its own Abort: control characters (which
 * could forge log lines or terminal escapes) become spaces, and it is cut to PEER_TEXT_CHARS, so a
 * peer cannot make either side log or send back megabytes.
 */
export function peerText(text: string): string {
  const clean = text.replace(/[\u0000-\u001f\u007f-\u009f]/g, ' ');
  return clean.length <= PEER_TEXT_CHARS ? clean : `${clean.slice(0, PEER_TEXT_CHARS)}… (${clean.length - PEER_TEXT_CHARS} more characters)`;
}

/** What `bfmig restore` needs besides the pages, saved beside them before the store commits. */
export function keepStreamParts(
  store: { saveBlob(name: string, data: Buffer): void },
  parts: { result(): { head: Buffer; tail: Buffer; ramSectionId: number; machineType: string | null } | null },
  footers: boolean | null,
  snapshotId: string,
): void {
  const r = parts.result();
  if (!r || footers === null) return;
  saveStreamParts(store, { head: r.head, tail: r.tail, info: { snapshotId, ramSectionId: r.ramSectionId, footers, ...streamOrigin(r.machineType, footers) } });
}

/** What settleStore() needs of a session's codec. */
interface SettledCodec {
  layout: unknown;
  fallback: StreamFallback | null;
  parts: Parameters<typeof keepStreamParts>[1];
  footers: boolean | null;
}

/**
 * The store's part of a completed migration: commits `snapshotId` when the codec followed the whole
 * stream, else puts back the snapshot the migration started from. The stream was delivered, so a store
 * failure does not fail the migration: `failed` hears of it and the store claims nothing new. Returns
 * the snapshot the store now claims for this migration (null when none).
 */
export function settleStore(
  store: PageStore | null,
  retained: UndoableStore | null,
  codec: SettledCodec | null,
  snapshotId: string | null,
  failed: (what: string, err: unknown) => void,
): string | null {
  try {
    // A stream relayed (partly) verbatim updated pages the store never saw: it claims no new snapshot
    // (rollback puts back the one it held before).
    // Neither does a store that retained nothing because the disk budget had no room for it.
    if (store && retained && !retained.withholding && snapshotId !== null && codec?.layout && !codec.fallback) {
      keepStreamParts(store, codec.parts, codec.footers, snapshotId);
      retained.commit(snapshotId);
      return snapshotId;
    }
    retained?.rollback();
  } catch (err) {
    failed('store commit failed', err);
    try {
      retained?.rollback();
    } catch (again) {
      failed('store rollback failed', again);
    }
  }
  return null;
}

/**
 * Notices a migration that has stopped moving: fed a running total of bytes moved on all of the
 * session's connections at each progress tick, it says when that total has not changed for `idleMs`.
 */
export class IdleWatch {
  private lastTotal = -1;
  private lastChange = Date.now();

  constructor(private readonly idleMs: number) {}

  stalled(total: number, now = Date.now()): boolean {
    if (total !== this.lastTotal) {
      this.lastTotal = total;
      this.lastChange = now;
      return false;
    }
    return now - this.lastChange >= this.idleMs;
  }
}
