/**
 * The security parts of a gateway's config: the `tls:` block, the `peerVms:` block and the `limits:` block.
 *
 * ```yaml
 * tls:                         # mutual TLS 1.3 between gateways (both directions)
 *   cert: tls/site-a.crt       # this site's certificate (PEM; relative paths: to the config file)
 *   key: tls/site-a.key        # its private key (PEM)
 *   ca: tls/ca.crt             # the CA every peer's certificate must be issued by
 *   allowPeers: [site-b]       # optional: peer certificate names (CN or DNS SAN) accepted
 * peerVms:                     # optional (needs tls): the VMs each peer may migrate to this gateway
 *   site-b: [vm1, "web-*"]     # names or globs (* any run of characters, ? one); unlisted peers: none
 * limits:
 *   handshakeSeconds: 10       # TCP accept → a valid Hello (TLS handshake included) / QEMU's stream magic
 *   idleSeconds: 120           # a migration whose connections move no byte this long is failed
 *   maxFrameBytes: 4MiB        # largest gateway-to-gateway frame accepted (1MiB..4MiB)
 *   maxConnections: 256        # open connections across all of this gateway's listeners
 *   maxPendingConnections: 64  # of those, not yet identified (TLS+Hello, QEMU's magic; metrics clients: always), per listener kind
 *   maxPendingPerAddress: 40   # not yet identified, from one remote address (IPv6: one /64) across all listeners
 *                              # (a multifd migration opens maxChannels + 1 at once: keep it above that)
 *   maxGuestRam: 256GiB        # largest guest RAM a stream may declare (the store keeps 16 B a page in memory)
 *   maxStores: 1024            # store directories (VMs) kept; a new VM above it migrates without retention
 *   maxChannels: 16            # multifd channels one migration may open (QEMU's multifd-channels; 1..255)
 * ```
 */
import { createPrivateKey, type KeyObject, X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import * as path from 'node:path';
import { parseSize } from '../common/units';
import { MAX_FRAME_PAYLOAD } from '../wire/frames';
import { describe, type Fail, isMapping, SITE_NAME } from './config-schema';
import { TABLE_FRAME_BYTES } from './session';

export interface TlsConfig {
  /** Absolute paths as resolved, for messages. */
  certFile: string;
  keyFile: string;
  caFile: string;
  cert: Buffer;
  key: Buffer;
  ca: Buffer;
  /** Peer certificate names accepted (subject CN or DNS subjectAltName), or null for any the CA issued. */
  allowPeers: string[] | null;
  /** When this site's certificate stops being valid. */
  validTo: Date;
  /** When the CA's certificate stops being valid (every certificate it issued is then refused). */
  caValidTo: Date;
}

export interface Limits {
  handshakeSeconds: number;
  idleSeconds: number;
  maxFrameBytes: number;
  maxConnections: number;
  /** Connections on one listener kind that have not yet said who they are (see ConnectionGate). */
  maxPendingConnections: number;
  /** Connections from one remote address that have not yet said who they are, across all listeners. */
  maxPendingPerAddress: number;
  /** Largest guest RAM (bytes) a migration's stream may declare: the digest table costs 16 B a page. */
  maxGuestRamBytes: number;
  /** Most store directories the data directory holds: a peer naming ever new VMs cannot fill it with stores. */
  maxStores: number;
  /** Multifd channels one migration may open besides its main channel (and a postcopy-preempt channel). */
  maxChannels: number;
}

export const DEFAULT_LIMITS: Readonly<Limits> = {
  handshakeSeconds: 10,
  idleSeconds: 120,
  maxFrameBytes: MAX_FRAME_PAYLOAD,
  // A multifd migration opens maxChannels + 1 connections at once from one hypervisor, and the sending
  // gateway as many to its peer: with 16 per address, a 16-channel migration lost a connection now and then.
  maxConnections: 256,
  maxPendingConnections: 64,
  maxPendingPerAddress: 40,
  maxGuestRamBytes: 256 * 2 ** 30,
  maxStores: 1024,
  maxChannels: 16,
};
/** The store's own ceiling: 2^28 pages of 4 KiB (a 4 GiB digest table). */
const MAX_GUEST_RAM_BYTES = 2 ** 40;
/** A digest-table frame must fit: smaller frame limits would break every digest-table exchange. */
export const MIN_FRAME_BYTES = TABLE_FRAME_BYTES;

const TLS_KEYS = ['cert', 'key', 'ca', 'allowPeers'] as const;
const LIMIT_KEYS = ['handshakeSeconds', 'idleSeconds', 'maxFrameBytes', 'maxConnections', 'maxPendingConnections', 'maxPendingPerAddress', 'maxGuestRam', 'maxStores', 'maxChannels'] as const;
/** A VM name (see the store's validateVmName) or a glob of one: * any run of characters, ? one. */
const VM_PATTERN = /^[A-Za-z0-9._*?-]{1,64}$/;

/** `peerVms:`: the VMs each peer (by certificate name) may migrate to this gateway. */
export interface PeerVmRule {
  peer: string;
  /** As written, for messages. */
  patterns: string[];
  /** The patterns as one anchored expression. */
  match: RegExp;
}

/** The `tls:` block, or null when absent. Reads and checks the PEM files so a bad one stops start-up. */
export function parseTls(value: unknown, baseDir: string, fail: Fail): TlsConfig | null {
  if (value === undefined || value === null) return null;
  if (!isMapping(value)) return fail('tls', `must be a mapping with cert, key, ca (and optionally allowPeers), not ${describe(value)}`);
  const unknown = Object.keys(value).filter((k) => !(TLS_KEYS as readonly string[]).includes(k));
  if (unknown.length > 0) fail(`tls.${unknown[0]}`, `unknown key "tls.${unknown[0]}" (expected ${TLS_KEYS.join(', ')})`);

  const file = (name: 'cert' | 'key' | 'ca'): { file: string; bytes: Buffer } => {
    const v = value[name];
    if (v === undefined || v === null) return fail(`tls.${name}`, 'is required');
    if (typeof v !== 'string' || v.trim() === '') return fail(`tls.${name}`, `must be a file name, not ${describe(v)}`);
    const resolved = path.resolve(baseDir, v);
    try {
      return { file: resolved, bytes: readFileSync(resolved) };
    } catch (err) {
      return fail(`tls.${name}`, `cannot read ${resolved}: ${(err as Error).message}`);
    }
  };
  const certPem = file('cert');
  const keyPem = file('key');
  const caPem = file('ca');

  const x509 = (key: string, bytes: Buffer, resolved: string): X509Certificate => {
    try {
      return new X509Certificate(bytes);
    } catch (err) {
      return fail(key, `${resolved} is not a PEM certificate: ${(err as Error).message}`);
    }
  };
  const cert = x509('tls.cert', certPem.bytes, certPem.file);
  const ca = x509('tls.ca', caPem.bytes, caPem.file);
  let key: KeyObject;
  try {
    key = createPrivateKey(keyPem.bytes);
  } catch (err) {
    return fail('tls.key', `${keyPem.file} is not a PEM private key: ${(err as Error).message}`);
  }
  if (!cert.checkPrivateKey(key)) fail('tls.key', `${keyPem.file} is not the private key of ${certPem.file}`);
  if (!ca.ca) fail('tls.ca', `${caPem.file} is not a CA certificate (basicConstraints CA:TRUE)`);
  if (!cert.checkIssued(ca) || !cert.verify(ca.publicKey)) fail('tls.cert', `${certPem.file} is not issued by the CA in ${caPem.file}`);
  const validTo = new Date(cert.validTo);
  if (validTo.getTime() < Date.now()) fail('tls.cert', `${certPem.file} expired on ${validTo.toISOString()}`);
  if (new Date(cert.validFrom).getTime() > Date.now()) fail('tls.cert', `${certPem.file} is not valid before ${new Date(cert.validFrom).toISOString()}`);

  let allowPeers: string[] | null = null;
  const allowValue = value.allowPeers;
  if (allowValue !== undefined && allowValue !== null) {
    if (!Array.isArray(allowValue) || allowValue.length === 0) fail('tls.allowPeers', `must be a non-empty list of peer names, not ${describe(allowValue)}`);
    allowPeers = (allowValue as unknown[]).map((name, i) => {
      if (typeof name !== 'string' || !SITE_NAME.test(name)) {
        return fail(`tls.allowPeers[${i}]`, `${describe(name)} is not a peer name (1-64 characters of A-Z a-z 0-9 . _ -)`);
      }
      return name;
    });
  }
  return { certFile: certPem.file, keyFile: keyPem.file, caFile: caPem.file, cert: certPem.bytes, key: keyPem.bytes, ca: caPem.bytes, allowPeers, validTo, caValidTo: new Date(ca.validTo) };
}

/** The `limits:` block; every key optional. */
export function parseLimits(value: unknown, fail: Fail): Limits {
  if (value === undefined || value === null) return { ...DEFAULT_LIMITS };
  if (!isMapping(value)) return fail('limits', `must be a mapping of ${LIMIT_KEYS.join(', ')}, not ${describe(value)}`);
  const unknown = Object.keys(value).filter((k) => !(LIMIT_KEYS as readonly string[]).includes(k));
  if (unknown.length > 0) fail(`limits.${unknown[0]}`, `unknown key "limits.${unknown[0]}" (expected ${LIMIT_KEYS.join(', ')})`);
  const number = (name: 'handshakeSeconds' | 'idleSeconds' | 'maxConnections' | 'maxPendingConnections' | 'maxPendingPerAddress' | 'maxStores' | 'maxChannels', min: number, max: number, integer: boolean): number => {
    const v = value[name];
    if (v === undefined || v === null) return DEFAULT_LIMITS[name];
    if (typeof v !== 'number' || !Number.isFinite(v) || (integer && !Number.isInteger(v))) {
      return fail(`limits.${name}`, `must be ${integer ? 'a whole number' : 'a number'}, not ${describe(v)}`);
    }
    if (v < min || v > max) return fail(`limits.${name}`, `${v} is out of range (${min}..${max})`);
    return v;
  };
  /** A size limit written like 4MiB, checked against [min, max] (`range` says it for people). */
  const size = (key: 'maxFrameBytes' | 'maxGuestRam', fallback: number, min: number, max: number, range: string): number => {
    const v = value[key];
    if (v === undefined || v === null) return fallback;
    let bytes = fallback;
    try {
      bytes = parseSize(String(v));
    } catch (err) {
      fail(`limits.${key}`, (err as Error).message);
    }
    if (bytes < min || bytes > max) fail(`limits.${key}`, `${bytes} bytes is out of range (${range})`);
    return bytes;
  };
  const maxFrameBytes = size('maxFrameBytes', DEFAULT_LIMITS.maxFrameBytes, MIN_FRAME_BYTES, MAX_FRAME_PAYLOAD, `${MIN_FRAME_BYTES}..${MAX_FRAME_PAYLOAD}: 1MiB..4MiB`);
  const maxGuestRamBytes = size('maxGuestRam', DEFAULT_LIMITS.maxGuestRamBytes, 2 ** 20, MAX_GUEST_RAM_BYTES, '1MiB..1TiB');
  const maxConnections = number('maxConnections', 1, 100_000, true);
  // Defaults shrink with a small maxConnections, so that setting only it stays a valid config.
  const pendingDefault = (name: 'maxPendingConnections' | 'maxPendingPerAddress', cap: number): number =>
    value[name] === undefined || value[name] === null ? Math.min(DEFAULT_LIMITS[name], cap) : number(name, 1, 100_000, true);
  const maxPendingConnections = pendingDefault('maxPendingConnections', maxConnections);
  const maxPendingPerAddress = pendingDefault('maxPendingPerAddress', maxPendingConnections);
  if (maxPendingConnections > maxConnections) {
    fail('limits.maxPendingConnections', `${maxPendingConnections} is more than limits.maxConnections (${maxConnections}): pending connections are part of that total`);
  }
  if (maxPendingPerAddress > maxPendingConnections) {
    fail('limits.maxPendingPerAddress', `${maxPendingPerAddress} is more than limits.maxPendingConnections (${maxPendingConnections}): one address would fill a listener's pending pool`);
  }
  return {
    handshakeSeconds: number('handshakeSeconds', 0.1, 3600, false),
    idleSeconds: number('idleSeconds', 1, 86400, false),
    maxFrameBytes,
    maxConnections,
    maxPendingConnections,
    maxPendingPerAddress,
    maxGuestRamBytes,
    maxStores: number('maxStores', 1, 1_000_000, true),
    // QEMU numbers multifd channels with one byte.
    maxChannels: number('maxChannels', 1, 255, true),
  };
}

/**
 * The `peerVms:` block (null when absent): a mapping from peer name to a list of VM names or globs.
 * Peer names come from certificates, so it needs a `tls:` block; with `allowPeers` set, every name
 * must be one of them (another could never connect: most likely a typo).
 */
export function parsePeerVms(value: unknown, tls: TlsConfig | null, fail: Fail): PeerVmRule[] | null {
  if (value === undefined || value === null) return null;
  if (!isMapping(value)) return fail('peerVms', `must be a mapping of peer name → list of VM names or globs, not ${describe(value)}`);
  if (tls === null) return fail('peerVms', "needs a tls block: a peer's name is known only from its certificate");
  return Object.entries(value).map(([peer, list]) => {
    const key = `peerVms.${peer}`;
    if (!SITE_NAME.test(peer)) return fail(key, `${JSON.stringify(peer)} is not a peer name (1-64 characters of A-Z a-z 0-9 . _ -)`);
    if (tls.allowPeers !== null && !tls.allowPeers.includes(peer)) return fail(key, `"${peer}" is not in tls.allowPeers (${tls.allowPeers.join(', ')}), so it can never connect`);
    if (!Array.isArray(list) || list.length === 0) return fail(key, `must be a non-empty list of VM names or globs, not ${describe(list)}`);
    const patterns = (list as unknown[]).map((p, i) => {
      if (typeof p !== 'string' || !VM_PATTERN.test(p)) return fail(`${key}[${i}]`, `${describe(p)} is not a VM name or glob (1-64 characters of A-Z a-z 0-9 . _ - * ?)`);
      return p;
    });
    const glob = (p: string): string => p.replace(/[.]/g, '\\.').replace(/\*/g, '.*').replace(/\?/g, '.');
    return { peer, patterns, match: new RegExp(`^(?:${patterns.map(glob).join('|')})$`) };
  });
}

/**
 * May a peer whose certificate gives `peerNames` migrate `vm` to this gateway? Always, without a
 * `peerVms:` block; with one, only when one of its names lists a pattern matching the VM. Returns
 * why not, or null.
 */
export function peerVmError(rules: readonly PeerVmRule[] | null, peerNames: readonly string[], vm: string): string | null {
  if (rules === null) return null;
  const mine = rules.filter((r) => peerNames.includes(r.peer));
  if (mine.some((r) => r.match.test(vm))) return null;
  const who = peerNames.length > 0 ? peerNames.map((n) => JSON.stringify(n)).join(', ') : 'a peer without a certificate name';
  return mine.length === 0 ? `peerVms lists no VM for ${who}` : `VM ${vm} is not among peerVms for ${who} (${mine.flatMap((r) => r.patterns).join(', ')})`;
}
