#!/usr/bin/env bash
# Installs what bfmig needs on a fresh Debian machine, builds it, and runs the two demos, all on
# this machine's loopback:
#   1. `bfmig demo`: a guest in real QEMU migrates A → B → A → B over an emulated 100 Mbit/s, 20 ms
#      WAN, directly and through two bfmig gateways, and a table compares the legs;
#   2. the capture demo: one migration through `bfmig capture`, then `bfmig inspect` on the stream.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
npm ci --no-audit --no-fund
npm run build
npx bfmig demo "$@"
echo
node dist/scripts/capture-demo.js
