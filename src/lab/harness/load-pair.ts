/**
 * Many VMs through one gateway pair at once: two gateways on loopback, each with one route per VM to
 * the other, a hashing destination stand-in per VM at each site, and passes that play every VM's
 * stream from one site to the other. bench/load.ts measures it; test/gateway-concurrent-vms.test.ts checks it.
 */
import { createHash } from 'node:crypto';
import * as path from 'node:path';
import { loopbackMultiRouteYaml, type LoopbackRoute } from './loopback-config';
import { HashingDestination, playStream, type Received } from './qemu-standins';
import { type SiteGateway, startSiteGateway } from './site-gateway';
import { freePort } from '../vm/ports';

/** One VM's migration stream and the digest its destination must see. */
export interface VmStream {
  vm: string;
  stream: Buffer;
  sha256: string;
}

export function vmStream(vm: string, stream: Buffer): VmStream {
  return { vm, stream, sha256: createHash('sha256').update(stream).digest('hex') };
}

export interface LoadSite {
  name: string;
  gateway: SiteGateway;
  /** The gateway's data directory: one page store per VM. */
  data: string;
  /** Per VM: the route port its source connects to at this site. */
  routePorts: Map<string, number>;
  /** Per VM: its destination stand-in at this site. */
  destinations: Map<string, HashingDestination>;
}

/** Two gateways on loopback, each with one route per VM to the other; in this process (tests) or as `bfmig gateway` children (benchmark). */
export async function startLoadPair(dir: string, vms: readonly string[], own: 'in-process' | 'child-process'): Promise<[LoadSite, LoadSite]> {
  const ports = (): Promise<number[]> => Promise.all(vms.map(() => freePort()));
  const destinations = (): Promise<HashingDestination[]> => Promise.all(vms.map(() => HashingDestination.listen()));
  const [peerA, peerB] = [await freePort(), await freePort()];
  const [routeA, routeB] = [await ports(), await ports()];
  const [destA, destB] = [await destinations(), await destinations()];
  const byVm = <T>(list: T[]): Map<string, T> => new Map(vms.map((vm, i) => [vm, list[i]]));
  const start = async (name: string, peerPort: number, farPeerPort: number, route: number[], farDest: HashingDestination[], dest: HashingDestination[]): Promise<LoadSite> => {
    const data = path.join(dir, name);
    const routes: LoopbackRoute[] = vms.map((vm, i) => ({ vm, routePort: route[i], targetPort: farDest[i].port }));
    const gateway = await startSiteGateway(dir, name, loopbackMultiRouteYaml({ name, data, peerPort, farPeerPort, routes }), own);
    return { name, gateway, data, routePorts: byVm(route), destinations: byVm(dest) };
  };
  const closeAll = (): Promise<unknown> => Promise.all([...destA, ...destB].map((d) => d.close()));
  let a: LoadSite;
  try {
    a = await start('site-a', peerA, peerB, routeA, destB, destA);
  } catch (err) {
    await closeAll();
    throw err;
  }
  try {
    return [a, await start('site-b', peerB, peerA, routeB, destA, destB)];
  } catch (err) {
    await a.gateway.stop();
    await closeAll();
    throw err;
  }
}

/** Stops both gateways and closes every destination stand-in. */
export async function stopLoadPair(sites: readonly (LoadSite | undefined)[]): Promise<void> {
  for (const site of sites) {
    if (!site) continue;
    await site.gateway.stop();
    await Promise.all([...site.destinations.values()].map((d) => d.close()));
  }
}

/** One VM's migration in a pass. */
export interface VmOutcome {
  vm: string;
  received: Received;
  /** The destination got exactly its own source's bytes. */
  intact: boolean;
}

export interface PassResult {
  seconds: number;
  /** QEMU stream bytes of all VMs of the pass. */
  bytes: number;
  outcomes: VmOutcome[];
}

/** Migrates every VM of `streams` at once from `from` to `to`: starts the destinations, plays every source, waits for every destination. */
export async function runPass(from: LoadSite, to: LoadSite, streams: readonly VmStream[]): Promise<PassResult> {
  const arrivals = streams.map((s) => (to.destinations.get(s.vm) as HashingDestination).next());
  const t0 = process.hrtime.bigint();
  const played = streams.map((s) => playStream(from.routePorts.get(s.vm) as number, s.stream).then(() => null, (err: Error) => err));
  const received = await Promise.all(arrivals);
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const playErrors = await Promise.all(played);
  const outcomes = streams.map((s, i) => ({
    vm: s.vm,
    received: received[i],
    intact: playErrors[i] === null && !received[i].reset && received[i].bytes === s.stream.length && received[i].sha256 === s.sha256,
  }));
  return { seconds, bytes: streams.reduce((n, s) => n + s.stream.length, 0), outcomes };
}

/** Waits until `site` has reported `count` finished migrations (reports of a child gateway come from its log and may lag). */
export async function awaitReports(site: LoadSite, count: number, timeoutMs = 30_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (site.gateway.reports.length < count) {
    if (Date.now() > until) throw new Error(`${site.name} reported ${site.gateway.reports.length} of ${count} migrations`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

