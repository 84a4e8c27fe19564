/**
 * Page stores a test opens in a directory of its own: whatever the test did, they are closed after it,
 * before the directory is removed (a store closed by the test, or broken on purpose, is passed over).
 */
import { PageStore } from '../src/store';
import { testTempDir } from './temp-dir';

export class TestStores {
  private readonly opened: PageStore[] = [];

  /** A new directory for this test's stores (call it in a beforeEach). */
  dir(prefix: string): string {
    return testTempDir(prefix, { release: () => this.closeAll() });
  }

  /** PageStore.open, and remembered to be closed after the test. */
  open(...args: Parameters<typeof PageStore.open>): PageStore {
    const store = PageStore.open(...args);
    this.opened.push(store);
    return store;
  }

  /** Closes every store opened so far: after the test, or sooner when a mount under them must go first. */
  closeAll(): void {
    for (const store of this.opened.splice(0)) {
      try {
        store.close();
      } catch {
        // Closed by the test already, or broken by it on purpose.
      }
    }
  }
}
