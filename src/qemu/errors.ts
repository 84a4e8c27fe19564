/** Why a stream was rejected. Each is fatal for that stream. */
export const enum StreamErrorCode {
  /** The first four bytes are not "QEVM". */
  BadMagic = 'BAD_MAGIC',
  /** Stream version 2 (obsolete) or otherwise not readable. */
  BadVersion = 'BAD_VERSION',
  /** The stream ended inside a record or before EOF. */
  Truncated = 'TRUNCATED',
  /** A length or size beyond any real stream (see Limit). */
  AbsurdLength = 'ABSURD_LENGTH',
  /** A record that contradicts the stream's own structure. */
  Malformed = 'MALFORMED',
  /** A RAM record names a block missing from the MEM_SIZE list. */
  UnknownBlock = 'UNKNOWN_BLOCK',
  /** A RAM record's page offset lies outside its block. */
  PageOutOfRange = 'PAGE_OUT_OF_RANGE',
  /** A section footer names another section, or is missing where footers are in use. */
  FooterMismatch = 'FOOTER_MISMATCH',
}

/** A typed, positioned rejection of a migration stream. */
export class StreamError extends Error {
  override readonly name = 'StreamError';
  constructor(
    readonly code: StreamErrorCode,
    /** Byte offset in the stream where the offending record starts (or where input ran out). */
    readonly offset: number,
    detail: string,
  ) {
    super(`${code} at byte ${offset}: ${detail}`);
  }
}
