import * as fs from 'node:fs';
import * as path from 'node:path';
import { Writable } from 'node:stream';
import { loopbackSiteYaml } from '../harness/loopback-config';
import { type GatewayLegReport, type SiteGateway, startSiteGateway } from '../harness/site-gateway';
import { makeTempDir, removeTempDir } from '../harness/temp-dir';
import { type MigrationInfo } from '../vm/qmp-types';
import { type QmpEvent, QemuVm, type WaitForMigrationOptions, disposeAllVms } from '../vm/qemu-vm';
import { ensureGuestBuilt } from '../vm/guest-image';
import { freePort } from '../vm/ports';
import { parseSwitchoverTrace, SWITCHOVER_TRACE_EVENTS } from '../vm/switchover-trace';
import { WanEmulator } from '../wan';

/** What a leg's opening is timed to: its first 8 MiB across the WAN (LegResult.openingMs). */
export const OPENING_BYTES = 8 * 2 ** 20;
import { X86_PAGE_SIZE } from '../../qemu/constants';
import { makeQemuTlsCredentials } from '../vm/qemu-tls';
import { distModule, type NodeChild, startNodeChild } from '../harness/child';
import { type CpuTime, cpuTime, procStats } from './proc-stats';

export interface BackForthOptions {
  legs: number;
  memMiB: number;
  workloadMiB: number;
  /** Share of the workload's pages the guest rewrites per second, also while it migrates. */
  rewritePct: number;
  /**
   * Percent of the guest's RAM pages the workload rewrites, once, at the site it is at, before leg
   * 2, 3, …: element i applies before leg i + 2 (missing: none). The guest is quiet meanwhile unless
   * rewritePct says otherwise. Capped at the workload's own pages.
   */
  changePcts?: number[];
  rateMbit: number;
  delayMs: number;
  machine: string;
  /** QEMU's downtime-limit, ms (default: the harness's, 500). */
  downtimeLimitMs?: number;
  /** Also migrate directly, QEMU to QEMU through the same WAN emulator, for comparison. */
  direct: boolean;
  /** Run each gateway as a `bfmig gateway` child process, so its CPU seconds are measured (default: in this process). */
  gatewayProcesses?: boolean;
  /** Node flags of those processes (e.g. the deployment's recommended ones, or --cpu-prof). */
  gatewayNodeArgs?: readonly string[];
  /** Prints progress lines; a TTY gets one updating line per leg. */
  out: NodeJS.WriteStream | Writable;
  /** The QEMU binary at site-a and at site-b (default: $BFMIG_QEMU or the system's at both). */
  qemuAt?: readonly [string, string];
  /** migrate-set-capabilities at both ends of every leg (destinations start with -incoming defer). */
  capabilities?: Record<string, boolean>;
  /**
   * migrate-set-parameters at the source of every leg, besides the harness's bandwidth and downtime, and
   * (when `capabilities` are set, so the destination starts with -incoming defer) at its destination too.
   */
  parameters?: Record<string, unknown>;
  /** Switch each leg to postcopy (migrate-start-postcopy) once QEMU has sent this many bytes. */
  postcopyAfterBytes?: number;
  /** With pause-before-switchover: how long each leg waits in `pre-switchover` before migrate-continue. */
  continueAfterPauseMs?: number;
  /** QEMU's own TLS on every leg (x509 credentials made for the run): the stream is encrypted end to end. */
  qemuTls?: boolean;
  /** The workload's page content: pseudo-random (default) or pages of real files (see guest/workload.c). */
  content?: 'random' | 'files';
  /** Database-like updates the guest makes, also while it migrates: `bytes` at a random offset, `perSecond` times a second. */
  scribble?: { bytes: number; perSecond: number };
  /** Also migrate through a second gateway pair with `compression: off`, path 'bfmig-uncompressed'. */
  uncompressed?: boolean;
  /**
   * Also migrate through a gateway pair each of whose sites states the link's rate (`peers[].wan.linkMbit`:
   * the emulated WAN's `rateMbit`), path 'bfmig-link-stated': what the compression policy does when it
   * need not measure the link.
   */
  linkStated?: boolean;
  /** Also migrate through a gateway pair that compresses on libuv's thread pool (`compressionRunsOn: thread-pool`), path 'bfmig-thread-pool'. */
  threadPool?: boolean;
  /** Also migrate through a gateway pair with `compression: off` and `deltas: off` (the gateway before either existed), path 'bfmig-plain'. */
  plain?: boolean;
  /**
   * Also migrate through a plain TCP relay at each site (QEMU → relay → the WAN emulator → relay → QEMU),
   * each relay a process of its own, path 'relay': what forwarding alone costs in CPU.
   */
  relay?: boolean;
  /**
   * Migrate the paths in an order turned this many places from the usual one (direct, relay, the gateway
   * pairs): a benchmark turns it run by run, so that no path always follows the same one (a leg meets
   * the memory and disk the path before it left: freshly freed guest memory is slow to touch again here).
   */
  rotatePaths?: number;
}

/**
 * How a leg crossed: QEMU to QEMU, through two plain TCP relays, through bfmig (compressing on the event
 * loop), through bfmig told the link's rate, through bfmig compressing on the thread pool, through bfmig
 * with `compression: off`, through bfmig with `compression: off` and `deltas: off`.
 */
export type LegPath = 'direct' | 'relay' | 'bfmig' | 'bfmig-link-stated' | 'bfmig-thread-pool' | 'bfmig-uncompressed' | 'bfmig-plain';

export interface LegResult {
  leg: number;
  path: LegPath;
  from: string;
  to: string;
  /** What the gateways said of a migration that failed on their side, sender's first (empty: none did). */
  gatewayErrors: string[];
  /** WAN bytes both ways, and each way (forward: towards the destination). */
  wanBytes: number;
  wanBytesForward: number;
  wanBytesBackward: number;
  /** QEMU stream bytes (the sending gateway's count through bfmig, QEMU's ram.transferred direct). */
  streamBytes: number;
  /** QEMU's total-time and downtime: the source's view, which ends when it has written its last byte. */
  totalTimeMs: number;
  downtimeMs: number;
  setupTimeMs: number;
  /**
   * What the guest saw, from QMP event timestamps: from the migrate command to the destination's RESUME,
   * and from the source's STOP to the destination's RESUME. Bytes still on their way (socket buffers,
   * the WAN) when the source says it is done count here, not in QEMU's figures.
   */
  untilRunningMs: number | null;
  pausedMs: number | null;
  /**
   * The leg's opening: from the migrate command until its first OPENING_BYTES had crossed the WAN
   * towards the destination (null: the leg carried fewer). The handshake, and a first leg's first
   * records while the gateway rather than the link sets the pace, fall in it.
   */
  openingMs: number | null;
  /** Pages sent in full over the WAN (QEMU's ram.normal direct). */
  pagesSent: number;
  pagesReused: number;
  /** Of pagesSent, pages the receiver held that a multifd migration sent whole all the same (0: direct). */
  pagesUnordered: number;
  /** QEMU's own counts for the migration: pages sent in full, zero pages, dirty-bitmap syncs (≈ rounds). */
  qemuNormalPages: number;
  qemuZeroPages: number;
  qemuTransferredBytes: number;
  dirtySyncCount: number;
  /**
   * What QEMU decided its switchover from: the bytes it sent with the guest stopped (`downtime-bytes`,
   * QEMU ≥ 8.1; null before), and the rate it last measured its stream to take (`mbps`, Mbit/s), against
   * which it weighs what is left to send.
   */
  downtimeBytes: number | null;
  qemuMbps: number | null;
  /**
   * From the source's own trace (lab/vm/switchover-trace.ts): the rate windows QEMU measured before it
   * switched over (bytes, ms), and the bytes it left to send with the guest stopped (null: not traced).
   */
  qemuWindows: { bytes: number; ms: number }[];
  pendingAtSwitchoverBytes: number | null;
  /** Pages the guest rewrote at the source site since it arrived there (the change before this leg). */
  changedPages: number;
  /** Seconds the guest ran at the source site, from its arrival (or boot) to this leg's start. */
  secondsAtSource: number;
  /**
   * Page writes the workload reported at the source site since the guest arrived there, the change
   * before this leg included (its per-second rewriting picks pages at random, so some twice); null
   * without the control port.
   */
  pageWritesAtSource: number | null;
  /** CPU seconds of the sending and receiving gateways (or relays) during the leg (null: direct, or gateways in process). */
  gatewayCpuSecondsSend: number | null;
  gatewayCpuSecondsReceive: number | null;
  /** Of those, the seconds in the kernel (sockets, disk, page faults). */
  gatewaySystemSecondsSend: number | null;
  gatewaySystemSecondsReceive: number | null;
  /** Of those, the main thread's (the event loop: what bounds a gateway with cores to spare); absent in older results. */
  gatewayMainThreadSecondsSend?: number | null;
  gatewayMainThreadSecondsReceive?: number | null;
  verified: boolean;
  /**
   * Why the leg did not verify, for a failure's report (absent when it did): the source's migration
   * status and error, the gateways' errors and their logs' last lines, and the destination QEMU's
   * stderr and console tail.
   */
  failure?: string;
  /** Whether migrate-start-postcopy was issued while the leg was still active. */
  postcopyStarted: boolean;
  /** Whether the source waited in pre-switchover and was sent migrate-continue (continueAfterPauseMs). */
  continuedFromPause: boolean;
  /** Why the sending gateway relayed (part of) the stream verbatim (a fallback code); null when it parsed it all, or direct. */
  verbatim: string | null;
  /** WAN bytes the sending gateway's compression saved (0: direct, or not compressed). */
  compressionSavedBytes: number;
  /**
   * Bytes of pages the sending and the receiving gateway's stores read from and wrote to their files for
   * the leg (reads ahead included; PageStore.pageIo); null: direct or relay, or a
   * gateway that did not report them. Absent in older results.
   */
  storeIo?: { readSend: number; writtenSend: number; readReceive: number; writtenReceive: number } | null;
  /** The sending gateway's deltas (not counted in pagesSent): pages sent as changed ranges, pages matched to the same content elsewhere, the Delta payload bytes both took (0: direct). */
  pagesDelta: number;
  pagesMatched: number;
  deltaBytes: number;
}

interface Site {
  name: string;
  gateway: SiteGateway;
  /** The source QEMU at this site migrates to this port (the gateway's route). */
  routePort: number;
  /** The destination QEMU at this site listens here. */
  qemuPort: number;
  /** The far gateway's connections to this site arrive through this emulator. */
  inbound: WanEmulator;
  /** The gateway's log file (warnings and errors). */
  logPath: string;
}

/** The test guest's workload has checked every page it wrote. */
export const VERIFIED = /WORKLOAD VERIFY OK round=\d+ pages=\d+/;

/** Whether a guest that has just arrived runs and its workload verifies (false: it did not in time). */
export function arrivedVerified(dest: QemuVm): Promise<boolean> {
  return dest
    .waitForStatus('running', 60_000)
    .then(() => dest.waitForSerial(VERIFIED, 120_000))
    .then(
      () => true,
      () => false,
    );
}

/** One run of the grid (bench/backforth-grid.json): a guest migrated `changePcts.length + 1` legs over one link, both paths. */
export interface GridRun {
  id: string;
  mbit: number;
  delayMs: number;
  memMiB: number;
  workloadMiB: number;
  /** Percent of guest RAM rewritten between legs (before leg 2, 3, …). */
  changePcts: number[];
  /** Percent of the workload's pages rewritten per second, also during the migrations. */
  rewritePct: number;
  /** QEMU's multifd-channels, where the run had multifd on. */
  multifdChannels?: number;
}

export interface GridFile {
  description?: string;
  downtimeLimitMs: number;
  runs: GridRun[];
}

/** What bench/backforth.ts writes and bench/model-check.ts reads. */
export interface BenchResults {
  host: { cpu: string; cores: number; node: string; qemu: string; accel: string; kernel: string };
  downtimeLimitMs: number;
  started: string;
  runs: Array<GridRun & { finished: string; legs: LegResult[] }>;
}

/**
 * Migrates a self-verifying guest back and forth between two sites on this machine, through two
 * bfmig gateways joined by a user-space WAN emulator, and (optionally) directly through the same
 * emulator. Everything stays on loopback.
 */
export async function runBackForth(o: BackForthOptions): Promise<LegResult[]> {
  ensureGuestBuilt();
  const tmp = makeTempDir('bfmig-backforth-');
  const say = (line: string): void => void o.out.write(line + '\n');
  /** The gateway pair each bfmig path goes through. */
  const pairs = new Map<LegPath, Site[]>();
  const results: LegResult[] = [];
  const changes = o.changePcts ?? [];
  const control = changes.length > 0;
  const workload = { mib: o.workloadMiB, seed: 5, rewritePct: o.rewritePct, intervalMs: 1000, control, content: o.content, scribbleBytes: o.scribble?.bytes, scribbleRate: o.scribble?.perSecond };
  const vmOptions = { machine: o.machine, memMiB: o.memMiB, workload };
  const siteIndex = (name: string): number => (name === 'site-a' ? 0 : 1);
  const tls = o.qemuTls ? makeQemuTlsCredentials(path.join(tmp, 'qemu-tls')) : null;
  const startVm = (options: ConstructorParameters<typeof QemuVm>[0], site: string): QemuVm => {
    const vm = new QemuVm({ ...options, qemuBinary: o.qemuAt?.[siteIndex(site)], extraArgs: tls?.args, traceEvents: SWITCHOVER_TRACE_EVENTS });
    if (o.downtimeLimitMs !== undefined) vm.setDowntimeLimit(o.downtimeLimitMs);
    return vm;
  };
  try {
    const [qemuA, qemuB] = await Promise.all([freePort(), freePort()]);
    /** A gateway pair joined by WAN emulators; `more` is YAML both configs end with (given the address each dials its peer at). */
    const startPair = async (dir: string, more: string | ((farPeer: string) => string)): Promise<Site[]> => {
      const [peerA, peerB, routeA, routeB] = await Promise.all(Array.from({ length: 4 }, () => freePort()));
      const inboundA = new WanEmulator({ listen: { host: '127.0.0.1', port: 0 }, target: { host: '127.0.0.1', port: peerA }, rateMbit: o.rateMbit, delayMs: o.delayMs });
      const inboundB = new WanEmulator({ listen: { host: '127.0.0.1', port: 0 }, target: { host: '127.0.0.1', port: peerB }, rateMbit: o.rateMbit, delayMs: o.delayMs });
      const wanA = await inboundA.listen();
      const wanB = await inboundB.listen();
      const specs = [
        { name: 'site-a', peer: peerA, farWan: wanB.port, route: routeA, qemu: qemuA, farQemu: qemuB, inbound: inboundA },
        { name: 'site-b', peer: peerB, farWan: wanA.port, route: routeB, qemu: qemuB, farQemu: qemuA, inbound: inboundB },
      ];
      const pair: Site[] = [];
      fs.mkdirSync(path.join(tmp, dir), { recursive: true });
      for (const s of specs) {
        const yaml = loopbackSiteYaml({ name: s.name, data: path.join(tmp, dir, s.name), peerPort: s.peer, vm: 'demo-vm', routePort: s.route, farPeerPort: s.farWan, targetPort: s.farQemu }) + (typeof more === 'string' ? more : more(`127.0.0.1:${s.farWan}`));
        const logPath = path.join(tmp, dir, `${s.name}.log`);
        const gateway = await startSiteGateway(path.join(tmp, dir), s.name, yaml, o.gatewayProcesses ? 'child-process' : 'in-process', { nodeArgs: o.gatewayNodeArgs, logPath });
        pair.push({ name: s.name, gateway, routePort: s.route, qemuPort: s.qemu, inbound: s.inbound, logPath });
      }
      return pair;
    };
    pairs.set('bfmig', await startPair('compressed', ''));
    if (o.linkStated) pairs.set('bfmig-link-stated', await startPair('link-stated', (peer) => `peers:\n  - peer: ${peer}\n    wan: { linkMbit: ${o.rateMbit} }\n`));
    if (o.threadPool) pairs.set('bfmig-thread-pool', await startPair('thread-pool', 'compressionRunsOn: thread-pool\n'));
    if (o.uncompressed) pairs.set('bfmig-uncompressed', await startPair('uncompressed', 'compression: off\n'));
    if (o.plain) pairs.set('bfmig-plain', await startPair('plain', 'compression: off\ndeltas: off\n'));
    const sites = pairs.get('bfmig') as Site[];

    const content = o.content === 'files' ? 'pages of real files' : 'pseudo-random pages';
    const scribble = o.scribble ? `, updating ${o.scribble.bytes} bytes ${o.scribble.perSecond} times a second` : '';
    say(`guest: ${o.memMiB} MiB RAM (${o.machine}), workload ${o.workloadMiB} MiB of ${content}, rewriting ${o.rewritePct}%/s${scribble}`);
    if (control) say(`before legs 2..${changes.length + 1}: ${changes.join('%, ')}% of the guest's RAM pages rewritten at the site it is at`);
    say(`WAN: ${o.rateMbit} Mbit/s, ${o.delayMs} ms one way (user-space emulator); QEMU max-bandwidth raised to 10 GiB/s`);
    const memPages = (o.memMiB * 2 ** 20) / X86_PAGE_SIZE;
    const workloadPages = (o.workloadMiB * 2 ** 20) / X86_PAGE_SIZE;
    const usual: LegPath[] = [...(o.direct ? (['direct'] as const) : []), ...(o.relay ? (['relay'] as const) : []), ...pairs.keys()];
    const turn = (o.rotatePaths ?? 0) % usual.length;
    const paths = [...usual.slice(turn), ...usual.slice(0, turn)];
    for (const path_ of paths) {
      const pathSites = pairs.get(path_) ?? sites;
      let vm = startVm({ ...vmOptions, name: `${path_}-origin` }, pathSites[0].name);
      await vm.start();
      await vm.waitForSerial(/WORKLOAD READY/, 300_000);
      await vm.waitForSerial(VERIFIED, 120_000);
      let arrivedAt = Date.now();
      let arrivedMark = vm.serialMark();
      /** The guest's console up to the workload round that confirmed its arrival (its whole first round: at the start). */
      let arrivalCheckedMark = -1;
      for (let leg = 1; leg <= o.legs; leg++) {
        const from = pathSites[(leg - 1) % 2];
        const to = pathSites[leg % 2];
        // Every leg after the first waits for one whole round of the workload at the site the guest arrived
        // at (the next VERIFY OK after the one that confirmed its arrival). The workload rewrote its pages
        // once a round, in a burst: a leg that started right after the arrival's check found that round's
        // writes sent already or not, by where the last leg's stop fell in the round, and a files guest's
        // back leg carried ~45 pages or ~600 (docs/benchmarks.md, "Thirtieth session"). Its database-like
        // updates are spread through the round since the forty-second session. A guest that fails its
        // check says so in the leg's own verification.
        if (arrivalCheckedMark >= 0) await vm.waitForSerial(VERIFIED, 120_000, { since: arrivalCheckedMark }).catch(() => undefined);
        const changePct = leg >= 2 ? changes[leg - 2] ?? 0 : 0;
        let changedPages = 0;
        if (changePct > 0) {
          changedPages = await vm.changePages(Math.min(100, (changePct * memPages) / workloadPages), 300_000);
          say(`  ${changedPages} pages (${((changedPages / memPages) * 100).toFixed(2)}% of RAM) rewritten at ${from.name} before leg ${leg}`);
        }
        const incoming = `tcp:127.0.0.1:${to.qemuPort}`;
        const defer = o.capabilities !== undefined || tls !== null;
        const dest = startVm({ ...vmOptions, name: `${path_}-leg${leg}`, incoming: defer ? 'defer' : incoming }, to.name);
        await dest.start();
        if (defer) {
          // Capabilities such as postcopy-ram, and TLS credentials, must be set at the destination before the stream arrives.
          if (o.capabilities) await dest.setMigrationCapabilities(o.capabilities);
          if (tls) await dest.setMigrationParameters(tls.incoming);
          // Some parameters must match at both ends (multifd-channels).
          if (o.parameters) await dest.setMigrationParameters(o.parameters);
          await dest.migrateIncoming(incoming);
          if (o.capabilities) await vm.setMigrationCapabilities(o.capabilities);
        }
        if (o.parameters || tls) await vm.setMigrationParameters({ ...o.parameters, ...tls?.outgoing });
        let uri: string;
        let directWan: WanEmulator | null = null;
        let relays: RelayPair | null = null;
        const wanBefore = { forward: to.inbound.bytesForward, backward: to.inbound.bytesBackward };
        if (path_ === 'direct' || path_ === 'relay') {
          relays = path_ === 'relay' ? await startRelayPair(to.qemuPort, (port) => new WanEmulator({ listen: { host: '127.0.0.1', port: 0 }, target: { host: '127.0.0.1', port }, rateMbit: o.rateMbit, delayMs: o.delayMs })) : null;
          directWan = relays?.wan ?? new WanEmulator({ listen: { host: '127.0.0.1', port: 0 }, target: { host: '127.0.0.1', port: to.qemuPort }, rateMbit: o.rateMbit, delayMs: o.delayMs });
          uri = `tcp:127.0.0.1:${relays ? relays.port : (await directWan.listen()).port}`;
        } else {
          uri = `tcp:127.0.0.1:${from.routePort}`;
        }
        const sentBefore = from.gateway.reports.length;
        const receivedBefore = to.gateway.reports.length;
        const cpuBefore = relays ? relays.cpu() : { send: from.gateway.cpu(), receive: to.gateway.cpu() };
        const secondsAtSource = (Date.now() - arrivedAt) / 1000;
        const pageWritesAtSource = control ? pageWritesSince(vm.serial, arrivedMark) : null;
        const migrateAt = Date.now();
        const eventsBefore = vm.qmpEvents.length;
        const opening = (directWan ?? to.inbound).markForward((directWan ? 0 : wanBefore.forward) + OPENING_BYTES);
        const migrateAtMs = performance.now();
        await vm.migrate(uri);
        const postcopyStarted = o.postcopyAfterBytes === undefined ? false : await startPostcopyAfter(vm, o.postcopyAfterBytes);
        let continuedFromPause = false;
        const info = await waitWithProgress(vm, `leg ${leg} ${path_.padEnd(6)} ${from.name} → ${to.name}`, o.out, {
          continueAfterPauseMs: o.continueAfterPauseMs,
          onContinued: () => (continuedFromPause = true),
        });
        arrivedAt = Date.now(); // the guest runs at the destination from here
        arrivedMark = 0; // and everything on the destination's console is from there
        const verified = await arrivedVerified(dest);
        arrivalCheckedMark = dest.serialMark();
        let wan: { forward: number; backward: number };
        let report: GatewayLegReport | undefined;
        let received: GatewayLegReport | undefined;
        const gatewayErrors: string[] = [];
        if (directWan) {
          wan = { forward: directWan.bytesForward, backward: directWan.bytesBackward };
          await directWan.close();
        } else {
          for (let i = 0; i < 400 && (from.gateway.reports.length === sentBefore || to.gateway.reports.length === receivedBefore); i++) await sleep(25);
          report = from.gateway.reports[sentBefore];
          received = to.gateway.reports[receivedBefore];
          for (const r of [report, received]) if (r?.error) gatewayErrors.push(`${r.direction}: ${r.error}`);
          wan = { forward: to.inbound.bytesForward - wanBefore.forward, backward: to.inbound.bytesBackward - wanBefore.backward };
        }
        const cpuAfter = relays ? relays.cpu() : { send: from.gateway.cpu(), receive: to.gateway.cpu() };
        await relays?.stop();
        const at = (e: QmpEvent | undefined): number | null => (e?.timestamp ? e.timestamp.seconds * 1000 + e.timestamp.microseconds / 1000 : null);
        const stoppedAt = at([...vm.qmpEvents.slice(eventsBefore)].reverse().find((e) => e.event === 'STOP'));
        const resumedAt = at(dest.qmpEvents.find((e) => e.event === 'RESUME'));
        const cpuDelta = (before: CpuTime | null, after: CpuTime | null, part: keyof CpuTime): number | null =>
          before === null || after === null || path_ === 'direct' ? null : Math.round((after[part] - before[part]) * 100) / 100;
        const switchover = parseSwitchoverTrace(vm.stderr);
        const result: LegResult = {
          leg,
          path: path_,
          from: from.name,
          to: to.name,
          gatewayErrors,
          wanBytes: wan.forward + wan.backward,
          wanBytesForward: wan.forward,
          wanBytesBackward: wan.backward,
          streamBytes: report?.streamBytes ?? info.ram?.transferred ?? 0,
          totalTimeMs: info['total-time'] ?? 0,
          downtimeMs: info.downtime ?? 0,
          setupTimeMs: info['setup-time'] ?? 0,
          untilRunningMs: resumedAt === null ? null : Math.round(resumedAt - migrateAt),
          openingMs: opening.reachedAt === null ? null : Math.round(opening.reachedAt - migrateAtMs),
          pausedMs: resumedAt === null || stoppedAt === null ? null : Math.round(resumedAt - stoppedAt),
          pagesSent: report ? report.pagesSent : info.ram?.normal ?? 0,
          pagesReused: report?.pagesReused ?? 0,
          pagesUnordered: report?.pagesUnordered ?? 0,
          qemuNormalPages: info.ram?.normal ?? 0,
          qemuZeroPages: info.ram?.duplicate ?? 0,
          qemuTransferredBytes: info.ram?.transferred ?? 0,
          dirtySyncCount: info.ram?.['dirty-sync-count'] ?? 0,
          downtimeBytes: info.ram?.['downtime-bytes'] ?? null,
          qemuMbps: info.ram?.mbps ?? null,
          qemuWindows: switchover.windows,
          pendingAtSwitchoverBytes: switchover.pendingAtSwitchover,
          changedPages,
          secondsAtSource,
          pageWritesAtSource,
          gatewayCpuSecondsSend: cpuDelta(cpuBefore.send, cpuAfter.send, 'cpuSeconds'),
          gatewayCpuSecondsReceive: cpuDelta(cpuBefore.receive, cpuAfter.receive, 'cpuSeconds'),
          gatewaySystemSecondsSend: cpuDelta(cpuBefore.send, cpuAfter.send, 'systemSeconds'),
          gatewaySystemSecondsReceive: cpuDelta(cpuBefore.receive, cpuAfter.receive, 'systemSeconds'),
          gatewayMainThreadSecondsSend: cpuDelta(cpuBefore.send, cpuAfter.send, 'mainThreadSeconds'),
          gatewayMainThreadSecondsReceive: cpuDelta(cpuBefore.receive, cpuAfter.receive, 'mainThreadSeconds'),
          verified: verified && info.status === 'completed' && (report === undefined || report.result === 'completed'),
          postcopyStarted,
          continuedFromPause,
          verbatim: report?.verbatim ?? null,
          compressionSavedBytes: report?.compressionSavedBytes ?? 0,
          storeIo: report && received ? { readSend: report.storeReadBytes, writtenSend: report.storeWrittenBytes, readReceive: received.storeReadBytes, writtenReceive: received.storeWrittenBytes } : null,
          pagesDelta: report?.pagesDelta ?? 0,
          pagesMatched: report?.pagesMatched ?? 0,
          deltaBytes: report?.deltaBytes ?? 0,
        };
        if (!result.verified) result.failure = describeFailedLeg(info, gatewayErrors, directWan ? [] : [from, to], dest);
        results.push(result);
        say(`leg ${leg} ${path_.padEnd(6)} ${from.name} → ${to.name}: ${mib(result.wanBytes)} over the WAN in ${(result.totalTimeMs / 1000).toFixed(1)} s, guest memory ${result.verified ? 'verified' : 'NOT VERIFIED'}${gatewayErrors.map((e) => `; gateway ${e}`).join('')}`);
        await vm.dispose();
        vm = dest;
        if (!result.verified) {
          // Carry on with a fresh guest so the remaining legs are still measured.
          say(`  the guest did not survive leg ${leg}; booting a fresh one at ${to.name}`);
          await vm.dispose();
          vm = startVm({ ...vmOptions, name: `${path_}-reboot${leg}` }, to.name);
          await vm.start();
          await vm.waitForSerial(/WORKLOAD READY/, 300_000);
          await vm.waitForSerial(VERIFIED, 120_000);
          arrivedAt = Date.now();
          arrivedMark = vm.serialMark();
          arrivalCheckedMark = -1;
        }
      }
      await vm.dispose();
    }
    return results;
  } finally {
    await disposeAllVms();
    for (const s of [...pairs.values()].flat()) {
      await s.gateway.stop();
      await s.inbound.close();
    }
    removeTempDir(tmp);
  }
}

/**
 * What a leg that did not verify left behind, bounded: enough for a CI log to say whether QEMU, a
 * gateway or the guest failed, without the run's temporary directory (removed when the run ends).
 */
function describeFailedLeg(info: MigrationInfo, gatewayErrors: readonly string[], sites: readonly Site[], dest: QemuVm): string {
  const lines = [`source migration: ${info.status ?? 'unknown'}${info['error-desc'] ? ` (${info['error-desc']})` : ''}`];
  for (const e of gatewayErrors) lines.push(`gateway ${e}`);
  for (const site of sites) {
    let log = '';
    try {
      log = fs.readFileSync(site.logPath, 'utf8');
    } catch {
      log = '(no log)';
    }
    lines.push(`${site.name} log tail: ${log.trim().slice(-3000) || '(empty)'}`);
  }
  lines.push(dest.describe());
  return lines.join('\n');
}

/** The relay path's two relays, each a process of its own, and the WAN emulator between them. */
interface RelayPair {
  /** Where the source QEMU migrates to. */
  port: number;
  wan: WanEmulator;
  /** CPU time of the source's and the destination's relay so far. */
  cpu(): { send: CpuTime; receive: CpuTime };
  stop(): Promise<void>;
}

/** A TcpRelay in a `node` child process, forwarding to `targetPort`; resolves once it listens. */
async function startRelayProcess(targetPort: number): Promise<{ child: NodeChild; port: number }> {
  const script = `const { TcpRelay } = require(${distModule('src/lab/wan/relay')});
new TcpRelay({ listen: { host: '127.0.0.1', port: 0 }, target: { host: '127.0.0.1', port: ${targetPort} } }).listen().then((at) => console.log('LISTENING ' + at.port));`;
  const child = startNodeChild(script);
  const said = await child.said(/LISTENING \d+/);
  return { child, port: Number(/LISTENING (\d+)/.exec(said)?.[1]) };
}

/** QEMU → relay → `wanTo(port)` → relay → `qemuPort`. */
async function startRelayPair(qemuPort: number, wanTo: (port: number) => WanEmulator): Promise<RelayPair> {
  const far = await startRelayProcess(qemuPort);
  const wan = wanTo(far.port);
  const near = await startRelayProcess((await wan.listen()).port);
  return {
    port: near.port,
    wan,
    cpu: () => ({ send: cpuTime(procStats(near.child.pid)), receive: cpuTime(procStats(far.child.pid)) }),
    stop: async () => {
      await Promise.all([near.child.kill(), far.child.kill()]);
    },
  };
}

/**
 * Waits until the source has sent `bytes`, then switches the migration to postcopy. Returns whether it
 * did: a migration that ended first (or failed) stays precopy.
 */
async function startPostcopyAfter(vm: QemuVm, bytes: number): Promise<boolean> {
  for (;;) {
    const info = await vm.queryMigrate();
    if (info.status !== 'active' && info.status !== 'setup') return false;
    if ((info.ram?.transferred ?? 0) >= bytes) break;
    await sleep(20);
  }
  try {
    await vm.qmp('migrate-start-postcopy');
    return true;
  } catch {
    return false;
  }
}

/** Pages the workload said it rewrote (per-second rewriting and change commands) in `serial` from `mark` on. */
function pageWritesSince(serial: string, mark: number): number {
  let pages = 0;
  for (const m of serial.slice(mark).matchAll(/WORKLOAD (?:REWROTE round=\d+|CHANGED seq=\d+) pages=(\d+)/g)) pages += Number(m[1]);
  return pages;
}

async function waitWithProgress(vm: QemuVm, label: string, out: NodeJS.WriteStream | Writable, pause: Pick<WaitForMigrationOptions, 'continueAfterPauseMs' | 'onContinued'>): Promise<MigrationInfo> {
  const tty = 'isTTY' in out && out.isTTY === true;
  const timer = tty
    ? setInterval(() => {
        vm.qmp('query-migrate').then(
          (r) => {
            const info = r as MigrationInfo;
            out.write(`\r${label}: ${info.status ?? '?'} ${mib(info.ram?.transferred ?? 0)} from QEMU   `);
          },
          () => undefined,
        );
      }, 500)
    : null;
  try {
    return await vm.waitForMigration({ timeoutMs: 900_000, ...pause });
  } finally {
    if (timer) {
      clearInterval(timer);
      out.write('\r\x1b[K');
    }
  }
}

export function formatTable(results: LegResult[]): string {
  const rows = [['leg', 'path', 'from → to', 'WAN bytes', 'WAN MiB', 'total time s', 'downtime ms', 'until running s', 'paused ms', 'pages sent', 'pages reused', 'delta pages', 'matched', 'delta bytes', 'guest']];
  for (const r of results) {
    rows.push([
      String(r.leg),
      r.path,
      `${r.from} → ${r.to}`,
      r.wanBytes.toLocaleString('en-US'),
      (r.wanBytes / 2 ** 20).toFixed(2),
      (r.totalTimeMs / 1000).toFixed(2),
      String(r.downtimeMs),
      r.untilRunningMs === null ? '?' : (r.untilRunningMs / 1000).toFixed(2),
      r.pausedMs === null ? '?' : String(r.pausedMs),
      String(r.pagesSent),
      String(r.pagesReused),
      String(r.pagesDelta),
      String(r.pagesMatched),
      r.deltaBytes.toLocaleString('en-US'),
      r.verified ? 'verified' : 'FAILED',
    ]);
  }
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  return rows.map((r) => r.map((c, i) => (i >= 3 && i <= 13 ? c.padStart(widths[i]) : c.padEnd(widths[i]))).join('  ')).join('\n');
}

const mib = (bytes: number): string => `${(bytes / 2 ** 20).toFixed(1)} MiB`;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
