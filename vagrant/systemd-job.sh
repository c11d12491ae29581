#!/bin/bash
# The job of the systemd flavour of the kernel testbed, run by agentd-testbed-job.service (written by
# vagrant/systemd-init.sh) once systemd reached basic.target: the same contract as guest-init.sh's job
# (job.sh from the run share, pytest or JOB_EXEC in the tree, output on /dev/ttyS0, exit status in the run
# share), then an immediate power-off (nothing in the overlay root is worth an orderly shutdown).
RUN="$1"
poweroff_now() { sync; echo o >/proc/sysrq-trigger; sleep 30; exit 1; }
[ -r "$RUN/job.sh" ] || { echo "no job.sh in $RUN" >"$RUN/init-error"; poweroff_now; }
. "$RUN/job.sh"
cd "$TREE" || { echo "cannot cd to $TREE" >"$RUN/init-error"; poweroff_now; }
stty -F /dev/ttyS0 raw -echo 2>/dev/null
read -r up _ </proc/uptime
echo "agentd-testbed-job: systemd up, starting the job at uptime $up" >/dev/kmsg
echo "$up" >"$RUN/started"
if [ -n "${JOB_EXEC:-}" ]; then
    env -i "${TESTBED_ENV[@]}" /bin/bash -c "$JOB_EXEC" </dev/null 2>&1 | cat >/dev/ttyS0
else
    env -i "${TESTBED_ENV[@]}" /opt/agentd-venv/bin/python -m pytest "$@" </dev/null 2>&1 | cat >/dev/ttyS0
fi
echo "${PIPESTATUS[0]}" >"$RUN/status"
poweroff_now
