import { ByteCursor } from '../src/qemu/byte-cursor';

/** Header-like fields: u8, u16, u32, u64, then a 5-byte name. */
const RECORD = Buffer.from([0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 1, 2, 3, 4, 5, 6, 7, 8, ...Buffer.from('pc.ra', 'latin1')]);
const FIELDS = [1, 2, 4, 8, 5];

function readField(cursor: ByteCursor, field: number): number | bigint | string {
  switch (field) {
    case 0: return cursor.u8(0);
    case 1: return cursor.u16(0);
    case 2: return cursor.u32(0);
    case 3: return cursor.u64(0);
    default: return cursor.latin1(0, 5);
  }
}

/** Reads RECORD's fields from the given chunks; returns what each field read, and where. */
function readFields(chunks: Buffer[]): { values: (number | bigint | string)[]; offsets: number[] } {
  const cursor = new ByteCursor(64);
  const values: (number | bigint | string)[] = [];
  const offsets: number[] = [];
  let field = 0;
  for (const chunk of chunks) {
    cursor.feed(chunk);
    while (field < FIELDS.length && cursor.take(FIELDS[field])) {
      values.push(readField(cursor, field));
      offsets.push(cursor.offset);
      field++;
    }
  }
  return { values, offsets };
}

describe('ByteCursor', () => {
  test('a field split across chunks at any point reads the same as a whole one', () => {
    const whole = readFields([RECORD]);
    expect(whole.values).toEqual([0x11, 0x2233, 0x44556677, 0x0102030405060708n, 'pc.ra']);
    expect(whole.offsets).toEqual([1, 3, 7, 15, 20]);
    for (let a = 0; a <= RECORD.length; a++) {
      for (let b = a; b <= RECORD.length; b++) {
        expect(readFields([RECORD.subarray(0, a), RECORD.subarray(a, b), RECORD.subarray(b)])).toEqual(whole);
      }
    }
  });

  test('a field whole in its chunk is a view of the chunk; a split one is assembled and copied out on request', () => {
    const cursor = new ByteCursor(16);
    const chunk = Buffer.from([9, 8, 7, 6, 5]);
    cursor.feed(chunk);
    expect(cursor.take(2)).toBe(true);
    expect(cursor.fieldData).toBe(chunk);
    expect(cursor.fieldIndex).toBe(0);
    expect(cursor.take(4)).toBe(false);
    expect(cursor.carriedBytes).toBe(3);
    expect(cursor.available).toBe(0);
    cursor.feed(Buffer.from([4, 3]));
    expect(cursor.take(4)).toBe(true);
    expect(cursor.fieldData).not.toBe(chunk);
    const copy = cursor.copy(0, 4);
    expect([...copy]).toEqual([7, 6, 5, 4]);
    expect(cursor.carriedBytes).toBe(0);
    expect(cursor.offset).toBe(6);
    expect(cursor.peek()).toBe(3);
    expect(cursor.position).toBe(1);
    expect(cursor.offsetOf(1)).toBe(6);
  });

  test('gather() collects a window across chunks that takeCarried() hands over', () => {
    const cursor = new ByteCursor(16);
    cursor.feed(Buffer.from([1, 2, 3]));
    cursor.moveTo(1);
    expect(cursor.gather(6)).toBe(false);
    cursor.feed(Buffer.from([4, 5, 6, 7, 8]));
    expect(cursor.gather(6)).toBe(true);
    expect(cursor.offset).toBe(7);
    expect([...cursor.takeCarried()]).toEqual([2, 3, 4, 5, 6, 7]);
    expect(cursor.carriedBytes).toBe(0);
    expect(cursor.peek()).toBe(8);
  });

  test('interpose() reads other bytes at their own offset, then returns to where it stood', () => {
    const cursor = new ByteCursor(16);
    cursor.feed(Buffer.from([1, 2, 3, 4]));
    cursor.moveTo(2);
    const seen: number[] = [];
    cursor.interpose(Buffer.from([0xa0, 0xa1]), 100, () => {
      seen.push(cursor.offset);
      expect(cursor.take(2)).toBe(true);
      seen.push(cursor.u16(0), cursor.offset);
    });
    expect(seen).toEqual([100, 0xa0a1, 102]);
    expect(cursor.offset).toBe(2);
    expect(cursor.peek()).toBe(3);
  });
});
