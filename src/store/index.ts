/**
 * Retained-snapshot store: per VM, pageCount fixed-size pages with a 16-byte
 * XXH3-128 digest each, plus metadata. Knows nothing of QEMU or the wire.
 */
export { type PageIo, PageStore, type PageStoreOptions } from './page-store';
export { PAGES_FILE } from './pages-file';
export { DIGESTS_FILE } from './digest-table';
export { type StoreLayout, type StoreMeta, validateVmName, hasMetaFile, readMetaFile, META_FILE, META_FORMAT, MAX_PAGE_COUNT, MAX_PAGE_SIZE } from './meta';
export { copyMode as storeCopyMode } from '../common/copy';
export { lockHolder, StoreBusyError } from './lock';
export { StoreBudget, scanStores, statStore, removeStore, removeUnclaimedStores, holdsNothing, type Eviction, type Room, type StoreEntry } from './budget';
export { UndoableStore } from './undo';
