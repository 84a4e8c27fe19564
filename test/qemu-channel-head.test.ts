/** Telling a migration's channels apart by their first bytes (qemu/channel-head.ts). */
import { classifyChannelHead, MULTIFD_INIT_BYTES } from '../src/qemu/channel-head';
import { multifdInitPacket } from '../src/lab/harness/qemu-standins';

describe('classifyChannelHead', () => {
  const uuid = Buffer.from('00112233445566778899aabbccddeeff', 'hex');

  test('QEMU stream magic is a main channel, from 4 bytes on', () => {
    expect(classifyChannelHead(Buffer.from('QEV'))).toEqual({ kind: 'need', bytes: 4 });
    expect(classifyChannelHead(Buffer.from('QEVM\u0000\u0000\u0000\u0003'))).toEqual({ kind: 'main' });
  });

  test('a multifd initial packet gives its VM UUID and channel id once whole', () => {
    const packet = multifdInitPacket(uuid, 7);
    expect(classifyChannelHead(packet.subarray(0, 20))).toEqual({ kind: 'need', bytes: MULTIFD_INIT_BYTES });
    expect(classifyChannelHead(packet)).toEqual({ kind: 'multifd', init: { uuid: uuid.toString('hex'), id: 7 } });
  });

  test('another multifd version, or other bytes, are neither', () => {
    expect(classifyChannelHead(multifdInitPacket(uuid, 0, 2))).toMatchObject({ kind: 'other', reason: expect.stringMatching(/version 2/) });
    expect(classifyChannelHead(Buffer.from('GET / HTTP/1.1'))).toMatchObject({ kind: 'other', reason: expect.stringMatching(/474554/) });
  });
});
