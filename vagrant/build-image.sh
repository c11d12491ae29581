#!/usr/bin/env bash
# Build the kernel testbed's guest: a Debian 13 root filesystem (directory, booted with root on virtiofs) made
# by mmdebstrap + vagrant/provision.sh --image, and the trixie-backports kernel extracted from it.
#
# Output in $AGENTD_TESTBED_DIR (default /var/cache/agentd-testbed; outside the git tree):
#   rootfs/          the guest root filesystem
#   vmlinux          uncompressed kernel (booted via its PVH entry: faster than the bzImage)
#   vmlinuz          the packaged bzImage (fallback)
#   image.hash       hash of the inputs (provision.sh, requirements.lock, this script, mirror, AGENTD_KERNEL_ABI);
#                    rebuild on change
#   image.info       kernel version, build date and duration
#
# Usage: build-image.sh [--force]      (or AGENTD_TESTBED_REBUILD=1)
# Environment: AGENTD_TESTBED_DIR, AGENTD_TESTBED_MIRROR (default http://deb.debian.org/debian),
#              AGENTD_KERNEL_ABI (pin the kernel, e.g. 7.3.4+deb13-amd64; default: newest in trixie-backports)
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd -P)"
REPO="$(cd "$HERE/.." && pwd -P)"
DIR="${AGENTD_TESTBED_DIR:-/var/cache/agentd-testbed}"
MIRROR="${AGENTD_TESTBED_MIRROR:-http://deb.debian.org/debian}"
FORCE="${AGENTD_TESTBED_REBUILD:-0}"
[ "${1:-}" = --force ] && FORCE=1

log() { printf '[build-image] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap root mode, virtiofs-shared root filesystem)"
command -v mmdebstrap >/dev/null || die "mmdebstrap missing: run 'make setup' (vagrant/host-setup.sh)"
command -v zstd >/dev/null || die "zstd missing: run 'make setup' (vagrant/host-setup.sh)"

INPUTS=("$HERE/provision.sh" "$REPO/requirements.lock" "$HERE/build-image.sh")
input_hash() {
    { sha256sum "${INPUTS[@]}" | awk '{print $1}'; echo "mirror=$MIRROR kabi=${AGENTD_KERNEL_ABI:-}"; } |
        sha256sum | awk '{print $1}'
}
HASH=$(input_hash)

up_to_date() {
    [ -f "$DIR/image.hash" ] && [ "$(cat "$DIR/image.hash")" = "$HASH" ] &&
        [ -x "$DIR/rootfs/opt/agentd-venv/bin/python" ] && [ -s "$DIR/vmlinux" ]
}

mkdir -p "$DIR"
if [ "$FORCE" != 1 ] && up_to_date; then
    log "image up to date ($DIR, $(sed -n 's/^kernel=//p' "$DIR/image.info" 2>/dev/null))"
    exit 0
fi

# One builder at a time; running testbeds hold the lock shared (run-tests.sh), so never swap under them.
exec 8>"$DIR/lock"
if ! flock -x -n 8; then
    log "waiting for the testbed lock ($DIR/lock: another build or run is in progress)"
    flock -x 8
fi
if [ "$FORCE" != 1 ] && up_to_date; then
    log "image up to date (built by another process meanwhile)"
    exit 0
fi

NEW="$DIR/rootfs.new"
OLD="$DIR/rootfs.old"

# Remove a (partial) root filesystem tree, but never through a mount point left inside it (a bind-mounted /dev
# or /proc from an interrupted mmdebstrap): unmount those first and refuse if anything stays mounted.
safe_rmtree() {
    local t="$1" m
    [ -e "$t" ] || return 0
    for m in $(awk -v p="$t" 'index($2, p) == 1 {print $2}' /proc/self/mounts | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
    if awk -v p="$t" 'index($2, p) == 1 {found=1} END {exit !found}' /proc/self/mounts; then
        die "mounts remain under $t; not deleting it"
    fi
    rm -rf --one-file-system "$t"
}
cleanup() { safe_rmtree "$NEW"; rm -f "$DIR/vmlinux.new" "$DIR/vmlinuz.new"; }
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

safe_rmtree "$NEW"
safe_rmtree "$OLD"
WORK=$(mktemp -d)
trap 'cleanup; rm -rf "$WORK"' EXIT
cp "$HERE/provision.sh" "$REPO/requirements.lock" "$WORK/"
# TLS: let pip in the chroot trust what the host trusts (e.g. a local proxy's CA), for this build only.
cp /etc/ssl/certs/ca-certificates.crt "$WORK/host-ca.crt" 2>/dev/null || : >"$WORK/host-ca.crt"

# Clean environment for the recipe in the chroot; forward proxy settings and pip index overrides only.
CHROOT_ENV=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
            DEBIAN_FRONTEND=noninteractive)
[ -s "$WORK/host-ca.crt" ] && CHROOT_ENV+=(PIP_CERT=/tmp/agentd-provision/host-ca.crt)
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY PIP_INDEX_URL PIP_EXTRA_INDEX_URL \
         PIP_TRUSTED_HOST AGENTD_KERNEL_ABI; do
    [ -n "${!v:-}" ] && CHROOT_ENV+=("$v=${!v}")
done
{
    echo '#!/bin/bash'
    echo 'set -e'
    printf 'exec chroot "$1" env -i'
    printf ' %q' "${CHROOT_ENV[@]}"
    echo ' bash /tmp/agentd-provision/provision.sh --image --requirements /tmp/agentd-provision/requirements.lock'
} >"$WORK/in-chroot.sh"
chmod 755 "$WORK/in-chroot.sh"

log "building $NEW with mmdebstrap (trixie + trixie-backports from $MIRROR)"
start=$(date +%s)
# The customize hooks run in root mode with /dev, /proc, /sys mounted in the chroot and the host's resolv.conf.
# Documentation, man pages and locales are left out (the image only runs tests).
mmdebstrap --mode=root --variant=apt --format=directory \
    --aptopt='APT::Install-Recommends "false"' \
    --aptopt='Acquire::Languages "none"' \
    --dpkgopt='force-unsafe-io' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook="mkdir -p \"\$1/tmp/agentd-provision\" && cp -a '$WORK'/. \"\$1/tmp/agentd-provision/\"" \
    --customize-hook="'$WORK/in-chroot.sh' \"\$1\"" \
    --customize-hook='echo agentd-testbed >"$1/etc/hostname"' \
    --customize-hook='printf "127.0.0.1 localhost\n127.0.1.1 agentd-testbed\n::1 localhost\n" >"$1/etc/hosts"' \
    --customize-hook=': >"$1/etc/resolv.conf"' \
    --customize-hook='rm -rf "$1/tmp/agentd-provision"' \
    trixie "$NEW" \
    "deb $MIRROR trixie main" \
    "deb $MIRROR trixie-updates main" \
    "deb $MIRROR trixie-backports main"

# The kernel: /usr/lib/modules/<abi>/vmlinuz (split linux-binary package) or /boot/vmlinuz-<abi>.
vmlinuz=$(ls -1 "$NEW"/usr/lib/modules/*/vmlinuz "$NEW"/boot/vmlinuz-* 2>/dev/null | head -1 || true)
[ -n "$vmlinuz" ] || die "no kernel image in the new root filesystem"
kver=$(ls -1 "$NEW/usr/lib/modules" | sort -V | tail -1)
cp "$vmlinuz" "$DIR/vmlinuz.new"
# The bzImage carries the kernel as one zstd frame: decompress from the first zstd magic (28 b5 2f fd).
off=$(LC_ALL=C grep -obUaP '\x28\xb5\x2f\xfd' "$vmlinuz" | head -1 | cut -d: -f1 || true)
[ -n "$off" ] || die "no zstd frame in $vmlinuz"
tail -c +"$((off + 1))" "$vmlinuz" | zstd -dcq 2>/dev/null >"$DIR/vmlinux.new" || true
[ "$(head -c 4 "$DIR/vmlinux.new" | od -An -c | tr -d ' ')" = '177ELF' ] || die "extracted kernel is not an ELF file"

# Swap in atomically (rename), then record the inputs' hash last.
rm -f "$DIR/image.hash"
[ -d "$DIR/rootfs" ] && mv "$DIR/rootfs" "$OLD"
mv "$NEW" "$DIR/rootfs"
mv "$DIR/vmlinux.new" "$DIR/vmlinux"
mv "$DIR/vmlinuz.new" "$DIR/vmlinuz"
safe_rmtree "$OLD"
secs=$(( $(date +%s) - start ))
{
    echo "kernel=$kver"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "build_seconds=$secs"
    echo "size=$(du -sh --one-file-system "$DIR/rootfs" | cut -f1)"
} >"$DIR/image.info"
echo "$HASH" >"$DIR/image.hash"
log "built in ${secs}s: kernel $kver, rootfs $(sed -n 's/^size=//p' "$DIR/image.info")"
