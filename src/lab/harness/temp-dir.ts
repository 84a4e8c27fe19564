/**
 * Temporary directories for tests, benchmarks and the demo: one way to make them and one way to remove
 * them. Benchmarks and the demo use withTempDir (removed in a finally, whatever happened); jest tests
 * use test/temp-dir.ts, which removes them in afterEach/afterAll hooks.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

export interface TempDirOptions {
  /**
   * Where to make it instead of the system's temp directory: a file system a test or benchmark needs
   * (one that takes O_DIRECT, a disk rather than a tmpfs: BFMIG_BENCH_STORE_DIR).
   */
  base?: string;
}

/** A new empty directory named `prefix` + a random suffix. */
export function makeTempDir(prefix: string, options: TempDirOptions = {}): string {
  return fs.mkdtempSync(path.join(path.resolve(options.base || os.tmpdir()), prefix));
}

/** Removes `dir` and all it holds; a directory already gone is not an error. */
export function removeTempDir(dir: string): void {
  fs.rmSync(dir, { recursive: true, force: true });
}

/** Runs `use` with a new directory and removes the directory afterwards, whether `use` succeeded or threw. */
export async function withTempDir<T>(prefix: string, use: (dir: string) => Promise<T> | T, options: TempDirOptions = {}): Promise<T> {
  const dir = makeTempDir(prefix, options);
  try {
    return await use(dir);
  } finally {
    removeTempDir(dir);
  }
}
