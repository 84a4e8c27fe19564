/**
 * Temporary directories in jest tests, always removed: `testTempDir` in a test or a beforeEach (gone
 * after that test), `suiteTempDir` in a beforeAll (gone after the file's last test). Importing this
 * module registers the hooks that remove them at the top level of the test file, so they run after the
 * hooks of every describe block: a gateway is stopped, a tmpfs unmounted, before its directory goes.
 * Set BFMIG_KEEP_VM_TMP=1 to keep the suite directories (gateway logs, stores) for a post-mortem.
 */
import { makeTempDir, removeTempDir, type TempDirOptions } from '../src/lab/harness/temp-dir';

interface Made {
  dir: string;
  /** Runs first: closes what still holds files in the directory (hooks of the file's top level run after this one). */
  release?: () => void;
}

const perTest: Made[] = [];
const perFile: Made[] = [];

export interface TestTempDirOptions extends TempDirOptions {
  release?: () => void;
}

/** A new directory, removed after the current test (call it in a test or a beforeEach). */
export function testTempDir(prefix: string, options: TestTempDirOptions = {}): string {
  const dir = makeTempDir(prefix, options);
  perTest.push({ dir, release: options.release });
  return dir;
}

/** A new directory, removed after the last test of the file (call it in a beforeAll, which a skipped suite never runs). */
export function suiteTempDir(prefix: string, options: TestTempDirOptions = {}): string {
  const dir = makeTempDir(prefix, options);
  perFile.push({ dir, release: options.release });
  return dir;
}

/** Releases and removes every directory of `made`, even when a release throws (the first error is thrown after). */
function remove(made: Made[], keep: boolean): void {
  let failure: unknown = null;
  for (const { dir, release } of made) {
    try {
      release?.();
    } catch (err) {
      failure ??= err;
    }
    if (keep) console.log(`kept ${dir} (BFMIG_KEEP_VM_TMP=1)`);
    else removeTempDir(dir);
  }
  if (failure !== null) throw failure;
}

afterEach(() => remove(perTest.splice(0), false));

afterAll(() => {
  remove(perTest.splice(0), false);
  remove(perFile.splice(0), process.env.BFMIG_KEEP_VM_TMP === '1');
});
