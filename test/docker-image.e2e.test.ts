/**
 * docker/Dockerfile, built and run by a container engine (podman or docker): the image's gateway
 * starts as a user other than root, serves its metrics, carries a migration byte for byte to a gateway
 * outside the container, and drains and exits 0 on the engine's stop (SIGTERM).
 *
 * Skipped, with a warning, where no engine works. BFMIG_CONTAINER_ENGINE picks one ("podman",
 * "docker"); BFMIG_NODE_IMAGE replaces the Node base image (the Dockerfile's NODE_IMAGE) where Docker
 * Hub is out of reach.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as path from 'node:path';
import { startLoggedGateway, type LoggedGateway } from '../src/lab/harness/gateway-pair';
import { guestMemory, migrationStream } from '../src/lab/harness/migration-stream';
import { destinationStandIn, sourceStandIn } from '../src/lab/harness/qemu-standins';
import { freePort } from '../src/lab/vm/ports';
import { eventually } from './eventually';
import { suiteTempDir } from './temp-dir';

const ROOT = path.join(__dirname, '..');
const SKIP = process.env.BFMIG_SKIP_E2E === '1';

/** The first engine that answers `info`, or null. */
function findEngine(): string | null {
  const wanted = process.env.BFMIG_CONTAINER_ENGINE;
  for (const engine of wanted ? [wanted] : ['podman', 'docker']) {
    if (spawnSync(engine, ['info'], { stdio: 'ignore', timeout: 60_000 }).status === 0) return engine;
  }
  return null;
}

const BASE_IMAGE = process.env.BFMIG_NODE_IMAGE ?? 'node:20-bookworm-slim';

/** Whether `engine` has the Node base image or can pull it (a registry may be out of reach). */
function baseImageAvailable(engine: string): boolean {
  if (spawnSync(engine, ['image', 'inspect', BASE_IMAGE], { stdio: 'ignore', timeout: 60_000 }).status === 0) return true;
  return spawnSync(engine, ['pull', BASE_IMAGE], { stdio: 'ignore', timeout: 180_000 }).status === 0;
}

const found = SKIP ? null : findEngine();
const engine = found !== null && baseImageAvailable(found) ? found : null;
if (!SKIP && found === null) console.warn('skipping the Docker image test: no container engine (podman or docker) works here');
else if (!SKIP && engine === null) console.warn(`skipping the Docker image test: ${found} cannot get the base image ${BASE_IMAGE} (set BFMIG_NODE_IMAGE to one it has)`);

function run(args: readonly string[], timeoutMs = 120_000): { status: number | null; out: string } {
  const r = spawnSync(engine ?? 'false', args, { cwd: ROOT, encoding: 'utf8', timeout: timeoutMs, maxBuffer: 64 * 1024 * 1024 });
  return { status: r.status, out: `${r.stdout}${r.stderr}` };
}

function get(port: number, urlPath: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve) => {
    const req = http.get({ host: '127.0.0.1', port, path: urlPath }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString() }));
    });
    req.on('error', () => resolve({ status: 0, body: '' }));
  });
}

(engine === null ? describe.skip : describe)(`the Docker image, run by ${engine ?? 'no engine'}`, () => {
  const tag = `bfmig-gateway-test:${process.pid}`;
  const name = `bfmig-test-${process.pid}`;
  const volume = `bfmig-test-data-${process.pid}`;
  let far: LoggedGateway | null = null;

  beforeAll(() => {
    const base = process.env.BFMIG_NODE_IMAGE;
    // BuildKit reads docker/Dockerfile.dockerignore by itself; podman is told.
    const ignore = engine === 'podman' ? ['--ignorefile', 'docker/Dockerfile.dockerignore'] : [];
    const build = run(['build', '-f', 'docker/Dockerfile', ...ignore, '--network=host', '-t', tag, ...(base ? ['--build-arg', `NODE_IMAGE=${base}`] : []), '.'], 1_800_000);
    if (build.status !== 0) throw new Error(`image build failed:\n${build.out.slice(-4000)}`);
  }, 1_800_000);

  afterAll(async () => {
    run(['rm', '-f', name]);
    run(['volume', 'rm', '-f', volume]);
    run(['rmi', '-f', tag]);
    await far?.gateway.stop(1);
  });

  test('the gateway runs unprivileged, serves metrics, carries a migration exactly, and drains on stop', async () => {
    const tmp = suiteTempDir('bfmig-docker-');
    const [peer, farPeer, route, metrics, farRoute, dest] = await Promise.all(Array.from({ length: 6 }, () => freePort()));
    // The site in the container routes vm1 to a gateway outside it (host network: both on loopback).
    const config = path.join(tmp, 'site.yaml');
    fs.writeFileSync(
      config,
      [
        'name: site-a',
        'data: /var/lib/bfmig',
        `peerListen: 127.0.0.1:${peer}`,
        `metrics: 127.0.0.1:${metrics}`,
        'shutdownGraceSeconds: 5',
        'routes:',
        '  - vm: vm1',
        `    listen: 127.0.0.1:${route}`,
        `    peer: 127.0.0.1:${farPeer}`,
        `    target: 127.0.0.1:${dest}`,
        '',
      ].join('\n'),
    );
    fs.chmodSync(config, 0o644);
    far = await startLoggedGateway(
      'site-b',
      ['name: site-b', `data: ${path.join(tmp, 'site-b')}`, `peerListen: 127.0.0.1:${farPeer}`, 'routes:', '  - vm: vm1', `    listen: 127.0.0.1:${farRoute}`, `    peer: 127.0.0.1:${peer}`, '    target: 127.0.0.1:4444', 'allowTargets:', '  - 127.0.0.0/8:*', ''].join('\n'),
    );

    const started = run(['run', '-d', '--name', name, '--network=host', '-v', `${config}:/etc/bfmig/site.yaml:ro`, '-v', `${volume}:/var/lib/bfmig`, tag]);
    expect(started.status).toBe(0);
    await eventually(async () => (await get(metrics, '/metrics')).status === 200, 60_000, () => `no metrics from the container:\n${run(['logs', name]).out}`);
    const text = (await get(metrics, '/metrics')).body;
    expect(text).toContain('bfmig_wan_bytes_total{vm="vm1",direction="send"} 0');
    expect(text).toMatch(/^bfmig_store_bytes \d+$/m);
    expect(run(['exec', name, 'id', '-u']).out.trim()).toBe('1000');
    expect(run(['logs', name]).out).toContain('"msg":"gateway started"');

    // A migration through the container's gateway arrives byte for byte: the image's native addon works.
    const stream = migrationStream(guestMemory([['pc.ram', 300]], 3), []);
    const destination = await destinationStandIn(dest);
    expect(await sourceStandIn(route, stream)).toBe('closed');
    expect((await destination.received).bytes.equals(stream)).toBe(true);
    await eventually(async () => /"msg":"migration completed"/.test(run(['logs', name]).out), 30_000, () => run(['logs', name]).out);

    // The engine's stop sends SIGTERM: the gateway drains and exits 0.
    expect(run(['stop', '-t', '30', name]).status).toBe(0);
    expect(run(['inspect', name, '--format', '{{.State.ExitCode}}']).out.trim()).toBe('0');
    expect(run(['logs', name]).out).toContain('"msg":"gateway stopped"');
  }, 300_000);
});
