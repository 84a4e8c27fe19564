'use strict';
/*
 * Tests that start `bfmig` as a child process run the compiled dist/. `npm test` builds first (pretest);
 * a bare `npx jest` does not, and would test yesterday's code. So: when any TypeScript source is newer
 * than its compiled file, build before the first test runs.
 */
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const root = path.resolve(__dirname, '..');

function stale(dir) {
  for (const entry of fs.readdirSync(path.join(root, dir), { withFileTypes: true })) {
    const rel = path.join(dir, entry.name);
    if (entry.isDirectory()) {
      if (stale(rel)) return true;
    } else if (entry.name.endsWith('.ts') && !entry.name.endsWith('.d.ts')) {
      const out = path.join(root, 'dist', rel.replace(/\.ts$/, '.js'));
      if (!fs.existsSync(out) || fs.statSync(out).mtimeMs < fs.statSync(path.join(root, rel)).mtimeMs) return true;
    }
  }
  return false;
}

module.exports = function globalSetup() {
  if (!['src', 'bench', 'scripts'].some(stale)) return;
  process.stderr.write('dist/ is older than the sources: building (npx tsc -p tsconfig.json)\n');
  execFileSync(process.execPath, [require.resolve('typescript/bin/tsc'), '-p', path.join(root, 'tsconfig.json')], { stdio: 'inherit', cwd: root });
};
