#!/usr/bin/env bash
# Install agentd from this source tree as a systemd service, or remove it again (`make install` / `make uninstall`).
#
#   systemd/install.sh [--wheels DIR]          install (or upgrade in place; a running agentd is restarted)
#   systemd/install.sh --uninstall [--purge]   remove; --purge also removes /etc/agentd and the records
#
# What goes where (the FHS places for software installed locally, not by the distribution's package manager;
# nothing points back into the source tree):
#   /opt/agentd/                                   Python virtualenv: agentd and its pinned dependencies
#   /usr/local/bin/{agentd,agentctl}               symlinks into the virtualenv
#   /usr/local/bin/agentd-shell                    the shell shim (also to be copied into sandbox images): agentd-run
#                                                  under that name when built, else agentd/data/agentd-shell
#   /usr/local/bin/agentd-run                      the native launcher, if launcher/build/agentd-run was built (make setup)
#   /usr/local/lib/agentd/bpf/*.bpf.o              the BPF objects (the unit's AGENTD_BPF_DIR)
#   /usr/local/lib/agentd/agentd.toml.default      the default configuration as shipped (to spot local edits)
#   /usr/local/lib/systemd/system/agentd.service   the unit
#   /usr/local/lib/tmpfiles.d/agentd.conf          /run/agentd, /var/lib/agentd
#   /usr/local/lib/sysusers.d/agentd.conf          group agentd (owns the admin socket)
#   /usr/local/share/doc/agentd/                   README.md, docs/*.md
#   /etc/agentd/agentd.toml                        the configuration: installed only if absent, never overwritten
# It does not enable or start the service: `systemctl enable --now agentd` does.
#
# Uninstall stops and disables agentd (agents and their sessions are never killed: if sessions still exist it
# refuses unless --force, and then leaves them running, unmanaged), removes all of the above, the group and
# /run/agentd, and keeps /var/lib/agentd (the records) and an /etc/agentd/agentd.toml edited locally.
#
# Needs: root, python3 (>= 3.11) with venv, a built tree (`make proto bpf`: agentd/api/gen, bpf/build), and PyPI
# (or --wheels DIR: a directory of wheels for an offline install, e.g. the testbed image's /opt/agentd-wheelhouse).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd -P)"
VENV=/opt/agentd
BIN=/usr/local/bin
LIB=/usr/local/lib/agentd
UNIT_DIR=/usr/local/lib/systemd/system
TMPFILES=/usr/local/lib/tmpfiles.d/agentd.conf
SYSUSERS=/usr/local/lib/sysusers.d/agentd.conf
DOC=/usr/local/share/doc/agentd
ETC=/etc/agentd
STATE=/var/lib/agentd
RUNTIME=/run/agentd
GROUP=agentd
MIN_PYTHON=3.11

log() { printf '[agentd-install] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

ACTION=install PURGE=0 FORCE=0 WHEELS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --uninstall) ACTION=uninstall ;;
        --purge) PURGE=1 ;;
        --force) FORCE=1 ;;
        --wheels) WHEELS="$2"; shift ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done
[ "$(id -u)" = 0 ] || die "must run as root"
have_systemd() { [ -d /run/systemd/system ]; }

install_agentd() {
    local py objects
    py=$(command -v python3) || die "python3 not found"
    "$py" -c "import sys, venv; sys.exit(sys.version_info < tuple(map(int, '$MIN_PYTHON'.split('.'))))" ||
        die "python3 >= $MIN_PYTHON with the venv module is needed (Debian: apt-get install python3-venv)"
    [ -f "$REPO/agentd/api/gen/agentd_pb2.py" ] || die "no generated gRPC code: run 'make proto' first"
    objects=("$REPO"/bpf/build/*.bpf.o)
    [ -e "${objects[0]}" ] || die "no BPF objects in bpf/build: run 'make bpf' first"

    # The package is built from a copy of the sources: the tree stays untouched (no build/, no egg-info).
    local src
    src=$(mktemp -d)
    SRC_COPY="$src"
    trap 'rm -rf "$SRC_COPY"' EXIT
    cp "$REPO/pyproject.toml" "$REPO/README.md" "$src/"
    cp -r "$REPO/agentd" "$src/agentd"
    find "$src" -name __pycache__ -prune -exec rm -rf {} +

    log "virtualenv $VENV"
    rm -rf "$VENV"
    "$py" -m venv "$VENV"
    local pip=("$VENV/bin/pip" install -q --disable-pip-version-check)
    [ -n "$WHEELS" ] && pip+=(--no-index --find-links "$WHEELS")
    # Runtime dependencies only (pyproject), at the versions the tests ran with (requirements.lock as constraints).
    "${pip[@]}" -c "$REPO/requirements.lock" "$src"
    "$VENV/bin/python" -c 'import agentd.daemon, agentd.api.gen.agentd_pb2'

    log "programs, BPF objects, shim in $BIN and $LIB"
    ln -sfn "$VENV/bin/agentd" "$BIN/agentd"
    ln -sfn "$VENV/bin/agentctl" "$BIN/agentctl"
    if [ -x "$REPO/launcher/build/agentd-run" ]; then
        install -D -m 0755 "$REPO/launcher/build/agentd-run" "$BIN/agentd-run"
        # The launcher under the name agentd-shell is the shim without a shell's start-up (launcher/shell.c); a
        # hard link, so that copying it into an image copies the binary.
        ln -f "$BIN/agentd-run" "$BIN/agentd-shell"
    else
        install -D -m 0755 "$REPO/agentd/data/agentd-shell" "$BIN/agentd-shell"
    fi
    rm -rf "$LIB/bpf"
    install -d -m 0755 "$LIB/bpf"
    install -m 0644 "${objects[@]}" "$LIB/bpf/"
    install -m 0644 "$REPO/systemd/agentd.toml" "$LIB/agentd.toml.default"

    log "unit, tmpfiles and sysusers snippets, documentation"
    install -D -m 0644 "$REPO/systemd/agentd.service" "$UNIT_DIR/agentd.service"
    install -D -m 0644 "$REPO/systemd/agentd.tmpfiles" "$TMPFILES"
    install -D -m 0644 "$REPO/systemd/agentd.sysusers" "$SYSUSERS"
    install -d -m 0755 "$DOC"
    install -m 0644 "$REPO/README.md" "$REPO"/docs/*.md "$DOC/"
    if [ -e "$ETC/agentd.toml" ]; then
        cmp -s "$ETC/agentd.toml" "$REPO/systemd/agentd.toml" ||
            log "keeping the existing $ETC/agentd.toml (the shipped default: $LIB/agentd.toml.default)"
    else
        install -D -m 0644 "$REPO/systemd/agentd.toml" "$ETC/agentd.toml"
    fi

    systemd-sysusers "$SYSUSERS"
    systemd-tmpfiles --create "$TMPFILES"
    if have_systemd; then
        systemctl daemon-reload
        if systemctl -q is-active agentd; then
            log "restarting the running agentd (its sessions and calls are adopted)"
            systemctl restart agentd
        fi
    fi
    log "installed; start it with: systemctl enable --now agentd"
}

live_sessions() {  # session cgroups below the unit's cgroup (they outlive the daemon: KillMode=process)
    local cg
    have_systemd || return 0
    cg=$(systemctl show -P ControlGroup agentd 2>/dev/null || true)
    [ -n "$cg" ] || return 0
    find "/sys/fs/cgroup$cg/sessions" -mindepth 1 -maxdepth 1 -type d 2>/dev/null || true
}

uninstall_agentd() {
    local sessions
    sessions=$(live_sessions)
    if [ -n "$sessions" ]; then
        if [ "$FORCE" != 1 ]; then
            die "sessions still exist (delete them first: agentctl session list / delete; or --force to leave them
running without agentd): $(echo "$sessions" | xargs -n1 basename | tr '\n' ' ')"
        fi
        log "leaving $(echo "$sessions" | wc -l) session(s) running, unmanaged"
    fi
    if have_systemd && [ -e "$UNIT_DIR/agentd.service" ]; then
        systemctl disable --now agentd 2>/dev/null || true
    fi
    rm -f "$BIN/agentd" "$BIN/agentctl" "$BIN/agentd-shell" "$UNIT_DIR/agentd.service" "$TMPFILES" "$SYSUSERS"
    rm -f "$BIN/agentd-run"
    if [ -e "$ETC/agentd.toml" ] && [ "$PURGE" != 1 ] && ! cmp -s "$ETC/agentd.toml" "$LIB/agentd.toml.default"; then
        log "keeping $ETC/agentd.toml (edited locally; --purge removes it)"
    else
        rm -f "$ETC/agentd.toml"
        rmdir "$ETC" 2>/dev/null || true
    fi
    rm -rf "$VENV" "$LIB" "$DOC" "$RUNTIME"
    local d
    for d in "$UNIT_DIR" "$(dirname "$UNIT_DIR")" "$(dirname "$TMPFILES")" "$(dirname "$SYSUSERS")"; do
        rmdir "$d" 2>/dev/null || true   # only if empty: someone else's files stay
    done
    if getent group "$GROUP" >/dev/null; then
        if command -v groupdel >/dev/null; then groupdel "$GROUP"; else log "group $GROUP left: no groupdel here"; fi
    fi
    if [ "$PURGE" = 1 ]; then
        rm -rf "$STATE"
    elif [ -d "$STATE" ]; then
        log "keeping the records in $STATE (--purge removes them)"
    fi
    if have_systemd; then
        systemctl daemon-reload
        systemctl reset-failed agentd 2>/dev/null || true
    fi
    log "uninstalled"
}

"${ACTION}_agentd"
