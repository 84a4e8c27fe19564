/**
 * What the gateway knows of each migration in flight, from the sessions' progress ticks (about once a
 * second): what `GET /status` serves, when a long migration logs its progress, and when one has stopped
 * moving (stalled) or moves again. Pure bookkeeping over counters the sessions already keep: no
 * per-page work, no timers of its own (the ticks bring the time).
 */
import { describe, type Fail, isMapping } from './config-schema';
import type { Direction, ProgressTick } from './session';

/** The `progress:` block of the config. */
export interface ProgressConfig {
  /** A migration in flight logs its progress this often (0: never). */
  logSeconds: number;
  /** A migration that moved no byte this long is logged once and counted as stalled, until bytes flow again. */
  stallSeconds: number;
}

export const DEFAULT_PROGRESS: Readonly<ProgressConfig> = { logSeconds: 60, stallSeconds: 30 };

/** One migration in flight, as `GET /status` serves it. */
export interface MigrationStatus {
  vm: string;
  direction: Direction;
  phase: string;
  startedAt: string;
  elapsedSeconds: number;
  qemuBytes: number;
  wanBytes: number;
  pagesSent: number;
  pagesReused: number;
  pagesZero: number;
  /** QEMU stream bytes per second over the last tick. */
  qemuBytesPerSecond: number;
  /** WAN bytes per second over the last tick. */
  wanBytesPerSecond: number;
  /** 1 - WAN bytes / QEMU bytes so far (null before any stream byte). */
  saving: number | null;
  /** Guest RAM the stream declared (null until its setup has been read). */
  ramBytes: number | null;
  /**
   * RAM not yet seen in the first pass, in bytes, and how long it takes at the current rate: known only
   * during the first pass over RAM (later passes resend what the guest dirtied, which no one can count ahead).
   */
  remainingBytes: number | null;
  etaSeconds: number | null;
  /** Bytes of pages the VM's store read from and wrote to its file so far (bfmig_store_read_bytes_total, …_written_…). */
  storeReadBytes: number;
  storeWrittenBytes: number;
  /** No byte moved for progress.stallSeconds. */
  stalled: boolean;
}

/** What a tick means for the log and the metrics. */
export interface TickOutcome {
  /** The progress line is due (every progress.logSeconds). */
  logDue: boolean;
  /** 'stalled': it just stopped moving; 'moving': it just moved again after a stall. */
  change: 'stalled' | 'moving' | null;
}

interface Live {
  vm: string;
  direction: Direction;
  tick: ProgressTick;
  /** When the tick before this one came, and its totals (for the rates). */
  before: { at: number; streamBytes: number; wanBytes: number };
  at: number;
  /** When streamBytes + wanBytes last changed. */
  movedAt: number;
  loggedAt: number;
  stalled: boolean;
}

export class LiveMigrations {
  private readonly live = new Map<string, Live>();

  constructor(private readonly config: ProgressConfig) {}

  /** A session's tick: updates its entry and says whether to log a progress line or a stall. */
  tick(vm: string, direction: Direction, tick: ProgressTick, now = Date.now()): TickOutcome {
    const key = keyOf(vm, direction);
    const entry = this.live.get(key);
    if (!entry) {
      this.live.set(key, { vm, direction, tick, before: { at: tick.startedAt, streamBytes: 0, wanBytes: 0 }, at: now, movedAt: now, loggedAt: now, stalled: false });
      return { logDue: false, change: null };
    }
    const moved = tick.streamBytes + tick.wanBytes !== entry.tick.streamBytes + entry.tick.wanBytes;
    entry.before = { at: entry.at, streamBytes: entry.tick.streamBytes, wanBytes: entry.tick.wanBytes };
    entry.tick = tick;
    entry.at = now;
    let change: TickOutcome['change'] = null;
    if (moved) {
      entry.movedAt = now;
      if (entry.stalled) change = 'moving';
      entry.stalled = false;
    } else if (!entry.stalled && now - entry.movedAt >= this.config.stallSeconds * 1000) {
      entry.stalled = true;
      change = 'stalled';
    }
    const logDue = this.config.logSeconds > 0 && now - entry.loggedAt >= this.config.logSeconds * 1000;
    if (logDue) entry.loggedAt = now;
    return { logDue, change };
  }

  /** The migration ended: whether it was stalled (its stall is over with it). */
  finished(vm: string, direction: Direction): boolean {
    const key = keyOf(vm, direction);
    const stalled = this.live.get(key)?.stalled ?? false;
    this.live.delete(key);
    return stalled;
  }

  status(vm: string, direction: Direction, now = Date.now()): MigrationStatus | null {
    const entry = this.live.get(keyOf(vm, direction));
    return entry ? statusOf(entry, now) : null;
  }

  /** Every migration in flight, oldest first. */
  all(now = Date.now()): MigrationStatus[] {
    return [...this.live.values()].sort((a, b) => a.tick.startedAt - b.tick.startedAt).map((e) => statusOf(e, now));
  }
}

function keyOf(vm: string, direction: Direction): string {
  return `${vm}\u0000${direction}`;
}

function statusOf(e: Live, now: number): MigrationStatus {
  const t = e.tick;
  const seconds = Math.max(e.at - e.before.at, 1) / 1000;
  const qemuRate = (t.streamBytes - e.before.streamBytes) / seconds;
  const seen = t.counts.pagesSent + t.counts.pagesReused + t.counts.pagesZero + t.counts.pagesOther;
  const ramBytes = t.layout ? t.layout.pageCount * t.layout.pageSize : null;
  const firstPass = t.layout !== null && seen < t.layout.pageCount;
  const remainingBytes = firstPass && t.layout ? (t.layout.pageCount - seen) * t.layout.pageSize : null;
  return {
    vm: e.vm,
    direction: e.direction,
    phase: t.phase,
    startedAt: new Date(t.startedAt).toISOString(),
    elapsedSeconds: (now - t.startedAt) / 1000,
    qemuBytes: t.streamBytes,
    wanBytes: t.wanBytes,
    pagesSent: t.counts.pagesSent,
    pagesReused: t.counts.pagesReused,
    pagesZero: t.counts.pagesZero,
    qemuBytesPerSecond: Math.round(qemuRate),
    wanBytesPerSecond: Math.round((t.wanBytes - e.before.wanBytes) / seconds),
    saving: t.streamBytes > 0 ? 1 - t.wanBytes / t.streamBytes : null,
    ramBytes,
    remainingBytes,
    etaSeconds: remainingBytes !== null && qemuRate > 0 ? remainingBytes / qemuRate : null,
    storeReadBytes: t.storeIo.readBytes,
    storeWrittenBytes: t.storeIo.writtenBytes,
    stalled: e.stalled,
  };
}

const PROGRESS_KEYS = ['logSeconds', 'stallSeconds'] as const;

/** The `progress:` block; every key optional. */
export function parseProgress(value: unknown, fail: Fail): ProgressConfig {
  if (value === undefined || value === null) return { ...DEFAULT_PROGRESS };
  if (!isMapping(value)) return fail('progress', `must be a mapping of ${PROGRESS_KEYS.join(', ')}, not ${describe(value)}`);
  const unknown = Object.keys(value).filter((k) => !(PROGRESS_KEYS as readonly string[]).includes(k));
  if (unknown.length > 0) fail(`progress.${unknown[0]}`, `unknown key "progress.${unknown[0]}" (expected ${PROGRESS_KEYS.join(', ')})`);
  const seconds = (name: (typeof PROGRESS_KEYS)[number], min: number): number => {
    const v = value[name];
    if (v === undefined || v === null) return DEFAULT_PROGRESS[name];
    if (typeof v !== 'number' || !Number.isFinite(v)) return fail(`progress.${name}`, `must be a number of seconds, not ${describe(v)}`);
    if (v < min || v > 86400) return fail(`progress.${name}`, `${v} is out of range (${min}..86400)`);
    return v;
  };
  return { logSeconds: seconds('logSeconds', 0), stallSeconds: seconds('stallSeconds', 0.5) };
}
