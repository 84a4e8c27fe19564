/**
 * x509 credentials for QEMU's own migration TLS (`tls-creds`), made with the `openssl` command in
 * QEMU's directory layout (`ca-cert.pem`, `server-cert.pem`/`-key.pem`, `client-cert.pem`/`-key.pem`).
 * One certificate serves both ends: QEMU's x509 checks want key usage `digitalSignature,
 * keyEncipherment` and the purpose of each end (serverAuth, clientAuth), which bfmig's own gateway
 * certificates (`bfmig certs`) do not carry.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';

/** What a VM needs: its command-line objects and the migrate-set-parameters of each end. */
export interface QemuTlsCredentials {
  /** `-object tls-creds-x509` for both ends: a VM is a destination once and a source later. */
  args: string[];
  /** At the destination, before migrate-incoming. */
  incoming: Record<string, string>;
  /** At the source: it checks the destination's certificate against `tls-hostname`, not the address it dials (a gateway's). */
  outgoing: Record<string, string>;
}

export const QEMU_TLS_HOSTNAME = 'qemu-migration';

export function makeQemuTlsCredentials(dir: string): QemuTlsCredentials {
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const file = (name: string): string => path.join(dir, name);
  const openssl = (args: string[]): void => void execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  openssl(['req', '-x509', ...ec, '-keyout', file('ca-key.pem'), '-out', file('ca-cert.pem'), '-days', '2', '-subj', '/CN=bfmig test QEMU CA', '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign']);
  fs.writeFileSync(file('ext.cnf'), ['basicConstraints=critical,CA:FALSE', 'keyUsage=critical,digitalSignature,keyEncipherment', 'extendedKeyUsage=serverAuth,clientAuth', `subjectAltName=DNS:${QEMU_TLS_HOSTNAME}`, ''].join('\n'));
  openssl(['req', '-new', ...ec, '-keyout', file('server-key.pem'), '-out', file('server.csr'), '-subj', `/CN=${QEMU_TLS_HOSTNAME}`]);
  openssl(['x509', '-req', '-in', file('server.csr'), '-CA', file('ca-cert.pem'), '-CAkey', file('ca-key.pem'), '-set_serial', '1', '-days', '2', '-sha256', '-extfile', file('ext.cnf'), '-out', file('server-cert.pem')]);
  fs.copyFileSync(file('server-cert.pem'), file('client-cert.pem'));
  fs.copyFileSync(file('server-key.pem'), file('client-key.pem'));
  return {
    args: ['-object', `tls-creds-x509,id=mig-tls-in,endpoint=server,verify-peer=on,dir=${dir}`, '-object', `tls-creds-x509,id=mig-tls-out,endpoint=client,dir=${dir}`],
    incoming: { 'tls-creds': 'mig-tls-in' },
    outgoing: { 'tls-creds': 'mig-tls-out', 'tls-hostname': QEMU_TLS_HOSTNAME },
  };
}
