/**
 * Mutual TLS between a real gateway pair on loopback, certificates from `bfmig certs`' issuer: a
 * migration through it is byte-exact, and every peer the receiving gateway must not trust — a
 * certificate from another CA, no certificate, a name not on allowPeers, plaintext, a target outside
 * allowTargets, a VM name that could leave the store directory, an oversized frame — is refused,
 * logged and counted before anything reaches a store.
 */
import { X509Certificate } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as tls from 'node:tls';
import { issueCerts } from '../src/cli/certs';
import { parseConfig } from '../src/gateway/config';
import { Gateway } from '../src/gateway/gateway';
import { createLogger } from '../src/gateway/log';
import { FrameType, frameHeader, MAX_HANDSHAKE_PAYLOAD } from '../src/wire/frames';
import { rawPeer, refusals, startPair, stopPair, type TestSite, waitFor } from '../src/lab/harness/gateway-pair';
import { destinationStandIn, sourceStandIn } from '../src/lab/harness/qemu-standins';
import { treeListing } from '../src/lab/harness/stores';
import { guestMemory, migrationStream } from '../src/lab/harness/migration-stream';
import { suiteTempDir } from './temp-dir';

describe('gateways over mutual TLS', () => {
  let tmp = '';
  let a: TestSite;
  let b: TestSite;
  let certs = '';
  let foreign = '';
  const read = (dir: string, name: string): Buffer => fs.readFileSync(path.join(dir, name));
  const memory = guestMemory(
    [
      ['pc.ram', 500],
      ['vga', 20],
    ],
    5,
  );
  const stream = migrationStream(memory, [[3, 9, 200]]);

  beforeAll(async () => {
    tmp = suiteTempDir('bfmig-tls-');
    certs = path.join(tmp, 'certs');
    foreign = path.join(tmp, 'foreign');
    issueCerts(certs, ['site-a', 'site-b', 'site-c'], 30);
    // Another CA, issuing a certificate that claims to be site-a.
    issueCerts(foreign, ['site-a'], 30);
    const block = (site: string, peer: string): string =>
      `tls:\n  cert: ${certs}/${site}.crt\n  key: ${certs}/${site}.key\n  ca: ${certs}/ca.crt\n  allowPeers: [${peer}]\n`;
    [a, b] = await startPair(tmp, [block('site-a', 'site-b'), block('site-b', 'site-a')]);
  });

  afterAll(() => stopPair([a, b]));

  const refusedCount = async (site: TestSite, reason: string): Promise<number> => {
    const text = await site.metrics.text();
    const m = new RegExp(`bfmig_connections_refused_total\\{listener="peer",reason="${reason}"\\} (\\d+)`).exec(text);
    return m ? Number(m[1]) : 0;
  };

  /** Runs `attempt` against site B and checks it was refused for `reason` with B's store untouched. */
  async function expectRefused(reason: string, attempt: () => Promise<void>): Promise<{ error: string }> {
    const before = treeListing(b.data);
    const countBefore = await refusedCount(b, reason);
    const logged = refusals(b).length;
    await attempt();
    await waitFor(() => refusals(b).length > logged);
    const line = refusals(b)[logged];
    expect(line).toMatchObject({ listener: 'peer', reason });
    expect(await refusedCount(b, reason)).toBe(countBefore + 1);
    expect(treeListing(b.data)).toEqual(before);
    return line;
  }

  test('a migration A → B → A over mutual TLS 1.3 is byte-exact and the way back reuses pages', async () => {
    let dest = await destinationStandIn(b.destPort);
    expect(await sourceStandIn(a.routePort, stream)).toBe('closed');
    let got = await dest.received;
    expect(got.bytes.equals(stream)).toBe(true);
    await waitFor(() => a.gateway.history.length === 1 && b.gateway.history.length === 1);
    expect(a.gateway.history[0]).toMatchObject({ direction: 'send', result: 'completed', mode: 'none' });

    dest = await destinationStandIn(a.destPort);
    expect(await sourceStandIn(b.routePort, stream)).toBe('closed');
    got = await dest.received;
    expect(got.bytes.equals(stream)).toBe(true);
    await waitFor(() => b.gateway.history.length === 2);
    const back = b.gateway.history[1];
    expect(back).toMatchObject({ direction: 'send', result: 'completed', mode: 'shared-snapshot' });
    expect(back.counts.pagesReused).toBeGreaterThan(300);
    expect(a.logs.find((l) => l.msg === 'gateway started')).toMatchObject({ tls: true, allowPeers: ['site-b'] });

    // What the gateway speaks: TLS 1.3, and a certificate naming site-b.
    const probe = tls.connect({ host: '127.0.0.1', port: b.peerPort, ca: read(certs, 'ca.crt'), cert: read(certs, 'site-a.crt'), key: read(certs, 'site-a.key'), checkServerIdentity: () => undefined });
    await new Promise<void>((r) => probe.once('secureConnect', r));
    expect(probe.getProtocol()).toBe('TLSv1.3');
    expect(probe.authorized).toBe(true);
    expect(probe.getPeerCertificate().subject.CN).toBe('site-b');
    const logged = refusals(b).length;
    probe.destroy();
    // A verified peer that leaves without a Hello is a refusal too (logged, counted, nothing stored).
    await waitFor(() => refusals(b).length > logged);
    expect(refusals(b)[logged]).toMatchObject({ reason: 'closed' });
  });

  test('each gateway exports when its own, the CA\'s and its verified peer\'s certificates expire', async () => {
    // After the migrations above, A has dialled B and accepted B's dial: both paths verified a peer.
    const notAfter = (name: string): number => new Date(new X509Certificate(read(certs, name)).validTo).getTime() / 1000;
    for (const [site, self, peer] of [
      [a, 'site-a', 'site-b'],
      [b, 'site-b', 'site-a'],
    ] as const) {
      const lines = (await site.metrics.text()).split('\n').filter((l) => l.startsWith('bfmig_tls_certificate_expiry_timestamp_seconds{'));
      expect(lines.sort()).toEqual([
        `bfmig_tls_certificate_expiry_timestamp_seconds{certificate="ca",peer=""} ${notAfter('ca.crt')}`,
        `bfmig_tls_certificate_expiry_timestamp_seconds{certificate="own",peer=""} ${notAfter(`${self}.crt`)}`,
        `bfmig_tls_certificate_expiry_timestamp_seconds{certificate="peer",peer="${peer}"} ${notAfter(`${peer}.crt`)}`,
      ]);
    }
  });

  test('a peer whose certificate another CA issued is refused before any store write', async () => {
    await expectRefused('tls', async () => {
      const peer = await rawPeer(b.peerPort, { cert: read(foreign, 'site-a.crt'), key: read(foreign, 'site-a.key') }).catch(() => null);
      peer?.hello('vm1', `127.0.0.1:${b.destPort}`);
      await peer?.closed;
    });
  });

  test('a peer without a certificate is refused', async () => {
    const line = await expectRefused('tls', async () => {
      const peer = await rawPeer(b.peerPort, {}).catch(() => null);
      peer?.hello('vm1', `127.0.0.1:${b.destPort}`);
      await peer?.closed;
    });
    expect(line.error).toMatch(/certificate/i);
  });

  test('a peer with a valid certificate whose name is not on allowPeers is refused', async () => {
    const line = await expectRefused('peer-not-allowed', async () => {
      const peer = await rawPeer(b.peerPort, { cert: read(certs, 'site-c.crt'), key: read(certs, 'site-c.key') }).catch(() => null);
      peer?.hello('vm1', `127.0.0.1:${b.destPort}`);
      await peer?.closed;
    });
    expect(line.error).toMatch(/"site-c", not one of allowPeers \(site-a\)/);
  });

  test('a sending gateway refuses a receiving gateway whose certificate is not on its allowPeers', async () => {
    // Site C has a certificate from the same CA; a gateway sending vm9 to it accepts only site-b.
    const start = async (name: string, yaml: string): Promise<Gateway> => {
      const gateway = new Gateway(parseConfig(`name: ${name}\ndata: ${tmp}/${name}\npeerListen: 127.0.0.1:0\n${yaml}`), createLogger({ name, level: 'silent' }), null);
      await gateway.start();
      return gateway;
    };
    const tlsAs = (site: string, allow: string): string => `tls:\n  cert: ${certs}/${site}.crt\n  key: ${certs}/${site}.key\n  ca: ${certs}/ca.crt\n${allow}`;
    const c = await start('site-c', tlsAs('site-c', ''));
    const sender = await start(
      'sender',
      tlsAs('site-a', '  allowPeers: [site-b]\n') +
        `routes:\n  - vm: vm9\n    listen: 127.0.0.1:0\n    peer: 127.0.0.1:${c.bound.get('peer')?.port}\n    target: 127.0.0.1:${b.destPort}\n`,
    );
    try {
      expect(await sourceStandIn(sender.bound.get('route:vm9')?.port ?? 0, stream)).toBe('reset');
      await waitFor(() => sender.history.length === 1);
      expect(sender.history[0]).toMatchObject({ direction: 'send', result: 'failed' });
      expect(sender.history[0].error).toMatch(/"site-c", not one of allowPeers \(site-b\)/);
      expect(c.history).toEqual([]);
      expect(treeListing(path.join(tmp, 'site-c'))).toEqual([]);
    } finally {
      await sender.stop(1);
      await c.stop(1);
    }
  });

  test('plaintext frames to a TLS gateway are refused', async () => {
    await expectRefused('tls', async () => {
      const peer = await rawPeer(b.peerPort);
      peer.hello('vm1', `127.0.0.1:${b.destPort}`);
      await peer.closed;
    });
  });

  describe('an authenticated peer asking for what it must not get', () => {
    const asSiteA = (): Promise<Awaited<ReturnType<typeof rawPeer>>> => rawPeer(b.peerPort, { cert: read(certs, 'site-a.crt'), key: read(certs, 'site-a.key') });

    test.each([['10.9.9.9:4444'], ['192.168.1.1:22'], ['[2001:db8::1]:4444'], ['dest.example:4444'], ['not-an-endpoint']])(
      'a destination outside allowTargets (%s) is refused, logged and answered with an Abort',
      async (target) => {
        let abort: string | null = null;
        const line = await expectRefused('target-not-allowed', async () => {
          const peer = await asSiteA();
          peer.hello('vm1', target);
          await peer.closed;
          abort = peer.abortText();
        });
        expect(line.error).toMatch(/destination/);
        expect(abort).toMatch(/destination/);
      },
    );

    test.each([['../escape'], ['..'], ['.'], ['a/b'], [''], ['x'.repeat(65)], ['-leading-dash'], ['vm\u0000'], ['ünïcode']])(
      'a VM name that could leave the store directory (%j) is refused; nothing is created anywhere',
      async (vm) => {
        const parent = treeListing(tmp).filter((l) => !l.startsWith('certs') && !l.startsWith('foreign'));
        await expectRefused('bad-vm-name', async () => {
          const peer = await asSiteA();
          peer.hello(vm, `127.0.0.1:${b.destPort}`);
          await peer.closed;
        });
        expect(treeListing(tmp).filter((l) => !l.startsWith('certs') && !l.startsWith('foreign'))).toEqual(parent);
      },
    );

    test('a frame larger than a Hello before the Hello is refused from its header', async () => {
      await expectRefused('frame-too-large', async () => {
        const peer = await asSiteA();
        // Only the header: the gateway must refuse without waiting for (or buffering) the payload.
        peer.socket.write(frameHeader(FrameType.Hello, MAX_HANDSHAKE_PAYLOAD + 1));
        await peer.closed;
      });
    });

    test('after the Hello, a frame above limits.maxFrameBytes fails the migration; the destination is reset', async () => {
      const dest = await destinationStandIn(b.destPort);
      const peer = await asSiteA();
      const history = b.gateway.history.length;
      peer.hello('vm1', `127.0.0.1:${b.destPort}`);
      await waitFor(() => peer.frames.some((f) => f.type === FrameType.Offer));
      peer.socket.write(Buffer.from([FrameType.Run, 0x00, 0x40, 0x00, 0x01])); // 4 MiB + 1
      await peer.closed;
      expect((await dest.received).bytes.length).toBe(0);
      await waitFor(() => b.gateway.history.length > history);
      expect(b.gateway.history[history]).toMatchObject({ direction: 'receive', result: 'failed' });
      expect(b.gateway.history[history].error).toMatch(/exceeds 4194304/);
      expect(peer.abortText()).toMatch(/exceeds/);
    });
  });
});
