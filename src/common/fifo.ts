/**
 * A first-in, first-out list whose shift() takes constant time. `Array#shift` moves every element
 * behind the first once an array is large (V8 trims only small arrays in place), so a queue that many
 * small pieces pass through (a source or a peer sending a few bytes a read) cost time quadratic in
 * their number: a multifd channel fed in 1-byte pieces while parked took seconds to read on.
 */
export class Fifo<T> {
  private items: (T | undefined)[] = [];
  private head = 0;

  get length(): number {
    return this.items.length - this.head;
  }

  push(item: T): void {
    this.items.push(item);
  }

  /** The first item; undefined when empty. */
  peek(): T | undefined {
    return this.items[this.head];
  }

  /** Removes and returns the first item; undefined when empty. */
  shift(): T | undefined {
    if (this.head === this.items.length) return undefined;
    const item = this.items[this.head];
    this.items[this.head++] = undefined;
    if (this.head === this.items.length) {
      this.items.length = 0;
      this.head = 0;
    } else if (this.head >= COMPACT_AFTER && this.head * 2 >= this.items.length) {
      // Taken items' slots are given back once they are half the array: each item moves at most once more.
      this.items = this.items.slice(this.head);
      this.head = 0;
    }
    return item;
  }

  /** Replaces the item `i` places from the front (0 <= i < length). */
  set(i: number, item: T): void {
    if (i < 0 || i >= this.length) throw new RangeError(`Fifo.set(${i}) on a list of ${this.length}`);
    this.items[this.head + i] = item;
  }

  clear(): void {
    this.items.length = 0;
    this.head = 0;
  }

  /** The item `i` places from the front (0 <= i < length). */
  at(i: number): T {
    return this.items[this.head + i] as T;
  }
}

/** Slots taken from the front before the array may be compacted. */
const COMPACT_AFTER = 1024;
