/**
 * QEMU's return path: the messages a destination QEMU sends back to its source on the migration
 * socket (migration/migration.c, enum mig_rp_message_type and source_return_path_thread). Each is a
 * be16 type, a be16 body length and the body. A pure incremental parser: no sockets, no timers.
 */

/** Return-path message types (enum mig_rp_message_type). */
export const enum ReturnPathMessage {
  /** Never valid on the wire. */
  Invalid = 0,
  /** The destination will send nothing more; be32 0 when it loaded the whole stream. */
  Shut = 1,
  /** Answer to a PING command; be32, the PING's value. */
  Pong = 2,
  /** Postcopy page request naming a RAM block: be64 start, be32 length, u8 length + name. */
  ReqPagesId = 3,
  /** Postcopy page request in the last named block: be64 start, be32 length. */
  ReqPages = 4,
  /** Postcopy recovery: a RAM block's received bitmap, sent outside the message framing. */
  RecvBitmap = 5,
  /** Postcopy recovery: the destination is ready to resume; be32. */
  ResumeAck = 6,
  /** The destination agrees to switch over (QEMU ≥ 8.1, capability switchover-ack); no body. */
  SwitchoverAck = 7,
}

/** QEMU's source reads a message body into a 512-byte buffer and rejects anything longer. */
export const RETURN_PATH_MAX_BODY = 512;

const HEADER_BYTES = 4;

/** A return-path message as parsed; `body` is a view valid only during the sink call. */
export type ReturnPathRecord =
  | { type: ReturnPathMessage.Shut | ReturnPathMessage.Pong | ReturnPathMessage.ResumeAck; value: number; body: Buffer; streamOffset: number }
  | { type: ReturnPathMessage.ReqPages; start: bigint; length: number; body: Buffer; streamOffset: number }
  | { type: ReturnPathMessage.ReqPagesId; start: bigint; length: number; block: string; body: Buffer; streamOffset: number }
  | { type: ReturnPathMessage.SwitchoverAck; body: Buffer; streamOffset: number };

export type ReturnPathSink = (message: ReturnPathRecord) => void;

/** Why return-path input was rejected. */
export const enum ReturnPathErrorCode {
  /** Type 0 or a type QEMU does not define. */
  UnknownType = 'UNKNOWN_TYPE',
  /** A body length that is not the one its type has, or over RETURN_PATH_MAX_BODY. */
  BadLength = 'BAD_LENGTH',
  /** A type this parser does not follow (RECV_BITMAP: its bitmap is not framed as a message). */
  Unsupported = 'UNSUPPORTED',
  /** Bytes after SHUT, after which QEMU sends nothing. */
  AfterShut = 'AFTER_SHUT',
  /** The input ended inside a message. */
  Truncated = 'TRUNCATED',
}

export class ReturnPathError extends Error {
  override readonly name = 'ReturnPathError';
  constructor(
    readonly code: ReturnPathErrorCode,
    /** Byte offset in the return path where the offending message starts (or where input ran out). */
    readonly offset: number,
    detail: string,
  ) {
    super(`return path: ${code} at byte ${offset}: ${detail}`);
  }
}

/** Fixed body lengths; -1 marks a variable one (QEMU's rp_cmd_args). */
const FIXED_LENGTH: readonly number[] = [-1, 4, 4, -1, 12, -1, 4, 0];
const NAMES: readonly string[] = ['INVALID', 'SHUT', 'PONG', 'REQ_PAGES_ID', 'REQ_PAGES', 'RECV_BITMAP', 'RESUME_ACK', 'SWITCHOVER_ACK'];

/**
 * Feed it the return path's bytes in chunks of any size with push(); it calls the sink once per
 * message, in order. Bad input throws a ReturnPathError, after which the parser refuses further input.
 */
export class ReturnPathParser {
  /** Set once a SHUT has been parsed: its value (0: the destination loaded the stream). */
  shutValue: number | null = null;

  private readonly buffer = Buffer.alloc(HEADER_BYTES + RETURN_PATH_MAX_BODY);
  private filled = 0;
  /** Absolute offset of the message being assembled. */
  private messageStart = 0;
  private error: ReturnPathError | null = null;

  constructor(private readonly sink: ReturnPathSink) {}

  /** Bytes consumed so far. */
  get offset(): number {
    return this.messageStart + this.filled;
  }

  push(chunk: Buffer): void {
    if (this.error) throw this.error;
    try {
      this.feed(chunk);
    } catch (err) {
      if (err instanceof ReturnPathError) this.error = err;
      throw err;
    }
  }

  /** The return path has ended: checks that it did not end inside a message. */
  end(): void {
    if (this.error) throw this.error;
    if (this.filled > 0) {
      this.error = new ReturnPathError(ReturnPathErrorCode.Truncated, this.messageStart, `the return path ended inside a message (${this.filled} bytes of it)`);
      throw this.error;
    }
  }

  private feed(chunk: Buffer): void {
    let pos = 0;
    while (pos < chunk.length) {
      if (this.shutValue !== null) this.fail(ReturnPathErrorCode.AfterShut, 'bytes after SHUT');
      // Header first: it says how much body to gather. Messages are assembled in one reused buffer;
      // they are small and rare, so the copy costs nothing worth avoiding.
      if (this.filled < HEADER_BYTES) {
        const take = Math.min(HEADER_BYTES - this.filled, chunk.length - pos);
        chunk.copy(this.buffer, this.filled, pos, pos + take);
        this.filled += take;
        pos += take;
        if (this.filled < HEADER_BYTES) return;
        this.checkHeader();
      }
      const total = HEADER_BYTES + this.buffer.readUInt16BE(2);
      const take = Math.min(total - this.filled, chunk.length - pos);
      chunk.copy(this.buffer, this.filled, pos, pos + take);
      this.filled += take;
      pos += take;
      if (this.filled < total) return;
      this.dispatch(total);
    }
  }

  private checkHeader(): void {
    const type = this.buffer.readUInt16BE(0);
    const length = this.buffer.readUInt16BE(2);
    if (type === ReturnPathMessage.Invalid || type >= FIXED_LENGTH.length) this.fail(ReturnPathErrorCode.UnknownType, `message type ${type}`);
    if (type === ReturnPathMessage.RecvBitmap) this.fail(ReturnPathErrorCode.Unsupported, 'RECV_BITMAP (postcopy recovery) is not followed');
    if (length > RETURN_PATH_MAX_BODY) this.fail(ReturnPathErrorCode.BadLength, `${NAMES[type]} body of ${length} bytes (at most ${RETURN_PATH_MAX_BODY})`);
    const fixed = FIXED_LENGTH[type];
    if (fixed >= 0 && length !== fixed) this.fail(ReturnPathErrorCode.BadLength, `${NAMES[type]} body of ${length} bytes (it has ${fixed})`);
    if (type === ReturnPathMessage.ReqPagesId && length < 13) this.fail(ReturnPathErrorCode.BadLength, `REQ_PAGES_ID body of ${length} bytes (at least 13)`);
  }

  private dispatch(total: number): void {
    const type = this.buffer.readUInt16BE(0) as ReturnPathMessage;
    const body = this.buffer.subarray(HEADER_BYTES, total);
    const streamOffset = this.messageStart;
    let message: ReturnPathRecord;
    let shut: number | null = null;
    switch (type) {
      case ReturnPathMessage.Shut:
      case ReturnPathMessage.Pong:
      case ReturnPathMessage.ResumeAck:
        message = { type, value: body.readUInt32BE(0), body, streamOffset };
        if (type === ReturnPathMessage.Shut) shut = message.value;
        break;
      case ReturnPathMessage.ReqPages:
        message = { type, start: body.readBigUInt64BE(0), length: body.readUInt32BE(8), body, streamOffset };
        break;
      case ReturnPathMessage.ReqPagesId: {
        const nameLength = body[12];
        if (body.length !== 13 + nameLength) this.fail(ReturnPathErrorCode.BadLength, `REQ_PAGES_ID body of ${body.length} bytes for a ${nameLength}-byte block name`);
        message = { type, start: body.readBigUInt64BE(0), length: body.readUInt32BE(8), block: body.toString('latin1', 13, 13 + nameLength), body, streamOffset };
        break;
      }
      case ReturnPathMessage.SwitchoverAck:
        message = { type, body, streamOffset };
        break;
      default:
        // checkHeader() let only the types above through.
        throw new Error(`unreachable: return-path type ${type as number}`);
    }
    this.messageStart += total;
    this.filled = 0;
    this.shutValue = shut;
    this.sink(message);
  }

  private fail(code: ReturnPathErrorCode, detail: string): never {
    throw new ReturnPathError(code, this.messageStart, detail);
  }
}
