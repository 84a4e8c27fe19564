#!/usr/bin/env bash
# Debian packages bfmig needs: QEMU for real migrations, a kernel and busybox for the test guest,
# gcc for the guest's workload program, libxxhash-dev and libzstd-dev for the native addon (page
# digests, WAN compression), openssl for
# `bfmig certs` (it issues the gateways' TLS certificates); then QEMU 10.0 from bookworm-backports,
# unpacked beside 7.2 (scripts/install-qemu10.sh).
set -euo pipefail
packages=(qemu-system-x86 linux-image-amd64 busybox-static cpio gzip libxxhash-dev libzstd-dev gcc libc6-dev make g++ python3 openssl)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all Debian packages present"
else
  echo "install-deps: installing ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# QEMU 10.0 beside the system's 7.2 (the end-to-end tests run on both).
bash "$(dirname "$0")/install-qemu10.sh"
