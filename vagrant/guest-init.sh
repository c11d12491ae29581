#!/bin/bash
# PID 1 of the kernel testbed guest (installed as /sbin/agentd-testbed-init by vagrant/run-tests.sh).
#
# Mounts the API filesystems the way a systemd host would (cgroup2 with nsdelegate, bpffs, tracefs, debugfs),
# mounts the two other virtiofs shares (the run directory with the job, and the working tree at its host path),
# runs the job's pytest with its output on /dev/ttyS0 (the host streams that file), writes pytest's exit status
# to the run directory and powers off. Kernel messages go to the kernel console (ttyS1, a separate host file).
# Anything unexpected ends in a power-off too: the host then reports that the guest died.
#
# Every fork+exec costs ~15-50 ms under TCG, so builtins are used wherever possible.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
RUN=/run/agentd-testbed

kmsg() { echo "agentd-testbed-init: $*" >/dev/kmsg 2>/dev/null; }
poweroff_now() {
    sync
    echo o >/proc/sysrq-trigger
    sleep 30
    exit 1
}
fail() {
    echo "agentd-testbed-init: $*" >/dev/ttyS0 2>/dev/null
    echo "agentd-testbed-init: $*"
    kmsg "$*"
    [ -d "$RUN" ] && echo "$*" >"$RUN/init-error" 2>/dev/null
    poweroff_now
}

mount -t proc -o nosuid,nodev,noexec proc /proc || fail "cannot mount /proc"
mount -t tmpfs -o nosuid,nodev,mode=755 tmpfs /run || fail "cannot mount /run"
# Everything else in one mount(8) call, in this order.
FSTAB='sysfs    /sys                sysfs    nosuid,nodev,noexec 0 0
devtmpfs /dev                devtmpfs nosuid,mode=755 0 0
devpts   /dev/pts            devpts   nosuid,noexec,gid=5,mode=620,ptmxmode=000,X-mount.mkdir 0 0
tmpfs    /dev/shm            tmpfs    nosuid,nodev,mode=1777,X-mount.mkdir 0 0
tmpfs    /tmp                tmpfs    nosuid,nodev,mode=1777 0 0
tmpfs    /var/tmp            tmpfs    nosuid,nodev,mode=1777 0 0
tmpfs    /var/log            tmpfs    nosuid,nodev,mode=755 0 0
tmpfs    /var/lib/agentd     tmpfs    nosuid,nodev,mode=755 0 0
tmpfs    /root               tmpfs    nosuid,nodev,mode=700 0 0
cgroup2  /sys/fs/cgroup      cgroup2  nosuid,nodev,noexec,nsdelegate,memory_recursiveprot 0 0
bpf      /sys/fs/bpf         bpf      nosuid,nodev,noexec,mode=700 0 0
tracefs  /sys/kernel/tracing tracefs  nosuid,nodev,noexec 0 0
debugfs  /sys/kernel/debug   debugfs  nosuid,nodev,noexec 0 0
'
echo "$FSTAB" >/run/fstab
mount -a -T /run/fstab || fail "mounting the API filesystems failed: $(cat /proc/self/mounts)"
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
echo "+memory +cpu +pids +io" >/sys/fs/cgroup/cgroup.subtree_control || fail "cannot enable cgroup controllers"
echo agentd-testbed >/proc/sys/kernel/hostname
# No swap is configured in the image; turn off anything the kernel might have found anyway.
{ read -r _; read -r _ && swapoff -a; } </proc/swaps

mkdir "$RUN" || fail "cannot create $RUN"
mount -t virtiofs agentd-run "$RUN" || fail "cannot mount the run share"
[ -r "$RUN/job.sh" ] || fail "no job.sh in the run share"
# job.sh sets TREE, TESTBED_ENV (array), JOB_EXEC (a shell command run instead of pytest, if not empty) and the
# pytest arguments (set -- ...).
. "$RUN/job.sh"
[ -d "$TREE" ] || mkdir -p "$TREE"
mount -t virtiofs agentd-tree "$TREE" || fail "cannot mount the working tree at $TREE"
ip link set lo up || fail "ip link set lo up failed"
# Raw test console: no CR/LF translation, no echo.
stty -F /dev/ttyS0 raw -echo 2>/dev/null

cd "$TREE" || fail "cannot cd to $TREE"
read -r up _ </proc/uptime
kmsg "starting the job at uptime $up"
echo "$up" >"$RUN/started"
# Output through a pipe: pytest sees no terminal (no \r progress lines); the host sets PY_COLORS.
if [ -n "${JOB_EXEC:-}" ]; then
    env -i "${TESTBED_ENV[@]}" /bin/bash -c "$JOB_EXEC" </dev/null 2>&1 | cat >/dev/ttyS0
else
    env -i "${TESTBED_ENV[@]}" /opt/agentd-venv/bin/python -m pytest "$@" </dev/null 2>&1 | cat >/dev/ttyS0
fi
rc=${PIPESTATUS[0]}
echo "$rc" >"$RUN/status"
poweroff_now
