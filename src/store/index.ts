/**
 * Retained-snapshot store: per VM, pageCount fixed-size pages with a 16-byte
 * XXH3-128 digest each, plus metadata. Knows nothing of QEMU or the wire.
 */
export { PageStore, type PageStoreOptions, PAGES_FILE, DIGESTS_FILE, META_FILE } from './page-store';
export { type StoreLayout, type StoreMeta, validateVmName, META_FORMAT, MAX_PAGE_COUNT, MAX_PAGE_SIZE } from './meta';
export { copyMode as storeCopyMode } from './copy';
export { lockHolder, StoreBusyError } from './lock';
export { StoreBudget, scanStores, statStore, removeStore, removeUnclaimedStores, holdsNothing, type Eviction, type Room, type StoreEntry } from './budget';
export { UndoableStore } from './undo';
