import { connect, type Socket } from 'node:net';
import { type Endpoint, formatEndpoint } from '../gateway/address';
import { DIGEST_BYTES, digestContiguous, zeroPageDigest } from '../digest';
import { describeOrigin, RamFlag, SectionType, streamOrigin, VmCommand } from '../qemu';
import { writeRamWord, writeShortString } from '../qemu/encode';
import { X86_PAGE_SIZE as PAGE } from '../qemu/constants';
import { StreamError } from '../qemu/errors';
import { StreamParser } from '../qemu/parser';
import { RecordKind } from '../qemu/records';
import { ReturnPathError, ReturnPathMessage, ReturnPathParser, type ReturnPathRecord } from '../qemu/return-path';
import { sameDigest } from '../proxy/retained';
import { PageStore } from '../store';
import { readMigrationRecord } from '../store/migration-record';
import { loadStreamParts } from '../store/snapshot-parts';

const BATCH = 256;
/** How long restore waits for the destination to take more of the stream, or to give its verdict. */
export const DEFAULT_RESTORE_TIMEOUT_MS = 60_000;
/** After the verdict, how long the destination gets to close its end before ours is dropped. */
const CLOSE_GRACE_MS = 5_000;
/** The PING restore adds to a stream without a return path; any value does, QEMU echoes it in PONG. */
const RESTORE_PING = 0x62666d67;
/** Corrupt page indices a message lists before it only counts the rest. */
const LISTED_CORRUPT = 32;

export class RestoreError extends Error {
  override readonly name = 'RestoreError';
}

/** Pages of the store that no longer match their digests: restore sent no complete stream. */
export class CorruptPagesError extends RestoreError {
  constructor(
    vm: string,
    snapshotId: string,
    /** Page indices (numbered across all RAM blocks, as the store numbers them), ascending. */
    readonly pages: readonly number[],
  ) {
    const listed = pages.slice(0, LISTED_CORRUPT).join(', ') + (pages.length > LISTED_CORRUPT ? ` and ${pages.length - LISTED_CORRUPT} more` : '');
    super(
      `VM ${vm}: snapshot ${snapshotId} has ${pages.length} corrupt page${pages.length === 1 ? '' : 's'} (they no longer match their digests): ` +
        `${listed}; the destination's connection was reset, so it loaded nothing (\`bfmig snapshots verify\` stops holding them)`,
    );
  }
}

export interface RestoreOptions {
  /** Longest wait for the destination to take more of the stream or to give its verdict. */
  timeoutMs?: number;
}

export interface RestoreResult {
  bytes: number;
  pages: number;
  snapshotId: string;
  origin: string;
}

/**
 * Rebuilds a whole QEMU migration stream from a VM's retained snapshot — the head and device state of
 * the last complete migration, and every page the store holds — and sends it to a destination QEMU
 * started with `-incoming` and the same machine shape. The VM resumes as it was at the end of that
 * migration.
 *
 * Resolves only once the destination QEMU has said, on its return path, that it loaded the whole
 * stream; rejects with a RestoreError otherwise. Every page is checked against its digest before it is
 * sent; a corrupt one resets the destination's connection, so the destination never gets a stream that
 * loads.
 */
export async function restoreSnapshot(data: string, vm: string, to: Endpoint, options: RestoreOptions = {}): Promise<RestoreResult> {
  const timeoutMs = options.timeoutMs ?? DEFAULT_RESTORE_TIMEOUT_MS;
  const store = PageStore.open(data, vm);
  let destination: Destination | null = null;
  try {
    const meta = store.meta();
    if (!meta) throw new RestoreError(`no retained snapshot for VM ${vm} in ${data}`);
    const snapshotId = store.snapshotId();
    if (!snapshotId) throw new RestoreError(`VM ${vm}: the store claims no complete snapshot (its last migration did not complete)`);
    // A migration that completed without this store keeping its snapshot (part of it relayed verbatim,
    // a multifd channel whose pages were not kept) left the snapshot of an earlier one: the VM has run
    // on since, and restoring that state would roll it back behind its disks.
    const last = readMigrationRecord(store.dir);
    if (last?.result === 'completed' && last.kept === false) {
      const why = last.verbatim ? `relayed verbatim from byte ${last.verbatim.streamOffset}: ${last.verbatim.reason}` : 'its pages were not all kept';
      throw new RestoreError(
        `VM ${vm}: its last migration (${last.direction === 'send' ? 'sent' : 'received'} ${last.at}) completed without this store keeping its snapshot (${why}); ` +
          `snapshot ${snapshotId} is older than the VM, so restore refuses it`,
      );
    }
    const { head: storedHead, tail, info } = loadStreamParts(store);
    if (!info || !storedHead || !tail || info.snapshotId !== snapshotId) {
      throw new RestoreError(`VM ${vm}: the device state of snapshot ${snapshotId} was not retained`);
    }
    if (meta.presentPages !== meta.pageCount) {
      throw new RestoreError(`VM ${vm}: snapshot ${snapshotId} is incomplete: ${meta.pageCount - meta.presentPages} of ${meta.pageCount} pages are not held`);
    }
    const blocks = (meta.layout as { blocks?: { name: string; length: number }[] }).blocks;
    if (!Array.isArray(blocks)) throw new RestoreError(`VM ${vm}: the store has no RAM block layout`);
    const head = withReturnPath(storedHead, vm);

    destination = await Destination.open(to, timeoutMs);
    const out = destination;
    await out.send(head);
    const sectionHeader = Buffer.alloc(5);
    sectionHeader[0] = SectionType.End;
    sectionHeader.writeUInt32BE(info.ramSectionId, 1);
    await out.send(sectionHeader);

    const zeroDigest = zeroPageDigest(PAGE);
    const digests = store.digests;
    const pages = Buffer.allocUnsafe(BATCH * PAGE);
    const hashes = Buffer.allocUnsafe(BATCH * DIGEST_BYTES);
    const corrupt: number[] = [];
    let firstPage = 0;
    let sent = 0;
    for (const block of blocks) {
      const count = Math.ceil(block.length / PAGE);
      for (let at = 0; at < count; at += BATCH) {
        const n = Math.min(BATCH, count - at);
        const batchStart = firstPage + at;
        store.readPages(batchStart, n, pages, 0);
        // Re-hash what was read, in one native call per batch: the disk may have changed a page since
        // the digest was taken, and a wrong page must never reach a guest.
        digestContiguous(pages, 0, n, PAGE, hashes, 0);
        for (let k = 0; k < n; k++) {
          if (!sameDigest(hashes, k * DIGEST_BYTES, digests, (batchStart + k) * DIGEST_BYTES)) corrupt.push(batchStart + k);
        }
        // Past the first corrupt page nothing more is sent; the rest is still hashed to name them all.
        if (corrupt.length > 0) continue;
        const records = Buffer.allocUnsafe(n * (8 + PAGE) + 1 + block.name.length);
        let p = 0;
        for (let k = 0; k < n; k++) {
          const zero = sameDigest(hashes, k * DIGEST_BYTES, zeroDigest, 0);
          const named = at === 0 && k === 0;
          p = writeRamWord(records, p, (at + k) * PAGE, (zero ? RamFlag.Zero : RamFlag.Page) | (named ? 0 : RamFlag.Continue));
          if (named) {
            p = writeShortString(records, p, block.name);
          }
          if (zero) records[p++] = 0;
          else p += pages.copy(records, p, k * PAGE, (k + 1) * PAGE);
        }
        await out.send(records.subarray(0, p));
        sent += n;
      }
      firstPage += count;
    }
    if (corrupt.length > 0) throw new CorruptPagesError(vm, snapshotId, corrupt);
    const end = Buffer.alloc(8 + (info.footers ? 5 : 0));
    writeRamWord(end, 0, 0, RamFlag.Eos);
    if (info.footers) {
      end[8] = SectionType.Footer;
      end.writeUInt32BE(info.ramSectionId, 9);
    }
    await out.send(end);
    await out.send(tail);
    await out.verdict();
    await out.close();
    const origin = describeOrigin(streamOrigin(info.machineType ?? null, info.footers));
    return { bytes: out.bytes, pages: sent, snapshotId, origin };
  } catch (err) {
    // Whatever went wrong, a destination still listening must see a broken stream, never one that
    // ends where a stream may end.
    destination?.reset();
    throw err;
  } finally {
    store.close();
  }
}

/**
 * The stored head (file header, configuration, RAM setup) with a return path: a migration made with
 * QEMU's return-path capability already carries OPEN_RETURN_PATH and a PING; otherwise both are added
 * where QEMU's source puts them, right after the file header and the configuration (which must stay
 * first: QEMU only accepts it at byte 8).
 */
function withReturnPath(head: Buffer, vm: string): Buffer {
  let insertAt = -1;
  let opens = false;
  let fallback: string | null = null;
  const parser = new StreamParser((record) => {
    if (record.kind === RecordKind.FileHeader || record.kind === RecordKind.Configuration) insertAt = parser.recordsEnd;
    else if (record.kind === RecordKind.Command && record.command === VmCommand.OpenReturnPath) opens = true;
    else if (record.kind === RecordKind.Fallback) fallback = record.reason;
  });
  try {
    parser.push(head);
  } catch (err) {
    if (err instanceof StreamError) throw new RestoreError(`VM ${vm}: the retained stream head does not parse: ${err.message}`);
    throw err;
  }
  if (fallback !== null || insertAt < 0) throw new RestoreError(`VM ${vm}: the retained stream head is not one restore can rebuild${fallback ? `: ${fallback}` : ''}`);
  if (opens) return head;
  const commands = Buffer.alloc(5 + 5 + 4);
  commands[0] = SectionType.Command;
  commands.writeUInt16BE(VmCommand.OpenReturnPath, 1);
  commands.writeUInt16BE(0, 3);
  commands[5] = SectionType.Command;
  commands.writeUInt16BE(VmCommand.Ping, 6);
  commands.writeUInt16BE(4, 8);
  commands.writeUInt32BE(RESTORE_PING, 10);
  return Buffer.concat([head.subarray(0, insertAt), commands, head.subarray(insertAt)]);
}

/**
 * The connection to the destination QEMU: the stream goes out, its return path comes back. The
 * destination's verdict is a SHUT message: 0 when it loaded the whole stream. Anything else — SHUT
 * non-zero, a close or reset before SHUT, a malformed message, a stall — is a failure, kept here and
 * raised at the next send() or verdict().
 */
class Destination {
  bytes = 0;
  private failure: RestoreError | null = null;
  private shut = false;
  private streamSent = false;
  private closed = false;
  private readonly parser = new ReturnPathParser((message) => this.message(message));
  private readonly waiters = new Set<() => void>();

  private constructor(
    private readonly socket: Socket,
    private readonly where: string,
    private readonly timeoutMs: number,
  ) {
    socket.on('data', (chunk: Buffer) => {
      try {
        this.parser.push(chunk);
      } catch (err) {
        if (!(err instanceof ReturnPathError)) throw err;
        this.fail(`the destination ${where} sent a malformed return-path message: ${err.message}`);
      }
    });
    socket.on('end', () => this.fail(`the destination ${where} closed the connection before it said it loaded the stream (it failed to load it)`));
    socket.on('error', (err: Error) => this.fail(`the connection to the destination ${where} failed before it said it loaded the stream: ${err.message}`));
    socket.on('close', () => {
      this.closed = true;
      this.fail(`the connection to the destination ${where} closed before it said it loaded the stream`);
      this.notify();
    });
    socket.on('drain', () => this.notify());
  }

  static open(to: Endpoint, timeoutMs: number): Promise<Destination> {
    const where = formatEndpoint(to);
    return new Promise((resolve, reject) => {
      const socket = connect({ ...to, noDelay: true }, () => {
        clearTimeout(timer);
        socket.off('error', onError);
        resolve(new Destination(socket, where, timeoutMs));
      });
      const onError = (err: Error): void => {
        clearTimeout(timer);
        reject(new RestoreError(`the destination ${where} refused the stream: ${err.message}`));
      };
      socket.once('error', onError);
      // A host that drops the connection attempt would otherwise keep restore waiting for minutes.
      const timer = setTimeout(() => {
        socket.destroy();
        onError(new Error(`no answer within ${Math.round(timeoutMs / 1000)} s`));
      }, timeoutMs);
      timer.unref();
    });
  }

  /** Queues bytes of the stream; waits while the destination is behind. */
  async send(chunk: Buffer): Promise<void> {
    if (this.failure) throw this.failure;
    this.bytes += chunk.length;
    if (!this.socket.write(chunk)) await this.until(() => !this.socket.writableNeedDrain, 'take more of the stream');
  }

  /** The whole stream has been queued: waits for the destination's SHUT 0. */
  async verdict(): Promise<void> {
    this.streamSent = true;
    await this.until(() => this.shut, 'say whether it loaded the stream');
  }

  /** After the verdict: our end closes, and the destination's (QEMU closes its end after SHUT). */
  async close(): Promise<void> {
    this.socket.end();
    await this.until(() => this.closed, 'close the connection', CLOSE_GRACE_MS).catch(() => undefined);
    this.socket.destroy();
  }

  /** Breaks the stream: a reset, so that whatever the destination got cannot end as a loadable stream. */
  reset(): void {
    if (this.socket.destroyed) return;
    // Once the destination has closed its side there is nothing left to break, and Node 20's
    // resetAndDestroy() on such a socket never closes its handle (the process would not exit).
    if (this.socket.readableEnded) this.socket.destroy();
    else this.socket.resetAndDestroy();
  }

  private message(message: ReturnPathRecord): void {
    switch (message.type) {
      case ReturnPathMessage.Shut:
        if (message.value !== 0) this.fail(`the destination QEMU ${this.where} failed to load the stream (return path SHUT ${message.value})`);
        else if (!this.streamSent) this.fail(`the destination QEMU ${this.where} said it was done before it had the whole stream`);
        else this.shut = true;
        break;
      case ReturnPathMessage.Pong:
      case ReturnPathMessage.SwitchoverAck:
        // The answer to the stream's PING, and (QEMU ≥ 8.1 with switchover-ack) its consent to switch
        // over: neither is a verdict.
        break;
      default:
        this.fail(`the destination QEMU ${this.where} sent return-path message ${message.type}, which only postcopy uses`);
    }
    this.notify();
  }

  /** The first failure is the one reported; nothing changes the verdict once SHUT 0 came. */
  private fail(why: string): void {
    if (this.shut || this.failure) return;
    this.failure = new RestoreError(why);
    this.notify();
  }

  private notify(): void {
    for (const wake of this.waiters) wake();
  }

  /** Resolves once `done()` holds; rejects on a failure, or when `timeoutMs` pass without it. */
  private until(done: () => boolean, what: string, timeoutMs = this.timeoutMs): Promise<void> {
    return new Promise((resolve, reject) => {
      const check = (): void => {
        if (this.failure) finish(this.failure);
        else if (done()) finish(null);
      };
      const timer = setTimeout(() => {
        this.fail(`the destination ${this.where} did not ${what} within ${Math.round(timeoutMs / 1000)} s`);
        finish(this.failure ?? new RestoreError(`the destination ${this.where} did not ${what}`));
      }, timeoutMs);
      const finish = (err: RestoreError | null): void => {
        clearTimeout(timer);
        this.waiters.delete(check);
        if (err) reject(err);
        else resolve();
      };
      this.waiters.add(check);
      check();
    });
  }
}
