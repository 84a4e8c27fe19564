#!/usr/bin/env node
'use strict';
/*
 * Builds the bfmig_digest addon: `node-gyp rebuild` in the package root.
 * Used by `npm run build:native` and by the root `install` script (so
 * `npm ci` / `npm install` build it too).
 *
 * node-gyp normally downloads Node's headers from nodejs.org. Official Node
 * tarballs, NodeSource and Debian packages all ship them under
 * <prefix>/include/node, so unless a nodedir is configured already
 * (npm_config_nodedir, e.g. `nodedir=/usr` in .npmrc) we point node-gyp at
 * the running Node's own headers and need no network.
 *
 * Needs: a C compiler, make, python3, xxhash.h (Debian: libxxhash-dev) and libzstd (libzstd-dev).
 */
const { spawnSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const root = path.resolve(__dirname, '..');

function nodeGypCommand() {
  try {
    return [process.execPath, require.resolve('node-gyp/bin/node-gyp.js', { paths: [root] })];
  } catch {
    // devDependencies not installed (e.g. npm ci --omit=dev): npm exports the
    // path of its bundled node-gyp to scripts.
    const bundled = process.env.npm_config_node_gyp;
    if (bundled && fs.existsSync(bundled)) return [process.execPath, bundled];
    return ['node-gyp'];
  }
}

const args = ['rebuild'];
if (!process.env.npm_config_nodedir) {
  const prefix = path.resolve(path.dirname(process.execPath), '..');
  if (fs.existsSync(path.join(prefix, 'include', 'node', 'node_api.h'))) {
    args.push(`--nodedir=${prefix}`);
  }
}

const [cmd, ...pre] = nodeGypCommand();
const r = spawnSync(cmd, [...pre, ...args], { cwd: root, stdio: 'inherit' });
if (r.error) {
  console.error(`bfmig: cannot run node-gyp: ${r.error.message}`);
  process.exit(1);
}
if (r.status !== 0) {
  console.error('bfmig: building the native digest addon failed; it needs g++ (or cc), make, python3, libxxhash-dev and libzstd-dev');
}
process.exit(r.status === null ? 1 : r.status);
