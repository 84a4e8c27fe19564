/** What QEMU's QMP answers about a VM and its migration, as the lab reads it (query-status, query-migrate). */
/** RunState from qapi/run-state.json (QEMU 7.2). */
export type RunState =
  | 'debug'
  | 'inmigrate'
  | 'internal-error'
  | 'io-error'
  | 'paused'
  | 'postmigrate'
  | 'prelaunch'
  | 'finish-migrate'
  | 'restore-vm'
  | 'running'
  | 'save-vm'
  | 'shutdown'
  | 'suspended'
  | 'watchdog'
  | 'guest-panicked'
  | 'colo';

export interface StatusInfo {
  running: boolean;
  singlestep?: boolean;
  status: RunState;
}

/** MigrationStatus from qapi/migration.json (QEMU 7.2). */
export type MigrationStatus =
  | 'none'
  | 'setup'
  | 'cancelling'
  | 'cancelled'
  | 'active'
  | 'postcopy-active'
  | 'postcopy-paused'
  | 'postcopy-recover'
  | 'completed'
  | 'failed'
  | 'colo'
  | 'pre-switchover'
  | 'device'
  | 'wait-unplug';

/** MigrationStats (`ram` in query-migrate). Page counts are in target pages (4 KiB). */
export interface MigrationRamStats {
  transferred: number;
  remaining: number;
  total: number;
  /** Pages sent as "zero page" records (RAM_SAVE_FLAG_ZERO; formerly "compress"). */
  duplicate: number;
  skipped: number;
  /** Pages sent in full (RAM_SAVE_FLAG_PAGE). */
  normal: number;
  'normal-bytes': number;
  'dirty-pages-rate': number;
  mbps: number;
  'dirty-sync-count': number;
  'postcopy-requests': number;
  'page-size': number;
  'multifd-bytes': number;
  'pages-per-second': number;
  'precopy-bytes'?: number;
  'downtime-bytes'?: number;
  'postcopy-bytes'?: number;
  'dirty-sync-missed-zero-copy'?: number;
}

export interface MigrationInfo {
  status?: MigrationStatus;
  ram?: MigrationRamStats;
  'total-time'?: number;
  'expected-downtime'?: number;
  downtime?: number;
  'setup-time'?: number;
  'error-desc'?: string;
  'blocked-reasons'?: string[];
  'cpu-throttle-percentage'?: number;
  'postcopy-blocktime'?: number;
  'socket-address'?: Array<Record<string, string>>;
  [extra: string]: unknown;
}

export class MigrationFailedError extends Error {
  constructor(
    readonly info: MigrationInfo,
    vmName: string,
  ) {
    super(`${vmName}: migration ${info.status ?? 'unknown'}: ${info['error-desc'] ?? '(no error-desc)'}`);
    this.name = 'MigrationFailedError';
  }
}

