/**
 * The compatibility matrix: which QEMU releases, machine types and migration capabilities bfmig
 * carries, each row measured with a real guest migrated there and back through two gateways. A row
 * passes when every leg completes with the guest's memory verified at its destination, and — where
 * the row expects reuse — the back leg costs a small share of the first leg's WAN bytes.
 *
 * The README's compatibility table is this list (`node dist/bench/compat.js` prints it measured);
 * test/compat.e2e.test.ts runs the rows marked `everyRun` in the default test run and all of them with
 * BFMIG_COMPAT=all (as CI does).
 */
import { Writable } from 'node:stream';
import { type LegResult, runBackForth } from '../demo/backforth';
import { type QemuRelease, qemuBinary } from '../vm/qemu-releases';

export interface CompatRow {
  id: string;
  /** QEMU at the first leg's source and destination (a back leg runs the other way). */
  qemu: readonly [QemuRelease, QemuRelease];
  machine: string;
  /** What the row turns on, as the table says it. */
  label: string;
  capabilities?: Record<string, boolean>;
  parameters?: Record<string, unknown>;
  /** Switch to postcopy once the source has sent this many bytes. */
  postcopyAfterBytes?: number;
  /** QEMU's downtime-limit at every leg's source, ms (the harness's 500 otherwise). */
  downtimeLimitMs?: number;
  /** With pause-before-switchover: how long the source waits, its guest stopped, before migrate-continue. */
  continueAfterPauseMs?: number;
  /** QEMU's own TLS: the gateways relay every connection as it is. */
  qemuTls?: boolean;
  /** The gateways relay (part of) every leg as it is and must say so, with this reason. */
  verbatim?: string;
  /** 2: there and back (the back leg shows reuse); 1: one way only (a 7.2 → 10.0 upgrade). */
  legs: 1 | 2;
  /** Whether the back leg should reuse what the first leg left at the site it returns to. */
  expectReuse: boolean;
  /** In the default test run (the others run with BFMIG_COMPAT=all, and in CI). */
  everyRun: boolean;
}

/**
 * An idle guest's back leg is a few hundred KiB of device state and page headers against tens of
 * MiB sent the first time (0.4% was measured at 256 MiB); a back leg above this share did not reuse.
 */
export const REUSE_MAX_BACK_SHARE = 0.02;

const rp = { 'return-path': true };
/** Postcopy switched on this far into a first leg: pages move in both phases. */
const POSTCOPY_AFTER = 24 * 2 ** 20;
/**
 * The downtime-limit of legs switched to postcopy. A back leg whose pages are all held runs at QEMU's own
 * pace (3 Gbit/s here), and with the harness's 500 ms QEMU may switch over in precopy, the whole leg
 * fitting its threshold (its rate times the limit), before the harness's poll has seen 24 MiB sent: the
 * leg never reaches postcopy (once in a CI run). At 10 ms the threshold is a few MiB, so the leg cannot
 * end before most of its first pass has gone, and polls every 20 ms see it pass 24 MiB. Once in
 * postcopy, the limit no longer matters.
 */
const POSTCOPY_DOWNTIME_MS = 10;

/** A there-and-back row on one QEMU release, with no capabilities unless `more` says. */
const row = (qemu: QemuRelease, machine: string, label: string, { tail, ...more }: Partial<CompatRow> & { tail?: string } = {}): CompatRow => ({
  id: `${qemu}/${machine}${tail ? `/${tail}` : ''}`,
  qemu: [qemu, qemu],
  machine,
  label,
  legs: 2,
  expectReuse: true,
  everyRun: false,
  ...more,
});

export const COMPAT_ROWS: readonly CompatRow[] = [
  row('7.2', 'pc-i440fx-2.0', 'none'),
  row('7.2', 'pc-i440fx-7.2', 'none'),
  row('7.2', 'pc-q35-7.2', 'none'),
  row('7.2', 'pc-i440fx-7.2', 'return-path', { tail: 'return-path', capabilities: rp }),
  row('10.0', 'pc-i440fx-7.2', 'none'),
  row('10.0', 'pc-i440fx-9.2', 'none'),
  row('10.0', 'pc-i440fx-10.0', 'none', { everyRun: true }),
  row('10.0', 'pc-q35-10.0', 'none'),
  row('10.0', 'pc-i440fx-10.0', 'return-path', { tail: 'return-path', capabilities: rp }),
  row('10.0', 'pc-i440fx-10.0', 'postcopy-ram allowed, never started', { tail: 'postcopy-allowed', capabilities: { ...rp, 'postcopy-ram': true }, everyRun: true }),
  row('10.0', 'pc-i440fx-10.0', 'postcopy started (migrate-start-postcopy)', {
    tail: 'postcopy-started',
    capabilities: { ...rp, 'postcopy-ram': true },
    postcopyAfterBytes: POSTCOPY_AFTER,
    downtimeLimitMs: POSTCOPY_DOWNTIME_MS,
    everyRun: true,
  }),
  row('10.0', 'pc-i440fx-10.0', 'xbzrle', { tail: 'xbzrle', capabilities: { xbzrle: true } }),
  row('10.0', 'pc-i440fx-10.0', 'auto-converge', { tail: 'auto-converge', capabilities: { 'auto-converge': true } }),
  row('10.0', 'pc-i440fx-10.0', 'switchover-ack (with return-path)', { tail: 'switchover-ack', capabilities: { ...rp, 'switchover-ack': true } }),
  // Multifd channels go through the multifd codec: their pages are kept and reused like the main channel's
  // (QEMU 7.2's pages sent twice in an epoch, and its main channel's zero pages, included: measured 0.89%).
  row('7.2', 'pc-i440fx-7.2', 'multifd, 4 channels', { tail: 'multifd-4', capabilities: { multifd: true }, parameters: { 'multifd-channels': 4 } }),
  row('10.0', 'pc-i440fx-10.0', 'multifd, 4 channels', { tail: 'multifd-4', capabilities: { multifd: true }, parameters: { 'multifd-channels': 4 }, everyRun: true }),
  // Machine types of 8.0 and before sync the channels after every RAM section, as 7.2 does: short epochs.
  row('10.0', 'pc-i440fx-7.2', 'multifd, 4 channels (a SYNC after every RAM section)', { tail: 'multifd-4', capabilities: { multifd: true }, parameters: { 'multifd-channels': 4 } }),
  row('10.0', 'pc-i440fx-10.0', 'multifd, 16 channels', { tail: 'multifd-16', capabilities: { multifd: true }, parameters: { 'multifd-channels': 16 } }),
  // Zero pages on the main channel, as 7.2 sends them, beside 10.0's channels and their Deltas against
  // other pages of the epoch (the receiver keeps what the main channel overwrites ahead of a channel).
  row('10.0', 'pc-i440fx-10.0', 'multifd, 4 channels, zero-page-detection legacy (zero pages on the main channel)', {
    tail: 'multifd-4-legacy-zero',
    capabilities: { multifd: true },
    parameters: { 'multifd-channels': 4, 'zero-page-detection': 'legacy' },
  }),
  // Zero pages as normal pages in the channels' packets: QEMU looks for none.
  row('10.0', 'pc-i440fx-10.0', 'multifd, 4 channels, zero-page-detection none (zero pages sent whole)', {
    tail: 'multifd-4-no-zero-detection',
    capabilities: { multifd: true },
    parameters: { 'multifd-channels': 4, 'zero-page-detection': 'none' },
  }),
  row('10.0', 'pc-i440fx-10.0', 'zero-page-detection none (zero pages sent whole)', { tail: 'no-zero-detection', parameters: { 'zero-page-detection': 'none' } }),
  // QEMU's multifd-compression: the codec cannot read compressed packets, so the channels cross as they
  // are (and the gateways say so); the stores keep the snapshot they held.
  ...(['zlib', 'zstd'] as const).map((method) =>
    row('10.0', 'pc-i440fx-10.0', `multifd, 4 channels, multifd-compression ${method} (channels relayed as they are: no reuse)`, {
      tail: `multifd-4-${method}`,
      capabilities: { multifd: true },
      parameters: { 'multifd-channels': 4, 'multifd-compression': method },
      verbatim: 'multifd-compression',
      expectReuse: false,
    }),
  ),
  row('7.2', 'pc-i440fx-7.2', 'multifd, 4 channels, multifd-compression zlib (channels relayed as they are: no reuse)', {
    tail: 'multifd-4-zlib',
    capabilities: { multifd: true },
    parameters: { 'multifd-channels': 4, 'multifd-compression': 'zlib' },
    verbatim: 'multifd-compression',
    expectReuse: false,
  }),
  // QEMU 7.2's compress capability (removed in 9.1): pages zlib-compressed by QEMU's threads cross as
  // they are, neither retained nor reused (the stream is rebuilt byte for byte, so they cannot be
  // replaced by a page the far side holds).
  row('7.2', 'pc-i440fx-7.2', 'compress (the pages QEMU compressed cross as they are: next to no reuse)', { tail: 'compress', capabilities: { compress: true }, expectReuse: false }),
  // libvirt's way with storage copied alongside: the source stops the guest and waits for migrate-continue
  // before its last pages and device state, the stream quiet meanwhile.
  row('10.0', 'pc-i440fx-10.0', "pause-before-switchover, continued after 3 s (libvirt's way when it copies storage too)", {
    tail: 'pause-before-switchover',
    capabilities: { ...rp, 'pause-before-switchover': true },
    continueAfterPauseMs: 3000,
  }),
  row('10.0', 'pc-i440fx-10.0', 'multifd, 4 channels, zero-copy-send', {
    tail: 'multifd-4-zero-copy',
    capabilities: { multifd: true, 'zero-copy-send': true },
    parameters: { 'multifd-channels': 4 },
  }),
  row('10.0', 'pc-i440fx-10.0', 'postcopy-preempt, postcopy started (its channel verbatim)', {
    tail: 'postcopy-preempt',
    capabilities: { ...rp, 'postcopy-ram': true, 'postcopy-preempt': true },
    postcopyAfterBytes: POSTCOPY_AFTER,
    downtimeLimitMs: POSTCOPY_DOWNTIME_MS,
    expectReuse: false,
  }),
  // QEMU's own TLS: encrypted end to end, so each connection is relayed as it is and nothing is reused.
  row('7.2', 'pc-i440fx-7.2', "QEMU's own TLS (relayed as it is: no reuse)", { tail: 'tls', qemuTls: true, verbatim: 'encrypted', expectReuse: false }),
  row('10.0', 'pc-i440fx-10.0', "QEMU's own TLS (relayed as it is: no reuse)", { tail: 'tls', qemuTls: true, verbatim: 'encrypted', expectReuse: false, everyRun: true }),
  row('10.0', 'pc-i440fx-10.0', "QEMU's own TLS with multifd, 4 channels (relayed as it is: no reuse)", {
    tail: 'tls-multifd-4',
    qemuTls: true,
    verbatim: 'encrypted',
    capabilities: { multifd: true },
    parameters: { 'multifd-channels': 4 },
    expectReuse: false,
  }),
  { id: '7.2→10.0/pc-i440fx-7.2', qemu: ['7.2', '10.0'], machine: 'pc-i440fx-7.2', label: 'QEMU 7.2 source, 10.0 destination', legs: 1, expectReuse: false, everyRun: true },
];

export interface CompatOutcome {
  row: CompatRow;
  /** Every leg completed and the guest verified its memory at each destination. */
  verified: boolean;
  firstLegWanBytes: number;
  /** Null for one-way rows. */
  backLegWanBytes: number | null;
  /** The back leg's WAN bytes as a share of the first leg's (null for one-way rows). */
  backShare: number | null;
  postcopyStarted: boolean;
  legs: LegResult[];
}

/** Whether the outcome is what the row promises. */
export function compatPassed(o: CompatOutcome): boolean {
  if (!o.verified) return false;
  // A row that promises reuse must have been parsed whole: a stream relayed verbatim reuses little.
  if (o.row.expectReuse && o.legs.some((l) => l.verbatim !== null)) return false;
  if (o.row.postcopyAfterBytes !== undefined && !o.legs.every((l) => l.postcopyStarted)) return false;
  if (o.row.continueAfterPauseMs !== undefined && !o.legs.every((l) => l.continuedFromPause)) return false;
  // Never silent: every leg of an encrypted migration must be reported as relayed as it is.
  if (o.row.verbatim !== undefined && !o.legs.every((l) => l.verbatim === o.row.verbatim)) return false;
  return !o.row.expectReuse || (o.backShare !== null && o.backShare <= REUSE_MAX_BACK_SHARE);
}

/** Runs one row: boots a guest under the row's source QEMU and migrates it there (and back). */
export async function runCompatRow(row: CompatRow, opts: { mbit?: number; delayMs?: number; out?: Writable } = {}): Promise<CompatOutcome> {
  const legs = await runBackForth({
    legs: row.legs,
    memMiB: 256,
    workloadMiB: 32,
    rewritePct: 0,
    rateMbit: opts.mbit ?? 1000,
    delayMs: opts.delayMs ?? 1,
    machine: row.machine,
    direct: false,
    out: opts.out ?? new Writable({ write: (_chunk, _enc, done) => done() }),
    qemuAt: [qemuBinary(row.qemu[0]), qemuBinary(row.qemu[1])],
    capabilities: row.capabilities,
    parameters: row.parameters,
    postcopyAfterBytes: row.postcopyAfterBytes,
    downtimeLimitMs: row.downtimeLimitMs,
    continueAfterPauseMs: row.continueAfterPauseMs,
    qemuTls: row.qemuTls,
  });
  const first = legs[0];
  const back = legs.length > 1 ? legs[1] : null;
  return {
    row,
    verified: legs.length === row.legs && legs.every((l) => l.verified),
    firstLegWanBytes: first?.wanBytes ?? 0,
    backLegWanBytes: back?.wanBytes ?? null,
    backShare: back && first && first.wanBytes > 0 ? back.wanBytes / first.wanBytes : null,
    postcopyStarted: legs.some((l) => l.postcopyStarted),
    legs,
  };
}

/** The README's table row of an outcome. */
export function compatTableRow(o: CompatOutcome): string {
  const r = o.row;
  const qemu = r.qemu[0] === r.qemu[1] ? r.qemu[0] : `${r.qemu[0]} → ${r.qemu[1]}`;
  const back = o.backShare === null ? 'one way' : `${(o.backShare * 100).toFixed(2)}%`;
  return `| ${qemu} | ${r.machine} | ${r.label} | ${o.verified ? 'yes, verified' : 'NO'} | ${back} |`;
}

export const COMPAT_TABLE_HEAD = '| QEMU | machine | capabilities | completes | back leg WAN bytes / first leg |\n| --- | --- | --- | --- | --- |';
