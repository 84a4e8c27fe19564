import { errorMessage } from '../common/errors';
import { FrameTooLargeError } from '../wire/frames';
import { Refusal, type RefusalReason } from './limits';

/** What a peer gateway did wrong. */
export type ViolationCode =
  /** A frame this session does not take in its phase (or at all). */
  | 'unexpected-frame'
  /** A frame whose payload does not decode, or contradicts what the session knows. */
  | 'bad-payload';

/**
 * The peer gateway broke the protocol. Thrown from a session's frame handling and caught where the
 * session feeds its frame parser, which ends the migration (or refuses the connection) with its message.
 */
export class ProtocolViolation extends Error {
  override readonly name = 'ProtocolViolation';
  constructor(
    readonly code: ViolationCode,
    message: string,
  ) {
    super(message);
  }
}

/** A frame's payload decoded by `decode`, whose complaint becomes the peer's violation. */
export function decodePayload<T>(decode: (payload: Buffer) => T, payload: Buffer): T {
  try {
    return decode(payload);
  } catch (err) {
    throw new ProtocolViolation('bad-payload', errorMessage(err));
  }
}

/** Why a connection whose peer has not been accepted yet is refused, for what went wrong with its frames. */
export function refusalReason(err: unknown): RefusalReason {
  if (err instanceof Refusal) return err.reason;
  return err instanceof FrameTooLargeError ? 'frame-too-large' : 'protocol';
}
