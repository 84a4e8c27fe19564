/**
 * `bfmig status --gateway HOST:PORT [--watch] [--json]`: the migrations in flight through a gateway, as
 * its metrics listener serves them at GET /status (gateway/progress.ts says what each field is).
 */
import * as http from 'node:http';
import { type Endpoint, formatEndpoint } from '../gateway/address';
import type { GatewayStatus } from '../gateway/gateway';
import type { MigrationStatus } from '../gateway/progress';
import { errorMessage } from '../common/errors';
import { formatSize } from '../common/units';

/** --watch refreshes this often (the gateway's figures change once a second). */
const WATCH_INTERVAL_MS = 1000;
const REQUEST_TIMEOUT_MS = 5000;

/** GET /status of the gateway whose metrics listener is `at`. */
export function fetchStatus(at: Endpoint): Promise<GatewayStatus> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: at.host, port: at.port, path: '/status', timeout: REQUEST_TIMEOUT_MS }, (res) => {
      const parts: Buffer[] = [];
      res.on('data', (b: Buffer) => parts.push(b));
      res.on('error', reject);
      res.on('end', () => {
        const body = Buffer.concat(parts).toString('utf8');
        if (res.statusCode !== 200) return reject(new Error(`${formatEndpoint(at)}/status answered ${res.statusCode}: ${body.trim()}`));
        try {
          resolve(JSON.parse(body) as GatewayStatus);
        } catch (err) {
          reject(new Error(`${formatEndpoint(at)}/status: not JSON (${errorMessage(err)})`));
        }
      });
    });
    req.on('timeout', () => req.destroy(new Error(`${formatEndpoint(at)}: no answer within ${REQUEST_TIMEOUT_MS / 1000} s`)));
    req.on('error', reject);
  });
}

const COLUMNS: ReadonlyArray<{ title: string; width: number; cell: (m: MigrationStatus) => string }> = [
  { title: 'vm', width: 20, cell: (m) => m.vm },
  { title: 'dir', width: 8, cell: (m) => m.direction },
  { title: 'phase', width: 14, cell: (m) => (m.stalled ? `${m.phase}!` : m.phase) },
  { title: 'elapsed', width: 9, cell: (m) => duration(m.elapsedSeconds) },
  { title: 'qemu', width: 11, cell: (m) => formatSize(m.qemuBytes) },
  { title: 'wan', width: 11, cell: (m) => formatSize(m.wanBytes) },
  { title: 'saving', width: 7, cell: (m) => (m.saving === null ? '-' : `${Math.round(m.saving * 100)}%`) },
  { title: 'qemu/s', width: 11, cell: (m) => formatSize(m.qemuBytesPerSecond) },
  { title: 'wan/s', width: 11, cell: (m) => formatSize(m.wanBytesPerSecond) },
  { title: 'sent', width: 10, cell: (m) => String(m.pagesSent) },
  { title: 'reused', width: 10, cell: (m) => String(m.pagesReused) },
  { title: 'left', width: 11, cell: (m) => (m.remainingBytes === null ? '-' : formatSize(m.remainingBytes)) },
  { title: 'eta', width: 8, cell: (m) => (m.etaSeconds === null ? '-' : duration(m.etaSeconds)) },
];

/** The status as a table, one line per migration in flight. */
export function formatStatus(status: GatewayStatus): string {
  const head = `${status.site} at ${status.time}: ${status.migrations.length === 0 ? 'no migration in flight' : `${status.migrations.length} in flight`}`;
  if (status.migrations.length === 0) return `${head}\n`;
  const row = (cells: string[]): string => cells.map((c, i) => (i < 3 ? c.padEnd(COLUMNS[i].width) : c.padStart(COLUMNS[i].width))).join(' ').trimEnd();
  const lines = [head, row(COLUMNS.map((c) => c.title)), ...status.migrations.map((m) => row(COLUMNS.map((c) => c.cell(m))))];
  if (status.migrations.some((m) => m.stalled)) lines.push('!: stalled, no bytes moved for progress.stallSeconds');
  return `${lines.join('\n')}\n`;
}

function duration(seconds: number): string {
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
}

/**
 * Prints the status once (exit 0, or 1 when the gateway cannot be asked), or with `watch` refreshes it
 * until interrupted: redrawn in place on a terminal, appended otherwise (one JSON line each with --json).
 */
export async function runStatus(at: Endpoint, options: { watch: boolean; json: boolean }, write: (text: string) => void, tty: boolean): Promise<number> {
  const render = (s: GatewayStatus): string => (options.json ? `${JSON.stringify(s, null, options.watch ? undefined : 2)}\n` : formatStatus(s));
  if (!options.watch) {
    write(render(await fetchStatus(at)));
    return 0;
  }
  for (;;) {
    let text: string;
    try {
      text = render(await fetchStatus(at));
    } catch (err) {
      // A gateway restarting is worth waiting for: the watch goes on.
      text = `bfmig status: ${errorMessage(err)}\n`;
    }
    write(tty && !options.json ? `\x1b[H\x1b[2J${text}` : text);
    await new Promise((resolve) => setTimeout(resolve, WATCH_INTERVAL_MS));
  }
}
