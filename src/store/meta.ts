/**
 * Store metadata (meta.json), layout validation and VM-name validation.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { errorMessage } from '../common/errors';
import { readFileNoFollow } from './fsio';

/** The store's metadata file in its directory, replaced atomically by the store. */
export const META_FILE = 'meta.json';

/** What the caller tells begin() about the VM's RAM. */
export interface StoreLayout {
  /** Bytes per page (4096 for x86 guests). */
  pageSize: number;
  /** Pages across all RAM blocks; pages are indexed 0..pageCount-1. */
  pageCount: number;
  /** Caller's digest of its layout; a different layoutId means the old pages are meaningless. */
  layoutId: string;
  /** Caller's JSON description, stored as is. */
  layout: unknown;
}

export interface StoreMeta {
  vm: string;
  /** The complete snapshot this store claims, or null. */
  snapshotId: string | null;
  /** 'dirty' while a migration is writing (persisted before the first page write). */
  state: 'clean' | 'dirty';
  layoutId: string;
  layout: unknown;
  pageSize: number;
  pageCount: number;
  /** Pages held (non-zero digest) when the meta was last written. */
  presentPages: number;
  /** ISO time of the last meta write. */
  updatedAt: string;
}

/** Format tag written into meta.json; a file without it (or another tag) is not ours. */
export const META_FORMAT = 'bfmig-store/1';

/** Largest page size accepted (the write buffer always holds at least one page). */
export const MAX_PAGE_SIZE = 16 * 1024 * 1024;
/** Largest page count: the in-memory digest table (16 B/page) must fit one typed array (< 4 GiB). */
export const MAX_PAGE_COUNT = 2 ** 28 - 1;

/** A VM name: the store keys its directories by it (validateVmName says what is wrong with one that fails). */
export const VM_NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

/**
 * Returns name if it is a safe VM name (a single path component):
 * 1..64 characters from [A-Za-z0-9._-], starting with a letter or digit.
 * Throws an Error naming the problem otherwise.
 */
export function validateVmName(name: string): string {
  if (typeof name !== 'string') throw new Error(`VM name must be a string, got ${typeof name}`);
  if (name.length === 0) throw new Error('VM name is empty');
  if (name === '.' || name === '..') throw new Error(`VM name ${JSON.stringify(name)} is a relative path component`);
  if (name.length > 64) throw new Error(`VM name is ${name.length} characters long (at most 64)`);
  const bad = /[^A-Za-z0-9._-]/.exec(name);
  if (bad !== null) {
    throw new Error(
      `VM name ${JSON.stringify(name)} contains ${JSON.stringify(bad[0])} at ${bad.index} (allowed: letters, digits, '.', '_', '-')`,
    );
  }
  if (!VM_NAME_RE.test(name)) {
    throw new Error(`VM name ${JSON.stringify(name)} must start with a letter or digit`);
  }
  return name;
}

/** Throws unless layout is usable; returns the layout description as JSON text (null when undefined). */
export function validateLayout(layout: StoreLayout): string {
  if (typeof layout !== 'object' || layout === null) throw new TypeError('store layout must be an object');
  const { pageSize, pageCount, layoutId } = layout;
  if (!Number.isInteger(pageSize) || pageSize < 1 || pageSize > MAX_PAGE_SIZE) {
    throw new RangeError(`store layout: pageSize must be an integer in [1, ${MAX_PAGE_SIZE}], got ${pageSize}`);
  }
  if (!Number.isInteger(pageCount) || pageCount < 0 || pageCount > MAX_PAGE_COUNT) {
    throw new RangeError(`store layout: pageCount must be an integer in [0, ${MAX_PAGE_COUNT}], got ${pageCount}`);
  }
  if (typeof layoutId !== 'string' || layoutId.length === 0) {
    throw new TypeError('store layout: layoutId must be a non-empty string');
  }
  const json = JSON.stringify(layout.layout === undefined ? null : layout.layout);
  if (json === undefined) throw new TypeError('store layout: layout is not JSON-serializable');
  return json;
}

/** Parses meta.json text; returns null (and why) when it is not a valid store meta for vm. */
export function parseMeta(text: string, vm: string): { meta: StoreMeta } | { error: string } {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    return { error: `not JSON (${errorMessage(err)})` };
  }
  if (typeof raw !== 'object' || raw === null) return { error: 'not a JSON object' };
  const r = raw as Record<string, unknown>;
  if (r.format !== META_FORMAT) return { error: `format is ${JSON.stringify(r.format)}, want ${META_FORMAT}` };
  if (r.vm !== vm) return { error: `belongs to VM ${JSON.stringify(r.vm)}` };
  if (r.snapshotId !== null && (typeof r.snapshotId !== 'string' || r.snapshotId.length === 0)) {
    return { error: 'bad snapshotId' };
  }
  if (r.state !== 'clean' && r.state !== 'dirty') return { error: 'bad state' };
  if (typeof r.layoutId !== 'string' || r.layoutId.length === 0) return { error: 'bad layoutId' };
  const ps = r.pageSize;
  const pc = r.pageCount;
  if (typeof ps !== 'number' || !Number.isInteger(ps) || ps < 1 || ps > MAX_PAGE_SIZE) return { error: 'bad pageSize' };
  if (typeof pc !== 'number' || !Number.isInteger(pc) || pc < 0 || pc > MAX_PAGE_COUNT) return { error: 'bad pageCount' };
  const present = r.presentPages;
  if (typeof present !== 'number' || !Number.isInteger(present) || present < 0 || present > pc) {
    return { error: 'bad presentPages' };
  }
  if (typeof r.updatedAt !== 'string') return { error: 'bad updatedAt' };
  return {
    meta: {
      vm,
      snapshotId: r.snapshotId as string | null,
      state: r.state,
      layoutId: r.layoutId,
      layout: r.layout === undefined ? null : r.layout,
      pageSize: ps,
      pageCount: pc,
      presentPages: present,
      updatedAt: r.updatedAt,
    },
  };
}

/** meta.json text for m. */
export function serializeMeta(m: StoreMeta): string {
  return `${JSON.stringify({ format: META_FORMAT, ...m }, null, 2)}\n`;
}

/**
 * The meta.json of the store in dir as it is on disk, read without opening the store (which would take
 * its lock, and recover it): null when it is missing, unreadable or not a valid meta of vm's store.
 */
export function readMetaFile(dir: string, vm: string): StoreMeta | null {
  try {
    const parsed = parseMeta(readFileNoFollow(path.join(dir, META_FILE)).toString('utf8'), vm);
    return 'meta' in parsed ? parsed.meta : null;
  } catch {
    return null;
  }
}

/** Whether the store in dir has a meta.json: whether it holds anything, or ever began to. */
export function hasMetaFile(dir: string): boolean {
  return fs.existsSync(path.join(dir, META_FILE));
}
