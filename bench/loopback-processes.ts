/**
 * What the loopback throughput benchmarks share: each gateway and each plain relay in a process of its
 * own, so that its CPU seconds and memory are its own, and a median.
 */
import { fork, type ChildProcess } from 'node:child_process';
import * as path from 'node:path';
import { loopbackSiteYaml } from '../src/lab/harness/loopback-config';
import { RECOMMENDED_GATEWAY_NODE_OPTIONS } from '../src/gateway/node-options';
import { type SiteGateway, startSiteGateway } from '../src/lab/harness/site-gateway';

/** Node flags of the gateway processes: the deployment's recommended ones (README, docker/Dockerfile) unless overridden. */
export const gatewayNodeArgs = (process.env.BFMIG_BENCH_NODE_ARGS ?? RECOMMENDED_GATEWAY_NODE_OPTIONS).split(' ').filter(Boolean);

/** A `bfmig gateway` child process routing vm "bench" to the far site; its log goes to $BFMIG_BENCH_LOG.NAME.log when that is set. */
export function startGateway(dir: string, name: string, peerPort: number, routePort: number, farPeer: number, target: number): Promise<SiteGateway> {
  const yaml = loopbackSiteYaml({ name, data: path.join(dir, name), peerPort, vm: 'bench', routePort, farPeerPort: farPeer, targetPort: target });
  const logPath = process.env.BFMIG_BENCH_LOG ? `${process.env.BFMIG_BENCH_LOG}.${name}.log` : undefined;
  return startSiteGateway(dir, name, yaml, 'child-process', { nodeArgs: gatewayNodeArgs, logPath });
}

/** A plain TcpRelay to `targetPort` in a child process (bench/wan.js serve): every connection it accepts is relayed. */
export function startRelay(targetPort: number): Promise<{ child: ChildProcess; port: number }> {
  return new Promise((resolve, reject) => {
    const request = { kind: 'relay', target: { host: '127.0.0.1', port: targetPort }, rateMbit: 0, delayMs: 0 };
    const child = fork(path.join(__dirname, 'wan.js'), ['serve', JSON.stringify(request)], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    child.once('error', reject);
    child.once('message', (m: { port: number }) => resolve({ child, port: m.port }));
  });
}

export function median(values: readonly number[]): number {
  const s = [...values].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}
