import * as fs from 'node:fs';
import * as path from 'node:path';
import { loadStreamInfo, type StreamInfo } from '../store/snapshot-parts';
import { hasMetaFile, lockHolder, PageStore, readMetaFile, removeStore, StoreBusyError, validateVmName } from '../store';
import { describeMigrationRecord, type MigrationRecord, readMigrationRecord } from '../store/migration-record';
import { UsageError } from './parse';

export interface SnapshotSummary {
  vm: string;
  snapshotId: string | null;
  pages: number;
  presentPages: number;
  /** Bytes the store's files take on disk (pages are sparse). */
  diskBytes: number;
  updatedAt: string | null;
  /** "pid@host" of a process using the store now (a migration), else null. */
  inUse: string | null;
  /** Whether `bfmig restore` can rebuild the VM: a claimed snapshot, every page held, its device state kept. */
  restorable: boolean;
  /** The machine type the snapshot came from, when its stream said. */
  machineType: string | null;
  /** The QEMU release that introduced that machine type: the sender ran it or later (the stream carries no version). */
  minQemuRelease: string | null;
  /** What became of the VM's last migration through this gateway (null: none noted). */
  lastMigration: MigrationRecord | null;
}

function diskBytes(dir: string): number {
  let total = 0;
  for (const name of fs.readdirSync(dir)) {
    let st: fs.Stats;
    try {
      st = fs.lstatSync(path.join(dir, name));
    } catch {
      continue; // removed meanwhile (a lock let go, a takeover file)
    }
    if (st.isFile()) total += st.blocks * 512;
  }
  return total;
}

/** The retained stream's description, or null when absent or unreadable. */
function streamInfo(store: PageStore): StreamInfo | null {
  try {
    return loadStreamInfo(store);
  } catch {
    return null;
  }
}

export function listSnapshots(data: string): SnapshotSummary[] {
  if (!fs.existsSync(data)) return [];
  const out: SnapshotSummary[] = [];
  for (const vm of fs.readdirSync(data).sort()) {
    const dir = path.join(data, vm);
    if (!fs.lstatSync(dir).isDirectory()) continue; // a symbolic link is no store: never followed
    try {
      validateVmName(vm);
    } catch {
      continue;
    }
    const holder = lockHolder(dir);
    if (holder) {
      // In use: report what its metadata says without opening it.
      const meta = readMetaFile(dir, vm);
      out.push({ vm, snapshotId: null, pages: meta?.pageCount ?? 0, presentPages: meta?.presentPages ?? 0, diskBytes: diskBytes(dir), updatedAt: meta?.updatedAt ?? null, inUse: `${holder.pid}@${holder.host}`, restorable: false, machineType: null, minQemuRelease: null, lastMigration: readMigrationRecord(dir) });
      continue;
    }
    const store = PageStore.open(data, vm);
    try {
      const meta = store.meta();
      const info = streamInfo(store);
      const snapshotId = store.snapshotId();
      out.push({
        vm,
        snapshotId,
        pages: meta?.pageCount ?? 0,
        presentPages: meta?.presentPages ?? 0,
        diskBytes: diskBytes(dir),
        updatedAt: meta?.updatedAt ?? null,
        inUse: null,
        restorable: snapshotId !== null && info?.snapshotId === snapshotId && meta !== null && meta.presentPages === meta.pageCount,
        machineType: info?.snapshotId === snapshotId ? info?.machineType ?? null : null,
        minQemuRelease: info?.snapshotId === snapshotId ? info?.minQemuRelease ?? null : null,
        lastMigration: readMigrationRecord(dir),
      });
    } finally {
      store.close();
    }
  }
  return out;
}

/** `bfmig snapshots list|show|verify|rm --data DIR [VM]`; returns the exit status. */
export function runSnapshots(action: string | undefined, data: string, vm: string | undefined, json: boolean, write: (s: string) => void): number {
  switch (action) {
    case 'list': {
      const list = listSnapshots(data);
      if (json) {
        write(JSON.stringify(list, null, 2) + '\n');
      } else if (list.length === 0) {
        write(`no retained VMs in ${data}\n`);
      } else {
        write('vm'.padEnd(24) + 'snapshot'.padEnd(38) + 'pages held'.padStart(22) + 'on disk MiB'.padStart(13) + '  restorable  updated\n');
        for (const s of list) {
          const held = `${s.presentPages}/${s.pages}`;
          write(s.vm.padEnd(24) + (s.inUse ? `(in use by ${s.inUse})` : s.snapshotId ?? '(none claimed)').padEnd(38) + held.padStart(22) + (s.diskBytes / 2 ** 20).toFixed(1).padStart(13) + `  ${(s.restorable ? `yes${s.machineType ? ` (${s.machineType}${s.minQemuRelease ? `, QEMU ≥ ${s.minQemuRelease}` : ''})` : ''}` : 'no').padEnd(11)}${s.updatedAt ?? '-'}\n`);
          if (s.lastMigration) write(`  last migration ${describeMigrationRecord(s.lastMigration)}\n`);
        }
      }
      return 0;
    }
    case 'show':
    case 'verify':
    case 'rm': {
      if (!vm) throw new UsageError(`snapshots ${action} needs a VM name`);
      const name = validateVmName(vm);
      const dir = path.join(data, name);
      if (!hasMetaFile(dir)) {
        write(`no retained snapshot for VM ${name} in ${data}\n`);
        return 1;
      }
      if (action === 'rm') {
        // Removed under its own lock, so never while a gateway has just opened it.
        if (removeStore(data, name) === null) {
          const holder = lockHolder(dir);
          throw new StoreBusyError(`the store of ${name} is in use by process ${holder?.pid ?? '?'} on ${holder?.host ?? '?'}`);
        }
        write(`removed ${dir}\n`);
        return 0;
      }
      const store = PageStore.open(data, name);
      try {
        if (action === 'show') {
          const info = streamInfo(store);
          const origin = info !== null && info.snapshotId === store.snapshotId() ? info : null;
          const stream = origin && { machineType: origin.machineType ?? null, minQemuRelease: origin.minQemuRelease ?? null, framing: origin.framing ?? null };
          write(JSON.stringify({ ...store.meta(), stream, lastMigration: readMigrationRecord(dir), diskBytes: diskBytes(dir), warnings: store.warnings }, null, 2) + '\n');
          return 0;
        }
        const corrupted = store.verify();
        const result = { vm: name, presentPages: store.meta()?.presentPages ?? 0, corrupted, snapshotId: store.snapshotId() };
        if (json) write(JSON.stringify(result, null, 2) + '\n');
        else if (corrupted.length === 0) write(`${name}: every held page matches its digest\n`);
        else write(`${name}: ${corrupted.length} corrupted page(s), no longer held: ${corrupted.slice(0, 20).join(', ')}${corrupted.length > 20 ? ', …' : ''}\n`);
        return corrupted.length === 0 ? 0 : 1;
      } finally {
        store.close();
      }
    }
    default:
      throw new UsageError('snapshots takes list, show VM, verify VM or rm VM');
  }
}
