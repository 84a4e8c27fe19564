import { FrameTooLargeError, decodeSeal } from '../src/wire/frames';
import { Refusal } from '../src/gateway/limits';
import { decodePayload, ProtocolViolation, refusalReason } from '../src/gateway/protocol-violation';
import { checkedMove, type PhaseMoves } from '../src/gateway/session-lifecycle';

type Phase = 'open' | 'closing' | 'closed';
const MOVES: PhaseMoves<Phase> = { open: ['closing'], closing: ['closed'], closed: [] };

describe('checkedMove', () => {
  test('a listed move goes to its phase', () => {
    expect(checkedMove('send', MOVES, 'open', 'closing')).toBe('closing');
    expect(checkedMove('receive', MOVES, 'closing', 'closed')).toBe('closed');
  });

  test('a move not listed is a bug: it throws, naming both phases', () => {
    expect(() => checkedMove('send', MOVES, 'open', 'closed')).toThrow('send session: no move from open to closed');
    expect(() => checkedMove('receive', MOVES, 'closed', 'open')).toThrow('receive session: no move from closed to open');
  });
});

describe('protocol violations', () => {
  test('a payload that does not decode is a bad-payload violation with the decoder’s message', () => {
    const payload = Buffer.from('{"streamBytes":"many"}');
    let plain: unknown;
    try {
      decodeSeal(payload);
    } catch (err) {
      plain = err;
    }
    expect(plain).toBeInstanceOf(Error);
    let thrown: unknown;
    try {
      decodePayload(decodeSeal, payload);
    } catch (err) {
      thrown = err;
    }
    expect(thrown).toBeInstanceOf(ProtocolViolation);
    expect((thrown as ProtocolViolation).code).toBe('bad-payload');
    expect((thrown as ProtocolViolation).message).toBe((plain as Error).message);
  });

  test('a payload that decodes is returned as decoded', () => {
    expect(decodePayload(decodeSeal, Buffer.from('{"streamBytes":5,"streamCheck":"ab"}'))).toEqual({ streamBytes: 5, streamCheck: 'ab' });
  });

  test('refusal reasons: a Refusal keeps its own, an oversized frame is frame-too-large, a violation is protocol', () => {
    expect(refusalReason(new Refusal('busy', 'VM x is already migrating'))).toBe('busy');
    expect(refusalReason(new FrameTooLargeError('frame of 9 bytes exceeds 8'))).toBe('frame-too-large');
    expect(refusalReason(new ProtocolViolation('unexpected-frame', 'a second Hello'))).toBe('protocol');
    expect(refusalReason(new Error('anything else'))).toBe('protocol');
  });
});
