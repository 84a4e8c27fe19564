#!/usr/bin/env bash
# Build the bfmig end-to-end test guest into .cache/guest/ (gitignored; never commit it):
#   .cache/guest/vmlinuz            the host's Debian kernel (newest /boot/vmlinuz-*)
#   .cache/guest/initramfs.cpio.gz  busybox-static + /init (guest/init) + /bin/workload
#   .cache/guest/initramfs-files.cpio.gz  the same plus /corpus: real files from this machine's Debian
#                                   packages (executables, libraries, text, already-compressed files),
#                                   for workload.content=files (never committed: built here)
#   .cache/guest/workload           the static workload binary (also inside the initramfs)
#   .cache/guest/guest.json         what was built, for the test harness
# Idempotent: if no input changed since the last build it only says "up to date".
# The archive is reproducible for a given toolchain/busybox (sorted, fixed mtimes, root-owned).
#
# Environment overrides:
#   BFMIG_GUEST_OUT     output directory (default <repo>/.cache/guest)
#   BFMIG_GUEST_KERNEL  kernel image to use (default newest /boot/vmlinuz-*)
#   BFMIG_BUSYBOX       static busybox binary (default /bin/busybox)
#   BFMIG_SKIP_QEMU_CHECK=1  do not require qemu-system-x86 (building only)
#   SOURCE_DATE_EPOCH   mtime stamped on every archive member (default 0)
#   BFMIG_GUEST_CORPUS_MIB  MiB of each of the corpus's four kinds of files (default 8)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${BFMIG_GUEST_OUT:-$REPO/.cache/guest}"
WORKLOAD_SRC="$REPO/guest/workload.c"
INIT_SRC="$REPO/guest/init"
SELF="$REPO/scripts/build-guest.sh"
EPOCH="${SOURCE_DATE_EPOCH:-0}"

log() { printf 'build-guest: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- prerequisites
missing=()
need_pkg() { # need_pkg <package>  (deduplicated)
	local p
	for p in "${missing[@]:-}"; do [[ "$p" == "$1" ]] && return 0; done
	missing+=("$1")
}

if command -v gcc >/dev/null 2>&1; then
	libc_a="$(gcc -print-file-name=libc.a 2>/dev/null || true)"
	[[ "$libc_a" == /* && -f "$libc_a" ]] || need_pkg libc6-dev
else
	need_pkg gcc
	compgen -G '/usr/lib/*-linux-gnu/libc.a' >/dev/null || need_pkg libc6-dev # gcc only Recommends it
fi
command -v cpio >/dev/null 2>&1 || need_pkg cpio
command -v gzip >/dev/null 2>&1 || need_pkg gzip
command -v flock >/dev/null 2>&1 || need_pkg util-linux

BUSYBOX="${BFMIG_BUSYBOX:-/bin/busybox}"
if [[ ! -x "$BUSYBOX" ]]; then
	need_pkg busybox-static
elif command -v readelf >/dev/null 2>&1 && LC_ALL=C readelf -l "$BUSYBOX" 2>/dev/null | grep -q 'INTERP'; then
	log "$BUSYBOX is dynamically linked (package busybox); the guest needs busybox-static"
	need_pkg busybox-static
fi

if [[ -n "${BFMIG_GUEST_KERNEL:-}" ]]; then
	KERNEL="$BFMIG_GUEST_KERNEL"
	[[ -f "$KERNEL" ]] || die "BFMIG_GUEST_KERNEL=$KERNEL does not exist"
else
	KERNEL="$(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1 || true)"
	[[ -n "$KERNEL" ]] || need_pkg linux-image-amd64
fi

if [[ "${BFMIG_SKIP_QEMU_CHECK:-0}" != 1 ]]; then
	command -v qemu-system-x86_64 >/dev/null 2>&1 || need_pkg qemu-system-x86
fi

if ((${#missing[@]})); then
	log "missing build prerequisites; on Debian/Ubuntu run:"
	printf 'apt-get install -y %s\n' "${missing[*]}" >&2
	exit 2
fi
[[ -r "$KERNEL" ]] || die "$KERNEL is not readable by $(id -un) (Ubuntu installs kernels 0600: sudo chmod 0644 $KERNEL, or set BFMIG_GUEST_KERNEL)"

# ---------------------------------------------------------------- up-to-date check
mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9 # concurrent builders (parallel jest workers) wait for each other

KERNEL_REAL="$(readlink -f "$KERNEL")"
BUSYBOX_REAL="$(readlink -f "$BUSYBOX")"
CORPUS_BYTES=$(( ${BFMIG_GUEST_CORPUS_MIB:-8} * 1024 * 1024 ))

# The corpus: files of installed Debian packages, four kinds of what a guest's memory holds, each up to
# CORPUS_BYTES, chosen in a fixed order (files over 4 MiB skipped). Prints "<kind> <path>" lines.
# Listed only to build: the up-to-date check takes the package database's state instead.
is_elf() { local magic; LC_ALL=C IFS= read -r -d '' -n 4 magic <"$1" 2>/dev/null; [[ "$magic" == $'\x7fELF' ]]; }
corpus_list() {
	local kind total f size
	for kind in bin lib text gz; do
		total=0
		while read -r size f; do
			((size > 0 && size <= 4194304 && total + size <= CORPUS_BYTES)) || continue
			case "$kind" in bin | lib) is_elf "$f" || continue ;; esac
			total=$((total + size))
			printf '%s %s\n' "$kind" "$f"
		done < <(case "$kind" in
			bin) find -L /usr/bin /usr/sbin -maxdepth 1 -type f -printf '%s %p\n' ;;
			lib) find -L /usr/lib/x86_64-linux-gnu -maxdepth 1 -type f -name '*.so*' -printf '%s %p\n' ;;
			text) find /usr/share/doc -name copyright -type f -printf '%s %p\n'; find /usr/include -name '*.h' -type f -printf '%s %p\n' ;;
			gz) find /usr/share/man /usr/share/doc -name '*.gz' -type f -printf '%s %p\n' ;;
			esac 2>/dev/null | LC_ALL=C sort -k2)
	done
}
inputs_hash="$(
	{
		echo "format 1 epoch $EPOCH"
		sha256sum "$WORKLOAD_SRC" "$INIT_SRC" "$SELF"
		echo "corpus $CORPUS_BYTES"
		stat -c '%n %s %Y' /var/lib/dpkg/status
		stat -c '%n %s %Y' "$KERNEL_REAL" "$BUSYBOX_REAL"
		gcc -dumpfullversion -dumpversion 2>/dev/null | head -n 1
		gcc -print-file-name=libc.a
	} | sha256sum | cut -d' ' -f1
)"

outputs=("$OUT/vmlinuz" "$OUT/initramfs.cpio.gz" "$OUT/initramfs-files.cpio.gz" "$OUT/workload" "$OUT/guest.json")
uptodate=1
for f in "${outputs[@]}"; do [[ -s "$f" ]] || uptodate=0; done
if ((uptodate)) && [[ -f "$OUT/.stamp" && "$(cat "$OUT/.stamp")" == "$inputs_hash" ]]; then
	log "up to date: $OUT"
	exit 0
fi

# ---------------------------------------------------------------- build
start_ns=$(date +%s%N)
STAGE="$(mktemp -d "$OUT/.stage.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT

log "compiling workload"
gcc -O2 -static -Wall -Wextra -o "$STAGE/workload" "$WORKLOAD_SRC"
strip "$STAGE/workload" 2>/dev/null || true

ROOT="$STAGE/root"
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,root,etc}
install -m 0755 "$BUSYBOX" "$ROOT/bin/busybox"
install -m 0755 "$STAGE/workload" "$ROOT/bin/workload"
install -m 0755 "$INIT_SRC" "$ROOT/init"
# Only bin/sh is linked here (to run /init); /init runs `busybox --install -s` at boot,
# which creates every applet link in one process (a fork per link is slow on small CI boxes).
ln -s busybox "$ROOT/bin/sh"
"$BUSYBOX" --list | grep -qx sh || die "busybox at $BUSYBOX provides no sh applet"
find "$ROOT" -exec touch -h -d "@$EPOCH" {} +

log "packing initramfs"
(cd "$ROOT" && find . -mindepth 1 -print | LC_ALL=C sort |
	cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -n -9 >"$STAGE/initramfs.cpio.gz"

CORPUS_LIST="$(corpus_list)"
log "packing initramfs with the corpus ($(printf '%s\n' "$CORPUS_LIST" | grep -c .) files)"
n=0
while read -r kind f; do
	[[ -n "$kind" ]] || continue
	mkdir -p "$ROOT/corpus/$kind"
	cp -L "$f" "$ROOT/corpus/$kind/$(printf '%05d' "$n")-$(basename "$f")"
	n=$((n + 1))
done <<<"$CORPUS_LIST"
find "$ROOT/corpus" -exec touch -h -d "@$EPOCH" {} +
(cd "$ROOT" && find . -mindepth 1 -print | LC_ALL=C sort |
	cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -n -1 >"$STAGE/initramfs-files.cpio.gz"

install -m 0644 "$KERNEL_REAL" "$STAGE/vmlinuz"
kver="$(basename "$KERNEL_REAL")"
kver="${kver#vmlinuz-}"
# no_timer_check: under software emulation on a loaded host the kernel's early IO-APIC timer check can
# miss its ticks and panic the boot ("IO-APIC + timer doesn't work"); the timer works, only the check
# is timing-sensitive, so virtual machines commonly skip it.
cat >"$STAGE/guest.json" <<EOF
{
  "kernel": "vmlinuz",
  "initrd": "initramfs.cpio.gz",
  "initrdWithFiles": "initramfs-files.cpio.gz",
  "workload": "workload",
  "kernelSource": "$KERNEL_REAL",
  "kernelVersion": "$kver",
  "busyboxSource": "$BUSYBOX_REAL",
  "baseCmdline": "console=ttyS0 quiet panic=-1 init_on_free=1 no_timer_check",
  "inputsHash": "$inputs_hash"
}
EOF

for f in vmlinuz initramfs.cpio.gz initramfs-files.cpio.gz workload guest.json; do mv -f "$STAGE/$f" "$OUT/$f"; done
printf '%s\n' "$inputs_hash" >"$OUT/.stamp"
end_ns=$(date +%s%N)
log "built $OUT (kernel $kver, initramfs $(stat -c %s "$OUT/initramfs.cpio.gz") bytes) in $(((end_ns - start_ns) / 1000000)) ms"
