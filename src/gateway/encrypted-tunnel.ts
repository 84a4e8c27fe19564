/**
 * QEMU's own TLS (`tls-creds`): every connection of such a migration (its main channel and, with
 * multifd, each multifd channel) starts with a TLS handshake and stays encrypted end to end, so the
 * gateways can neither parse it nor reuse anything in it. Each connection is carried as it is, both
 * ways, over a peer connection of its own: an extra channel of kind 'encrypted' (channel-relay.ts) in a
 * group of its own, since nothing in its bytes says which migration it belongs to.
 *
 * Never silent: each such connection is logged as a stream relayed verbatim (reason `encrypted`) when
 * it begins, reported as a migration when it ends (log line, `bfmig_streams_relayed_verbatim_total`),
 * and noted in the VM's store when the VM has one, so `bfmig snapshots` shows that its snapshot is
 * older than the VM. The stores are otherwise left as they are.
 *
 * QEMU 10 tells its channels apart after the TLS handshake, so their order across the WAN does not
 * matter; QEMU 7.2 with multifd and TLS takes the first connection to arrive as the main channel,
 * which two peer connections cannot promise (README, "Compatibility").
 */
import { randomUUID } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Socket } from 'node:net';
import type { StreamFallback } from '../qemu/records';
import { newCounts } from '../proxy/transfer-counts';
import { PageStore } from '../store';
import { saveMigrationRecord } from '../store/migration-record';
import { errorMessage } from '../common/errors';
import { formatEndpoint } from './address';
import { ChannelReceiver, ChannelSender } from './channel-relay';
import type { RouteConfig } from './config';
import { ChannelGroup, type GroupEvent } from './migration-channels';
import { type Direction, type MigrationReport, NO_STORE_IO, type SessionObserver } from './session';
import type { PeerTransport } from './transport';
import type { ChannelName } from '../wire/frames';

export const ENCRYPTED: StreamFallback = {
  code: 'encrypted',
  reason: "QEMU's own TLS (tls-creds): the stream is encrypted end to end, so it is relayed as it is and nothing in it is reused or retained",
  streamOffset: 0,
};

const CHANNEL: ChannelName = { kind: 'encrypted', index: 0 };

/** What a tunnel needs of its gateway. */
export interface TunnelContext {
  observer: SessionObserver;
  /** The store directory (config `data`), for the note of the VM's last migration. */
  storeRoot: string;
  maxFrameBytes: number;
  event: (vm: string, direction: Direction) => GroupEvent;
}

/** Sending side: one encrypted connection of the source QEMU, on `route`, to the far gateway. */
export function tunnelFromSource(source: Socket, route: RouteConfig, site: string, transport: PeerTransport, ctx: TunnelContext): ChannelSender {
  const target = formatEndpoint(route.target);
  const { group, over } = tunnelGroup(route.vm, 'send', target, source.remoteAddress ?? '?', ctx);
  const relay = new ChannelSender(source, { site, route, transport, group, channel: CHANNEL, maxFrameBytes: ctx.maxFrameBytes, over });
  group.join(CHANNEL, source.remoteAddress ?? '?', null, relay);
  return relay;
}

/** Receiving side: a peer connection whose Hello names an encrypted connection to `target`. */
export function tunnelToDestination(peer: Socket, vm: string, target: string, origin: string, ctx: TunnelContext): ChannelReceiver {
  const { group, over } = tunnelGroup(vm, 'receive', target, origin, ctx);
  const relay = new ChannelReceiver(peer, { group, channel: CHANNEL, maxFrameBytes: ctx.maxFrameBytes, over });
  group.join(CHANNEL, origin, null, relay);
  return relay;
}

/** A group of one connection with nothing to wait for, whose end is reported as a migration relayed verbatim. */
function tunnelGroup(vm: string, direction: Direction, target: string, origin: string, ctx: TunnelContext) {
  const startedAt = Date.now();
  ctx.observer.relayedVerbatim(vm, direction, ENCRYPTED);
  // Its only channel is the whole migration: when the channel fails, there is nothing else to abort.
  const group = new ChannelGroup(randomUUID(), vm, target, origin, 1, { abort: () => undefined, postcopyAdvised: () => false, compression: () => null }, ctx.event(vm, direction), 0, () => undefined);
  group.ready();
  const over = (o: { completed: boolean; error: string | null; streamBytes: number }): void => {
    const result = o.completed ? 'completed' : 'failed';
    noteInStore(ctx, vm, direction, result, o.error);
    const report: MigrationReport = {
      vm,
      direction,
      result,
      error: o.error,
      seconds: (Date.now() - startedAt) / 1000,
      streamBytes: o.streamBytes,
      // Every byte crosses the WAN (frame headers not counted).
      wanBytesOut: direction === 'send' ? o.streamBytes : 0,
      wanBytesIn: direction === 'receive' ? o.streamBytes : 0,
      compressionSavedBytes: 0,
      storeIo: NO_STORE_IO,
      counts: newCounts(),
      mode: 'none',
      snapshotId: null,
      verbatim: ENCRYPTED,
      postcopy: false,
    };
    report.counts.streamBytes = o.streamBytes;
    ctx.observer.finished(report);
  };
  return { group, over };
}

/** Notes the tunnel in the VM's store, when the VM has one and no migration holds it now. */
function noteInStore(ctx: TunnelContext, vm: string, direction: Direction, result: 'completed' | 'failed', error: string | null): void {
  if (!fs.existsSync(path.join(ctx.storeRoot, vm))) return;
  try {
    const store = PageStore.open(ctx.storeRoot, vm);
    try {
      saveMigrationRecord(store, { at: new Date().toISOString(), direction, result, error, snapshotId: store.snapshotId(), kept: false, verbatim: ENCRYPTED, postcopy: false });
    } finally {
      store.close();
    }
  } catch (err) {
    ctx.event(vm, direction)('store note of the migration failed', { error: errorMessage(err) });
  }
}
