import { WanCap, WanCaps, WanLink, WanShare } from '../src/gateway/wan-cap';

/**
 * A writer on the caps: writes `chunk` bytes each time it may, as a sending session writes what one read
 * of its source turned into, and counts what it wrote until `stop()`.
 */
function writer(caps: WanCap[], chunk: number): { share: WanShare; written: () => number; stop: () => void } {
  const share = new WanShare(caps);
  let written = 0;
  let stopped = false;
  const go = (): void => {
    while (!stopped && !share.hold(go)) {
      share.charge(chunk);
      written += chunk;
    }
  };
  queueMicrotask(go);
  return {
    share,
    written: () => written,
    stop: () => {
      stopped = true;
      share.close();
    },
  };
}

describe('WanCap', () => {
  test('writers of very different chunk sizes get about the same bytes from one cap', async () => {
    const cap = new WanCap({ maxMbit: 80 });
    const big = writer([cap], 256 * 1024);
    const small = writer([cap], 16 * 1024);
    await new Promise<void>((resolve) => {
      const check = setInterval(() => {
        if (big.written() + small.written() < 8 * 1024 * 1024) return;
        clearInterval(check);
        resolve();
      }, 5);
    });
    const [b, s] = [big.written(), small.written()];
    big.stop();
    small.stop();
    expect(Math.min(b, s) / Math.max(b, s)).toBeGreaterThan(0.8);
  });

  test('a share on no cap never holds; one that closed is not resumed', () => {
    const free = new WanShare([]);
    free.charge(1 << 30);
    expect(free.hold(() => undefined)).toBe(false);
    const cap = new WanCap({ maxMbit: 1 });
    const share = new WanShare([cap]);
    share.charge(1 << 20);
    let resumed = false;
    expect(share.hold(() => (resumed = true))).toBe(true);
    expect(share.held).toBe(true);
    share.close();
    expect(share.held).toBe(false);
    expect(resumed).toBe(false);
  });
});

describe('WanLink', () => {
  test("the connections open on a peer's stated link share it equally; without one no rate is stated", () => {
    const caps = new WanCaps({ peers: [{ peer: 'gw-b:7300', wan: null, linkMbit: 1000 }], routes: [] });
    const main = caps.share('vm1', 'gw-b:7300');
    expect(main.linkBytesPerSecond).toBe(125e6);
    const channels = [caps.share('vm1', 'gw-b:7300'), caps.share('vm1', 'gw-b:7300'), caps.share('vm2', 'gw-b:7300')];
    expect([main, ...channels].map((s) => s.linkBytesPerSecond)).toEqual([31.25e6, 31.25e6, 31.25e6, 31.25e6]);
    for (const c of channels) c.close();
    expect(main.linkBytesPerSecond).toBe(125e6);
    expect(caps.share('vm1', 'gw-c:7300').linkBytesPerSecond).toBe(-1);
    expect(new WanShare([], new WanLink(1e6)).linkBytesPerSecond).toBe(1e6);
  });

  test("a migration's main channel counts as no connection of its own while extra channels of it are open", () => {
    const caps = new WanCaps({ peers: [{ peer: 'gw-b:7300', wan: null, linkMbit: 1000 }], routes: [] });
    const main = caps.share('vm1', 'gw-b:7300');
    const channels = Array.from({ length: 4 }, () => caps.share('vm1', 'gw-b:7300', main));
    // Four multifd channels: a quarter of the link each (a fifth when the main channel counted), and the
    // main channel works with a channel's share.
    expect([main, ...channels].map((s) => s.linkBytesPerSecond)).toEqual(Array(5).fill(31.25e6));
    // Another VM's migration on the same link counts as a connection.
    const other = caps.share('vm2', 'gw-b:7300');
    expect(other.linkBytesPerSecond).toBe(25e6);
    other.close();
    for (const c of channels.slice(1)) c.close();
    expect([main.linkBytesPerSecond, channels[0].linkBytesPerSecond]).toEqual([125e6, 125e6]);
    // The last channel gone (closed twice, as an aborted channel may be), the main channel counts again.
    channels[0].close();
    channels[0].close();
    const late = caps.share('vm2', 'gw-b:7300');
    expect([main.linkBytesPerSecond, late.linkBytesPerSecond]).toEqual([62.5e6, 62.5e6]);
    late.close();
    // A main channel that ends first (its migration failed) leaves its channels sharing as any connections.
    const next = caps.share('vm3', 'gw-b:7300');
    const nextChannels = [caps.share('vm3', 'gw-b:7300', next), caps.share('vm3', 'gw-b:7300', next)];
    next.close();
    main.close();
    expect(nextChannels.map((s) => s.linkBytesPerSecond)).toEqual([62.5e6, 62.5e6]);
  });
});
