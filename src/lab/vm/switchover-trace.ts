/**
 * What a source QEMU's own trace says of how it chose its switchover. QEMU measures its stream's rate in
 * windows of about 100 ms (migration_update_counters) and stops the guest once what is left to send is
 * under that rate × the downtime limit (migration_iteration_run). Through a gateway pair the rate it
 * measures is the pair's pace, not the WAN's. These two events, traced by QEMU 7.2 and 10.0 alike
 * through its `log` trace backend (to stderr), say when it stopped the guest and with how much left;
 * the downtime then says how fast the pair took the rest.
 */

/** The trace events to enable at a source (`-trace NAME` each). */
export const SWITCHOVER_TRACE_EVENTS = ['migrate_transferred', 'migration_thread_low_pending'] as const;

export interface SwitchoverTrace {
  /** Each rate window QEMU measured before it switched over, in order: bytes sent in it, and its length. */
  windows: { bytes: number; ms: number }[];
  /** Bytes QEMU had left to send when it stopped the guest (null: no switchover traced). */
  pendingAtSwitchover: number | null;
}

// "migrate_transferred transferred 15157018 time_spent 140 bandwidth 108264 ..." (QEMU 7.2 and 10.0); the
// log backend may prefix a line with "PID@SECONDS:".
const WINDOW = /(?:^|[\s:])migrate_transferred transferred (\d+) time_spent (\d+)/;
const LOW_PENDING = /(?:^|[\s:])migration_thread_low_pending (\d+)/;

/**
 * The windows and switchover of the last outgoing migration in `stderr`: a VM migrated out more than once
 * has its earlier migrations' lines first, each ended by its switchover.
 */
export function parseSwitchoverTrace(stderr: string): SwitchoverTrace {
  let windows: SwitchoverTrace['windows'] = [];
  let pendingAtSwitchover: number | null = null;
  for (const line of stderr.split('\n')) {
    const window = WINDOW.exec(line);
    if (window) {
      if (pendingAtSwitchover !== null) {
        windows = [];
        pendingAtSwitchover = null;
      }
      windows.push({ bytes: Number(window[1]), ms: Number(window[2]) });
      continue;
    }
    const low = LOW_PENDING.exec(line);
    if (low) pendingAtSwitchover = Number(low[1]);
  }
  return { windows, pendingAtSwitchover };
}
