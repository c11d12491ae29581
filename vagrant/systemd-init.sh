#!/bin/bash
# First process of the systemd flavour of the kernel testbed (installed as /sbin/agentd-testbed-sdinit by
# vagrant/run-tests.sh; kernel command line init=). It hands over to Debian's systemd as PID 1.
#
# The image's root filesystem is shared read-only with every other testbed run, but tests in this flavour
# install agentd into /opt, /etc, /usr/local: so the root becomes an overlay (the image below, a tmpfs on top)
# and systemd starts on that (switch_root). Before that, the run share (the job) and the working tree are
# mounted inside the new root, and the job's units are written into its /etc:
#   agentd-testbed.target       (systemd.unit= on the command line) basic.target + the job; nothing else starts
#   agentd-testbed-job.service  runs vagrant/systemd-job.sh from the tree: pytest, status file, power-off
# Anything unexpected powers off; the host then reports that the guest died or names the error.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
NEW=/mnt/root
RUN_DIR=/agentd-testbed-run     # the run share, inside the new root

fail() {
    echo "agentd-testbed-sdinit: $*" >/dev/kmsg 2>/dev/null
    echo "agentd-testbed-sdinit: $*"
    [ -d "$NEW$RUN_DIR" ] && echo "$*" >"$NEW$RUN_DIR/init-error" 2>/dev/null
    sync
    echo o >/proc/sysrq-trigger
    sleep 30
    exit 1
}

mount -t proc -o nosuid,nodev,noexec proc /proc || fail "cannot mount /proc"
mount -t devtmpfs -o nosuid,mode=755 devtmpfs /dev || fail "cannot mount /dev"
modprobe overlay || fail "cannot load the overlay module"
mount -t tmpfs -o mode=755 tmpfs /mnt || fail "cannot mount a tmpfs on /mnt"
mkdir -p /mnt/upper /mnt/work "$NEW" || fail "cannot create the overlay directories"
mount -t overlay overlay -o lowerdir=/,upperdir=/mnt/upper,workdir=/mnt/work "$NEW" ||
    fail "cannot mount the overlay root"

mkdir -p "$NEW$RUN_DIR" || fail "cannot create $RUN_DIR"
mount -t virtiofs agentd-run "$NEW$RUN_DIR" || fail "cannot mount the run share"
[ -r "$NEW$RUN_DIR/job.sh" ] || fail "no job.sh in the run share"
. "$NEW$RUN_DIR/job.sh"
mkdir -p "$NEW$TREE" || fail "cannot create $TREE"
mount -t virtiofs agentd-tree "$NEW$TREE" || fail "cannot mount the working tree at $TREE"

# A fixed machine id: no first-boot logic (systemd-firstboot would wait for answers on the console).
echo 6167656e7464746573746265640000aa >"$NEW/etc/machine-id"
units="$NEW/etc/systemd/system"
cat >"$units/agentd-testbed.target" <<UNIT
[Unit]
Description=agentd testbed: basic system + the test job
Requires=basic.target
After=basic.target
Wants=agentd-testbed-job.service
AllowIsolate=yes
UNIT
cat >"$units/agentd-testbed-job.service" <<UNIT
[Unit]
Description=agentd testbed job (pytest on the working tree)
After=basic.target

[Service]
Type=exec
ExecStart=/bin/bash $TREE/vagrant/systemd-job.sh $RUN_DIR
StandardInput=null
StandardOutput=journal+console
StandardError=journal+console
UNIT

umount /proc
exec switch_root "$NEW" /lib/systemd/systemd || fail "switch_root to systemd failed"
