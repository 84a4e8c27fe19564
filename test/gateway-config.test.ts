import { mkdirSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { suiteTempDir } from './temp-dir';
import {
  ConfigError,
  GatewayConfig,
  checkTransportSecurity,
  isLoopbackHost,
  loadConfig,
  parseConfig,
  targetAllowed,
} from '../src/gateway/config';
import { DEFAULT_LIMITS } from '../src/gateway/security-config';

const FULL = `
name: site-a
data: /var/lib/bfmig
peerListen: 0.0.0.0:7300
metrics: 127.0.0.1:9464
insecurePlaintext: true
shutdownGraceSeconds: 12.5
storeBudget: 200GiB
routes:
  - vm: vm1
    listen: 127.0.0.1:7101
    peer: gw-b.example:7300
    target: 10.1.0.5:4444
    wan: { maxMbit: 50 }
    siblings: [vm2, vm3]
  - vm: vm2
    listen: "[::1]:7102"
    peer: "[2001:db8::2]:7300"
    target: dest.example:4445
    encrypted: refuse
allowTargets:
  - 10.1.0.0/24:4444
  - dest.example:4445
  - "[fd00::/64]:*"
peers:
  - peer: gw-b.example:7300
    wan: { maxMbit: 100 }
progress:
  logSeconds: 10
  stallSeconds: 5
`;

/** A minimal valid config, with lines replaced or appended to make variations. */
function minimal(extra = ''): string {
  return `name: site-a\ndata: /d\npeerListen: 127.0.0.1:7300\n${extra}`;
}

function errorOf(text: string): ConfigError {
  try {
    parseConfig(text);
  } catch (err) {
    if (err instanceof ConfigError) return err;
    throw err;
  }
  throw new Error('expected a ConfigError');
}

describe('parseConfig', () => {
  test('a full config parses into the expected structure', () => {
    const c = parseConfig(FULL);
    expect(c).toEqual<GatewayConfig>({
      source: '<config>',
      name: 'site-a',
      data: '/var/lib/bfmig',
      peerListen: { host: '0.0.0.0', port: 7300 },
      metrics: { host: '127.0.0.1', port: 9464 },
      insecurePlaintext: true,
      shutdownGraceSeconds: 12.5,
      compression: true,
      compressOffLoop: false,
      deltas: 'auto',
      storeBudget: 200 * 2 ** 30,
      routes: [
        {
          vm: 'vm1',
          listen: { host: '127.0.0.1', port: 7101 },
          peer: { host: 'gw-b.example', port: 7300 },
          target: { host: '10.1.0.5', port: 4444 },
          wan: { maxMbit: 50 },
          encrypted: true,
          siblings: ['vm2', 'vm3'],
        },
        {
          vm: 'vm2',
          listen: { host: '::1', port: 7102 },
          peer: { host: '2001:db8::2', port: 7300 },
          target: { host: 'dest.example', port: 4445 },
          wan: null,
          encrypted: false,
          siblings: [],
        },
      ],
      allowTargets: [
        { kind: 'net', text: '10.1.0.0/24:4444', family: 4, address: '10.1.0.0', prefix: 24, port: 4444 },
        { kind: 'host', text: 'dest.example:4445', host: 'dest.example', port: 4445 },
        { kind: 'net', text: '[fd00::/64]:*', family: 6, address: 'fd00::', prefix: 64, port: '*' },
      ],
      tls: null,
      limits: { handshakeSeconds: 10, idleSeconds: 120, maxFrameBytes: 4 * 1024 * 1024, maxConnections: 256, maxPendingConnections: 64, maxPendingPerAddress: 40, maxGuestRamBytes: 256 * 2 ** 30, maxStores: 1024, maxChannels: 16 },
      peerVms: null,
      progress: { logSeconds: 10, stallSeconds: 5 },
      peers: [{ peer: { host: 'gw-b.example', port: 7300 }, wan: { maxMbit: 100 }, linkMbit: null }],
    });
  });

  test('progress and WAN caps: defaults, and each mistake named by its key', () => {
    const c = parseConfig(minimal());
    expect(c.progress).toEqual({ logSeconds: 60, stallSeconds: 30 });
    expect(c.peers).toEqual([]);
    const route = 'routes:\n  - vm: vm1\n    listen: 127.0.0.1:7101\n    peer: 127.0.0.1:7301\n    target: 127.0.0.1:4444\n';
    expect(errorOf(minimal('progress:\n  stallSeconds: 0\n')).key).toBe('progress.stallSeconds');
    expect(errorOf(minimal('progress:\n  every: 3\n')).key).toBe('progress.every');
    expect(errorOf(minimal(`${route}    wan: { maxMbit: "fast" }\n`)).key).toBe('routes[0].wan.maxMbit');
    expect(errorOf(minimal(`${route}    wan: { maxMbps: 10 }\n`)).key).toBe('routes[0].wan.maxMbps');
    expect(errorOf(minimal(`${route}peers:\n  - peer: 127.0.0.1:7399\n    wan: { maxMbit: 10 }\n`)).detail).toMatch(/no route dials 127.0.0.1:7399/);
    expect(errorOf(minimal(`${route}peers:\n  - peer: 127.0.0.1:7301\n  - peer: 127.0.0.1:7301\n`)).key).toBe('peers[1].peer');
    expect(parseConfig(minimal(`${route}peers:\n  - peer: 127.0.0.1:7301\n    wan: { maxMbit: 0.5 }\n`)).peers[0].wan).toEqual({ maxMbit: 0.5 });

    // A peer's link rate (what a byte saved is priced at), with or without a cap; a route has no link of its own.
    const peer = (wan: string): string => minimal(`${route}peers:\n  - peer: 127.0.0.1:7301\n    wan: ${wan}\n`);
    expect(parseConfig(peer('{ linkMbit: 1000 }')).peers[0]).toMatchObject({ wan: null, linkMbit: 1000 });
    expect(parseConfig(peer('{ maxMbit: 100, linkMbit: 1000 }')).peers[0]).toMatchObject({ wan: { maxMbit: 100 }, linkMbit: 1000 });
    expect(parseConfig(peer('{ maxMbit: 100 }')).peers[0]).toMatchObject({ wan: { maxMbit: 100 }, linkMbit: null });
    expect(errorOf(peer('{ linkMbit: "1G" }')).key).toBe('peers[0].wan.linkMbit');
    expect(errorOf(peer('{ linkMbit: 0 }')).key).toBe('peers[0].wan.linkMbit');
    expect(errorOf(peer('{}')).detail).toMatch(/maxMbit, linkMbit or both/);
    expect(errorOf(minimal(`${route}    wan: { linkMbit: 1000 }\n`)).key).toBe('routes[0].wan.linkMbit');
  });

  test('defaults for a minimal receive-only config', () => {
    const c = parseConfig(minimal());
    expect(c.metrics).toBeNull();
    expect(c.insecurePlaintext).toBe(false);
    expect(c.shutdownGraceSeconds).toBe(30);
    expect(c.compression).toBe(true);
    expect(c.routes).toEqual([]);
    // Nothing to dial unless listed: a peer cannot reach any service through a gateway by default.
    expect(c.allowTargets).toEqual([]);
    expect(c.tls).toBeNull();
  });

  test('compression: off turns WAN compression off', () => {
    expect(parseConfig(minimal('compression: off\n')).compression).toBe(false);
    expect(parseConfig(minimal('compression: zstd\n')).compression).toBe(true);
  });

  test('compressionRunsOn: the event loop by default, or the thread pool', () => {
    expect(parseConfig(minimal()).compressOffLoop).toBe(false);
    expect(parseConfig(minimal('compressionRunsOn: thread-pool\n')).compressOffLoop).toBe(true);
    expect(parseConfig(minimal('compressionRunsOn: event-loop\n')).compressOffLoop).toBe(false);
  });

  test('keys written with no value count as absent', () => {
    const c = parseConfig(minimal('metrics:\nroutes:\ntls:\nlimits:\n'));
    expect(c.metrics).toBeNull();
    expect(c.routes).toEqual([]);
    expect(c.tls).toBeNull();
    expect(c.limits.maxConnections).toBe(DEFAULT_LIMITS.maxConnections);
  });

  test('ConfigError carries key and message "key: detail"', () => {
    const err = errorOf(minimal('routes:\n  - vm: a\n    listen: 127.0.0.1:1\n    peer: p:1\n    target: t:1\n  - vm: b\n    listen: "127.0.0.1"\n    peer: p:1\n    target: t:1\n'));
    expect(err).toBeInstanceOf(ConfigError);
    expect(err.key).toBe('routes[1].listen');
    expect(err.message).toBe('routes[1].listen: "127.0.0.1" is not HOST:PORT');
  });

  const route = (vm: string, listen: string, more = ''): string =>
    `  - vm: ${vm}\n    listen: "${listen}"\n    peer: gw:7300\n    target: 127.0.0.1:4444\n${more}`;

  // [description, config text, expected key, expected message fragment]
  const cases: Array<[string, string, string, RegExp]> = [
    ['invalid YAML', 'name: [oops', '', /invalid YAML/],
    ['duplicate YAML key', minimal('name: other\n'), '', /invalid YAML.*unique/i],
    ['empty document', '', '', /empty/],
    ['top level not a mapping', '- a\n- b\n', '', /mapping/],
    ['unknown top-level key', minimal('lsiten: x\nfoo: 1\n'), 'lsiten', /unknown keys "lsiten", "foo"/],
    ['missing name', 'data: /d\npeerListen: 127.0.0.1:1\n', 'name', /is required/],
    ['name wrong type', 'name: 12\ndata: /d\npeerListen: 127.0.0.1:1\n', 'name', /must be a string/],
    ['name bad characters', 'name: "site a"\ndata: /d\npeerListen: 127.0.0.1:1\n', 'name', /1-64 characters/],
    ['name too long', `name: ${'a'.repeat(65)}\ndata: /d\npeerListen: 127.0.0.1:1\n`, 'name', /1-64/],
    ['missing data', 'name: a\npeerListen: 127.0.0.1:1\n', 'data', /is required/],
    ['empty data', 'name: a\ndata: ""\npeerListen: 127.0.0.1:1\n', 'data', /empty/],
    ['missing peerListen', 'name: a\ndata: /d\n', 'peerListen', /is required/],
    ['peerListen not HOST:PORT', 'name: a\ndata: /d\npeerListen: "7300"\n', 'peerListen', /"7300" is not HOST:PORT/],
    ['peerListen a number', 'name: a\ndata: /d\npeerListen: 7300\n', 'peerListen', /must be a string/],
    ['peerListen port out of range', 'name: a\ndata: /d\npeerListen: 127.0.0.1:70000\n', 'peerListen', /out of range/],
    ['peerListen bad IPv6', 'name: a\ndata: /d\npeerListen: "[::zz]:1"\n', 'peerListen', /not HOST:PORT/],
    ['metrics bad', minimal('metrics: localhost\n'), 'metrics', /not HOST:PORT/],
    ['metrics collides with peerListen', minimal('metrics: 127.0.0.1:7300\n'), 'metrics', /collides with peerListen/],
    ['insecurePlaintext not boolean', minimal('insecurePlaintext: "yes"\n'), 'insecurePlaintext', /true or false/],
    ['shutdownGraceSeconds not a number', minimal('shutdownGraceSeconds: soon\n'), 'shutdownGraceSeconds', /must be a number/],
    ['compression unknown', minimal('compression: gzip\n'), 'compression', /must be zstd or off/],
    ['compressionRunsOn unknown', minimal('compressionRunsOn: gpu\n'), 'compressionRunsOn', /must be thread-pool or event-loop/],
    ['storeBudget not a size', minimal('storeBudget: lots\n'), 'storeBudget', /not a size/],
    ['storeBudget zero', minimal('storeBudget: 0GiB\n'), 'storeBudget', /more than 0/],
    ['shutdownGraceSeconds zero', minimal('shutdownGraceSeconds: 0\n'), 'shutdownGraceSeconds', /out of range/],
    ['shutdownGraceSeconds negative', minimal('shutdownGraceSeconds: -1\n'), 'shutdownGraceSeconds', /out of range/],
    ['shutdownGraceSeconds huge', minimal('shutdownGraceSeconds: 1e9\n'), 'shutdownGraceSeconds', /out of range/],
    ['shutdownGraceSeconds infinite', minimal('shutdownGraceSeconds: .inf\n'), 'shutdownGraceSeconds', /must be a number/],
    ['tls not a mapping', minimal('tls: true\n'), 'tls', /mapping/],
    ['routes not a list', minimal('routes: vm1\n'), 'routes', /must be a list/],
    ['route not a mapping', minimal('routes:\n  - vm1\n'), 'routes[0]', /must be a mapping/],
    ['route unknown key', minimal('routes:\n' + route('vm1', '127.0.0.1:7101', '    port: 3\n')), 'routes[0].port', /unknown key "routes\[0\]\.port"/],
    ['route missing vm', minimal('routes:\n  - listen: 127.0.0.1:1\n    peer: p:1\n    target: t:1\n'), 'routes[0].vm', /is required/],
    ['route vm wrong type', minimal('routes:\n  - vm: 7\n    listen: 127.0.0.1:1\n    peer: p:1\n    target: t:1\n'), 'routes[0].vm', /must be a string/],
    ['route vm bad name', minimal('routes:\n' + route('-vm', '127.0.0.1:7101')), 'routes[0].vm', /must start with/],
    ['route missing listen', minimal('routes:\n  - vm: a\n    peer: p:1\n    target: t:1\n'), 'routes[0].listen', /is required/],
    ['route missing peer', minimal('routes:\n  - vm: a\n    listen: 127.0.0.1:1\n    target: t:1\n'), 'routes[0].peer', /is required/],
    ['route missing target', minimal('routes:\n  - vm: a\n    listen: 127.0.0.1:1\n    peer: p:1\n'), 'routes[0].target', /is required/],
    ['route bad peer', minimal('routes:\n  - vm: a\n    listen: 127.0.0.1:1\n    peer: "gw b:1"\n    target: t:1\n'), 'routes[0].peer', /not HOST:PORT/],
    ['route peer port 0', minimal('routes:\n  - vm: a\n    listen: 127.0.0.1:1\n    peer: gw:0\n    target: t:1\n'), 'routes[0].peer', /port 0/],
    ['route bad target', minimal('routes:\n  - vm: a\n    listen: 127.0.0.1:1\n    peer: gw:1\n    target: t\n'), 'routes[0].target', /"t" is not HOST:PORT/],
    ['duplicate vm', minimal('routes:\n' + route('vm1', '127.0.0.1:7101') + route('vm1', '127.0.0.1:7102')), 'routes[1].vm', /"vm1" is already routed by routes\[0\]/],
    ['duplicate listen', minimal('routes:\n' + route('vm1', '127.0.0.1:7101') + route('vm2', '127.0.0.1:7101')), 'routes[1].listen', /collides with routes\[0\]\.listen/],
    ['listen vs wildcard listen', minimal('routes:\n' + route('vm1', '0.0.0.0:7101') + route('vm2', '10.0.0.1:7101')), 'routes[1].listen', /collides with routes\[0\]\.listen/],
    ['listen vs IPv6 spelling', minimal('routes:\n' + route('vm1', '[::1]:7101') + route('vm2', '[0:0:0:0:0:0:0:1]:7101')), 'routes[1].listen', /collides/],
    ['siblings not a list', minimal('routes:\n' + route('vm1', '127.0.0.1:7101', '    siblings: vm2\n')), 'routes[0].siblings', /must be a list of VM names/],
    ['sibling bad name', minimal('routes:\n' + route('vm1', '127.0.0.1:7101', '    siblings: [vm2, -x]\n')), 'routes[0].siblings[1]', /must start with/],
    ['sibling is the route\'s VM', minimal('routes:\n' + route('vm1', '127.0.0.1:7101', '    siblings: [vm1]\n')), 'routes[0].siblings[0]', /the route's own VM/],
    ['sibling twice', minimal('routes:\n' + route('vm1', '127.0.0.1:7101', '    siblings: [vm2, vm2]\n')), 'routes[0].siblings[1]', /listed twice/],
    ['too many siblings', minimal('routes:\n' + route('vm1', '127.0.0.1:7101', '    siblings: [a, b, c, d, e]\n')), 'routes[0].siblings', /at most 4/],
    ['listen collides with peerListen', minimal('routes:\n' + route('vm1', '127.0.0.1:7300')), 'routes[0].listen', /collides with peerListen/],
    ['listen collides with metrics', minimal('metrics: 0.0.0.0:9464\nroutes:\n' + route('vm1', '127.0.0.1:9464')), 'routes[0].listen', /collides with metrics/],
    ['allowTargets not a list', minimal('allowTargets: 10.0.0.0/8:*\n'), 'allowTargets', /must be a list/],
    ['allowTargets entry not a string', minimal('allowTargets:\n  - 4444\n'), 'allowTargets[0]', /must be a string/],
    ['allowTargets entry malformed', minimal('allowTargets:\n  - 10.0.0.0/8\n'), 'allowTargets[0]', /not "HOST:PORT"/],
    ['allowTargets prefix out of range', minimal('allowTargets:\n  - ok:1\n  - 10.0.0.0/33:*\n'), 'allowTargets[1]', /prefix \/33/],
    ['allowTargets hostname with *', minimal('allowTargets:\n  - dest.example:*\n'), 'allowTargets[0]', /exact port/],
    ['allowTargets hostname with prefix', minimal('allowTargets:\n  - dest/8:1\n'), 'allowTargets[0]', /not an IP address/],
    ['allowTargets unbracketed IPv6', minimal('allowTargets:\n  - ::1:*\n'), 'allowTargets[0]', /not "HOST:PORT"/],
    ['allowTargets port out of range', minimal('allowTargets:\n  - 10.0.0.1:99999\n'), 'allowTargets[0]', /out of range/],
  ];

  test.each(cases)('%s', (_desc, text, key, message) => {
    const err = errorOf(text);
    expect(err.key).toBe(key);
    expect(err.message).toMatch(message);
    if (key !== '') expect(err.message.startsWith(`${key}: `)).toBe(true);
  });

  test('port 0 listeners are allowed and never collide', () => {
    const c = parseConfig(
      'name: a\ndata: /d\npeerListen: 127.0.0.1:0\nmetrics: 127.0.0.1:0\nroutes:\n' +
        route('vm1', '127.0.0.1:0') +
        route('vm2', '127.0.0.1:0'),
    );
    expect(c.routes.map((r) => r.listen.port)).toEqual([0, 0]);
  });

  test('same port on different hosts does not collide', () => {
    const c = parseConfig(minimal('routes:\n' + route('vm1', '127.0.0.1:7101') + route('vm2', '127.0.0.2:7101')));
    expect(c.routes).toHaveLength(2);
  });
});

describe('data directory and loadConfig', () => {
  let dir: string;
  beforeAll(() => {
    dir = suiteTempDir('bfmig-config-');
  });

  test('a relative data dir resolves against the config file directory', () => {
    const file = path.join(dir, 'etc', 'gw.yaml');
    mkdirSync(path.dirname(file), { recursive: true });
    writeFileSync(file, 'name: a\ndata: ../store\npeerListen: 127.0.0.1:7300\n');
    const c = loadConfig(file);
    expect(c.data).toBe(path.join(dir, 'store'));
    expect(c.source).toBe(file);
  });

  test('an absolute data dir is kept', () => {
    expect(parseConfig(minimal(), path.join(dir, 'x.yaml')).data).toBe('/d');
  });

  test('a relative data dir with no file resolves against the working directory', () => {
    expect(parseConfig('name: a\ndata: store\npeerListen: 127.0.0.1:1\n').data).toBe(path.resolve('store'));
  });

  test('errors from a file name the file', () => {
    const file = path.join(dir, 'bad.yaml');
    writeFileSync(file, 'name: a\ndata: d\npeerListen: nope\n');
    expect(() => loadConfig(file)).toThrow(`${file}: peerListen: "nope" is not HOST:PORT`);
  });

  test('a missing file is a ConfigError', () => {
    expect(() => loadConfig(path.join(dir, 'missing.yaml'))).toThrow(ConfigError);
  });
});

describe('targetAllowed', () => {
  const withRules = (...rules: string[]): GatewayConfig =>
    parseConfig(minimal(`allowTargets:\n${rules.map((r) => `  - "${r}"\n`).join('')}`));

  test.each<[string, string[], string, number, boolean]>([
    ['no allowTargets: loopback is refused', [], '127.0.0.1', 4444, false],
    ['no allowTargets: ::1 is refused', [], '::1', 4444, false],
    ['no allowTargets: other addresses are refused', [], '10.1.0.5', 4444, false],
    ['loopback rule allows all of 127/8', ['127.0.0.0/8:*'], '127.9.8.7', 1, true],
    ['::1 rule allows ::1 in another spelling', ['[::1]:*'], '0:0:0:0:0:0:0:1', 4444, true],
    ['loopback rule refuses localhost by name', ['127.0.0.0/8:*'], 'localhost', 4444, false],
    ['CIDR:PORT inside, right port', ['10.1.0.0/24:4444'], '10.1.0.5', 4444, true],
    ['CIDR:PORT inside, wrong port', ['10.1.0.0/24:4444'], '10.1.0.5', 4445, false],
    ['CIDR:PORT outside', ['10.1.0.0/24:4444'], '10.1.1.5', 4444, false],
    ['CIDR:* any port', ['10.0.0.0/8:*'], '10.200.3.4', 65535, true],
    ['/0 matches every IPv4', ['0.0.0.0/0:4444'], '192.0.2.1', 4444, true],
    ['IPv4 rule does not match IPv6', ['0.0.0.0/0:*'], '2001:db8::1', 4444, false],
    ['exact IP:PORT', ['10.1.0.5:4444'], '10.1.0.5', 4444, true],
    ['exact IP:PORT, other IP', ['10.1.0.5:4444'], '10.1.0.6', 4444, false],
    ['IPv6 CIDR', ['[fd00::/64]:*'], 'fd00::1234', 9, true],
    ['IPv6 CIDR outside', ['[fd00::/64]:*'], 'fd01::1', 9, false],
    ['hostname exact', ['dest.example:4444'], 'dest.example', 4444, true],
    ['hostname case-insensitive', ['Dest.Example:4444'], 'dest.EXAMPLE', 4444, true],
    ['hostname wrong port', ['dest.example:4444'], 'dest.example', 4445, false],
    ['hostname other name', ['dest.example:4444'], 'evil.example', 4444, false],
    ['hostname never matches a CIDR', ['0.0.0.0/0:*'], 'dest.example', 4444, false],
    ['no rules at all', ['__none__'], '127.0.0.1', 4444, false],
  ])('%s', (_desc, rules, host, port, expected) => {
    const config =
      rules.length === 0
        ? parseConfig(minimal())
        : rules[0] === '__none__'
          ? parseConfig(minimal('allowTargets: []\n'))
          : withRules(...rules);
    expect(targetAllowed(config, { host, port })).toBe(expected);
  });
});

describe('checkTransportSecurity', () => {
  const cfg = (peerListen: string, peers: string[], extra = ''): GatewayConfig =>
    parseConfig(
      `name: a\ndata: /d\npeerListen: "${peerListen}"\n${extra}` +
        (peers.length
          ? `routes:\n${peers.map((p, i) => `  - vm: vm${i}\n    listen: 127.0.0.1:${7101 + i}\n    peer: "${p}"\n    target: 127.0.0.1:4444\n`).join('')}`
          : ''),
    );

  test('all loopback: fine, no warning', () => {
    expect(checkTransportSecurity(cfg('127.0.0.1:7300', ['127.0.0.1:7400', '[::1]:7400', 'localhost:7400']))).toEqual({
      warn: null,
    });
  });

  test('non-loopback peerListen without insecurePlaintext is refused', () => {
    expect(() => checkTransportSecurity(cfg('0.0.0.0:7300', []))).toThrow(ConfigError);
    try {
      checkTransportSecurity(cfg('0.0.0.0:7300', []));
    } catch (err) {
      expect((err as ConfigError).key).toBe('peerListen');
      expect((err as ConfigError).message).toMatch(/insecurePlaintext: true/);
    }
  });

  test('non-loopback route peer without insecurePlaintext is refused, naming the route', () => {
    try {
      checkTransportSecurity(cfg('127.0.0.1:7300', ['127.0.0.1:7400', 'gw-b.example:7300']));
      throw new Error('expected a ConfigError');
    } catch (err) {
      expect(err).toBeInstanceOf(ConfigError);
      expect((err as ConfigError).key).toBe('routes[1].peer');
      expect((err as ConfigError).message).toMatch(/^routes\[1\]\.peer: .*gw-b\.example:7300/);
    }
  });

  test('insecurePlaintext: true allows it with a warning', () => {
    const { warn } = checkTransportSecurity(cfg('0.0.0.0:7300', ['10.0.0.2:7300'], 'insecurePlaintext: true\n'));
    expect(warn).toMatch(/unencrypted/);
    expect(warn).toMatch(/peerListen \(0\.0\.0\.0:7300\), routes\[0\]\.peer \(10\.0\.0\.2:7300\)/);
  });

  test('insecurePlaintext: true on an all-loopback config: no warning', () => {
    expect(checkTransportSecurity(cfg('127.0.0.1:7300', [], 'insecurePlaintext: true\n')).warn).toBeNull();
  });


  test.each<[string, boolean]>([
    ['127.0.0.1', true],
    ['127.255.0.9', true],
    ['::1', true],
    ['::ffff:127.0.0.1', true],
    ['localhost', true],
    ['LOCALHOST', true],
    ['0.0.0.0', false],
    ['::', false],
    ['10.0.0.1', false],
    ['gw.example', false],
  ])('isLoopbackHost(%s) = %s', (host, expected) => {
    expect(isLoopbackHost(host)).toBe(expected);
  });
});
