/**
 * What the loopback throughput benchmarks share: each gateway and each plain relay in a process of its
 * own, so that its CPU seconds and memory are its own.
 */
import { fork, type ChildProcess } from 'node:child_process';
import * as path from 'node:path';
import { loopbackSiteYaml } from '../src/lab/harness/loopback-config';
import { reapWithThisProcess } from '../src/lab/harness/reap-children';
import { RECOMMENDED_GATEWAY_NODE_OPTIONS } from '../src/gateway/node-options';
import { type SiteGateway, startSiteGateway } from '../src/lab/harness/site-gateway';
import { withTempDir } from '../src/lab/harness/temp-dir';
import { freePort } from '../src/lab/vm/ports';

/** Node flags of the gateway processes: the deployment's recommended ones (README, docker/Dockerfile) unless overridden. */
export const gatewayNodeArgs = (process.env.BFMIG_BENCH_NODE_ARGS ?? RECOMMENDED_GATEWAY_NODE_OPTIONS).split(' ').filter(Boolean);

/**
 * A `bfmig gateway` child process routing vm "bench" to the far site; its log goes to $BFMIG_BENCH_LOG.NAME.log
 * when that is set. $BFMIG_BENCH_STORE_BUDGET (e.g. 1MiB) sets its `storeBudget`: one too small for the
 * stream's store leaves the store keeping nothing, which shows what retention itself costs a leg.
 */
function startGateway(dir: string, name: string, peerPort: number, routePort: number, farPeer: number, target: number): Promise<SiteGateway> {
  const budget = process.env.BFMIG_BENCH_STORE_BUDGET;
  const yaml = loopbackSiteYaml({ name, data: path.join(dir, name), peerPort, vm: 'bench', routePort, farPeerPort: farPeer, targetPort: target }) + (budget ? `storeBudget: ${budget}\n` : '');
  const logPath = process.env.BFMIG_BENCH_LOG ? `${process.env.BFMIG_BENCH_LOG}.${name}.log` : undefined;
  return startSiteGateway(dir, name, yaml, 'child-process', { nodeArgs: gatewayNodeArgs, logPath });
}

/** One leg of a back-and-forth: from the gateway whose route listens on `routePort` to the one that dials `destPort`. */
export interface Leg {
  name: 'first' | 'back';
  from: SiteGateway;
  to: SiteGateway;
  routePort: number;
  destPort: number;
}

/**
 * A fresh gateway pair, site-a and site-b, with empty stores (under $BFMIG_BENCH_STORE_DIR when set):
 * `leg` runs for the first leg A → B (nothing to reuse), then for the back leg B → A.
 */
export async function withGatewayPair(prefix: string, leg: (leg: Leg) => Promise<void>): Promise<void> {
  await withTempDir(
    prefix,
    async (dir) => {
      const [peerA, peerB, routeA, routeB, destA, destB] = await Promise.all(Array.from({ length: 6 }, () => freePort()));
      const a = await startGateway(dir, 'site-a', peerA, routeA, peerB, destB);
      const b = await startGateway(dir, 'site-b', peerB, routeB, peerA, destA);
      try {
        await leg({ name: 'first', from: a, to: b, routePort: routeA, destPort: destB });
        await leg({ name: 'back', from: b, to: a, routePort: routeB, destPort: destA });
      } finally {
        await Promise.all([a.stop(), b.stop()]);
      }
    },
    { base: process.env.BFMIG_BENCH_STORE_DIR },
  );
}

/** A plain TcpRelay to `targetPort` in a child process (bench/wan.js serve): every connection it accepts is relayed. */
export function startRelay(targetPort: number): Promise<{ child: ChildProcess; port: number }> {
  return new Promise((resolve, reject) => {
    const request = { kind: 'relay', target: { host: '127.0.0.1', port: targetPort }, rateMbit: 0, delayMs: 0 };
    const child = fork(path.join(__dirname, 'wan.js'), ['serve', JSON.stringify(request)], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    reapWithThisProcess(child);
    child.once('error', reject);
    child.once('message', (m: { port: number }) => resolve({ child, port: m.port }));
  });
}
