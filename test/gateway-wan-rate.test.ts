/**
 * WanRate: what a sending session's WAN takes a second, which decides whether a store read at the
 * receiver is worth a page's crossing; WanPace: what a sending connection tells its compression policy
 * per source chunk.
 */
import { type LoopLoadSource, WanPace } from '../src/gateway/wan-pace';
import { ASSUMED_BYTES_PER_SECOND, LINK_WINDOW_MS, WanRate, WINDOW_MS } from '../src/gateway/wan-rate';
import { CompressionPolicy, DRAINED_BYTES } from '../src/wire/compression-policy';

describe('WanRate', () => {
  test('unmeasured until a whole window has passed, then bytes handed on over that window', () => {
    const rate = new WanRate();
    expect(rate.slowerThan(1e12)).toBe(false);
    expect(rate.fasterThan(0)).toBe(false);
    rate.observe(0, 1000);
    rate.observe(5_000_000, 1000 + WINDOW_MS / 2); // a first burst into the kernel's buffer
    expect(rate.bytesPerSecond).toBe(-1);
    expect(rate.slowerThan(1e12)).toBe(false);
    rate.observe(6_000_000, 1000 + 2 * WINDOW_MS);
    expect(rate.bytesPerSecond).toBeCloseTo(6_000_000 / ((2 * WINDOW_MS) / 1000));
    // 12.5 MB/s (100 Mbit/s) from then on: slower than 16 MB/s, a page there takes longer than 250 µs.
    rate.observe(6_000_000 + 12_500_000 * 0.2, 1000 + 2 * WINDOW_MS + 200);
    expect(rate.bytesPerSecond).toBeCloseTo(12_500_000);
    expect(rate.slowerThan(16_384_000)).toBe(true);
    // 1 Gbit/s: faster.
    rate.observe(8_500_000 + 125_000_000 * 0.1, 1000 + 2 * WINDOW_MS + 300);
    expect(rate.bytesPerSecond).toBeCloseTo(125_000_000);
    expect(rate.slowerThan(16_384_000)).toBe(false);
    // Slower than the 256 MB/s past which a match's work here costs more than the page's crossing.
    expect(rate.fasterThan(4096 / 16e-6)).toBe(false);
    rate.observe(21_000_000 + 500_000_000 * 0.1, 1000 + 2 * WINDOW_MS + 400);
    expect(rate.fasterThan(4096 / 16e-6)).toBe(true);
  });

  test('a link that took nothing over a window is slow, not unmeasured', () => {
    const rate = new WanRate();
    rate.observe(100, 0);
    rate.observe(100, 2 * WINDOW_MS);
    expect(rate.bytesPerSecond).toBe(0);
    expect(rate.slowerThan(1)).toBe(true);
  });

  test("a page's WAN time: at the measured rate while the WAN holds the session back, else at most a fast link's", () => {
    const rate = new WanRate();
    const fastLinkPage = (4096 * 1e6) / ASSUMED_BYTES_PER_SECOND;
    // Unmeasured: a fast link's, held back or not.
    expect(rate.pageMicros(4096, true)).toBeCloseTo(fastLinkPage);
    expect(rate.pageMicros(4096, false)).toBeCloseTo(fastLinkPage);
    // 12.5 MB/s measured: the link's rate while it holds the session back (328 µs a page)...
    rate.observe(0, 0);
    rate.observe(12_500_000 * 0.2, 200);
    expect(rate.pageMicros(4096, true)).toBeCloseTo(327.68);
    // ...and otherwise only what the session used of it, which a fast link's price bounds.
    expect(rate.pageMicros(4096, false)).toBeCloseTo(fastLinkPage);
    // A back leg that sent next to nothing: the link is no slower for it.
    rate.observe(12_500_000 * 0.2 + 100, 400);
    expect(rate.pageMicros(4096, false)).toBeCloseTo(fastLinkPage);
    // Faster than the assumed link, measured either way: its own rate.
    rate.observe(12_500_000 * 0.2 + 100 + 500_000_000 * 0.2, 600);
    expect(rate.pageMicros(4096, false)).toBeCloseTo(8.192);
    expect(rate.pageMicros(4096, true)).toBeCloseTo(8.192);
  });

  test("the link's own rate: bytes handed on across held-back intervals only, added up however far apart", () => {
    const rate = new WanRate();
    let sent = 0;
    let now = 0;
    const step = (ms: number, bytesPerSecond: number, heldBack: boolean): void => {
      now += ms;
      sent += (bytesPerSecond * ms) / 1000;
      rate.observe(sent, now, heldBack);
    };
    rate.observe(0, 0, true);
    // Compressed stretches the link drained through, at 40 MB/s, between short raw ones it held back at
    // 125 MB/s: the session's rate is the mix, the link's the held-back intervals'.
    for (let i = 0; i < 10; i++) {
      step(20, 40e6, false);
      step(2, 125e6, true);
      step(2, 125e6, true);
      step(2, 125e6, true);
    }
    expect(rate.bytesPerSecond).toBeGreaterThan(0);
    expect(rate.bytesPerSecond).toBeLessThan(60e6);
    expect(rate.linkBytesPerSecond).toBeCloseTo(125e6);
    // 60 ms held back in all: measured once (each LINK_WINDOW_MS of it), as the session's end logs it.
    expect(rate.linkReport).toEqual({ linkBytesPerSecond: 125_000_000, linkMeasurements: 1, linkStated: false });
    // Not measured before LINK_WINDOW_MS of held-back time.
    const fresh = new WanRate();
    fresh.observe(0, 0, true);
    fresh.observe(125_000, 1, true);
    fresh.observe(125_000 * (LINK_WINDOW_MS - 2), LINK_WINDOW_MS - 2, true);
    expect(fresh.linkBytesPerSecond).toBe(-1);
    expect(fresh.linkReport).toEqual({ linkBytesPerSecond: -1, linkMeasurements: 0, linkStated: false });
    // A first held-back observation measures no interval: the one before it was not seen.
    const late = new WanRate();
    late.observe(1e9, 10_000, true);
    expect(late.linkBytesPerSecond).toBe(-1);
    // A rate the operator stated stands for the measured one, which is still counted.
    rate.knownLinkBytesPerSecond = 31.25e6;
    expect(rate.linkBytesPerSecond).toBe(31.25e6);
    expect(rate.linkReport).toEqual({ linkBytesPerSecond: 31_250_000, linkMeasurements: 1, linkStated: true });
  });
});

describe('WanPace', () => {
  const CHUNK = 256 * 1024;
  /** The loop's load as a test sets it: busy (and idle) milliseconds told to the policy per chunk. */
  class SetLoad implements LoopLoadSource {
    busyMs = 0;
    idleMs = 0;
    tell(policy: CompressionPolicy): void {
      policy.observeLoop(this.busyMs, this.idleMs);
    }
  }

  /**
   * A connection held back by a 125 MB/s link for `ms` (1 MiB queued in its socket throughout), then
   * drained chunks taken in at `drainedMBps` with the loop always busy: whether compression still pays.
   */
  function run(ms: number, drainedMBps: number): { pace: WanPace; policy: CompressionPolicy; heldBackSeen: boolean } {
    const load = new SetLoad();
    const pace = new WanPace(load);
    const policy = new CompressionPolicy();
    let now = 1000;
    let written = 0;
    let heldBackSeen = false;
    const chunkMs = (CHUNK / 125e6) * 1000;
    load.busyMs = chunkMs / 2;
    load.idleMs = chunkMs / 2;
    for (let t = 0; t < ms; t += chunkMs) {
      written += CHUNK;
      now += chunkMs;
      heldBackSeen = pace.observe(policy, 2 ** 20, written, CHUNK, now) || heldBackSeen;
    }
    // The socket drains: everything written is handed on, and the gateway's own CPU sets the pace.
    const drainedMs = (CHUNK / (drainedMBps * 1e6)) * 1000;
    load.busyMs = drainedMs;
    load.idleMs = 0;
    for (let i = 0; i < (3 * DRAINED_BYTES) / CHUNK; i++) {
      written += CHUNK;
      now += drainedMs;
      pace.observe(policy, 0, written, CHUNK, now);
      policy.noteLiteral(CHUNK); // every chunk crosses as Literal bytes: no back leg's sparse share
    }
    return { pace, policy, heldBackSeen };
  }

  test("tells the policy the link's rate measured while held back: a stretch taken in faster than the link keeps compression on", () => {
    const { pace, policy, heldBackSeen } = run(2 * LINK_WINDOW_MS, 145);
    expect(heldBackSeen).toBe(true);
    expect(pace.rate.linkBytesPerSecond).toBeCloseTo(125e6, -5);
    expect(policy.savingPays).toBe(true);
    // Taken in slower than the link would take it raw: backs off.
    expect(run(2 * LINK_WINDOW_MS, 105).policy.savingPays).toBe(false);
    // Not held back long enough to measure the link: the stretch cannot be weighed, and backs off.
    const short = run(LINK_WINDOW_MS / 2, 145);
    expect(short.pace.rate.linkBytesPerSecond).toBe(-1);
    expect(short.policy.savingPays).toBe(false);
  });

  test('without a policy (compression off) the connection is measured all the same, never held back', () => {
    const pace = new WanPace(new SetLoad());
    let written = 0;
    for (let i = 0; i <= 10; i++) {
      written += 1_250_000;
      expect(pace.observe(null, 2 ** 20, written, 1_250_000, i * 10 * 2)).toBe(false);
    }
    // 1.25 MB every 20 ms: 62.5 MB/s; the link's own rate needs held-back intervals, which only a policy tells.
    expect(pace.rate.bytesPerSecond).toBeCloseTo(62.5e6, -5);
    expect(pace.rate.linkBytesPerSecond).toBe(-1);
  });
});
