/**
 * The tls: and limits: blocks of a gateway config, with certificates made by `bfmig certs`' issuer:
 * every problem stops start-up with a message naming the key; checkTransportSecurity lets a gateway
 * with TLS face the network.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { configSnippets, issueCerts } from '../src/cli/certs';
import { checkTransportSecurity, ConfigError, parseConfig } from '../src/gateway/config';
import { peerVmError } from '../src/gateway/security-config';
import { suiteTempDir } from './temp-dir';

describe('tls: and limits: config', () => {
  let dir = '';
  let other = '';
  beforeAll(() => {
    dir = suiteTempDir('bfmig-seccfg-');
    other = path.join(dir, 'other');
    issueCerts(dir, ['site-a', 'site-b'], 30);
    issueCerts(other, ['site-a'], 30);
  });

  const config = (extra: string, peerListen = '0.0.0.0:7300'): string => `name: site-a\ndata: ${dir}/store\npeerListen: ${peerListen}\n${extra}`;
  const tlsBlock = (cert = 'site-a.crt', key = 'site-a.key', ca = 'ca.crt', more = ''): string => `tls:\n  cert: ${cert}\n  key: ${key}\n  ca: ${ca}\n${more}`;
  const parse = (text: string): ReturnType<typeof parseConfig> => parseConfig(text, path.join(dir, 'site-a.yaml'));
  const errorOf = (text: string): ConfigError => {
    try {
      parse(text);
    } catch (err) {
      if (err instanceof ConfigError) return err;
      throw err;
    }
    throw new Error('expected a ConfigError');
  };

  test('a tls block with paths relative to the config file parses; a gateway with it may face the network', () => {
    const c = parse(config(tlsBlock(undefined, undefined, undefined, '  allowPeers: [site-b]\n')));
    expect(c.tls).toMatchObject({ certFile: path.join(dir, 'site-a.crt'), caFile: path.join(dir, 'ca.crt'), allowPeers: ['site-b'] });
    expect(c.tls?.validTo.getTime()).toBeGreaterThan(Date.now());
    expect(checkTransportSecurity(c)).toEqual({ warn: null });
    // Without it the same gateway is refused, and the message says what to do.
    expect(() => checkTransportSecurity(parse(config('')))).toThrow(/no tls block is configured.*bfmig certs.*insecurePlaintext: true/);
  });

  test.each<[string, () => string, string, RegExp]>([
    ['tls not a mapping', () => config('tls: true\n'), 'tls', /must be a mapping/],
    ['unknown tls key', () => config(tlsBlock(undefined, undefined, undefined, '  verify: false\n')), 'tls.verify', /unknown key "tls.verify"/],
    ['missing cert', () => config('tls:\n  key: site-a.key\n  ca: ca.crt\n'), 'tls.cert', /is required/],
    ['missing ca', () => config('tls:\n  cert: site-a.crt\n  key: site-a.key\n'), 'tls.ca', /is required/],
    ['unreadable cert', () => config(tlsBlock('nowhere.crt')), 'tls.cert', /cannot read .*nowhere\.crt/],
    ['cert is not PEM', () => config(tlsBlock('site-a.key')), 'tls.cert', /not a PEM certificate/],
    ['key is not a key', () => config(tlsBlock(undefined, 'site-a.crt')), 'tls.key', /not a PEM private key/],
    ['key of another certificate', () => config(tlsBlock(undefined, 'site-b.key')), 'tls.key', /not the private key of/],
    ['ca is a site certificate', () => config(tlsBlock(undefined, undefined, 'site-b.crt')), 'tls.ca', /not a CA certificate/],
    ['cert from another CA', () => config(tlsBlock('other/site-a.crt', 'other/site-a.key')), 'tls.cert', /not issued by the CA/],
    ['allowPeers not a list', () => config(tlsBlock(undefined, undefined, undefined, '  allowPeers: site-b\n')), 'tls.allowPeers', /non-empty list/],
    ['allowPeers empty', () => config(tlsBlock(undefined, undefined, undefined, '  allowPeers: []\n')), 'tls.allowPeers', /non-empty list/],
    ['allowPeers bad name', () => config(tlsBlock(undefined, undefined, undefined, '  allowPeers: ["site b"]\n')), 'tls.allowPeers[0]', /not a peer name/],
    ['limits not a mapping', () => config('limits: 5\n'), 'limits', /must be a mapping/],
    ['unknown limits key', () => config('limits:\n  maxConns: 5\n'), 'limits.maxConns', /unknown key/],
    ['handshakeSeconds zero', () => config('limits:\n  handshakeSeconds: 0\n'), 'limits.handshakeSeconds', /out of range/],
    ['idleSeconds a string', () => config('limits:\n  idleSeconds: soon\n'), 'limits.idleSeconds', /must be a number/],
    ['maxConnections fractional', () => config('limits:\n  maxConnections: 2.5\n'), 'limits.maxConnections', /whole number/],
    ['maxFrameBytes below a digest-table frame', () => config('limits:\n  maxFrameBytes: 64KiB\n'), 'limits.maxFrameBytes', /out of range/],
    ['maxFrameBytes above the protocol maximum', () => config('limits:\n  maxFrameBytes: 1GiB\n'), 'limits.maxFrameBytes', /out of range/],
    ['maxFrameBytes not a size', () => config('limits:\n  maxFrameBytes: big\n'), 'limits.maxFrameBytes', /not a size/],
    ['maxGuestRam above what a store can index', () => config('limits:\n  maxGuestRam: 2TiB\n'), 'limits.maxGuestRam', /out of range/],
    ['maxGuestRam not a size', () => config('limits:\n  maxGuestRam: lots\n'), 'limits.maxGuestRam', /not a size/],
    ['maxPendingConnections above maxConnections', () => config('limits:\n  maxConnections: 10\n  maxPendingConnections: 20\n'), 'limits.maxPendingConnections', /more than limits\.maxConnections/],
    ['maxPendingPerAddress above maxPendingConnections', () => config('limits:\n  maxPendingConnections: 4\n  maxPendingPerAddress: 5\n'), 'limits.maxPendingPerAddress', /more than limits\.maxPendingConnections/],
    ['maxPendingPerAddress zero', () => config('limits:\n  maxPendingPerAddress: 0\n'), 'limits.maxPendingPerAddress', /out of range/],
    ['maxChannels past what QEMU numbers', () => config('limits:\n  maxChannels: 256\n'), 'limits.maxChannels', /out of range/],
    ['peerVms without tls', () => config('peerVms:\n  site-b: [vm1]\n'), 'peerVms', /needs a tls block/],
    ['peerVms not a mapping', () => config(`${tlsBlock()}peerVms: [vm1]\n`), 'peerVms', /must be a mapping/],
    ['peerVms peer not in allowPeers', () => config(`${tlsBlock(undefined, undefined, undefined, '  allowPeers: [site-b]\n')}peerVms:\n  site-x: [vm1]\n`), 'peerVms.site-x', /not in tls\.allowPeers/],
    ['peerVms list empty', () => config(`${tlsBlock()}peerVms:\n  site-b: []\n`), 'peerVms.site-b', /non-empty list/],
    ['peerVms bad pattern', () => config(`${tlsBlock()}peerVms:\n  site-b: [vm1, "../x"]\n`), 'peerVms.site-b[1]', /not a VM name or glob/],
    ['maxStores zero', () => config('limits:\n  maxStores: 0\n'), 'limits.maxStores', /out of range/],
    ['maxStores fractional', () => config('limits:\n  maxStores: 1.5\n'), 'limits.maxStores', /whole number/],
  ])('%s', (_what, text, key, message) => {
    const err = errorOf(text());
    expect(err.key).toBe(key);
    expect(err.message).toMatch(message);
  });

  test('an expired certificate is refused', () => {
    const expired = path.join(dir, 'expired');
    fs.mkdirSync(expired);
    fs.copyFileSync(path.join(dir, 'ca.crt'), path.join(expired, 'ca.crt'));
    fs.copyFileSync(path.join(dir, 'ca.key'), path.join(expired, 'ca.key'));
    execFileSync('openssl', ['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', `${expired}/old.key`, '-out', `${expired}/old.csr`, '-subj', '/CN=old'], { stdio: 'ignore' });
    // -days -1: a certificate that ended a day before it began.
    execFileSync('openssl', ['x509', '-req', '-in', `${expired}/old.csr`, '-CA', `${expired}/ca.crt`, '-CAkey', `${expired}/ca.key`, '-set_serial', '7', '-days', '-1', '-out', `${expired}/old.crt`], { stdio: 'ignore' });
    const err = errorOf(config(tlsBlock('expired/old.crt', 'expired/old.key')));
    expect(err.key).toBe('tls.cert');
    expect(err.message).toMatch(/old\.crt expired on \d{4}-/);
  });

  test('limits: defaults, and values as written', () => {
    expect(parse(config('', '127.0.0.1:7300')).limits).toEqual({
      handshakeSeconds: 10,
      idleSeconds: 120,
      maxFrameBytes: 4 * 1024 * 1024,
      maxConnections: 256,
      maxPendingConnections: 64,
      maxPendingPerAddress: 40,
      maxGuestRamBytes: 256 * 2 ** 30,
      maxStores: 1024,
      maxChannels: 16,
    });
    expect(
      parse(
        config(
          'limits:\n  handshakeSeconds: 2.5\n  idleSeconds: 30\n  maxFrameBytes: 2MiB\n  maxConnections: 500\n  maxPendingConnections: 100\n  maxPendingPerAddress: 3\n  maxGuestRam: 512GiB\n  maxStores: 20\n  maxChannels: 8\n',
          '127.0.0.1:7300',
        ),
      ).limits,
    ).toEqual({
      handshakeSeconds: 2.5,
      idleSeconds: 30,
      maxFrameBytes: 2 * 1024 * 1024,
      maxConnections: 500,
      maxPendingConnections: 100,
      maxPendingPerAddress: 3,
      maxGuestRamBytes: 512 * 2 ** 30,
      maxStores: 20,
      maxChannels: 8,
    });
    // A small maxConnections alone stays valid: the pending limits' defaults shrink to fit under it.
    expect(parse(config('limits:\n  maxConnections: 6\n', '127.0.0.1:7300')).limits).toMatchObject({ maxPendingConnections: 6, maxPendingPerAddress: 6 });
  });

  test('peerVms: names and globs per peer; none for an unlisted peer', () => {
    const c = parse(config(`${tlsBlock(undefined, undefined, undefined, '  allowPeers: [site-b, site-c]\n')}peerVms:\n  site-b: [vm1, "web-*", "db-?", app.1]\n`));
    expect(c.peerVms?.map((r) => [r.peer, r.patterns])).toEqual([['site-b', ['vm1', 'web-*', 'db-?', 'app.1']]]);
    expect(peerVmError(c.peerVms, ['site-b'], 'vm1')).toBeNull();
    expect(peerVmError(c.peerVms, ['site-b'], 'web-frontend.2')).toBeNull();
    expect(peerVmError(c.peerVms, ['site-b'], 'db-1')).toBeNull();
    expect(peerVmError(c.peerVms, ['site-b'], 'db-12')).toMatch(/VM db-12 is not among peerVms for "site-b"/);
    expect(peerVmError(c.peerVms, ['site-b'], 'vm10')).not.toBeNull();
    expect(peerVmError(c.peerVms, ['site-b'], 'app.1')).toBeNull();
    expect(peerVmError(c.peerVms, ['site-b'], 'appx1')).not.toBeNull();
    expect(peerVmError(c.peerVms, ['site-c'], 'vm1')).toMatch(/peerVms lists no VM for "site-c"/);
    expect(peerVmError(null, [], 'anything')).toBeNull();
  });

  test('bfmig certs: reuses the CA for new sites, refuses to overwrite, prints blocks that parse', () => {
    const issued = issueCerts(dir, ['site-c'], 10);
    expect(issued.ca.created).toBe(false);
    expect(() => issueCerts(dir, ['site-a'])).toThrow(/site-a\.crt exists/);
    expect(() => issueCerts(dir, ['bad/name'])).toThrow(/site name/);
    expect(fs.statSync(path.join(dir, 'site-c.key')).mode & 0o777).toBe(0o600);
    const snippet = configSnippets(issueCerts(path.join(dir, 'fresh'), ['x', 'y'], 5));
    const blockOfX = snippet.split('\n\n')[0].split('\n').slice(1).join('\n');
    expect(blockOfX).toMatch(/allowPeers: \[y\]/);
    expect(parse(config(`${blockOfX}\n`)).tls).toMatchObject({ allowPeers: ['y'] });
  });
});
