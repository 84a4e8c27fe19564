/**
 * Gateway configuration: one YAML file per site.
 *
 * ```yaml
 * name: site-a                 # this site (required, [A-Za-z0-9._-]{1,64})
 * data: /var/lib/bfmig         # store directory (required; relative to the config file's directory)
 * peerListen: 0.0.0.0:7300     # required: where peer gateways connect
 * metrics: 127.0.0.1:9464      # optional: Prometheus /metrics endpoint
 * insecurePlaintext: false     # optional (default false)
 * shutdownGraceSeconds: 30     # optional, 0 < n <= 86400 (default 30)
 * compression: zstd            # optional: zstd (default) or off, for Literal bytes across the WAN
 * compressionRunsOn: event-loop # optional: event-loop (default) or thread-pool (libuv's threads, beside
 *                              # the event loop: for a gateway with cores to spare)
 * deltas: auto                 # optional: a changed page as the bytes that changed: auto (when the
 *                              # WAN sets the pace or the store reads are quick), always, or off
 * routes:                      # optional
 *   - vm: vm1                  # VM name
 *     listen: 127.0.0.1:7101   # the source QEMU migrates here
 *     peer: gw-b.example:7300  # far gateway's peerListen
 *     target: 10.1.0.5:4444    # destination QEMU's -incoming address, as the far gateway reaches it
 *     encrypted: relay         # optional: a migration under QEMU's own TLS is carried as it is (relay, the
 *                              # default) or refused (refuse); see encrypted-tunnel.ts
 *     siblings: [vm2, vm3]     # optional, at most 4: VMs booted from the same image. A page the far site
 *                              # holds in a sibling's retained snapshot goes as a reference to it (not
 *                              # with deltas: off); see proxy/sibling-match.ts
 * allowTargets:                # what this gateway may dial when receiving; none unless listed
 *   - 10.1.0.0/24:4444
 * tls: ...                     # mutual TLS between gateways, see security-config.ts
 * peerVms: ...                 # which VMs each peer may migrate here, see security-config.ts
 * limits: ...                  # handshake / idle timeouts, frame size, connections, see security-config.ts
 * progress:                    # optional, see progress.ts
 *   logSeconds: 60             # a migration in flight logs its progress this often (0: never)
 *   stallSeconds: 30           # no byte moved this long: logged once, counted as stalled
 * peers:                       # optional: settings per far gateway, by the address routes dial
 *   - peer: gw-b.example:7300
 *     wan: { maxMbit: 100 }    # WAN cap all migrations to this peer share, see wan-cap.ts; and/or
 *                              # linkMbit: the link's rate, what a byte saved is priced at (else measured)
 * (a route may have its own `wan: { maxMbit: N }` too)
 * ```
 *
 * Every problem is reported as a {@link ConfigError} whose `key` names the offending setting,
 * e.g. `routes[1].listen: "127.0.0.1" is not HOST:PORT`.
 */
import { readFileSync } from 'node:fs';
import { BlockList, isIP } from 'node:net';
import * as path from 'node:path';
import { parseDocument } from 'yaml';
import { Endpoint, formatEndpoint, parseEndpoint } from './address';
import { parseSize } from '../common/units';
import { describe, type Fail, isMapping, SITE_NAME } from './config-schema';
import { type Limits, parseLimits, parsePeerVms, parseTls, type PeerVmRule, type TlsConfig } from './security-config';
import { errorMessage } from '../common/errors';
import { parseProgress, type ProgressConfig } from './progress';
import { parsePeerWan, parseWanCap, type WanCapConfig } from './wan-cap';
import { VM_NAME_RE } from '../store/meta';
import { MAX_SIBLINGS } from '../wire/frames';

export class ConfigError extends Error {
  /**
   * @param key the offending setting, e.g. `routes[1].listen` ('' when the whole file is at fault)
   * @param detail what is wrong with it
   * @param source the config file, or '<config>' when parsed from a string
   */
  constructor(
    readonly key: string,
    readonly detail: string,
    readonly source: string = DEFAULT_SOURCE,
  ) {
    const prefix = [source === DEFAULT_SOURCE ? '' : source, key].filter((s) => s !== '').join(': ');
    super(prefix === '' ? detail : `${prefix}: ${detail}`);
    this.name = 'ConfigError';
  }
}

/** Config `deltas`: send a changed page as the bytes that changed when that pays (auto), always, or never. */
export type DeltaMode = 'auto' | 'always' | 'off';

export interface RouteConfig {
  /** VM name; also the key both gateways use for the VM's retained pages. */
  vm: string;
  /** Where the source QEMU migrates to (this gateway listens here). */
  listen: Endpoint;
  /** The far gateway's peerListen. */
  peer: Endpoint;
  /** The destination QEMU's -incoming address, as the far gateway reaches it. */
  target: Endpoint;
  /** This route's WAN cap (`wan: { maxMbit }`), or null. */
  wan: WanCapConfig | null;
  /** Carry a migration under QEMU's own TLS as it is (`encrypted: relay`, the default), or refuse it (`refuse`). */
  encrypted: boolean;
  /** VMs booted from the same image (`siblings:`), whose retained snapshots may stand for this VM's pages. */
  siblings: string[];
}

/** A `peers:` entry: settings for one far gateway, by the address routes dial it at. */
export interface PeerConfig {
  peer: Endpoint;
  /** The cap all migrations to this peer share, or null. */
  wan: WanCapConfig | null;
  /** The link's rate to this peer in Mbit/s, as the operator knows it (`wan.linkMbit`), or null: measured. */
  linkMbit: number | null;
}

/** One parsed `allowTargets` entry. */
export type TargetRule =
  | {
      kind: 'net';
      /** The entry as written. */
      text: string;
      family: 4 | 6;
      /** Network address (an exact address when prefix is 32 / 128). */
      address: string;
      prefix: number;
      /** '*' = any port. */
      port: number | '*';
    }
  | {
      kind: 'host';
      text: string;
      /** Hostname, lower-cased; matches only exactly. */
      host: string;
      port: number;
    };

export interface GatewayConfig {
  /** The file this came from, or '<config>'. */
  source: string;
  name: string;
  /** Store directory, absolute. */
  data: string;
  peerListen: Endpoint;
  metrics: Endpoint | null;
  insecurePlaintext: boolean;
  shutdownGraceSeconds: number;
  /** Compress Literal bytes across the WAN when the peer can (`compression: zstd`, the default; `off`). */
  compression: boolean;
  /** Compress on libuv's thread pool (`compressionRunsOn: thread-pool`), not on the event loop (`event-loop`, the default). */
  compressOffLoop: boolean;
  /** Changed pages as deltas against the version both sites hold: `auto` (when they pay), `always`, `off`. */
  deltas: DeltaMode;
  /** Disk budget of the store directory in bytes (`storeBudget: 200GiB`), or null for none. */
  storeBudget: number | null;
  routes: RouteConfig[];
  allowTargets: TargetRule[];
  /** Mutual TLS between gateways; null when absent (then only loopback peers, or insecurePlaintext). */
  tls: TlsConfig | null;
  /** The VMs each peer may migrate to this gateway (`peerVms:`), or null: any VM. */
  peerVms: PeerVmRule[] | null;
  limits: Limits;
  /** Progress log interval and stall detection (`progress:`). */
  progress: ProgressConfig;
  peers: PeerConfig[];
}

export const DEFAULT_SOURCE = '<config>';
export const DEFAULT_SHUTDOWN_GRACE_SECONDS = 30;
export const MAX_SHUTDOWN_GRACE_SECONDS = 86400;

const TOP_LEVEL_KEYS = [
  'name',
  'data',
  'peerListen',
  'metrics',
  'insecurePlaintext',
  'shutdownGraceSeconds',
  'compression',
  'compressionRunsOn',
  'deltas',
  'storeBudget',
  'routes',
  'allowTargets',
  'tls',
  'peerVms',
  'limits',
  'progress',
  'peers',
] as const;
const ROUTE_KEYS = ['vm', 'listen', 'peer', 'target', 'wan', 'encrypted', 'siblings'] as const;
const PEER_KEYS = ['peer', 'wan'] as const;

export function loadConfig(file: string): GatewayConfig {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new ConfigError('', `cannot read config: ${(err as Error).message}`, file);
  }
  return parseConfig(text, file);
}

/**
 * Parse and validate a config. `source` names the file in errors; relative `data` paths resolve
 * against its directory (against the working directory when source is '<config>').
 */
export function parseConfig(text: string, source = DEFAULT_SOURCE): GatewayConfig {
  const fail = (key: string, detail: string): never => {
    throw new ConfigError(key, detail, source);
  };

  const doc = parseDocument(text, { uniqueKeys: true, prettyErrors: true });
  if (doc.errors.length > 0) fail('', `invalid YAML: ${doc.errors[0].message.trimEnd()}`);
  let root: unknown;
  try {
    root = doc.toJS({ maxAliasCount: 100 });
  } catch (err) {
    fail('', `invalid YAML: ${(err as Error).message}`);
  }
  if (!isMapping(root)) {
    return fail('', root == null ? 'config is empty' : 'config must be a mapping of settings');
  }

  checkKeys(root, TOP_LEVEL_KEYS, '', fail);

  const name = requiredString(root, 'name', 'name', fail);
  if (!SITE_NAME.test(name)) fail('name', `"${name}" must be 1-64 characters of A-Z a-z 0-9 . _ -`);

  const dataText = requiredString(root, 'data', 'data', fail);
  const baseDir = source === DEFAULT_SOURCE ? process.cwd() : path.dirname(path.resolve(source));
  const data = path.resolve(baseDir, dataText);

  const peerListen = endpoint(requiredString(root, 'peerListen', 'peerListen', fail), 'peerListen', false, fail);
  const metricsText = optionalString(root, 'metrics', 'metrics', fail);
  const metrics = metricsText === undefined ? null : endpoint(metricsText, 'metrics', false, fail);

  const insecurePlaintext = optional(root, 'insecurePlaintext') ?? false;
  if (typeof insecurePlaintext !== 'boolean') fail('insecurePlaintext', `must be true or false, not ${describe(insecurePlaintext)}`);

  const grace = optional(root, 'shutdownGraceSeconds') ?? DEFAULT_SHUTDOWN_GRACE_SECONDS;
  if (typeof grace !== 'number' || !Number.isFinite(grace)) {
    fail('shutdownGraceSeconds', `must be a number, not ${describe(grace)}`);
  }
  const shutdownGraceSeconds = grace as number;
  const compressionValue = optional(root, 'compression') ?? 'zstd';
  if (compressionValue !== 'zstd' && compressionValue !== 'off') fail('compression', `must be zstd or off, not ${describe(compressionValue)}`);
  const compression = compressionValue === 'zstd';
  const runsOn = optional(root, 'compressionRunsOn') ?? 'event-loop';
  if (runsOn !== 'thread-pool' && runsOn !== 'event-loop') fail('compressionRunsOn', `must be thread-pool or event-loop, not ${describe(runsOn)}`);
  const compressOffLoop = runsOn === 'thread-pool';
  const deltasValue = optional(root, 'deltas') ?? 'auto';
  if (deltasValue !== 'auto' && deltasValue !== 'always' && deltasValue !== 'off') fail('deltas', `must be auto, always or off, not ${describe(deltasValue)}`);
  const deltas = deltasValue as DeltaMode;
  if (shutdownGraceSeconds <= 0 || shutdownGraceSeconds > MAX_SHUTDOWN_GRACE_SECONDS) {
    fail('shutdownGraceSeconds', `${shutdownGraceSeconds} is out of range (must be > 0 and <= ${MAX_SHUTDOWN_GRACE_SECONDS})`);
  }

  const budgetValue = optional(root, 'storeBudget');
  let storeBudget: number | null = null;
  if (budgetValue !== undefined) {
    try {
      storeBudget = parseSize(typeof budgetValue === 'number' ? String(budgetValue) : String(budgetValue));
    } catch (err) {
      fail('storeBudget', errorMessage(err));
    }
    if (storeBudget !== null && storeBudget <= 0) fail('storeBudget', 'must be more than 0');
  }

  const tls = parseTls(optional(root, 'tls'), baseDir, fail);
  const peerVms = parsePeerVms(optional(root, 'peerVms'), tls, fail);
  const limits = parseLimits(optional(root, 'limits'), fail);

  // Every endpoint this gateway listens on, to catch two listeners on one port.
  const listeners: Array<{ key: string; at: Endpoint }> = [{ key: 'peerListen', at: peerListen }];
  const claim = (key: string, at: Endpoint): void => {
    const clash = listeners.find((l) => listenersCollide(l.at, at));
    if (clash) fail(key, `${formatEndpoint(at)} collides with ${clash.key} (${formatEndpoint(clash.at)})`);
    listeners.push({ key, at });
  };
  if (metrics) claim('metrics', metrics);

  const routes: RouteConfig[] = [];
  const routesValue = optional(root, 'routes') ?? [];
  if (!Array.isArray(routesValue)) fail('routes', `must be a list, not ${describe(routesValue)}`);
  (routesValue as unknown[]).forEach((item, i) => {
    const at = `routes[${i}]`;
    if (!isMapping(item)) return fail(at, `must be a mapping with vm, listen, peer, target; not ${describe(item)}`);
    checkKeys(item, ROUTE_KEYS, `${at}.`, fail);
    const vm = requiredString(item, 'vm', `${at}.vm`, fail);
    if (!VM_NAME_RE.test(vm)) {
      fail(`${at}.vm`, `"${vm}" must start with A-Z a-z 0-9 and be 1-64 characters of A-Z a-z 0-9 . _ -`);
    }
    const dup = routes.findIndex((r) => r.vm === vm);
    if (dup >= 0) fail(`${at}.vm`, `"${vm}" is already routed by routes[${dup}]`);
    const listen = endpoint(requiredString(item, 'listen', `${at}.listen`, fail), `${at}.listen`, false, fail);
    claim(`${at}.listen`, listen);
    const peer = endpoint(requiredString(item, 'peer', `${at}.peer`, fail), `${at}.peer`, true, fail);
    const target = endpoint(requiredString(item, 'target', `${at}.target`, fail), `${at}.target`, true, fail);
    const encrypted = optional(item, 'encrypted') ?? 'relay';
    if (encrypted !== 'relay' && encrypted !== 'refuse') fail(`${at}.encrypted`, `must be relay or refuse, not ${describe(encrypted)}`);
    const siblings = parseSiblings(optional(item, 'siblings'), vm, `${at}.siblings`, fail);
    routes.push({ vm, listen, peer, target, wan: parseWanCap(optional(item, 'wan'), `${at}.wan`, fail), encrypted: encrypted === 'relay', siblings });
  });

  const peersValue = optional(root, 'peers') ?? [];
  if (!Array.isArray(peersValue)) fail('peers', `must be a list, not ${describe(peersValue)}`);
  const peers: PeerConfig[] = [];
  (peersValue as unknown[]).forEach((item, i) => {
    const at = `peers[${i}]`;
    if (!isMapping(item)) return fail(at, `must be a mapping with peer and wan; not ${describe(item)}`);
    checkKeys(item, PEER_KEYS, `${at}.`, fail);
    const peer = endpoint(requiredString(item, 'peer', `${at}.peer`, fail), `${at}.peer`, true, fail);
    const text = formatEndpoint(peer);
    if (peers.some((p) => formatEndpoint(p.peer) === text)) fail(`${at}.peer`, `${text} is listed twice`);
    // Settings for a peer no route dials would never apply: most likely a typo.
    if (!routes.some((r) => formatEndpoint(r.peer) === text)) fail(`${at}.peer`, `no route dials ${text} (routes[].peer)`);
    peers.push({ peer, ...parsePeerWan(optional(item, 'wan'), `${at}.wan`, fail) });
  });

  // No default: a gateway dials for its peers only what its operator listed. Loopback used to be the
  // default, which let any peer reach any local service (an SSH daemon, a database) through it.
  const allowValue = optional(root, 'allowTargets') ?? [];
  if (!Array.isArray(allowValue)) fail('allowTargets', `must be a list, not ${describe(allowValue)}`);
  const allowTargets = (allowValue as unknown[]).map((entry, i) => {
    const key = `allowTargets[${i}]`;
    if (typeof entry !== 'string') return fail(key, `must be a string "HOST:PORT", "CIDR:PORT" or "CIDR:*", not ${describe(entry)}`);
    return parseTargetRule(entry, key, fail);
  });

  return {
    source,
    name,
    data,
    peerListen,
    metrics,
    insecurePlaintext: insecurePlaintext as boolean,
    shutdownGraceSeconds,
    compression,
    compressOffLoop,
    deltas,
    storeBudget,
    routes,
    allowTargets,
    tls,
    peerVms,
    limits,
    progress: parseProgress(optional(root, 'progress'), fail),
    peers,
  };
}

/** `routes[].siblings`: distinct VM names other than the route's own, at most MAX_SIBLINGS. */
function parseSiblings(value: unknown, vm: string, key: string, fail: Fail): string[] {
  if (value === undefined) return [];
  if (!Array.isArray(value)) return fail(key, `must be a list of VM names, not ${describe(value)}`);
  if (value.length > MAX_SIBLINGS) fail(key, `lists ${value.length} VMs, at most ${MAX_SIBLINGS}`);
  const names: string[] = [];
  (value as unknown[]).forEach((name, i) => {
    if (typeof name !== 'string' || !VM_NAME_RE.test(name)) fail(`${key}[${i}]`, `${describe(name)} must start with A-Z a-z 0-9 and be 1-64 characters of A-Z a-z 0-9 . _ -`);
    if (name === vm) fail(`${key}[${i}]`, `"${vm}" is the route's own VM`);
    if (names.includes(name as string)) fail(`${key}[${i}]`, `"${name as string}" is listed twice`);
    names.push(name as string);
  });
  return names;
}

/** May the receiving side dial `target`? IP literals match CIDR / address rules; hostnames only an exact HOST:PORT rule. */
export function targetAllowed(config: Pick<GatewayConfig, 'allowTargets'>, target: Endpoint): boolean {
  const family = isIP(target.host);
  const host = target.host.toLowerCase();
  return config.allowTargets.some((rule) => {
    if (rule.kind === 'host') return family === 0 && rule.host === host && rule.port === target.port;
    if (family === 0 || (rule.port !== '*' && rule.port !== target.port)) return false;
    const list = new BlockList();
    list.addSubnet(rule.address, rule.prefix, rule.family === 4 ? 'ipv4' : 'ipv6');
    return list.check(target.host, family === 4 ? 'ipv4' : 'ipv6');
  });
}

/**
 * Peer traffic is plaintext unless a tls block is configured. Refuse (throw ConfigError) when it
 * would leave the loopback interface without `insecurePlaintext: true`; otherwise return a warning
 * worth logging at startup, or null.
 */
export function checkTransportSecurity(config: GatewayConfig): { warn: string | null } {
  if (config.tls !== null) return { warn: null };
  const exposed: string[] = [];
  if (!isLoopbackHost(config.peerListen.host)) exposed.push(`peerListen (${formatEndpoint(config.peerListen)})`);
  config.routes.forEach((r, i) => {
    if (!isLoopbackHost(r.peer.host)) exposed.push(`routes[${i}].peer (${formatEndpoint(r.peer)})`);
  });
  if (exposed.length === 0) return { warn: null };
  const what = `${exposed.join(', ')} ${exposed.length === 1 ? 'is' : 'are'} not loopback`;
  if (!config.insecurePlaintext) {
    const key = exposed[0].slice(0, exposed[0].indexOf(' '));
    throw new ConfigError(
      key,
      `${what} and no tls block is configured: peer traffic would cross the network unencrypted and unauthenticated; ` +
        'configure tls (see bfmig certs), or set insecurePlaintext: true to allow that',
      config.source,
    );
  }
  return { warn: `insecurePlaintext: peer traffic is unencrypted and unauthenticated; ${what}` };
}

/** 127.0.0.0/8, ::1 (any spelling, including ::ffff:127.x.y.z) or "localhost". */
export function isLoopbackHost(host: string): boolean {
  const family = isIP(host);
  if (family === 0) return host.toLowerCase() === 'localhost';
  const list = new BlockList();
  list.addSubnet('127.0.0.0', 8, 'ipv4');
  list.addAddress('::1', 'ipv6');
  return list.check(host, family === 4 ? 'ipv4' : 'ipv6');
}

// ---------------------------------------------------------------------------------------------

function checkKeys(obj: Record<string, unknown>, known: readonly string[], prefix: string, fail: Fail): void {
  const unknown = Object.keys(obj).filter((k) => !known.includes(k));
  if (unknown.length > 0) {
    fail(
      `${prefix}${unknown[0]}`,
      `unknown key${unknown.length > 1 ? 's' : ''} ${unknown.map((k) => JSON.stringify(`${prefix}${k}`)).join(', ')}` +
        ` (expected ${known.join(', ')})`,
    );
  }
}

/** A present, non-null value, or undefined (a key written with no value counts as absent). */
function optional(obj: Record<string, unknown>, name: string): unknown {
  const v = obj[name];
  return v === null ? undefined : v;
}

function optionalString(obj: Record<string, unknown>, name: string, key: string, fail: Fail): string | undefined {
  const v = optional(obj, name);
  if (v === undefined) return undefined;
  if (typeof v !== 'string') return fail(key, `must be a string, not ${describe(v)} (quote it)`);
  if (v.trim() === '') return fail(key, 'must not be empty');
  return v;
}

function requiredString(obj: Record<string, unknown>, name: string, key: string, fail: Fail): string {
  const v = optionalString(obj, name, key, fail);
  if (v === undefined) return fail(key, 'is required');
  return v;
}

function endpoint(text: string, key: string, dialled: boolean, fail: Fail): Endpoint {
  let e: Endpoint;
  try {
    e = parseEndpoint(text);
  } catch (err) {
    return fail(key, (err as Error).message);
  }
  if (e.host.includes(':') && isIP(e.host) !== 6) return fail(key, `"${e.host}" in "${text}" is not an IPv6 address`);
  if (dialled && e.port === 0) return fail(key, `port 0 in "${text}" cannot be dialled`);
  return e;
}

function isWildcard(host: string): boolean {
  return host === '0.0.0.0' || isUnspecified6(host);
}

function isUnspecified6(host: string): boolean {
  if (isIP(host) !== 6) return false;
  const list = new BlockList();
  list.addAddress('::', 'ipv6');
  return list.check(host, 'ipv6');
}

function sameHost(a: string, b: string): boolean {
  const fa = isIP(a);
  const fb = isIP(b);
  if (fa === 0 || fb === 0) return a.toLowerCase() === b.toLowerCase();
  const list = new BlockList();
  list.addAddress(a, fa === 4 ? 'ipv4' : 'ipv6');
  return list.check(b, fb === 4 ? 'ipv4' : 'ipv6');
}

/** Would binding both fail? Same port and the same host, or either host a wildcard. Port 0 (ephemeral) never collides. */
function listenersCollide(a: Endpoint, b: Endpoint): boolean {
  if (a.port === 0 || b.port === 0 || a.port !== b.port) return false;
  return isWildcard(a.host) || isWildcard(b.host) || sameHost(a.host, b.host);
}

function parseTargetRule(text: string, key: string, fail: Fail): TargetRule {
  const match = /^(?:\[([0-9a-fA-F:.]+(?:\/\d{1,3})?)\]|([^:[\]\s]+)):(\d{1,5}|\*)$/.exec(text.trim());
  if (!match) return fail(key, `"${text}" is not "HOST:PORT", "CIDR:PORT" or "CIDR:*"`);
  const hostPart = match[1] ?? match[2];
  let port: number | '*' = '*';
  if (match[3] !== '*') {
    port = Number(match[3]);
    if (port < 1 || port > 65535) return fail(key, `port ${port} in "${text}" is out of range`);
  }
  const slash = hostPart.indexOf('/');
  const address = slash < 0 ? hostPart : hostPart.slice(0, slash);
  const family = isIP(address);
  if (family === 0) {
    if (slash >= 0 || match[1] !== undefined) return fail(key, `"${address}" in "${text}" is not an IP address`);
    if (port === '*') return fail(key, `"${text}": a hostname needs an exact port (only CIDR:* may use *)`);
    return { kind: 'host', text, host: address.toLowerCase(), port };
  }
  if (family === 6 && match[1] === undefined) return fail(key, `IPv6 "${address}" in "${text}" must be in brackets`);
  const max = family === 4 ? 32 : 128;
  const prefix = slash < 0 ? max : Number(hostPart.slice(slash + 1));
  if (!Number.isInteger(prefix) || prefix < 0 || prefix > max) {
    return fail(key, `prefix /${hostPart.slice(slash + 1)} in "${text}" is out of range (0-${max})`);
  }
  return { kind: 'net', text, family: family === 4 ? 4 : 6, address, prefix, port };
}
