/**
 * A receiving peer that answers the Hello a byte at a time and never completes its Offer: the sender's
 * wait for the Offer is a deadline (HANDSHAKE_TIMEOUT_MS, shortened here), not an inactivity timeout
 * that every trickled byte would reset, so the source is cut instead of waiting for ever.
 */
import { FrameType } from '../src/wire/frames';
import { HostileReceiverRig, rawFrame } from './hostile-receiver';
import { guestMemory, migrationStream } from '../src/lab/harness/migration-stream';

jest.mock('../src/gateway/session', () => ({ ...jest.requireActual<object>('../src/gateway/session'), HANDSHAKE_TIMEOUT_MS: 1000 }));

describe('a receiving peer that trickles its Offer', () => {
  const rig = new HostileReceiverRig('bfmig-hostile-slow-');
  const stream = migrationStream(guestMemory([['pc.ram', 64]], 3), []);

  beforeAll(() => rig.start(), 30_000);
  afterAll(() => rig.stop());

  test('the sender fails the migration at its deadline and cuts the source', async () => {
    const before = rig.lastReport();
    const offer = rawFrame(FrameType.Offer, '{"site":"b","snapshotId":null,"layoutId":null,"pageCount":0,"presentPages":0}');
    rig.hostile = (c, f) => {
      if (f.type !== FrameType.Hello) return;
      let at = 0;
      const drip = setInterval(() => {
        if (c.socket.destroyed || at >= offer.length - 1) return void clearInterval(drip);
        c.socket.write(offer.subarray(at, ++at));
      }, 100);
      c.socket.on('close', () => clearInterval(drip));
    };
    const started = Date.now();
    const outcome = await rig.source(stream, 6000);
    const report = await rig.nextReport(before);
    expect(outcome.ending).not.toBe('hanging');
    expect(Date.now() - started).toBeLessThan(4000);
    expect(report).toMatchObject({ result: 'failed', snapshotId: null });
    expect(report.error).toMatch(/sent no Offer within 1 s/);
    expect(await rig.honest(stream)).toMatchObject({ identical: true, report: { result: 'completed' } });
  }, 30_000);
});
