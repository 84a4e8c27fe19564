import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';

/** The directory of bfmig's package.json, found by walking up: works from src/ (ts-jest) and dist/. */
function findPackageRoot(from: string): string {
  for (let dir = from; ; dir = dirname(dir)) {
    const file = join(dir, 'package.json');
    if (existsSync(file)) {
      try {
        if ((JSON.parse(readFileSync(file, 'utf8')) as { name?: unknown }).name === 'bfmig') return dir;
      } catch {
        // not ours; keep walking
      }
    }
    if (dirname(dir) === dir) throw new Error(`cannot find the bfmig package root above ${from}`);
  }
}

export const PACKAGE_ROOT = findPackageRoot(__dirname);
