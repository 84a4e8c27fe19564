/**
 * Prometheus metrics for one gateway, in its own registry (several gateways, or tests, can live in
 * one process). All series are labelled by `vm` and `direction` ('send' = this gateway forwards a
 * source QEMU's stream to a peer; 'receive' = it rebuilds a stream for a destination QEMU).
 */
import * as http from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { Counter, Gauge, Registry, collectDefaultMetrics } from 'prom-client';
import type { Endpoint } from './address';
import type { RefusalReason } from './limits';
import type { Direction } from './session';

export type PageKind = 'sent' | 'reused' | 'zero' | 'delta' | 'matched' | 'sibling';
export type MigrationResult = 'completed' | 'failed';

export interface MigrationSummary {
  result: MigrationResult;
  /** Wall-clock duration of the migration. */
  seconds: number;
  /** QEMU stream bytes of this migration (what QEMU sent / the destination QEMU received). */
  qemuBytes: number;
  /** Bytes this migration put on / took off the WAN link. */
  wanBytes: number;
  /** Why its stream was relayed verbatim from some point on (a fallback code), or null. */
  verbatimReason: string | null;
  /** WAN bytes compression saved (Literal bytes less the Compressed frames that carried them). */
  compressionSavedBytes: number;
}

type VmLabels = 'vm' | 'direction';

/** Whose TLS certificate: this site's own, the CA's, or a peer's (as it last presented it). */
export type CertificateRole = 'own' | 'ca' | 'peer';

export class GatewayMetrics {
  readonly registry = new Registry();

  private readonly streamBytes = new Counter<VmLabels>({
    name: 'bfmig_qemu_stream_bytes_total',
    help: 'Bytes of QEMU migration stream read from the source QEMU (send) or written to the destination QEMU (receive)',
    labelNames: ['vm', 'direction'],
    registers: [this.registry],
  });

  private readonly wanBytes = new Counter<VmLabels>({
    name: 'bfmig_wan_bytes_total',
    help: 'Bytes sent to (send) or received from (receive) the peer gateway',
    labelNames: ['vm', 'direction'],
    registers: [this.registry],
  });

  private readonly storeReadBytes = new Counter<VmLabels>({
    name: 'bfmig_store_read_bytes_total',
    help: "Bytes of pages the VM's store read from its file for its migrations (reads ahead included; with direct I/O the disk read them all but never-written zero pages)",
    labelNames: ['vm', 'direction'],
    registers: [this.registry],
  });

  private readonly storeWrittenBytes = new Counter<VmLabels>({
    name: 'bfmig_store_written_bytes_total',
    help: "Bytes of pages the VM's store wrote to its file for its migrations",
    labelNames: ['vm', 'direction'],
    registers: [this.registry],
  });

  private readonly evictions = new Counter<'vm'>({
    name: 'bfmig_store_evictions_total',
    help: 'Retained VM snapshots removed to keep the store directory within storeBudget',
    labelNames: ['vm'],
    registers: [this.registry],
  });

  private readonly storeFull = new Counter<VmLabels>({
    name: 'bfmig_store_full_total',
    help: 'Store writes that failed for lack of space (the VM then migrates without retention until there is room)',
    labelNames: ['vm', 'direction'],
    registers: [this.registry],
  });

  private readonly unretained = new Counter<VmLabels>({
    name: 'bfmig_migrations_unretained_total',
    help: 'Migrations that retained nothing because the store had no room: the next one reuses nothing',
    labelNames: ['vm', 'direction'],
    registers: [this.registry],
  });

  private readonly pages = new Counter<VmLabels | 'kind'>({
    name: 'bfmig_pages_total',
    help: 'RAM pages by how they crossed the WAN: sent in full, reused from the far site, zero, as a delta against the version the far site held, matched to another page the far site held with the same content, or matched to a page of a sibling VM snapshot the far site held',
    labelNames: ['vm', 'direction', 'kind'],
    registers: [this.registry],
  });

  private readonly migrations = new Counter<VmLabels | 'result'>({
    name: 'bfmig_migrations_total',
    help: 'Migrations finished, by result',
    labelNames: ['vm', 'direction', 'result'],
    registers: [this.registry],
  });

  private readonly verbatim = new Counter<VmLabels | 'reason'>({
    name: 'bfmig_streams_relayed_verbatim_total',
    help: 'Migrations whose stream bfmig stopped parsing and relayed as it was from some point on (no reuse and nothing retained after it), by reason (stream-version, section-type, live-section, ram-section, rdma, ram-flags, command, after-end, configuration)',
    labelNames: ['vm', 'direction', 'reason'],
    registers: [this.registry],
  });

  private readonly lastDuration = new Gauge<VmLabels>({
    name: 'bfmig_last_migration_duration_seconds',
    help: 'Duration of the last finished (completed or failed) migration',
    labelNames: ['vm', 'direction'],
    registers: [this.registry],
  });

  private readonly compressionSaved = new Counter<VmLabels>({
    name: 'bfmig_compression_saved_bytes_total',
    help: 'WAN bytes zstd compression saved, beside what reuse saved: Literal bytes less the Compressed frames that carried them',
    labelNames: ['vm', 'direction'],
    registers: [this.registry],
  });

  private readonly savingRatio = new Gauge<VmLabels>({
    name: 'bfmig_saving_ratio',
    help: '1 - WAN bytes / QEMU stream bytes of the last finished migration (absent when it had no stream bytes)',
    labelNames: ['vm', 'direction'],
    registers: [this.registry],
  });

  private readonly connectionsOpen = new Gauge<'listener'>({
    name: 'bfmig_connections_open',
    help: 'Open connections by listener (peer, source, metrics); limits.maxConnections bounds their sum',
    labelNames: ['listener'],
    registers: [this.registry],
  });

  private readonly connectionsRefused = new Counter<'listener' | 'reason'>({
    name: 'bfmig_connections_refused_total',
    help: 'Connections turned away before a migration began, by listener and reason (connection-limit, pending-limit, per-address-limit, tls, peer-not-allowed, handshake-timeout, frame-too-large, protocol, bad-vm-name, target-not-allowed, vm-not-allowed, busy, not-qemu, no-migration, channel-mismatch, duplicate-channel, channel-limit, closed)',
    labelNames: ['listener', 'reason'],
    registers: [this.registry],
  });

  private readonly idleTimeouts = new Counter<'direction'>({
    name: 'bfmig_idle_timeouts_total',
    help: 'Migrations failed because no byte moved on their connections for limits.idleSeconds',
    labelNames: ['direction'],
    registers: [this.registry],
  });

  private readonly stalled = new Gauge<VmLabels>({
    name: 'bfmig_migrations_stalled',
    help: 'Migrations in flight that moved no byte for progress.stallSeconds (1), until bytes flow again (0)',
    labelNames: ['vm', 'direction'],
    registers: [this.registry],
  });

  private readonly stalls = new Counter<VmLabels>({
    name: 'bfmig_migration_stalls_total',
    help: 'Times a migration in flight stalled (moved no byte for progress.stallSeconds)',
    labelNames: ['vm', 'direction'],
    registers: [this.registry],
  });

  private readonly certificateExpiry = new Gauge<'certificate' | 'peer'>({
    name: 'bfmig_tls_certificate_expiry_timestamp_seconds',
    help: 'When a TLS certificate stops being valid (its notAfter, Unix time): certificate="own" (this site\'s, tls.cert), "ca" (tls.ca), "peer" (as a peer gateway last presented it, peer = the names it gives)',
    labelNames: ['certificate', 'peer'],
    registers: [this.registry],
  });

  /** What the store directory holds now, read at each scrape (see watchStore). */
  private storeUsedBytes: (() => number) | null = null;

  private readonly storeBytes = new Gauge({
    name: 'bfmig_store_bytes',
    help: 'Bytes the retained stores in the data directory take now (file sizes, as storeBudget counts them)',
    registers: [this.registry],
    collect: () => {
      if (this.storeUsedBytes) this.storeBytes.set(this.storeUsedBytes());
    },
  });

  private readonly storeBudget = new Gauge({
    name: 'bfmig_store_budget_bytes',
    help: 'storeBudget: the bound on bfmig_store_bytes (0 when none is configured)',
    registers: [this.registry],
  });

  private server: http.Server | null = null;
  /** What GET /status serves (JSON), when the gateway gave it. */
  private status: (() => object) | null = null;

  constructor(opts: { defaultMetrics?: boolean } = {}) {
    if (opts.defaultMetrics ?? true) collectDefaultMetrics({ register: this.registry });
  }

  /**
   * Creates `vm`'s counters for `direction` at 0 (a route's VM, at start): Prometheus's rate() and
   * increase() count only what a series gains after it first sees it, so a counter that appeared at its
   * first increment would lose the first migration's bytes, or its first failure, to them.
   */
  startSeries(vm: string, direction: Direction): void {
    const labels = { vm, direction };
    this.streamBytes.inc(labels, 0);
    this.wanBytes.inc(labels, 0);
    this.storeReadBytes.inc(labels, 0);
    this.storeWrittenBytes.inc(labels, 0);
    for (const kind of ['sent', 'reused', 'zero'] as const) this.pages.inc({ ...labels, kind }, 0);
    for (const result of ['completed', 'failed'] as const) this.migrations.inc({ ...labels, result }, 0);
  }

  addStreamBytes(vm: string, direction: Direction, n: number): void {
    this.streamBytes.inc({ vm, direction }, n);
  }

  addWanBytes(vm: string, direction: Direction, n: number): void {
    this.wanBytes.inc({ vm, direction }, n);
  }

  /** Bytes of pages the VM's store read from and wrote to its file since the last call. */
  addStoreIo(vm: string, direction: Direction, readBytes: number, writtenBytes: number): void {
    this.storeReadBytes.inc({ vm, direction }, readBytes);
    this.storeWrittenBytes.inc({ vm, direction }, writtenBytes);
  }

  storeEvicted(vm: string): void {
    this.evictions.inc({ vm });
  }

  storeWriteNoSpace(vm: string, direction: Direction): void {
    this.storeFull.inc({ vm, direction });
  }

  migrationUnretained(vm: string, direction: Direction): void {
    this.unretained.inc({ vm, direction });
  }

  connectionsOpenNow(listener: string, open: number): void {
    this.connectionsOpen.set({ listener }, open);
  }

  connectionRefused(listener: string, reason: string): void {
    this.connectionsRefused.inc({ listener, reason });
  }

  idleTimeout(direction: Direction): void {
    this.idleTimeouts.inc({ direction });
  }

  /** A migration stalled (counted once per stall) or moves again, or ended. */
  stalledNow(vm: string, direction: Direction, stalled: boolean): void {
    if (stalled) this.stalls.inc({ vm, direction });
    this.stalled.set({ vm, direction }, stalled ? 1 : 0);
  }

  /** Report the store directory's use at each scrape: `usedBytes` is called then; `budgetBytes` null = no storeBudget. */
  watchStore(usedBytes: () => number, budgetBytes: number | null): void {
    this.storeUsedBytes = usedBytes;
    this.storeBudget.set(budgetBytes ?? 0);
  }

  /** A certificate this gateway holds or was shown, and when it stops being valid. */
  certificateExpires(certificate: CertificateRole, peer: string, notAfter: Date): void {
    this.certificateExpiry.set({ certificate, peer }, notAfter.getTime() / 1000);
  }

  addPages(vm: string, direction: Direction, kind: PageKind, n: number): void {
    this.pages.inc({ vm, direction, kind }, n);
  }

  /**
   * Count a finished migration and set the last-migration gauges. The byte counts only feed the
   * saving ratio; the byte counters are fed by addStreamBytes / addWanBytes as data flows.
   */
  migrationFinished(vm: string, direction: Direction, m: MigrationSummary): void {
    const labels = { vm, direction };
    this.migrations.inc({ ...labels, result: m.result });
    if (m.verbatimReason !== null) this.verbatim.inc({ ...labels, reason: m.verbatimReason });
    this.compressionSaved.inc(labels, m.compressionSavedBytes);
    this.lastDuration.set(labels, m.seconds);
    if (m.qemuBytes > 0) this.savingRatio.set(labels, 1 - m.wanBytes / m.qemuBytes);
    else this.savingRatio.remove(labels);
  }

  /** The exposition text, as GET /metrics serves it. */
  text(): Promise<string> {
    return this.registry.metrics();
  }

  /**
   * Serve GET /metrics (and GET /status, the JSON `status` returns, when given) on `endpoint` (port 0 =
   * any); resolves to the bound address. `admit` may turn
   * a connection away (the gateway's connection limits); a client gets `headersTimeoutMs` to send its
   * request headers and is dropped after `idleTimeoutMs` without traffic. A client whose request is
   * refused (headers not complete in time: reset; malformed or too large: answered 400 or 431) is
   * reported to `refused`.
   */
  serve(
    endpoint: Endpoint,
    limits: { admit?: (socket: Socket) => boolean; headersTimeoutMs?: number; idleTimeoutMs?: number; refused?: (socket: Socket, reason: RefusalReason, detail: string) => void; status?: () => object } = {},
  ): Promise<Endpoint> {
    if (this.server) return Promise.reject(new Error('metrics server already running'));
    this.status = limits.status ?? null;
    // Header and request timeouts are checked this often (Node's default, 30 s, would stretch them).
    const server = http.createServer({ connectionsCheckingInterval: 1000 }, (req, res) => this.handle(req, res));
    const admit = limits.admit;
    if (admit) server.on('connection', (socket: Socket) => admit(socket) || socket.destroy());
    if (limits.headersTimeoutMs !== undefined) {
      server.headersTimeout = limits.headersTimeoutMs;
      server.requestTimeout = limits.headersTimeoutMs;
    }
    const refused = limits.refused ?? (() => undefined);
    // Replaces Node's own answer to a bad or late request, so that each refusal is reported.
    server.on('clientError', (err: NodeJS.ErrnoException, duplex) => {
      const socket = duplex as Socket;
      if (err.code === 'ERR_HTTP_REQUEST_TIMEOUT') {
        refused(socket, 'handshake-timeout', `request headers not complete within ${server.headersTimeout / 1000} s (limits.handshakeSeconds)`);
        socket.resetAndDestroy();
      } else if (err.code?.startsWith('HPE_') && socket.writable && socket.bytesWritten === 0) {
        refused(socket, 'protocol', `bad HTTP request: ${err.message}`);
        const status = err.code === 'HPE_HEADER_OVERFLOW' ? '431 Request Header Fields Too Large' : '400 Bad Request';
        socket.end(`HTTP/1.1 ${status}\r\nConnection: close\r\n\r\n`);
      } else {
        socket.destroy(); // the client went away (reset), or broke a connection already answered
      }
    });
    if (limits.idleTimeoutMs !== undefined) server.setTimeout(limits.idleTimeoutMs, (socket: Socket) => socket.destroy());
    this.server = server;
    return new Promise<Endpoint>((resolve, reject) => {
      const onError = (err: Error): void => {
        this.server = null;
        reject(err);
      };
      server.once('error', onError);
      server.listen(endpoint.port, endpoint.host, () => {
        server.off('error', onError);
        const addr = server.address() as AddressInfo;
        resolve({ host: addr.address, port: addr.port });
      });
    });
  }

  /** Stop the HTTP server (if any), dropping open keep-alive connections. */
  close(): Promise<void> {
    const server = this.server;
    this.server = null;
    if (!server) return Promise.resolve();
    return new Promise<void>((resolve, reject) => {
      server.close((err) => (err ? reject(err) : resolve()));
      server.closeAllConnections();
    });
  }

  private handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    const pathname = (req.url ?? '/').split('?')[0];
    const status = pathname === '/status' ? this.status : null;
    if (pathname !== '/metrics' && !status) {
      res.writeHead(404, { 'Content-Type': 'text/plain; charset=utf-8' }).end(`not found; try /metrics${this.status ? ' or /status' : ''}\n`);
      return;
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { Allow: 'GET, HEAD', 'Content-Type': 'text/plain; charset=utf-8' }).end('method not allowed\n');
      return;
    }
    if (status) {
      res.writeHead(200, { 'Content-Type': 'application/json; charset=utf-8', 'Cache-Control': 'no-store' });
      res.end(req.method === 'HEAD' ? undefined : `${JSON.stringify(status())}\n`);
      return;
    }
    this.registry.metrics().then(
      (body) => {
        res.writeHead(200, { 'Content-Type': this.registry.contentType });
        res.end(req.method === 'HEAD' ? undefined : body);
      },
      (err: unknown) => {
        res.writeHead(500, { 'Content-Type': 'text/plain; charset=utf-8' }).end(`${String(err)}\n`);
      },
    );
  }
}
