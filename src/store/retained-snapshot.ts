import * as path from 'node:path';
import { errorMessage } from '../common/errors';
import { StoreBusyError } from './lock';
import { readMetaFile, validateVmName } from './meta';
import { PageStore, type PageStoreOptions } from './page-store';

/**
 * Opens another VM's store to read the snapshot it retains, for a migration of some other VM (a sibling
 * booted from the same image): only when it claims a complete snapshot (`snapshotId`, or any when null),
 * needs no crash recovery, and no migration or other process holds it. Its lock is the caller's until
 * close(), so nothing writes it meanwhile. Returns the store, or why it is not used.
 */
export function openRetainedSnapshot(root: string, vm: string, snapshotId: string | null, options: PageStoreOptions = {}): PageStore | string {
  try {
    validateVmName(vm);
  } catch (err) {
    return errorMessage(err);
  }
  // Read before opening: open() would create a missing store and recover a dirty one (a read of every page).
  const meta = readMetaFile(path.join(path.resolve(root), vm), vm);
  const held = meta !== null && meta.state === 'clean' ? meta.snapshotId : null;
  if (held === null) return 'no complete snapshot';
  if (snapshotId !== null && held !== snapshotId) return 'another snapshot';
  let store: PageStore;
  try {
    store = PageStore.open(root, vm, options);
  } catch (err) {
    return err instanceof StoreBusyError ? 'in use' : errorMessage(err);
  }
  // Between the read above and the lock, a migration may have changed it.
  if (store.snapshotId() !== held) {
    store.close();
    return 'changed while opening';
  }
  return store;
}

/** A copy of the digest table of the snapshot a VM's store retains now, and its id; or why not. */
export function readRetainedDigests(root: string, vm: string): { snapshotId: string; digests: Uint8Array } | string {
  const store = openRetainedSnapshot(root, vm, null);
  if (typeof store === 'string') return store;
  try {
    return { snapshotId: store.snapshotId() as string, digests: store.digests.slice() };
  } catch (err) {
    return errorMessage(err);
  } finally {
    store.close();
  }
}
