// Writes the hand-built fixtures of src/lab/harness/fixtures.ts to fixtures/ with a manifest.
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { PACKAGE_ROOT } from '../src/digest/package-root';
import { buildFixtures } from '../src/lab/harness/fixtures';

// The package's fixtures/, whether this runs from scripts/ (npm run fixtures, ts-node) or dist/scripts/.
const dir = join(PACKAGE_ROOT, 'fixtures');
const target = process.argv[2] ?? dir;
mkdirSync(target, { recursive: true });
const manifest = buildFixtures().map((f) => {
  writeFileSync(join(target, `${f.name}.bin`), f.bytes);
  return { file: `${f.name}.bin`, description: f.description, bytes: f.bytes.length, expect: f.expect };
});
writeFileSync(join(target, 'manifest.json'), JSON.stringify(manifest, null, 2) + '\n');
console.log(`wrote ${manifest.length} fixtures to ${target}`);
