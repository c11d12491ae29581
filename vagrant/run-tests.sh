#!/usr/bin/env bash
# Run agentd's guest test suite (`pytest -m guest`) on a kernel that really has cgroup v2 memory/cpu/pids/io,
# PSI, sched_ext, BTF and BPF LSM. This is `make test-kernel ARGS=...`.
#
# Two guest flavours boot the same image and kernel: `init` (vagrant/guest-init.sh as PID 1: fast, runs the
# tests marked guest but not systemd_guest) and `systemd` (Debian's systemd as PID 1 on an overlay root,
# vagrant/systemd-init.sh: runs the tests marked systemd_guest). A flavour whose selection is empty (collected
# on the host first) is not booted.
#
#   bash vagrant/run-tests.sh [pytest args...]
#
# Two ways, chosen automatically (AGENTD_TESTBED_MODE=auto|qemu|direct):
#   direct  the running kernel is already suitable and /opt/agentd-venv exists (the Vagrant VM provisioned by
#           vagrant/provision.sh): pytest runs right here, as root.
#   qemu    otherwise (e.g. the development/CI hosts): builds the guest image if its inputs changed
#           (vagrant/build-image.sh), boots it with QEMU/TCG, root on virtiofs, the working tree shared read-write
#           at the same absolute path, runs pytest inside and streams its output here. Exits with pytest's status.
#
# Environment:
#   AGENTD_TESTBED_DIR      image cache (default /var/cache/agentd-testbed)
#   AGENTD_TESTBED_TIMEOUT  hard limit for the whole run in seconds (default 1800)
#   AGENTD_TESTBED_FLAVOUR  init, systemd or all (default all; init with AGENTD_TESTBED_EXEC)
#   AGENTD_TESTBED_MEM      guest RAM (default 3G)           AGENTD_TESTBED_CPUS  guest vCPUs (default 2)
#   AGENTD_TESTBED_REBUILD  1: rebuild the image first       AGENTD_TESTBED_TCG_THREAD  single|multi (auto)
#   AGENTD_TESTBED_ACCEL    tcg (default) or kvm (only where KVM really works; not on the development hosts)
#   AGENTD_TESTBED_CPU      QEMU -cpu model (default max; host with kvm)
#   AGENTD_TESTBED_KERNEL_ARGS  extra kernel command line (e.g. loglevel=7 to see boot messages)
#   AGENTD_TESTBED_EXEC     a shell command to run in the guest (in the tree, same environment) instead of pytest
# Variables named AGENTD_* (other than AGENTD_TESTBED_*), CI, PYTEST_ADDOPTS and HYPOTHESIS_* are passed to pytest.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd -P)"
TREE="$(cd "$HERE/.." && pwd -P)"
DIR="${AGENTD_TESTBED_DIR:-/var/cache/agentd-testbed}"
MODE="${AGENTD_TESTBED_MODE:-auto}"
TIMEOUT="${AGENTD_TESTBED_TIMEOUT:-1800}"
MEM="${AGENTD_TESTBED_MEM:-3G}"
CPUS="${AGENTD_TESTBED_CPUS:-2}"
BOOT_ATTEMPTS=3          # the first boot plus 2 retries when the guest dies before pytest starts
VENV_PY=/opt/agentd-venv/bin/python
T0=$(date +%s.%N)

log() { printf '[testbed] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}'; }

# ------------------------------------------------------------------------------------------ pytest command line
# `tests` is the default path unless the caller names paths (or node ids) of their own.
has_path=0
for a in "$@"; do
    case "$a" in
        -*) ;;
        *) p="${a%%::*}"; if [ -e "$TREE/$p" ] || [ -e "$p" ]; then has_path=1; fi ;;
    esac
done
# Marker expressions of the two flavours; the caller's arguments come after (a -m of theirs wins).
declare -A MARKERS=([init]="guest and not systemd_guest" [systemd]="systemd_guest")
FLAVOUR="${AGENTD_TESTBED_FLAVOUR:-}"
[ -n "$FLAVOUR" ] || { [ -n "${AGENTD_TESTBED_EXEC:-}" ] && FLAVOUR=init || FLAVOUR=all; }
case "$FLAVOUR" in
    all) FLAVOURS=(init systemd) ;;
    init|systemd) FLAVOURS=("$FLAVOUR") ;;
    *) die "AGENTD_TESTBED_FLAVOUR must be init, systemd or all" ;;
esac
pytest_args() {  # pytest_args MARKER-EXPRESSION → PYTEST_ARGS
    PYTEST_ARGS=(-m "$1" -p no:cacheprovider)
    [ "$has_path" = 1 ] || PYTEST_ARGS+=(tests)
    PYTEST_ARGS+=("${USER_ARGS[@]}")
}
USER_ARGS=("$@")

# Environment of pytest (same in both modes).
if [ -t 1 ]; then colors=1; else colors=0; fi
cols="${COLUMNS:-$( (tput cols 2>/dev/null) || echo 120)}"
TEST_ENV=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
          AGENTD_IN_GUEST=1 PYTHONPATH="$TREE" PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PY_COLORS="$colors"
          COLUMNS="$cols")
while IFS='=' read -r name _; do
    case "$name" in
        AGENTD_TESTBED_*|AGENTD_IN_GUEST) ;;
        AGENTD_*|CI|PYTEST_ADDOPTS|HYPOTHESIS_*) TEST_ENV+=("$name=${!name}") ;;
    esac
done < <(env | grep -E '^[A-Za-z_][A-Za-z0-9_]*=' || true)

summary_of() {  # the last pytest summary line ("==== 6 passed in 12.3s ====", or "6 passed in 12.3s" with -q)
    sed 's/\x1b\[[0-9;]*m//g; s/\r$//' "$1" 2>/dev/null |
        grep -aE '(passed|failed|errors?|skipped|deselected|xfailed|xpassed|no tests ran|warnings?)(,.*)? in [0-9.]+s' |
        tail -1 | sed -E 's/^=+ //; s/ =+$//' || true
}

report() {  # report RC SUMMARY WHERE: final lines; returns RC
    local rc="$1" summary="$2" where="$3" what=pytest
    [ -n "${AGENTD_TESTBED_EXEC:-}" ] && what="AGENTD_TESTBED_EXEC command"
    [ -n "$summary" ] && log "$where: $summary"
    case "$rc" in
        0) log "$where: $what passed (total $(elapsed "$T0")s)" ;;
        5) [ "$what" = pytest ] &&
               log "$where: FAILED: pytest collected no tests (exit 5): the guest suite must always have tests" ;;&
        *) log "$where: FAILED: $what exit status $rc (total $(elapsed "$T0")s)" ;;
    esac
    return "$rc"
}

# ------------------------------------------------------------------------------------------ direct mode
suitable_kernel() {
    local cg c
    cg=$(findmnt -n -t cgroup2 -o TARGET 2>/dev/null | head -1) || return 1
    [ -n "$cg" ] && [ -r "$cg/cgroup.controllers" ] || return 1
    for c in memory cpu pids io; do
        grep -qw "$c" "$cg/cgroup.controllers" || return 1
    done
    [ -e /sys/kernel/sched_ext/state ] && [ -e /sys/kernel/btf/vmlinux ] && [ -x "$VENV_PY" ]
}

run_direct() {
    log "direct: kernel $(uname -r) is suitable; running the guest suite here"
    local sudo=() out rc
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || die "direct mode needs root (no sudo)"
        sudo=(sudo -n)
    fi
    out=$(mktemp)
    trap 'rm -f "$out"' EXIT
    cd "$TREE"
    # A VM with systemd as PID 1 runs both selections here (the systemd tests install agentd on it).
    if [ -d /run/systemd/system ]; then pytest_args guest; else pytest_args "${MARKERS[init]}"; fi
    set +e
    if [ -n "${AGENTD_TESTBED_EXEC:-}" ]; then
        "${sudo[@]}" env -i "${TEST_ENV[@]}" /bin/bash -c "$AGENTD_TESTBED_EXEC" </dev/null 2>&1 | tee "$out"
    else
        "${sudo[@]}" env -i "${TEST_ENV[@]}" "$VENV_PY" -m pytest "${PYTEST_ARGS[@]}" </dev/null 2>&1 | tee "$out"
    fi
    rc=${PIPESTATUS[0]}
    set -e
    report "$rc" "$(summary_of "$out")" "direct"
    exit "$?"
}

case "$MODE" in
    direct) run_direct ;;
    auto) if suitable_kernel; then run_direct; fi ;;
    qemu) ;;
    *) die "AGENTD_TESTBED_MODE must be auto, qemu or direct" ;;
esac

# ------------------------------------------------------------------------------------------ QEMU mode
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        exec sudo -n -E bash "$0" "$@"
    fi
    die "the QEMU testbed needs root (virtiofsd, mmdebstrap): run as root or with password-less sudo"
fi

QEMU=$(command -v qemu-system-x86_64) || die "qemu-system-x86_64 missing: run 'make setup'"
VFSD=""
for c in "${AGENTD_VIRTIOFSD:-}" /usr/local/libexec/agentd-testbed/virtiofsd /usr/libexec/virtiofsd \
         /usr/lib/qemu/virtiofsd; do
    if [ -n "$c" ] && [ -x "$c" ]; then VFSD="$c"; break; fi
done
[ -n "$VFSD" ] || die "virtiofsd missing: run 'make setup'"
if "$VFSD" --help 2>&1 | grep -- '--shared-dir' >/dev/null; then VFSD_KIND=rust; else VFSD_KIND=c; fi
# Children get SIGTERM when this script dies, even by SIGKILL (the EXIT trap handles every other way out).
CHILD=()
setpriv --pdeathsig TERM true 2>/dev/null && CHILD=(setpriv --pdeathsig TERM --)

# Which flavours have tests to run: collected on the host (a few seconds; no boot for an empty selection).
# Without the host venv, or with AGENTD_TESTBED_EXEC, every requested flavour boots.
RUN_FLAVOURS=()
for f in "${FLAVOURS[@]}"; do
    pytest_args "${MARKERS[$f]}"
    if [ -z "${AGENTD_TESTBED_EXEC:-}" ] && [ -x "$TREE/.venv/bin/python" ]; then
        set +e
        (cd "$TREE" && "$TREE/.venv/bin/python" -m pytest --collect-only -q "${PYTEST_ARGS[@]}" >/dev/null 2>&1)
        collected=$?
        set -e
        if [ "$collected" = 5 ]; then log "$f flavour: no tests selected; not booting it"; continue; fi
    fi
    RUN_FLAVOURS+=("$f")
done
if [ "${#RUN_FLAVOURS[@]}" = 0 ]; then
    log "FAILED: pytest collected no tests (exit 5) in any flavour: the guest suite must always have tests"
    exit 5
fi

AGENTD_TESTBED_DIR="$DIR" bash "$HERE/build-image.sh"
ROOTFS="$DIR/rootfs"
KERNEL="$DIR/vmlinux"

# Hold the image lock (shared) for the whole run: a rebuild waits for running guests.
exec 8>"$DIR/lock"
flock -s 8

# The init comes from the working tree (no image rebuild needed to change it); replaced by rename so that a
# concurrently running guest keeps reading its old copy.
install_init() {  # install_init SOURCE NAME
    if ! cmp -s "$HERE/$1" "$ROOTFS/sbin/$2"; then
        install -m 0755 "$HERE/$1" "$ROOTFS/sbin/.$2.new"
        mv -f "$ROOTFS/sbin/.$2.new" "$ROOTFS/sbin/$2"
    fi
}
install_init guest-init.sh agentd-testbed-init
install_init systemd-init.sh agentd-testbed-sdinit
# Mount points on the (read-only in the guest) root filesystem.
mkdir -p "$ROOTFS$TREE" "$ROOTFS/var/lib/agentd"

qemu_major=$("$QEMU" --version | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p')
# Multi-threaded TCG crashed guests with QEMU 7.2 (int3 oops while patching code) but is stable with QEMU 10.
if [ -n "${AGENTD_TESTBED_TCG_THREAD:-}" ]; then THREAD="$AGENTD_TESTBED_TCG_THREAD"
elif [ "${qemu_major:-0}" -ge 10 ]; then THREAD=multi
else THREAD=single
fi
# TCG by default: /dev/kvm on the development hosts is a software nested KVM that fails on real kernels.
# AGENTD_TESTBED_ACCEL=kvm opts in where KVM works.
if [ "${AGENTD_TESTBED_ACCEL:-tcg}" = kvm ]; then
    ACCEL=(-accel kvm -cpu "${AGENTD_TESTBED_CPU:-host}")
    ACCEL_DESC=KVM
else
    ACCEL=(-accel "tcg,thread=$THREAD" -cpu "${AGENTD_TESTBED_CPU:-max}")
    ACCEL_DESC="TCG thread=$THREAD"
fi

mkdir -p "$DIR/runs"
# Run directories left behind by runs that were killed hard (older than any run can last).
find "$DIR/runs" -mindepth 1 -maxdepth 1 -name 'run.*' -mmin +$(( TIMEOUT / 60 + 60 )) -exec rm -rf {} + 2>/dev/null || true
RUN=$(mktemp -d "$DIR/runs/run.XXXXXX")
chmod 755 "$RUN"
PIDS=()           # everything started here, killed on exit

kill_pids() {
    local p
    for p in "$@"; do kill -TERM "$p" 2>/dev/null || true; done
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        local alive=0
        for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && return 0
        sleep 0.2
    done
    for p in "$@"; do kill -KILL "$p" 2>/dev/null || true; done
    for p in "$@"; do wait "$p" 2>/dev/null || true; done
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    [ "${#PIDS[@]}" -gt 0 ] && kill_pids "${PIDS[@]}"
    if [ -d "$RUN" ]; then
        rm -rf "$DIR/last-run"
        mkdir -p "$DIR/last-run"
        cp -a "$RUN"/*.log "$DIR/last-run/" 2>/dev/null || true
        rm -rf "$RUN"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM HUP

write_job() {  # the job: working tree path, pytest environment and arguments (read in the guest)
    {
        printf 'TREE=%q\n' "$TREE"
        printf 'TESTBED_ENV=('; printf ' %q' "${TEST_ENV[@]}"; printf ' )\n'
        printf 'JOB_EXEC=%q\n' "${AGENTD_TESTBED_EXEC:-}"
        printf 'set --'; printf ' %q' "${PYTEST_ARGS[@]}"; printf '\n'
    } >"$RUN/job.sh"
}

start_virtiofsd() {  # start_virtiofsd TAG DIR CACHE(auto|always|none)
    local tag="$1" src="$2" cache="$3" sock="$RUN/$1.sock"
    if [ "$VFSD_KIND" = rust ]; then
        [ "$cache" = none ] && cache=never
        "${CHILD[@]}" "$VFSD" --socket-path="$sock" --shared-dir="$src" --cache="$cache" --sandbox=chroot \
            --log-level=error >"$RUN/virtiofsd-$tag.log" 2>&1 &
    else
        "${CHILD[@]}" "$VFSD" --socket-path="$sock" -o source="$src" -o cache="$cache" -o sandbox=chroot \
            -o log_level=err >"$RUN/virtiofsd-$tag.log" 2>&1 &
    fi
    PIDS+=($!)
}

boot() {  # boot FLAVOUR ATTEMPT → sets BOOT_RESULT (status|died-early|died|timeout|init-error)
    local flavour="$1" attempt="$2" sock qpid tpid deadline started=""
    rm -f "$RUN"/*.sock "$RUN/started" "$RUN/status" "$RUN/init-error" "$RUN/console.log" "$RUN/kernel.log"
    : >"$RUN/console.log"
    : >"$RUN/kernel.log"
    PIDS=()
    # root: read-only in the guest and unchanging → cache=always; tree: edited on the host between runs →
    # auto; run: status written by the guest, read here → none.
    start_virtiofsd agentd-root "$ROOTFS" always
    start_virtiofsd agentd-tree "$TREE" auto
    start_virtiofsd agentd-run "$RUN" none
    for sock in agentd-root agentd-tree agentd-run; do
        for _ in $(seq 100); do [ -S "$RUN/$sock.sock" ] && break; sleep 0.05; done
        [ -S "$RUN/$sock.sock" ] || { cat "$RUN"/virtiofsd-*.log >&2; die "virtiofsd did not create $sock.sock"; }
    done

    local cmdline="console=ttyS1 rootfstype=virtiofs root=agentd-root ro"
    if [ "$flavour" = systemd ]; then
        cmdline+=" init=/sbin/agentd-testbed-sdinit systemd.unit=agentd-testbed.target systemd.firstboot=0"
        cmdline+=" systemd.show_status=error"
    else
        cmdline+=" init=/sbin/agentd-testbed-init"
    fi
    cmdline+=" panic=-1 oops=panic mitigations=off psi=1 loglevel=4 ${AGENTD_TESTBED_KERNEL_ARGS:-}"
    "${CHILD[@]}" "$QEMU" -nodefaults -no-user-config -display none -no-reboot \
        -machine q35 "${ACCEL[@]}" -smp "$CPUS" -m "$MEM" \
        -object "memory-backend-memfd,id=mem,size=$MEM,share=on" -numa node,memdev=mem \
        -kernel "$KERNEL" -append "$cmdline" \
        -chardev "socket,id=vfs0,path=$RUN/agentd-root.sock" -device vhost-user-fs-pci,chardev=vfs0,tag=agentd-root \
        -chardev "socket,id=vfs1,path=$RUN/agentd-tree.sock" -device vhost-user-fs-pci,chardev=vfs1,tag=agentd-tree \
        -chardev "socket,id=vfs2,path=$RUN/agentd-run.sock" -device vhost-user-fs-pci,chardev=vfs2,tag=agentd-run \
        -chardev "file,id=ser0,path=$RUN/console.log,append=on" -serial chardev:ser0 \
        -chardev "file,id=ser1,path=$RUN/kernel.log,append=on" -serial chardev:ser1 \
        </dev/null >"$RUN/qemu.log" 2>&1 &
    qpid=$!
    PIDS+=("$qpid")
    local tboot
    tboot=$(date +%s.%N)
    log "booting the $flavour flavour: $(sed -n 's/^kernel=//p' "$DIR/image.info") (QEMU $qemu_major, $ACCEL_DESC, $CPUS vCPUs, $MEM; attempt $attempt/$BOOT_ATTEMPTS)"
    # Live output: follow the guest's test console until QEMU exits.
    "${CHILD[@]}" tail -n +1 -s 0.2 -f --pid="$qpid" "$RUN/console.log" &
    tpid=$!
    PIDS+=("$tpid")

    deadline=$(awk -v t="$T0" -v l="$TIMEOUT" 'BEGIN {printf "%d", t + l}')
    BOOT_RESULT=""
    while kill -0 "$qpid" 2>/dev/null; do
        if [ -z "$started" ] && [ -e "$RUN/started" ]; then
            started=1
            log "$flavour guest up, pytest starting ($(elapsed "$tboot")s after QEMU start)"
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            log "TIMEOUT: ${TIMEOUT}s exceeded; killing QEMU"
            BOOT_RESULT=timeout
            break
        fi
        sleep 0.2
    done
    # QEMU gone (or timed out): stop everything of this attempt; virtiofsd exits by itself on disconnect.
    kill_pids "$qpid"
    wait "$tpid" 2>/dev/null || true
    kill_pids "${PIDS[@]}"
    PIDS=()
    [ -z "$started" ] && [ -e "$RUN/started" ] && started=1
    if [ -n "$BOOT_RESULT" ]; then :
    elif [ -s "$RUN/status" ]; then BOOT_RESULT=status
    elif [ -e "$RUN/init-error" ]; then BOOT_RESULT=init-error
    elif [ -n "$started" ]; then BOOT_RESULT=died
    else BOOT_RESULT=died-early
    fi
    GUEST_SECS=$(elapsed "$tboot")
}

show_guest_logs() {
    log "--- QEMU: $(tail -5 "$RUN/qemu.log" | tr '\n' ' ')"
    log "--- last kernel messages (full log: $DIR/last-run/kernel.log):"
    tail -n 25 "$RUN/kernel.log" | sed 's/\r$//' >&2 || true
}

run_flavour() {  # run_flavour FLAVOUR → returns the job's status; its logs are kept as <name>-FLAVOUR.log
    local flavour="$1" attempt=1 rc
    pytest_args "${MARKERS[$flavour]}"
    write_job
    while :; do
        boot "$flavour" "$attempt"
        case "$BOOT_RESULT" in
            status) break ;;
            died-early)
                log "guest died before pytest started (attempt $attempt/$BOOT_ATTEMPTS)"
                show_guest_logs
                [ "$attempt" -lt "$BOOT_ATTEMPTS" ] || die "giving up after $BOOT_ATTEMPTS boots"
                attempt=$((attempt + 1)) ;;
            init-error) show_guest_logs; die "guest init failed: $(cat "$RUN/init-error")" ;;
            died) show_guest_logs; log "FAILED: the guest died while pytest was running"; exit 1 ;;
            timeout) show_guest_logs; log "FAILED: timeout after ${TIMEOUT}s"; exit 124 ;;
        esac
    done
    rc=$(tr -dc 0-9 <"$RUN/status")
    log "$flavour guest finished in ${GUEST_SECS}s (boot + suite + power-off)"
    SUMMARIES+=("$flavour: $(summary_of "$RUN/console.log")")
    for f in console kernel qemu; do mv -f "$RUN/$f.log" "$RUN/$f-$flavour.log" 2>/dev/null || true; done
    return "${rc:-1}"
}

SUMMARIES=()
final=0
for f in "${RUN_FLAVOURS[@]}"; do
    rc=0
    run_flavour "$f" || rc=$?
    [ "$final" = 0 ] && final=$rc
done
for line in "${SUMMARIES[@]:0:${#SUMMARIES[@]}-1}"; do log "guest $line"; done
report "$final" "${SUMMARIES[-1]}" "guest" || exit "$?"
