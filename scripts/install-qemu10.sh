#!/usr/bin/env bash
# QEMU 10.0 beside the system's QEMU 7.2, for the end-to-end tests of current QEMU streams.
#
# Debian 12 ships QEMU 7.2; bookworm-backports has 10.0. Installing it with apt would replace 7.2,
# so its packages are only downloaded and unpacked (dpkg -x) into .cache/qemu-10.0/root, and
# .cache/qemu-10.0/qemu-system-x86_64 is a wrapper that runs that build with its own module
# directory: the binary's built-in module path is the system's, and QEMU refuses (or crashes on)
# modules of another build. The firmware (seabios, ipxe) is unpacked beside it, because QEMU finds
# firmware relative to its own binary and 10.0 wants a newer seabios than bookworm's.
#
#   BFMIG_QEMU10_DIR   where to put it (default <repo>/.cache/qemu-10.0)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${BFMIG_QEMU10_DIR:-$REPO/.cache/qemu-10.0}"
WRAPPER="$DIR/qemu-system-x86_64"

if [ -x "$WRAPPER" ] && "$WRAPPER" --version 2>/dev/null | grep -q 'version 10\.'; then
  echo "install-qemu10: $("$WRAPPER" --version | head -1)"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
policy="$(apt-cache policy qemu-system-x86 2>/dev/null || true)"
if [[ "$policy" != *bookworm-backports* ]]; then
  echo "install-qemu10: adding Debian's bookworm-backports suite to apt's sources"
  $SUDO tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null <<'SOURCES'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
  $SUDO apt-get update -qq
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
chmod 755 "$work" # apt's download user must be able to write there
(
  cd "$work"
  apt-get download -qq qemu-system-x86/bookworm-backports qemu-system-common/bookworm-backports \
    qemu-system-data/bookworm-backports seabios/bookworm-backports ipxe-qemu 2>&1 | grep -v unsandboxed || true
)
rm -rf "$DIR.new"
mkdir -p "$DIR.new/root"
for deb in "$work"/*.deb; do dpkg -x "$deb" "$DIR.new/root"; done
# Its libraries are the system's: pull in any the 7.2 install does not already have.
missing_libs="$(ldd "$DIR.new/root/usr/bin/qemu-system-x86_64" | awk '/not found/ {print $1}')"
if [ -n "$missing_libs" ]; then
  echo "install-qemu10: libraries missing for QEMU 10: $missing_libs" >&2
  exit 1
fi
cat >"$DIR.new/qemu-system-x86_64" <<'WRAP'
#!/bin/sh
# QEMU 10.0 unpacked by scripts/install-qemu10.sh, with the module directory of its own build.
here="$(dirname "$(readlink -f "$0")")"
QEMU_MODULE_DIR="$here/root/usr/lib/x86_64-linux-gnu/qemu"
export QEMU_MODULE_DIR
exec "$here/root/usr/bin/qemu-system-x86_64" "$@"
WRAP
chmod 755 "$DIR.new/qemu-system-x86_64"
rm -rf "$DIR"
mv "$DIR.new" "$DIR"
echo "install-qemu10: $("$WRAPPER" --version | head -1) in $DIR"
