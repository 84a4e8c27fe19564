/**
 * Every page store's sync before its commit (PageStore.syncInBackground) made `ms` slower, as on a file
 * system slow to commit a large write phase: the stores of a migration settle that much later, so a test
 * can act while they do. Undone by jest.restoreAllMocks().
 */
import { PageStore } from '../src/store';

export interface SyncCount {
  /** Syncs begun. */
  begun: number;
  /** Syncs begun and not over yet. */
  running: number;
}

export function slowSyncs(ms: number): SyncCount {
  const realSync = PageStore.prototype.syncInBackground;
  const count: SyncCount = { begun: 0, running: 0 };
  jest.spyOn(PageStore.prototype, 'syncInBackground').mockImplementation(async function (this: PageStore) {
    count.begun++;
    count.running++;
    try {
      await new Promise((resolve) => setTimeout(resolve, ms));
      await realSync.call(this);
    } finally {
      count.running--;
    }
  });
  return count;
}
