/**
 * Import rules for bfmig, checked by `npm run check:deps` and by test/dependencies.test.ts (so by every
 * `npm test`). ARCHITECTURE.md explains the layers. A rule that must bend for one file gets an explicit
 * `pathNot` here with a comment saying why, never a silent widening of the pattern.
 */
const PRODUCT = '^src/(common|qemu|proxy|wire|store|digest|gateway|model)/';

/** @type {import('dependency-cruiser').IConfiguration} */
module.exports = {
  forbidden: [
    {
      name: 'no-circular',
      severity: 'error',
      comment: 'No import cycles, type-only imports included: import from the defining module, not a barrel that re-exports it.',
      from: {},
      to: { circular: true },
    },
    {
      name: 'product-not-lab',
      severity: 'error',
      comment: 'The product never loads the lab (QEMU driver, WAN emulator, demo, capture): src/lab/ may import the product, not the reverse.',
      from: { path: PRODUCT },
      to: { path: '^src/lab/' },
    },
    {
      name: 'cli-loads-lab-lazily',
      severity: 'error',
      comment: 'bfmig demo / capture reach the lab only through import() inside the command, so bfmig gateway never loads it.',
      from: { path: '^src/cli/' },
      to: { path: '^src/lab/', dynamic: false },
    },
    {
      name: 'product-not-cli',
      severity: 'error',
      comment: 'The CLI sits on top of the product; nothing below it imports it.',
      from: { path: PRODUCT },
      to: { path: '^src/cli/' },
    },
    // Each layer below the gateway may import only itself and the layers listed for it (src/common/, the
    // small pure helpers every layer shares, is allowed to all of them and imports nothing itself).
    {
      name: 'layer-common',
      severity: 'error',
      comment: 'src/common/ (errorMessage, parseSize) imports nothing else of bfmig, so every layer may import it.',
      from: { path: '^src/common/' },
      to: { path: '^src/', pathNot: '^src/common/' },
    },
    {
      name: 'layer-digest',
      severity: 'error',
      comment: 'src/digest/ (page digests, native addon) imports nothing else of bfmig but common.',
      from: { path: '^src/digest/' },
      to: { path: '^src/', pathNot: '^src/(digest|common)/' },
    },
    {
      name: 'layer-qemu',
      severity: 'error',
      comment: 'The QEMU stream codec imports only digest (and common).',
      from: { path: '^src/qemu/' },
      to: { path: '^src/', pathNot: '^src/(qemu|digest|common)/' },
    },
    {
      name: 'layer-wire',
      severity: 'error',
      comment: 'Gateway frames only move and bound payloads: src/wire/ imports only digest (and common), never qemu, proxy, store or gateway.',
      from: { path: '^src/wire/' },
      to: { path: '^src/', pathNot: '^src/(wire|digest|common)/' },
    },
    {
      name: 'layer-store',
      severity: 'error',
      comment: 'The page store knows pages and digests, not QEMU, the codecs, frames or sessions: it imports only digest (and common).',
      from: { path: '^src/store/' },
      to: { path: '^src/', pathNot: '^src/(store|digest|common)/' },
    },
    {
      name: 'layer-proxy',
      severity: 'error',
      comment: 'The encoder/decoder import qemu, digest and common only; they see the store through the RetainedPages interface and know no frames or sessions.',
      from: { path: '^src/proxy/' },
      to: { path: '^src/', pathNot: '^src/(proxy|qemu|digest|common)/' },
    },
    {
      name: 'layer-model',
      severity: 'error',
      comment: 'The pre-copy model is pure arithmetic: it imports nothing else of bfmig but common.',
      from: { path: '^src/model/' },
      to: { path: '^src/', pathNot: '^src/(model|common)/' },
    },
    {
      name: 'no-sockets-below-gateway',
      severity: 'error',
      comment: 'Codecs, frames and the store do no network I/O: sockets belong to src/gateway/ (and the CLI and lab).',
      from: { path: '^src/(common|qemu|proxy|wire|store|digest|model)/' },
      to: { dependencyTypes: ['core'], path: '^(node:)?(net|tls|dgram|http|https|http2)$' },
    },
    {
      name: 'src-not-tests',
      severity: 'error',
      comment: 'Shipped code never imports tests, benchmarks or scripts.',
      from: { path: '^src/' },
      to: { path: '^(test|bench|scripts)/' },
    },
    {
      name: 'tests-not-bench',
      severity: 'error',
      comment: 'Tests and benchmarks share equipment through src/lab/harness/, never each other: a test runs a benchmark as a child process if it must.',
      from: { path: '^test/' },
      to: { path: '^bench/' },
    },
    {
      name: 'bench-not-tests',
      severity: 'error',
      comment: 'Benchmarks share equipment with tests through src/lab/harness/, never by importing test/ (jest helpers have no place in a benchmark).',
      from: { path: '^bench/' },
      to: { path: '^test/' },
    },
    {
      name: 'not-to-unresolvable',
      severity: 'error',
      comment: 'Every import resolves (a rule over paths is only as good as the paths it can see).',
      from: {},
      to: { couldNotResolve: true },
    },
  ],
  options: {
    doNotFollow: { path: 'node_modules' },
    tsPreCompilationDeps: true,
    tsConfig: { fileName: 'tsconfig.json' },
  },
};
