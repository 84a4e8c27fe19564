/**
 * Keeps the stream queued between the source QEMU and the WAN small. QEMU counts a byte as migrated
 * once its socket has taken it; every byte queued after that (the gateway's receive buffer, the WAN
 * socket's unsent bytes) still has to cross the WAN after QEMU has stopped the guest for the last
 * round, and adds to the guest's real downtime. So on every connection that carries the source's stream
 * (the main channel's session and each multifd channel alike) both are held small. Node has no API for
 * these socket options on TCP; the project's native addon sets them.
 */
import { connect, type NetConnectOpts, type Socket } from 'node:net';
import { nativeExport } from '../digest';

/** The accepted source connection's receive buffer (the kernel doubles it for its bookkeeping). */
export const SOURCE_RECV_BUFFER_BYTES = 256 * 1024;
/** Unsent bytes the WAN socket may hold beyond what is in flight (TCP_NOTSENT_LOWAT). */
export const WAN_NOT_SENT_BYTES = 256 * 1024;
/**
 * What the sending gateway queues for the WAN socket before it stops reading the source (Node's write
 * high-water mark): the frames of one 256 KiB source read. Node's 16 KiB paused the source after nearly
 * every read, which cost the sender 6% more CPU on loopback; a deeper queue would add to downtime on a
 * slow WAN (1 MiB is 84 ms at 100 Mbit/s), this one adds about 20 ms.
 */
export const WAN_QUEUE_BYTES = 256 * 1024;

/**
 * Dials a TCP connection whose Writable queues up to `queueBytes` before write() asks the caller to
 * wait. Node passes writableHighWaterMark on to the socket's Writable; @types/node does not list it.
 */
export function connectWithQueue(options: NetConnectOpts, queueBytes: number): Socket {
  const withQueue: NetConnectOpts & { writableHighWaterMark: number } = { ...options, writableHighWaterMark: queueBytes };
  return connect(withQueue);
}

type TuneSocket = (fd: number, recvBufferBytes: number, notSentLowatBytes: number) => boolean;

function tuner(): TuneSocket | null {
  const fn = nativeExport('tuneSocket');
  return typeof fn === 'function' ? (fn as TuneSocket) : null;
}

/** The file descriptor under a TCP socket (or a TLS socket over one), if Node exposes it. */
function fdOf(socket: Socket): number | null {
  type Handle = { fd?: unknown } | null | undefined;
  const s = socket as unknown as { _handle?: Handle; _parent?: { _handle?: Handle } | null };
  for (const handle of [s._handle, s._parent?._handle]) {
    if (typeof handle?.fd === 'number' && handle.fd >= 0) return handle.fd;
  }
  return null;
}

/** Applies the options to a connected socket; false when they could not be (no fd, no addon): the stream then just queues more. */
export function tuneSocket(socket: Socket, options: { recvBufferBytes?: number; notSentBytes?: number }): boolean {
  const fd = fdOf(socket);
  const set = tuner();
  if (fd === null || set === null) return false;
  try {
    set(fd, options.recvBufferBytes ?? 0, options.notSentBytes ?? 0);
    return true;
  } catch {
    return false;
  }
}

/** Tunes a connection the source QEMU opened (the main channel's or a multifd channel's). */
export function tuneSourceConnection(socket: Socket): boolean {
  return tuneSocket(socket, { recvBufferBytes: SOURCE_RECV_BUFFER_BYTES });
}

/** Tunes a connection that carries the stream to the peer gateway, once it is connected. */
export function tuneWanConnection(socket: Socket): boolean {
  return tuneSocket(socket, { notSentBytes: WAN_NOT_SENT_BYTES });
}

type ReadTuning = (fd: number) => [number, number];

/**
 * What the kernel reports for a connected socket: its receive buffer (Linux doubles what SO_RCVBUF
 * was set to) and TCP_NOTSENT_LOWAT (-1 where the platform has none); null with no fd or no addon.
 * Tests read it to see that every connection tuneSocket is meant for was tuned.
 */
export function socketTuning(socket: Socket): { recvBufferBytes: number; notSentBytes: number } | null {
  const fd = fdOf(socket);
  const read = nativeExport('socketTuning');
  if (fd === null || typeof read !== 'function') return null;
  const [recvBufferBytes, notSentBytes] = (read as ReadTuning)(fd);
  return { recvBufferBytes, notSentBytes };
}

/** Runs `writes` with `socket` corked: what they write leaves in one writev, not a write call each. */
export function corked(socket: Socket, writes: () => void): void {
  socket.cork();
  try {
    writes();
  } finally {
    socket.uncork();
  }
}
