import { Fifo } from '../src/common/fifo';

describe('Fifo', () => {
  test('gives items back in the order they came, through compactions, with peek, at and set on the live ones', () => {
    const fifo = new Fifo<number>();
    expect(fifo.length).toBe(0);
    expect(fifo.peek()).toBeUndefined();
    expect(fifo.shift()).toBeUndefined();
    let next = 0;
    let expected = 0;
    // Far past the compaction point, taking fewer than pushing so the front keeps moving inside the array.
    for (let round = 0; round < 50; round++) {
      for (let i = 0; i < 300; i++) fifo.push(next++);
      for (let i = 0; i < 250; i++) {
        expect(fifo.peek()).toBe(expected);
        expect(fifo.at(0)).toBe(expected);
        expect(fifo.shift()).toBe(expected++);
      }
      expect(fifo.length).toBe(next - expected);
      expect(fifo.at(fifo.length - 1)).toBe(next - 1);
    }
    fifo.set(0, -1);
    fifo.set(fifo.length - 1, -2);
    expect(fifo.shift()).toBe(-1);
    expected++;
    while (fifo.length > 1) expect(fifo.shift()).toBe(expected++);
    expect(fifo.shift()).toBe(-2);
    expect(fifo.length).toBe(0);
    expect(() => fifo.set(0, 1)).toThrow(RangeError);
  });

  test('clear empties it, and it takes items again after', () => {
    const fifo = new Fifo<string>();
    for (let i = 0; i < 2000; i++) fifo.push(String(i));
    for (let i = 0; i < 1500; i++) fifo.shift();
    fifo.clear();
    expect(fifo.length).toBe(0);
    fifo.push('a');
    fifo.push('b');
    expect([fifo.shift(), fifo.shift(), fifo.shift()]).toEqual(['a', 'b', undefined]);
  });
});
