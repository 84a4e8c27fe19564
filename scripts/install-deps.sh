#!/usr/bin/env bash
# Debian packages bfmig needs: QEMU for real migrations, a kernel and busybox for the test guest,
# gcc for the guest's workload program, libxxhash-dev and libzstd-dev for the native addon (page
# digests, WAN compression), openssl for
# `bfmig certs` (it issues the gateways' TLS certificates), prometheus for promtool and a real
# Prometheus server (the tests of deploy/prometheus' rules and of scraping a migration), systemd for
# `systemd-analyze verify` of deploy/systemd's unit; libvirt's daemon, QEMU driver and virsh for
# the libvirt recipe's end-to-end test (docs/libvirt.md); those last and prometheus without their recommends (other hypervisors'
# drivers, LVM, every QEMU target); then QEMU 10.0 from bookworm-backports, unpacked beside 7.2
# (scripts/install-qemu10.sh).
set -euo pipefail
packages=(qemu-system-x86 linux-image-amd64 busybox-static cpio gzip libxxhash-dev libzstd-dev gcc libc6-dev make g++ python3 openssl systemd)
bare_packages=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients prometheus)
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
updated=0
# install OPTIONS... -- PACKAGES...: those of PACKAGES not installed yet, apt-get run with OPTIONS.
install() {
  local options=() missing=()
  while [ "$1" != "--" ]; do options+=("$1"); shift; done
  shift
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    echo "install-deps: present: $*"
    return
  fi
  echo "install-deps: installing ${missing[*]}"
  if [ $updated -eq 0 ]; then $SUDO apt-get update -qq; updated=1; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${options[@]}" "${missing[@]}" >/dev/null
}
install -- "${packages[@]}"
install --no-install-recommends -- "${bare_packages[@]}"
# QEMU 10.0 beside the system's 7.2 (the end-to-end tests run on both).
bash "$(dirname "$0")/install-qemu10.sh"
