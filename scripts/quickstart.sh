#!/usr/bin/env bash
# Installs what bfmig needs on a fresh Debian machine, builds it, and runs the capture demo:
# a guest in real QEMU migrates through `bfmig capture`, then `bfmig inspect` reads the stream.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
npm ci --no-audit --no-fund
npm run build
node dist/scripts/capture-demo.js "$@"
