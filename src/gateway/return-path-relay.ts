import { ReturnPathParser, type ReturnPathRecord, returnPathBytes } from '../qemu/return-path';

/** A QEMU stream's header (magic and version): what a destination must have had before it may answer. */
export const STREAM_HEADER_BYTES = 8;

/**
 * QEMU's return path as both gateways relay it: bytes in, the complete, checked messages among them
 * out, byte for byte as QEMU sent them. A message split across chunks goes out once it is whole;
 * anything that is not a return-path message throws (ReturnPathError).
 */
export class ReturnPathMessages {
  private readonly messages: Buffer[] = [];
  private readonly parser = new ReturnPathParser((message: ReturnPathRecord) => this.messages.push(returnPathBytes(message)));

  /** The value of the destination's SHUT once it has sent one (0: it loaded the stream), else null. */
  get shutValue(): number | null {
    return this.parser.shutValue;
  }

  /** The whole messages this chunk completes, in one buffer, or null when it completes none. */
  check(chunk: Buffer): Buffer | null {
    this.parser.push(chunk);
    if (this.messages.length === 0) return null;
    const bytes = this.messages.length === 1 ? this.messages[0] : Buffer.concat(this.messages);
    this.messages.length = 0;
    return bytes;
  }
}
