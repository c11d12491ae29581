#!/usr/bin/env bash
# Provisioning recipe for a Debian 13 (trixie) system that runs agentd's guest test suite
# (`pytest -m guest`): the trixie-backports kernel (7.3: cgroup v2 memory/cpu/pids/io, PSI, sched_ext, BTF,
# BPF LSM), the BPF toolchain, and a virtualenv at /opt/agentd-venv with the repo's pinned requirements.
#
# One recipe, two users:
#   --vm     (default) a whole Debian 13 machine (vagrant/Vagrantfile). Installs the kernel meta package
#            linux-image-amd64 from trixie-backports (initramfs + GRUB entry); the machine must reboot into it.
#   --image  the QEMU testbed's root filesystem, run by vagrant/build-image.sh inside the mmdebstrap chroot.
#            Installs only linux-binary-<abi> + linux-modules-<abi> (no initramfs: the testbed boots the
#            kernel directly with root on virtiofs, which is built in).
#
# Options: --requirements FILE   the repo's requirements.lock (default: ../requirements.lock beside this script)
# Environment: AGENTD_KERNEL_ABI  pin the kernel ABI (e.g. 7.3.4+deb13-amd64); default: newest in trixie-backports
#              AGENTD_APT_MIRROR  mirror for the trixie-backports entry if one must be added
# Idempotent; needs root and network (apt + PyPI).
set -euo pipefail

MODE=vm
REQ="$(cd "$(dirname "$0")" && pwd)/../requirements.lock"
while [ $# -gt 0 ]; do
    case "$1" in
        --vm) MODE=vm ;;
        --image) MODE=image ;;
        --requirements) REQ="$2"; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "provision.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

VENV=/opt/agentd-venv
PACKAGES=(python3 python3-venv clang llvm libbpf-dev bpftool iproute2 procps kmod util-linux mount
          ca-certificates make)
# The systemd flavour of the testbed boots this same image with systemd as PID 1 (vagrant/systemd-init.sh);
# the init-script flavour ignores it. No dbus: as root, systemctl/systemd-run talk to /run/systemd/private.
# passwd (groupdel for the uninstall) is on every real Debian system, but not in mmdebstrap's apt variant.
IMAGE_PACKAGES=(systemd passwd)
# Wheels of the pinned requirements and of the build backend, so that the offline guest can run the real
# install (systemd/install.sh with PIP_NO_INDEX=1 PIP_FIND_LINKS=$WHEELHOUSE).
WHEELHOUSE=/opt/agentd-wheelhouse
export DEBIAN_FRONTEND=noninteractive
APT=(apt-get -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold --no-install-recommends)

log() { printf '[provision:%s] %s\n' "$MODE" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
[ -r "$REQ" ] || die "requirements file not found: $REQ"
. /etc/os-release
[ "${VERSION_CODENAME:-}" = trixie ] || log "WARNING: expected Debian 13 (trixie), found '${PRETTY_NAME:-?}'"

# --------------------------------------------------------------------------- apt sources: trixie-backports
if ! grep -rqsE '^[^#]*(^|[[:space:]])trixie-backports([[:space:]]|$)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/; then
    mirror="${AGENTD_APT_MIRROR:-http://deb.debian.org/debian}"
    log "adding trixie-backports ($mirror)"
    cat >/etc/apt/sources.list.d/agentd-trixie-backports.sources <<EOF
Types: deb
URIs: $mirror
Suites: trixie-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
fi
log "apt-get update"
apt-get update -q >/dev/null

# --------------------------------------------------------------------------- kernel
if [ -n "${AGENTD_KERNEL_ABI:-}" ]; then
    KABI="$AGENTD_KERNEL_ABI"
else
    meta_ver=$(apt-cache madison linux-image-amd64 | awk -F'|' '$3 ~ /trixie-backports/ {gsub(/ /, "", $2); print $2; exit}')
    [ -n "$meta_ver" ] || die "linux-image-amd64 not found in trixie-backports"
    KABI=$(apt-cache show "linux-image-amd64=$meta_ver" | sed -n 's/^Depends:.*linux-image-\([0-9][^ ,]*\) .*/\1/p' | head -1)
    [ -n "$KABI" ] || die "cannot determine the kernel ABI behind linux-image-amd64 $meta_ver"
fi
log "kernel ABI $KABI"
if [ "$MODE" = image ]; then
    # Split packages: the kernel image and its modules, without initramfs tooling.
    "${APT[@]}" -t trixie-backports install "linux-binary-$KABI" "linux-modules-$KABI"
    depmod -a "$KABI"
else
    if [ -n "${AGENTD_KERNEL_ABI:-}" ]; then
        "${APT[@]}" -t trixie-backports install "linux-image-$KABI"
    else
        "${APT[@]}" -t trixie-backports install linux-image-amd64
    fi
fi

# --------------------------------------------------------------------------- tools
[ "$MODE" = image ] && PACKAGES+=("${IMAGE_PACKAGES[@]}")
log "installing ${PACKAGES[*]}"
"${APT[@]}" install "${PACKAGES[@]}"

# --------------------------------------------------------------------------- virtualenv
want=$(sha256sum "$REQ" | cut -d' ' -f1)-$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.agentd-requirements" 2>/dev/null)" = "$want" ]; then
    log "$VENV is up to date"
else
    log "creating $VENV from $REQ"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --no-cache-dir --disable-pip-version-check -r "$REQ"
    echo "$want" >"$VENV/.agentd-requirements"
fi
if [ "$MODE" = image ]; then
    log "filling $WHEELHOUSE"
    rm -rf "$WHEELHOUSE"
    "$VENV/bin/pip" download -q --no-cache-dir --disable-pip-version-check -d "$WHEELHOUSE" -r "$REQ" \
        'setuptools>=68' wheel
fi
"$VENV/bin/python" -c 'import grpc, google.protobuf, prometheus_client, psutil, pyroute2, pytest, hypothesis'

if [ "$MODE" = image ]; then
    apt-get clean
    rm -rf /var/lib/apt/lists/* /root/.cache
fi

running=$(uname -r)
if [ "$MODE" = vm ] && [ "$running" != "$KABI" ]; then
    log "kernel $KABI installed; running $running: reboot to use it"
fi
log "done"
