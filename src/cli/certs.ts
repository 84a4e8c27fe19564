/**
 * `bfmig certs`: a private CA and one certificate per site for mutual TLS between gateways, made with
 * the `openssl` command (Node can verify certificates but not issue them). Keys are ECDSA P-256.
 *
 * DIR/ca.crt, DIR/ca.key         the CA (ca.key signs; keep it off the gateways). Reused when present,
 *                                so running again with new site names adds sites to the same CA.
 * DIR/<site>.crt, DIR/<site>.key a site's certificate (CN and DNS subjectAltName = the site name,
 *                                serverAuth + clientAuth: a gateway both accepts and dials peers)
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { SITE_NAME } from '../gateway/config-schema';

export const DEFAULT_CERT_DAYS = 825;
const CA_DAYS = 3650;

export interface IssuedCerts {
  ca: { cert: string; key: string; created: boolean };
  sites: Array<{ site: string; cert: string; key: string }>;
}

export function issueCerts(outDir: string, sites: readonly string[], days = DEFAULT_CERT_DAYS): IssuedCerts {
  if (sites.length === 0) throw new Error('no site names given');
  for (const site of sites) {
    if (!SITE_NAME.test(site)) throw new Error(`site name "${site}" must be 1-64 characters of A-Z a-z 0-9 . _ -`);
  }
  if (new Set(sites).size !== sites.length) throw new Error('a site name is given twice');
  if (!Number.isInteger(days) || days < 1 || days > CA_DAYS) throw new Error(`--days ${days} is out of range (1..${CA_DAYS})`);
  const dir = path.resolve(outDir);
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  for (const site of sites) {
    for (const ext of ['crt', 'key']) {
      const file = path.join(dir, `${site}.${ext}`);
      if (fs.existsSync(file)) throw new Error(`${file} exists; remove it to issue a new certificate for ${site}`);
    }
  }

  const caCert = path.join(dir, 'ca.crt');
  const caKey = path.join(dir, 'ca.key');
  const haveCa = fs.existsSync(caCert) && fs.existsSync(caKey);
  if (!haveCa) {
    if (fs.existsSync(caCert) || fs.existsSync(caKey)) throw new Error(`${dir} has only one of ca.crt and ca.key`);
    openssl([
      'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
      '-keyout', caKey, '-out', caCert, '-days', String(CA_DAYS), '-subj', '/CN=bfmig gateway CA',
      '-addext', 'basicConstraints=critical,CA:TRUE,pathlen:0',
      '-addext', 'keyUsage=critical,keyCertSign,cRLSign',
    ]);
    fs.chmodSync(caKey, 0o600);
  }

  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'bfmig-certs-'));
  try {
    const issued = sites.map((site) => {
      const cert = path.join(dir, `${site}.crt`);
      const key = path.join(dir, `${site}.key`);
      const csr = path.join(work, `${site}.csr`);
      const ext = path.join(work, `${site}.ext`);
      openssl(['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-out', csr, '-subj', `/CN=${site}`]);
      fs.chmodSync(key, 0o600);
      fs.writeFileSync(
        ext,
        ['basicConstraints=critical,CA:FALSE', 'keyUsage=critical,digitalSignature', 'extendedKeyUsage=serverAuth,clientAuth', `subjectAltName=DNS:${site}`, ''].join('\n'),
      );
      // A random positive 128-bit serial: no serial file to keep beside the CA.
      const serial = randomBytes(16);
      serial[0] &= 0x7f;
      openssl(['x509', '-req', '-in', csr, '-CA', caCert, '-CAkey', caKey, '-set_serial', `0x${serial.toString('hex')}`, '-days', String(days), '-sha256', '-extfile', ext, '-out', cert]);
      return { site, cert, key };
    });
    return { ca: { cert: caCert, key: caKey, created: !haveCa }, sites: issued };
  } finally {
    fs.rmSync(work, { recursive: true, force: true });
  }
}

/** The `tls:` block each site's config needs, with every other site as its allowed peer. */
export function configSnippets(issued: IssuedCerts): string {
  const names = issued.sites.map((s) => s.site);
  return issued.sites
    .map((s) => {
      const others = names.filter((n) => n !== s.site);
      return [
        `# ${s.site}: copy ${path.basename(issued.ca.cert)}, ${path.basename(s.cert)} and ${path.basename(s.key)} to its gateway`,
        'tls:',
        `  cert: ${s.cert}`,
        `  key: ${s.key}`,
        `  ca: ${issued.ca.cert}`,
        ...(others.length > 0 ? [`  allowPeers: [${others.join(', ')}]`] : []),
      ].join('\n');
    })
    .join('\n\n');
}

function openssl(args: string[]): void {
  try {
    execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stderr?: Buffer };
    if (e.code === 'ENOENT') throw new Error('bfmig certs needs the openssl command (Debian: apt-get install openssl)');
    throw new Error(`openssl ${args[0]} failed: ${e.stderr?.toString().trim() || e.message}`);
  }
}
