/**
 * The pool of page buffers a migration's codecs take and give back (proxy/reused-buffers.ts): a buffer
 * given back is lent again, never to two takers at once, and no more is kept idle than the pool's bound.
 */
import { ReusedBuffers } from '../src/proxy/reused-buffers';

describe('reused page buffers', () => {
  test('a buffer given back is lent to the next taker of its length; other lengths get buffers of their own', () => {
    const pool = new ReusedBuffers(1 << 20);
    const first = pool.take(64 * 1024);
    expect(first.length).toBe(64 * 1024);
    pool.give(first);
    expect(pool.idleByteCount).toBe(64 * 1024);
    const again = pool.take(64 * 1024);
    expect(again.buffer).toBe(first.buffer);
    expect(pool.idleByteCount).toBe(0);
    // Nothing idle of that length is left: the next taker gets a new buffer, and so does another length.
    const second = pool.take(64 * 1024);
    expect(second.buffer).not.toBe(first.buffer);
    const other = pool.take(32 * 1024);
    expect(other.length).toBe(32 * 1024);
  });

  test('a buffer given back twice is lent once; no more than the bound is kept idle, and nothing empty', () => {
    const pool = new ReusedBuffers(100 * 1024);
    const a = pool.take(64 * 1024);
    pool.give(a);
    pool.give(a);
    expect(pool.idleByteCount).toBe(64 * 1024);
    expect(pool.take(64 * 1024).buffer).toBe(a.buffer);
    expect(pool.take(64 * 1024).buffer).not.toBe(a.buffer);
    // Two 64 KiB buffers would be 128 KiB idle: the second is dropped (left to the garbage collector).
    const [b, c] = [pool.take(64 * 1024), pool.take(64 * 1024)];
    pool.give(b);
    pool.give(c);
    expect(pool.idleByteCount).toBe(64 * 1024);
    pool.give(Buffer.alloc(0));
    expect(pool.idleByteCount).toBe(64 * 1024);
  });

  test('prefill makes a touched buffer of each length idle, counts those idle already, and keeps to the bound', () => {
    const pool = new ReusedBuffers(200 * 1024);
    const kept = pool.take(64 * 1024);
    kept.fill(7);
    pool.give(kept);
    pool.prefill([64 * 1024, 64 * 1024, 32 * 1024]);
    // One 64 KiB buffer was idle already: one more of it, and one of 32 KiB.
    expect(pool.idleByteCount).toBe(160 * 1024);
    pool.prefill([64 * 1024, 64 * 1024, 32 * 1024]);
    expect(pool.idleByteCount).toBe(160 * 1024);
    const taken = [pool.take(64 * 1024), pool.take(64 * 1024), pool.take(32 * 1024)];
    expect(taken.filter((b) => b.buffer === kept.buffer)).toHaveLength(1);
    // The new ones are zero: written once, their memory the process's own.
    for (const b of taken.filter((b) => b.buffer !== kept.buffer)) expect(b.every((byte) => byte === 0)).toBe(true);
    expect(pool.idleByteCount).toBe(0);
    // Past the bound it stops: two 128 KiB buffers would be 256 KiB.
    pool.prefill([128 * 1024, 128 * 1024]);
    expect(pool.idleByteCount).toBe(128 * 1024);
  });
});
