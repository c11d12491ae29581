#!/usr/bin/env bash
# Install what the HOST needs to run the kernel testbed (vagrant/run-tests.sh): QEMU, virtiofsd, mmdebstrap, zstd.
#
# Idempotent, non-interactive, needs root (re-runs itself with `sudo -n` otherwise). Called by `make setup`.
#
# Rules (see /work/shared/notes/testbed.md):
#   * Host packages are only ever resolved against the host's own release (`-t bookworm`). trixie/sid are never
#     added to the host's apt sources; they are used only inside the guest image (mmdebstrap has its own apt).
#   * QEMU 10 comes from bookworm-backports (~3x faster fork/exec under TCG than bookworm's 7.2, and stable with
#     multi-threaded TCG). If bookworm-backports is not configured it is added with a Pin-Priority of 100 (the
#     archive's own default), and exactly the backports packages QEMU needs are selected by name
#     (`pkg/bookworm-backports`), so no other package is ever installed or upgraded from backports.
#   * QEMU >= 8 no longer ships the C virtiofsd and bookworm has no `virtiofsd` package, so the virtiofsd binary of
#     bookworm's own qemu-system-common (7.2) is extracted to /usr/local/libexec/agentd-testbed/virtiofsd.
#     If backports cannot be used, bookworm's QEMU 7.2 (which ships /usr/lib/qemu/virtiofsd) is installed instead
#     and run-tests.sh falls back to single-threaded TCG.
set -euo pipefail

log() { printf '[host-setup] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        exec sudo -n -E bash "$0" "$@"
    fi
    die "must run as root (or with password-less sudo)"
fi

export DEBIAN_FRONTEND=noninteractive
LIBEXEC=/usr/local/libexec/agentd-testbed
VIRTIOFSD="$LIBEXEC/virtiofsd"
BPO_SOURCES=/etc/apt/sources.list.d/agentd-bookworm-backports.sources
BPO_PIN=/etc/apt/preferences.d/agentd-bookworm-backports
APT_OPTS=(-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold --no-install-recommends)
# Runtime libraries of the extracted virtiofsd, and tools the testbed scripts use.
BASE_PKGS=(mmdebstrap zstd ca-certificates debian-archive-keyring python3 procps util-linux coreutils grep
           libnuma1 libseccomp2 libcap-ng0 libglib2.0-0)

. /etc/os-release
CODENAME="${VERSION_CODENAME:-}"
[ "${ID:-}" = debian ] || die "this script supports Debian hosts only (found ID=${ID:-?})"

updated=0
apt_update() {
    if [ "$updated" = 0 ]; then
        log "apt-get update"
        apt-get update -q >/dev/null
        updated=1
    fi
}

have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep 'install ok installed' >/dev/null; }

qemu_major() {
    qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p'
}

find_virtiofsd() {
    local c
    for c in "${AGENTD_VIRTIOFSD:-}" "$VIRTIOFSD" /usr/libexec/virtiofsd /usr/lib/qemu/virtiofsd; do
        if [ -n "$c" ] && [ -x "$c" ] && "$c" --version >/dev/null 2>&1; then
            echo "$c"
            return 0
        fi
    done
    return 1
}

base_ok() {
    local p
    for p in "${BASE_PKGS[@]}"; do have_pkg "$p" || return 1; done
    return 0
}

# ---------------------------------------------------------------------------------------------- fast path
if [ "${AGENTD_HOST_SETUP_FORCE:-0}" != 1 ] && base_ok && [ -n "$(qemu_major)" ] && find_virtiofsd >/dev/null; then
    if [ "$CODENAME" != bookworm ] || [ "$(qemu_major)" -ge 10 ] || [ "${AGENTD_NO_BACKPORTS:-0}" = 1 ]; then
        log "already set up: $(qemu-system-x86_64 --version | head -1); virtiofsd $(find_virtiofsd)"
        exit 0
    fi
fi

# ---------------------------------------------------------------------------------------------- non-bookworm
if [ "$CODENAME" != bookworm ]; then
    # trixie and later ship QEMU >= 10 and the Rust virtiofsd as a package of their own release.
    log "host is Debian '$CODENAME' (not bookworm): installing from its own release"
    apt_update
    apt-get install "${APT_OPTS[@]}" -t "$CODENAME" qemu-system-x86 virtiofsd "${BASE_PKGS[@]}"
    find_virtiofsd >/dev/null || die "virtiofsd not found after installation"
    log "done: $(qemu-system-x86_64 --version | head -1); virtiofsd $(find_virtiofsd)"
    exit 0
fi

# ---------------------------------------------------------------------------------------------- bookworm
bpo_configured() {
    # Any enabled source (one-line or deb822) already carrying bookworm-backports?
    grep -rqsE '^[^#]*(^|[[:space:]])bookworm-backports([[:space:]]|$)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources >/dev/null
}

use_bpo=1
[ "${AGENTD_NO_BACKPORTS:-0}" = 1 ] && use_bpo=0
if [ "$use_bpo" = 1 ] && ! bpo_configured; then
    log "adding bookworm-backports ($BPO_SOURCES), pinned to 100 ($BPO_PIN)"
    # Same mirror as the host's bookworm entry when it is a plain URI; deb.debian.org otherwise.
    mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:.*\/debian\/?$/ {print $2; exit}' || true)
    [ -n "$mirror" ] || mirror=$(awk '/^deb [^[]*http[^ ]*\/debian\/? bookworm / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
    cat >"$BPO_PIN" <<'EOF'
# Added by agentd vagrant/host-setup.sh. Backports are never an automatic install/upgrade source; packages are
# taken from it only when selected by name (pkg/bookworm-backports).
Package: *
Pin: release n=bookworm-backports
Pin-Priority: 100
EOF
    cat >"$BPO_SOURCES" <<EOF
# Added by agentd vagrant/host-setup.sh for QEMU 10 (see $BPO_PIN).
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    updated=0
fi
apt_update

install_qemu_backports() {
    # Select qemu-system-x86 from backports plus exactly those dependencies whose bookworm version is too old
    # (found by simulating the installation). apt would take other *new* dependencies from backports too
    # (e.g. libbpf1, which then conflicts with bookworm's libbpf-dev): those are pinned to bookworm by name.
    local bpo=(qemu-system-x86) keep=() out missing extra p changed
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        local sel=()
        for p in "${bpo[@]}"; do sel+=("$p/bookworm-backports"); done
        for p in "${keep[@]}"; do sel+=("$p/bookworm"); done
        if ! out=$(apt-get install -s "${APT_OPTS[@]}" -t bookworm "${sel[@]}" "${BASE_PKGS[@]}" 2>&1); then
            missing=$(printf '%s\n' "$out" | sed -n 's/.*Depends: \([^ ]*\) (.* but .* is to be installed.*/\1/p' | sort -u)
            [ -n "$missing" ] || { printf '%s\n' "$out" | tail -15 >&2; return 1; }
            for p in $missing; do
                apt-cache madison "$p" | grep bookworm-backports >/dev/null || { log "$p not in backports"; return 1; }
                bpo+=("$p")
                local k rest=()
                for k in "${keep[@]}"; do [ "$k" = "$p" ] || rest+=("$k"); done
                keep=("${rest[@]}")
            done
            continue
        fi
        changed=0
        extra=$(printf '%s\n' "$out" | sed -n 's/^Inst \([^ ]*\) .*(\([^ ]*\) .*[Bb]ackports.*/\1/p' | sed 's/:.*//')
        for p in $extra; do
            case " ${bpo[*]} ${keep[*]} " in *" $p "*) continue ;; esac
            keep+=("$p"); changed=1
        done
        [ "$changed" = 1 ] && continue
        log "installing from bookworm-backports: ${bpo[*]}${keep[*]:+ (pinned to bookworm: ${keep[*]})}"
        apt-get install "${APT_OPTS[@]}" -t bookworm "${sel[@]}" "${BASE_PKGS[@]}"
        return 0
    done
    return 1
}

if [ "$use_bpo" = 1 ] && apt-cache madison qemu-system-x86 | grep bookworm-backports >/dev/null && install_qemu_backports; then
    :
else
    log "bookworm-backports unusable: installing bookworm's QEMU 7.2 (run-tests.sh will use single-threaded TCG)"
    apt-get install "${APT_OPTS[@]}" -t bookworm qemu-system-x86 "${BASE_PKGS[@]}"
fi

# ---------------------------------------------------------------------------------------------- virtiofsd
if ! find_virtiofsd >/dev/null; then
    log "extracting the C virtiofsd from bookworm's qemu-system-common to $VIRTIOFSD"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    chmod 755 "$tmp"   # apt downloads as the _apt user
    ver=$(apt-cache madison qemu-system-common | awk -F'|' '$3 ~ /bookworm\/main|bookworm-security\/main|bookworm-updates\/main/ && $2 ~ /7\./ {gsub(/ /,"",$2); print $2; exit}')
    [ -n "$ver" ] || die "no bookworm qemu-system-common 7.x in apt's lists"
    (cd "$tmp" && apt-get download -q "qemu-system-common=$ver" >/dev/null 2>&1) || die "apt-get download qemu-system-common=$ver failed"
    dpkg-deb -x "$tmp"/qemu-system-common_*.deb "$tmp/x"
    [ -x "$tmp/x/usr/lib/qemu/virtiofsd" ] || die "qemu-system-common $ver has no /usr/lib/qemu/virtiofsd"
    install -D -m 0755 "$tmp/x/usr/lib/qemu/virtiofsd" "$VIRTIOFSD"
    echo "extracted from qemu-system-common $ver by agentd vagrant/host-setup.sh" >"$LIBEXEC/README"
fi
vfsd=$(find_virtiofsd) || die "virtiofsd does not run (missing libraries?)"

log "done: $(qemu-system-x86_64 --version | head -1); virtiofsd $vfsd; $(mmdebstrap --version)"
