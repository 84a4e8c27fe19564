import { connect, type Socket } from 'node:net';
import { type Endpoint, formatEndpoint } from './address';
import { DIGEST_BYTES, digestOne } from './digest';
import { describeOrigin, RamFlag, SectionType, streamOrigin, type StreamOrigin } from './qemu';
import { writeRamWord, writeShortString } from './qemu/encode';
import { sameDigest } from './proxy/retained';
import { PageStore } from './store';

const PAGE = 4096;
const BATCH = 256;

export class RestoreError extends Error {
  override readonly name = 'RestoreError';
}

interface StreamInfo extends Partial<StreamOrigin> {
  snapshotId: string;
  ramSectionId: number;
  footers: boolean;
}

/**
 * Rebuilds a whole QEMU migration stream from a VM's retained snapshot — the head and device state of
 * the last complete migration, and every page the store holds — and sends it to a destination QEMU
 * started with `-incoming` and the same machine shape. The VM resumes as it was at the end of that
 * migration.
 */
export async function restoreSnapshot(data: string, vm: string, to: Endpoint): Promise<{ bytes: number; pages: number; snapshotId: string; origin: string }> {
  const store = PageStore.open(data, vm);
  let socket: Socket | null = null;
  try {
    const meta = store.meta();
    if (!meta) throw new RestoreError(`no retained snapshot for VM ${vm} in ${data}`);
    const snapshotId = store.snapshotId();
    if (!snapshotId) throw new RestoreError(`VM ${vm}: the store claims no complete snapshot (its last migration did not complete)`);
    const infoBlob = store.loadBlob('stream-info');
    const head = store.loadBlob('stream-head');
    const tail = store.loadBlob('stream-tail');
    const info = infoBlob ? (JSON.parse(infoBlob.toString('utf8')) as StreamInfo) : null;
    if (!info || !head || !tail || info.snapshotId !== snapshotId) {
      throw new RestoreError(`VM ${vm}: the device state of snapshot ${snapshotId} was not retained`);
    }
    if (meta.presentPages !== meta.pageCount) {
      throw new RestoreError(`VM ${vm}: snapshot ${snapshotId} is incomplete: ${meta.pageCount - meta.presentPages} of ${meta.pageCount} pages are not held`);
    }
    const blocks = (meta.layout as { blocks?: { name: string; length: number }[] }).blocks;
    if (!Array.isArray(blocks)) throw new RestoreError(`VM ${vm}: the store has no RAM block layout`);

    socket = await open(to);
    const out = socket;
    let bytes = 0;
    const send = async (chunk: Buffer): Promise<void> => {
      bytes += chunk.length;
      if (!out.write(chunk)) await drained(out);
    };
    await send(head);
    const sectionHeader = Buffer.alloc(5);
    sectionHeader[0] = SectionType.End;
    sectionHeader.writeUInt32BE(info.ramSectionId, 1);
    await send(sectionHeader);

    const zeroDigest = Buffer.alloc(DIGEST_BYTES);
    digestOne(Buffer.alloc(PAGE), 0, PAGE, zeroDigest, 0);
    const digests = store.digests;
    const pages = Buffer.allocUnsafe(BATCH * PAGE);
    let firstPage = 0;
    let sent = 0;
    for (const block of blocks) {
      const count = Math.ceil(block.length / PAGE);
      for (let at = 0; at < count; at += BATCH) {
        const n = Math.min(BATCH, count - at);
        store.readPages(firstPage + at, n, pages, 0);
        const records = Buffer.allocUnsafe(n * (8 + PAGE) + 1 + block.name.length);
        let p = 0;
        for (let k = 0; k < n; k++) {
          const index = firstPage + at + k;
          const zero = sameDigest(digests, index * DIGEST_BYTES, zeroDigest, 0);
          const named = at === 0 && k === 0;
          p = writeRamWord(records, p, (at + k) * PAGE, (zero ? RamFlag.Zero : RamFlag.Page) | (named ? 0 : RamFlag.Continue));
          if (named) {
            p = writeShortString(records, p, block.name);
          }
          if (zero) records[p++] = 0;
          else p += pages.copy(records, p, k * PAGE, (k + 1) * PAGE);
        }
        await send(records.subarray(0, p));
        sent += n;
      }
      firstPage += count;
    }
    const end = Buffer.alloc(8 + (info.footers ? 5 : 0));
    writeRamWord(end, 0, 0, RamFlag.Eos);
    if (info.footers) {
      end[8] = SectionType.Footer;
      end.writeUInt32BE(info.ramSectionId, 9);
    }
    await send(end);
    await send(tail);
    await new Promise<void>((resolve, reject) => {
      out.once('error', reject);
      out.end(() => resolve());
    });
    const origin = describeOrigin(streamOrigin(info.machineType ?? null, info.footers));
    return { bytes, pages: sent, snapshotId, origin };
  } finally {
    socket?.destroy();
    store.close();
  }
}

function open(to: Endpoint): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = connect({ ...to, noDelay: true }, () => {
      socket.off('error', onError);
      socket.on('error', () => undefined);
      resolve(socket);
    });
    const onError = (err: Error): void => reject(new RestoreError(`the destination ${formatEndpoint(to)} refused the stream: ${err.message}`));
    socket.once('error', onError);
    socket.resume(); // a return path, if the destination opens one
  });
}

function drained(socket: Socket): Promise<void> {
  return new Promise((resolve, reject) => {
    const onClose = (): void => reject(new RestoreError('the destination closed the connection'));
    socket.once('close', onClose);
    socket.once('drain', () => {
      socket.off('close', onClose);
      resolve();
    });
  });
}
