import * as http from 'node:http';
import { Writable } from 'node:stream';
import { Endpoint } from '../src/gateway/address';
import { createLogger } from '../src/gateway/log';
import { GatewayMetrics } from '../src/gateway/metrics';

interface Reply {
  status: number;
  contentType: string | undefined;
  body: string;
}

function request(at: Endpoint, urlPath: string, method = 'GET'): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: at.host, port: at.port, path: urlPath, method }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () =>
        resolve({
          status: res.statusCode ?? 0,
          contentType: res.headers['content-type'],
          body: Buffer.concat(chunks).toString('utf8'),
        }),
      );
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end();
  });
}

/** The sample lines of the exposition text (no # HELP / # TYPE). */
function samples(text: string): string[] {
  return text.split('\n').filter((l) => l !== '' && !l.startsWith('#'));
}

describe('GatewayMetrics over HTTP', () => {
  let metrics: GatewayMetrics;
  let at: Endpoint;

  beforeAll(async () => {
    metrics = new GatewayMetrics();
    at = await metrics.serve({ host: '127.0.0.1', port: 0 });

    metrics.addStreamBytes('vm1', 'send', 1000);
    metrics.addStreamBytes('vm1', 'send', 3000);
    metrics.addWanBytes('vm1', 'send', 1000);
    metrics.addPages('vm1', 'send', 'sent', 10);
    metrics.addPages('vm1', 'send', 'reused', 70);
    metrics.addPages('vm1', 'send', 'zero', 20);
    metrics.addPages('vm1', 'send', 'reused', 5);
    metrics.migrationFinished('vm1', 'send', { result: 'completed', seconds: 2.5, qemuBytes: 4000, wanBytes: 1000, verbatimReason: null, compressionSavedBytes: 300 });

    metrics.addStreamBytes('vm2', 'receive', 512);
    metrics.addWanBytes('vm2', 'receive', 128);
    metrics.migrationFinished('vm2', 'receive', { result: 'failed', seconds: 0.25, qemuBytes: 512, wanBytes: 128, verbatimReason: null, compressionSavedBytes: 0 });
    metrics.migrationFinished('vm2', 'receive', { result: 'failed', seconds: 0.5, qemuBytes: 0, wanBytes: 0, verbatimReason: 'command', compressionSavedBytes: 0 });
  });

  afterAll(() => metrics.close());

  test('serve() resolves to the bound address', () => {
    expect(at.host).toBe('127.0.0.1');
    expect(at.port).toBeGreaterThan(0);
  });

  test('GET /metrics returns the expected samples', async () => {
    const reply = await request(at, '/metrics');
    expect(reply.status).toBe(200);
    expect(reply.contentType).toBe(metrics.registry.contentType);
    expect(reply.contentType).toMatch(/^text\/plain; version=0\.0\.4/);
    const lines = samples(reply.body);
    expect(lines).toEqual(
      expect.arrayContaining([
        'bfmig_qemu_stream_bytes_total{vm="vm1",direction="send"} 4000',
        'bfmig_compression_saved_bytes_total{vm="vm1",direction="send"} 300',
        'bfmig_compression_saved_bytes_total{vm="vm2",direction="receive"} 0',
        'bfmig_streams_relayed_verbatim_total{vm="vm2",direction="receive",reason="command"} 1',
        'bfmig_qemu_stream_bytes_total{vm="vm2",direction="receive"} 512',
        'bfmig_wan_bytes_total{vm="vm1",direction="send"} 1000',
        'bfmig_wan_bytes_total{vm="vm2",direction="receive"} 128',
        'bfmig_pages_total{vm="vm1",direction="send",kind="sent"} 10',
        'bfmig_pages_total{vm="vm1",direction="send",kind="reused"} 75',
        'bfmig_pages_total{vm="vm1",direction="send",kind="zero"} 20',
        'bfmig_migrations_total{vm="vm1",direction="send",result="completed"} 1',
        'bfmig_migrations_total{vm="vm2",direction="receive",result="failed"} 2',
        'bfmig_last_migration_duration_seconds{vm="vm1",direction="send"} 2.5',
        'bfmig_last_migration_duration_seconds{vm="vm2",direction="receive"} 0.5',
        'bfmig_saving_ratio{vm="vm1",direction="send"} 0.75',
      ]),
    );
    // The last vm2 migration had no stream bytes: no ratio rather than a stale or NaN one.
    expect(lines.some((l) => l.startsWith('bfmig_saving_ratio{vm="vm2"'))).toBe(false);
    // Default process metrics are in the same registry.
    expect(reply.body).toMatch(/^process_cpu_user_seconds_total \d/m);
    expect(reply.body).toMatch(/^nodejs_heap_size_used_bytes \d/m);
  });

  test('metric names and types follow Prometheus conventions', async () => {
    const body = (await request(at, '/metrics')).body;
    const types = new Map<string, string>();
    for (const m of body.matchAll(/^# TYPE (\S+) (\S+)$/gm)) types.set(m[1], m[2]);
    const ours = [...types.keys()].filter((n) => n.startsWith('bfmig_'));
    expect(ours.sort()).toEqual([
      'bfmig_compression_saved_bytes_total',
      'bfmig_connections_open',
      'bfmig_connections_refused_total',
      'bfmig_idle_timeouts_total',
      'bfmig_last_migration_duration_seconds',
      'bfmig_migration_stalls_total',
      'bfmig_migrations_stalled',
      'bfmig_migrations_total',
      'bfmig_migrations_unretained_total',
      'bfmig_pages_total',
      'bfmig_qemu_stream_bytes_total',
      'bfmig_saving_ratio',
      'bfmig_store_budget_bytes',
      'bfmig_store_bytes',
      'bfmig_store_evictions_total',
      'bfmig_store_full_total',
      'bfmig_store_read_bytes_total',
      'bfmig_store_written_bytes_total',
      'bfmig_streams_relayed_verbatim_total',
      'bfmig_tls_certificate_expiry_timestamp_seconds',
      'bfmig_wan_bytes_total',
    ]);
    for (const name of ours) {
      expect(name).toMatch(/^[a-z_:][a-z0-9_:]*$/);
      expect(body).toMatch(new RegExp(`^# HELP ${name} \\S`, 'm'));
      // Counters end in _total, nothing else does; units are base units (bytes, seconds).
      expect(types.get(name) === 'counter').toBe(name.endsWith('_total'));
    }
    expect(types.get('bfmig_saving_ratio')).toBe('gauge');
    expect(types.get('bfmig_last_migration_duration_seconds')).toBe('gauge');
  });

  test('query strings are ignored, HEAD works, other paths are 404, other methods 405', async () => {
    expect((await request(at, '/metrics?x=1')).status).toBe(200);
    const head = await request(at, '/metrics', 'HEAD');
    expect(head.status).toBe(200);
    expect(head.body).toBe('');
    expect((await request(at, '/')).status).toBe(404);
    expect((await request(at, '/metricsx')).status).toBe(404);
    expect((await request(at, '/metrics', 'POST')).status).toBe(405);
  });
});

describe('GatewayMetrics store use and certificates', () => {
  test('startSeries creates a VM\'s counters at 0, so that the first increment of each is an increase', async () => {
    const m = new GatewayMetrics({ defaultMetrics: false });
    m.startSeries('vm1', 'send');
    const zeros = samples(await m.text()).filter((l) => l.endsWith(' 0'));
    expect(zeros.sort()).toEqual([
      'bfmig_migrations_total{vm="vm1",direction="send",result="completed"} 0',
      'bfmig_migrations_total{vm="vm1",direction="send",result="failed"} 0',
      'bfmig_pages_total{vm="vm1",direction="send",kind="reused"} 0',
      'bfmig_pages_total{vm="vm1",direction="send",kind="sent"} 0',
      'bfmig_pages_total{vm="vm1",direction="send",kind="zero"} 0',
      'bfmig_qemu_stream_bytes_total{vm="vm1",direction="send"} 0',
      'bfmig_store_budget_bytes 0',
      'bfmig_store_bytes 0',
      'bfmig_store_read_bytes_total{vm="vm1",direction="send"} 0',
      'bfmig_store_written_bytes_total{vm="vm1",direction="send"} 0',
      'bfmig_wan_bytes_total{vm="vm1",direction="send"} 0',
    ]);
    m.migrationFinished('vm1', 'send', { result: 'failed', seconds: 1, qemuBytes: 0, wanBytes: 0, verbatimReason: null, compressionSavedBytes: 0 });
    expect(samples(await m.text())).toContain('bfmig_migrations_total{vm="vm1",direction="send",result="failed"} 1');
  });


  test('the store use is read at each scrape; the budget is 0 without one', async () => {
    const m = new GatewayMetrics({ defaultMetrics: false });
    let used = 1234;
    m.watchStore(() => used, 4096);
    expect(samples(await m.text())).toEqual(expect.arrayContaining(['bfmig_store_bytes 1234', 'bfmig_store_budget_bytes 4096']));
    used = 2048;
    expect(samples(await m.text())).toContain('bfmig_store_bytes 2048');
    m.watchStore(() => 7, null);
    expect(samples(await m.text())).toEqual(expect.arrayContaining(['bfmig_store_bytes 7', 'bfmig_store_budget_bytes 0']));
  });

  test('certificate expiry is a Unix timestamp per certificate; a peer shown again updates its own series', async () => {
    const m = new GatewayMetrics({ defaultMetrics: false });
    m.certificateExpires('own', '', new Date('2030-01-02T00:00:00Z'));
    m.certificateExpires('peer', 'site-b', new Date('2029-06-01T00:00:00Z'));
    m.certificateExpires('peer', 'site-b', new Date('2031-06-01T00:00:00Z'));
    m.certificateExpires('peer', 'site-c', new Date('2028-01-01T00:00:00Z'));
    const lines = samples(await m.text()).filter((l) => l.startsWith('bfmig_tls_certificate_expiry_timestamp_seconds'));
    expect(lines.sort()).toEqual([
      `bfmig_tls_certificate_expiry_timestamp_seconds{certificate="own",peer=""} ${Date.UTC(2030, 0, 2) / 1000}`,
      `bfmig_tls_certificate_expiry_timestamp_seconds{certificate="peer",peer="site-b"} ${Date.UTC(2031, 5, 1) / 1000}`,
      `bfmig_tls_certificate_expiry_timestamp_seconds{certificate="peer",peer="site-c"} ${Date.UTC(2028, 0, 1) / 1000}`,
    ]);
  });
});

describe('GatewayMetrics lifecycle', () => {
  test('two instances in one process keep separate registries', async () => {
    const a = new GatewayMetrics();
    const b = new GatewayMetrics({ defaultMetrics: false });
    a.addWanBytes('vm1', 'send', 7);
    b.addWanBytes('vm1', 'send', 9);
    expect(await a.text()).toContain('bfmig_wan_bytes_total{vm="vm1",direction="send"} 7');
    const bText = await b.text();
    expect(bText).toContain('bfmig_wan_bytes_total{vm="vm1",direction="send"} 9');
    expect(bText).not.toContain('process_cpu_user_seconds_total');
  });

  test('serve twice is refused; close releases the port; close is idempotent', async () => {
    const m = new GatewayMetrics({ defaultMetrics: false });
    const at = await m.serve({ host: '127.0.0.1', port: 0 });
    await expect(m.serve({ host: '127.0.0.1', port: 0 })).rejects.toThrow(/already running/);
    // A second instance cannot bind the same port while the first is up.
    const other = new GatewayMetrics({ defaultMetrics: false });
    await expect(other.serve(at)).rejects.toThrow(/EADDRINUSE/);
    await m.close();
    await m.close();
    const again = await other.serve(at);
    expect(again.port).toBe(at.port);
    await other.close();
  });
});

describe('createLogger', () => {
  function capture(): { stream: Writable; lines: () => Array<Record<string, unknown>> } {
    const chunks: string[] = [];
    const stream = new Writable({
      write(chunk: Buffer, _enc, cb) {
        chunks.push(chunk.toString('utf8'));
        cb();
      },
    });
    const lines = (): Array<Record<string, unknown>> =>
      chunks
        .join('')
        .split('\n')
        .filter((l) => l !== '')
        .map((l) => JSON.parse(l) as Record<string, unknown>);
    return { stream, lines };
  }

  test('writes one JSON object per line with name, level, time, msg and fields', () => {
    const { stream, lines } = capture();
    const log = createLogger({ name: 'site-a', destination: stream });
    log.info({ vm: 'vm1', bytes: 42 }, 'migration completed');
    log.debug('not at info level');
    log.child({ vm: 'vm2' }).warn('slow peer');
    const out = lines();
    expect(out).toHaveLength(2);
    expect(out[0]).toMatchObject({ level: 30, name: 'site-a', vm: 'vm1', bytes: 42, msg: 'migration completed' });
    expect(typeof out[0].time).toBe('string');
    expect(out[1]).toMatchObject({ level: 40, name: 'site-a', vm: 'vm2', msg: 'slow peer' });
  });

  test('honours level; rejects an unknown level', () => {
    const { stream, lines } = capture();
    const log = createLogger({ name: 'x', level: 'debug', destination: stream });
    log.debug('shown');
    expect(lines()).toHaveLength(1);
    expect(() => createLogger({ name: 'x', level: 'loud', destination: stream })).toThrow(/unknown log level "loud"/);
  });
});
