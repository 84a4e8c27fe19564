/**
 * What a new migration connection is, from its first bytes (no I/O: the gateway reads them).
 *
 * A QEMU migration is one main channel (the stream, starting with "QEVM") and, with the `multifd`
 * capability, N more connections to the same address, each starting with an initial packet
 * (MultiFDInit_t in QEMU's migration/multifd.c, the same in 7.2 and 10.0):
 *
 *   u32 magic 0x11223344 | u32 version 1 | u8 uuid[16] | u8 id | u8 unused[7] | u64 unused[4]   (big endian, 64 bytes)
 *
 * The postcopy-preempt channel starts with no magic at all (QEMU sends nothing on it until a page is
 * urgent), so it cannot be told from its bytes: the gateway recognises it by the migration it joins.
 */
import { FILE_MAGIC } from './constants';

/** A TLS record of content type handshake: how a TLS client's first bytes begin (RFC 8446 §5.1). */
const TLS_HANDSHAKE = 22;

/** MULTIFD_MAGIC in QEMU's migration/multifd.c. */
export const MULTIFD_MAGIC = 0x11223344;
/** MULTIFD_VERSION: the only initial-packet version QEMU 7.2 … 10.0 send and accept. */
export const MULTIFD_VERSION = 1;
/** sizeof(MultiFDInit_t). */
export const MULTIFD_INIT_BYTES = 64;
/** Bytes that tell a main channel from a multifd one. */
export const CHANNEL_MAGIC_BYTES = 4;

/** A multifd channel's initial packet. */
export interface MultifdInit {
  /** The source VM's UUID (qemu_uuid), 32 hex digits: all of a migration's channels carry the same. */
  uuid: string;
  /** The channel's index, 0 … multifd-channels - 1. */
  id: number;
}

export type ChannelHead =
  /** Not enough bytes yet to tell: read at least `bytes`. */
  | { kind: 'need'; bytes: number }
  | { kind: 'main' }
  | { kind: 'multifd'; init: MultifdInit }
  /**
   * A TLS handshake record (content type 22, version 3.x): QEMU's own TLS (`tls-creds`), whose channels
   * are all encrypted end to end, main and multifd alike. Nothing in it can be read: relay it as it is.
   */
  | { kind: 'encrypted' }
  /** Neither: `reason` says what was wrong. */
  | { kind: 'other'; reason: string };

/** What a connection whose first bytes are `head` is (`head` may be shorter than a whole initial packet). */
export function classifyChannelHead(head: Uint8Array): ChannelHead {
  if (head.length < CHANNEL_MAGIC_BYTES) return { kind: 'need', bytes: CHANNEL_MAGIC_BYTES };
  const view = Buffer.from(head.buffer, head.byteOffset, head.length);
  const magic = view.readUInt32BE(0);
  if (magic === FILE_MAGIC) return { kind: 'main' };
  if (view[0] === TLS_HANDSHAKE && view[1] === 3 && view[2] <= 4) return { kind: 'encrypted' };
  if (magic !== MULTIFD_MAGIC) return { kind: 'other', reason: `first bytes ${view.subarray(0, CHANNEL_MAGIC_BYTES).toString('hex')} are neither QEMU's stream magic nor multifd's` };
  if (view.length < MULTIFD_INIT_BYTES) return { kind: 'need', bytes: MULTIFD_INIT_BYTES };
  const version = view.readUInt32BE(4);
  if (version !== MULTIFD_VERSION) return { kind: 'other', reason: `multifd initial packet of version ${version}, not ${MULTIFD_VERSION}` };
  return { kind: 'multifd', init: { uuid: view.subarray(8, 24).toString('hex'), id: view[24] } };
}
