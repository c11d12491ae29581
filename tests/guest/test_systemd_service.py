"""agentd as an installed systemd service, in the testbed's systemd flavour (systemd as PID 1, issue 12).

Everything goes through the real install (`systemd/install.sh`, offline from the image's wheelhouse), `systemctl`
and `journalctl`: the unit as shipped, not a test copy. The tests share one installation and run in file order:
install first, uninstall last (it must leave nothing but the records).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import REPO, SLOW, wait_for

from agentd.api.gen import agentd_pb2 as pb
from agentd.client import Client

pytestmark = [pytest.mark.guest, pytest.mark.systemd_guest]

UNIT = "agentd"
CGROUP2 = Path("/sys/fs/cgroup")
ADMIN_SOCKET = "/run/agentd/admin.sock"
SANDBOX_SOCKET = "/run/agentd/sandbox.sock"
AGENTCTL = "/usr/local/bin/agentctl"
WHEELHOUSE = "/opt/agentd-wheelhouse"  # filled by vagrant/provision.sh --image: the QEMU guest has no network
RECORDS = Path("/var/lib/agentd/records.jsonl")
# Everything the install puts in place; the uninstall must remove all of it.
INSTALLED = [
    Path("/opt/agentd/bin/python"), Path("/usr/local/bin/agentd"), Path("/usr/local/bin/agentctl"),
    Path("/usr/local/bin/agentd-shell"), Path("/usr/local/lib/agentd/bpf/lifecycle.bpf.o"),
    Path("/usr/local/lib/systemd/system/agentd.service"), Path("/usr/local/lib/tmpfiles.d/agentd.conf"),
    Path("/usr/local/lib/sysusers.d/agentd.conf"), Path("/usr/local/share/doc/agentd/README.md"),
    Path("/etc/agentd/agentd.toml"),
]
BUDGET = 1 << 30
TIMEOUT = 60.0 * SLOW / 10 + 60.0  # systemctl start waits for READY: several seconds of Python start-up under TCG


def run(*argv: str, check: bool = True, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{argv} exited {done.returncode}: {done.stdout}{done.stderr}")
    return done


def show(prop: str) -> str:
    return run("systemctl", "show", "-P", prop, UNIT).stdout.strip()


def unit_cgroup() -> Path:
    return CGROUP2 / show("ControlGroup").lstrip("/")


def journal(invocation: str) -> list[dict[str, Any]]:
    """The journal entries agentd itself wrote during one invocation of the unit."""
    out = run("journalctl", "--no-pager", "-o", "json", f"_SYSTEMD_INVOCATION_ID={invocation}",
              "SYSLOG_IDENTIFIER=agentd").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def messages(invocation: str) -> list[dict[str, Any]]:
    return [json.loads(entry["MESSAGE"]) for entry in journal(invocation)]


def admin() -> Client:
    return Client(ADMIN_SOCKET)


def wait_active(previous_pid: str = "") -> str:
    """Wait for the unit to be active with a main pid other than previous_pid; return that pid."""
    def up() -> bool:
        return show("ActiveState") == "active" and show("MainPID") not in ("0", previous_pid)
    wait_for(up, timeout=TIMEOUT)
    return show("MainPID")


def wait_started(tool: subprocess.Popen[str], pidfile: Path) -> int:
    """Wait until the tool wrote its pid; fail at once with agentctl's output if it ended instead."""
    def started() -> bool:
        if tool.poll() is not None:
            out, err = tool.communicate()
            raise AssertionError(f"agentctl run ended with {tool.returncode}: {out}{err}")
        return pidfile.exists() and pidfile.read_text().strip() != ""
    wait_for(started, timeout=TIMEOUT)
    return int(pidfile.read_text())


def cgroup_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text().strip().removeprefix("0::")


class Agent:
    """A session with an agent process (a `sleep`, placed into its agent/ leaf), the way an operator sets one up."""

    def __init__(self, budget: int = BUDGET) -> None:
        with admin() as client:
            reply = client.call("CreateSession", pb.CreateSessionRequest(
                spec=pb.SessionSpec(priority=pb.PRIORITY_NORMAL, memory_budget_bytes=budget, capture=pb.CAPTURE_OFF)))
            self.id, self.token = reply.session.spec.id, reply.token
            self.cgroup = Path(reply.session.cgroup)
            self.proc = subprocess.Popen(["sleep", "100000"])
            client.call("PlaceAgent", pb.PlaceAgentRequest(session_id=self.id, pid=self.proc.pid))

    def untouched(self) -> bool:
        """The agent's process lives, in the same cgroup as when it was placed."""
        return self.proc.poll() is None and cgroup_of(self.proc.pid) == "/" + str(
            (self.cgroup / "agent").relative_to(CGROUP2))

    def run_tool(self, script: str, *options: str) -> subprocess.Popen[str]:
        """`agentctl run -- sh -c SCRIPT` from inside the sandbox: placed into the session's agent/ leaf first (as a
        container runtime would), with the token and the sandbox socket in its environment."""
        env = dict(os.environ, AGENTD_SOCKET=SANDBOX_SOCKET, AGENTD_SESSION_TOKEN=self.token)
        env.pop("PYTHONPATH", None)  # the installed agentctl, not the tree's
        argv = [AGENTCTL, "run", "--memory", "32M", *options, "--", "sh", "-c", script]
        # Held at `read` until placed, then it becomes agentctl.
        release_r, release_w = os.pipe()
        try:
            tool = subprocess.Popen(["sh", "-c", 'read -r _ && exec "$@" </dev/null', "held", *argv], env=env,
                                    text=True, stdin=release_r, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            with admin() as client:
                client.call("PlaceAgent", pb.PlaceAgentRequest(session_id=self.id, pid=tool.pid))
            os.write(release_w, b"\n")
        finally:
            os.close(release_r)
            os.close(release_w)
        return tool

    def delete(self) -> None:
        self.proc.kill()
        self.proc.wait()
        with admin() as client:
            client.call("DeleteSession", pb.DeleteSessionRequest(session_id=self.id, force=True))


@pytest.fixture(scope="module")
def installed() -> Iterator[None]:
    """agentd installed from the tree and running as agentd.service; removed again at the end even on failure."""
    offline = ["--wheels", WHEELHOUSE] if Path(WHEELHOUSE).is_dir() else []  # a Vagrant VM has PyPI instead
    run("bash", str(REPO / "systemd/install.sh"), *offline, timeout=900)
    run("systemctl", "enable", "--now", UNIT)
    try:
        yield
    finally:
        if Path(ADMIN_SOCKET).exists():
            with admin() as client:
                for s in client.call("ListSessions", pb.ListSessionsRequest()).sessions:
                    client.call("DeleteSession", pb.DeleteSessionRequest(session_id=s.spec.id, force=True))
        run("bash", str(REPO / "systemd/install.sh"), "--uninstall", "--force", check=False)


@pytest.fixture
def agent(installed: None) -> Iterator[Agent]:
    a = Agent()
    try:
        yield a
    finally:
        if show("ActiveState") != "active":
            run("systemctl", "start", UNIT)
        a.delete()


def test_install_puts_everything_in_place(installed: None) -> None:
    missing = [str(p) for p in INSTALLED if not p.exists()]
    assert missing == []
    if (REPO / "launcher/build/agentd-run").exists():  # built by the host: the shim is the launcher by another name
        assert os.path.samefile("/usr/local/bin/agentd-shell", "/usr/local/bin/agentd-run")
    assert os.readlink("/usr/local/bin/agentd") == "/opt/agentd/bin/agentd"
    assert show("FragmentPath") == "/usr/local/lib/systemd/system/agentd.service"
    assert show("ActiveState") == "active" and show("UnitFileState") == "enabled"
    assert run("getent", "group", "agentd").returncode == 0
    # Nothing the daemon runs comes from the source tree.
    main = show("MainPID")
    assert str(REPO) not in os.readlink(f"/proc/{main}/exe") + Path(f"/proc/{main}/cmdline").read_text()
    maps = Path(f"/proc/{main}/maps").read_text()
    assert "/opt/agentd/lib/" in maps and str(REPO) not in maps


def test_hardening_keeps_cgroupfs_bpffs_and_bpf(installed: None) -> None:
    assert show("ProtectSystem") == "strict" and show("NoNewPrivileges") == "yes"
    with admin() as client:
        status = client.call("GetStatus", pb.GetStatusRequest())
    assert {"memory", "cpu", "pids"} <= set(status.controllers_enforced)
    assert (status.bpf_lifecycle, status.bpf_network, list(status.bpf_errors)) == (True, True, [])
    assert status.psi_available


def test_delegate_gives_agentd_its_subtree_and_systemd_leaves_sessions_alone(agent: Agent) -> None:
    unit = unit_cgroup()
    assert unit == CGROUP2 / "system.slice/agentd.service"
    with admin() as client:
        assert client.call("GetStatus", pb.GetStatusRequest()).cgroup_root == str(unit)
    assert cgroup_of(int(show("MainPID"))) == "/system.slice/agentd.service/supervisor"
    assert agent.cgroup.parent == unit / "sessions"
    assert (agent.cgroup / "memory.max").read_text().strip() == str(BUDGET)
    assert {"memory", "cpu", "pids"} <= set((unit / "cgroup.subtree_control").read_text().split())
    # systemd re-applies its own settings to the unit's cgroup on daemon-reload; the delegated subtree is ours.
    run("systemctl", "daemon-reload")
    assert (agent.cgroup / "memory.max").read_text().strip() == str(BUDGET)
    assert agent.untouched()


def test_ready_only_after_reconcile(agent: Agent, tmp_path: Path) -> None:
    go = tmp_path / "go"
    tool = agent.run_tool(f"echo $$ >{tmp_path}/pid; while [ ! -e {go} ]; do sleep 0.1; done; exit 3")
    wait_started(tool, tmp_path / "pid")
    before = show("MainPID")
    run("systemctl", "restart", UNIT)  # returns once READY=1 arrived (Type=notify)
    # At READY the adopted call is already known: reconcile ran before.
    with admin() as client:
        active = client.call("ListToolCalls", pb.ListToolCallsRequest(session_id=agent.id, include_active=True))
    assert [c.state for c in active.active] == [pb.CALL_STATE_RUNNING]
    entries = {json.loads(e["MESSAGE"])["msg"]: e for e in journal(show("InvocationID"))}
    assert json.loads(entries["agentd ready"]["MESSAGE"])["adopted_calls"] == 1 and show("MainPID") != before
    # systemd saw the unit active only after agentd had logged the end of reconcile (journald's receive times and
    # the unit's state change are on the same monotonic clock; seconds apart under TCG with Type=simple).
    assert int(entries["reconciled"]["__MONOTONIC_TIMESTAMP"]) < int(show("ActiveEnterTimestampMonotonic"))
    go.touch()
    out, err = tool.communicate(timeout=TIMEOUT)
    assert tool.returncode == 3, out + err


def test_restart_while_a_call_runs_adopts_it(agent: Agent, tmp_path: Path) -> None:
    go = tmp_path / "go"
    tool = agent.run_tool(f"echo $$ >{tmp_path}/pid; while [ ! -e {go} ]; do sleep 0.1; done; echo done; exit 7",
                          "--memory-max", "64M")
    tool_pid = wait_started(tool, tmp_path / "pid")
    tool_cgroup = cgroup_of(tool_pid)
    assert "/tc-" in tool_cgroup
    run("systemctl", "restart", UNIT)
    # KillMode=process: only the daemon was signalled; the tool and the agent kept running where they were.
    assert cgroup_of(tool_pid) == tool_cgroup and agent.untouched()
    assert (CGROUP2 / tool_cgroup.lstrip("/") / "memory.max").read_text().strip() == str(64 << 20)
    go.touch()
    out, err = tool.communicate(timeout=TIMEOUT)
    assert (tool.returncode, out) == (7, "done\n"), err
    with admin() as client:
        finished = client.call("ListToolCalls", pb.ListToolCallsRequest(session_id=agent.id)).finished
    assert [(r.outcome, r.has_exit_status, r.exit_code) for r in finished] == [(pb.OUTCOME_FAILED, True, 7)]


def test_restart_on_failure_after_sigkill(agent: Agent) -> None:
    before, restarts = show("MainPID"), int(show("NRestarts"))
    run("systemctl", "kill", "--kill-whom=main", "--signal=SIGKILL", UNIT)
    after = wait_active(before)
    assert int(show("NRestarts")) == restarts + 1 and after != before
    with admin() as client:
        assert agent.id in {s.spec.id for s in client.call("ListSessions", pb.ListSessionsRequest()).sessions}
    assert agent.untouched()


def test_stop_leaves_sessions_for_the_next_start(agent: Agent) -> None:
    run("systemctl", "stop", UNIT)
    assert show("ActiveState") == "inactive"
    assert agent.cgroup.is_dir() and agent.untouched()
    run("systemctl", "start", UNIT)
    with admin() as client:
        session = client.call("GetSession", pb.GetSessionRequest(session_id=agent.id))
    assert session.agent_processes == 1 and agent.untouched()
    ready = [m for m in messages(show("InvocationID")) if m["msg"] == "agentd ready"]
    assert ready and ready[0]["sessions"] >= 1


def test_journal_holds_the_json_lines(installed: None) -> None:
    entries = journal(show("InvocationID"))
    assert entries
    for entry in entries:
        line = json.loads(entry["MESSAGE"])  # every line agentd wrote is one JSON object
        assert {"ts", "level", "logger", "msg"} <= set(line)
    assert any(json.loads(e["MESSAGE"])["msg"] == "agentd ready" for e in entries)


def test_uninstall_leaves_nothing_but_the_records(installed: None) -> None:
    agent = Agent()
    tool = agent.run_tool("exit 0")
    out, err = tool.communicate(timeout=TIMEOUT)
    assert tool.returncode == 0, out + err
    agent.delete()
    unit = unit_cgroup()
    run("bash", str(REPO / "systemd/install.sh"), "--uninstall")
    left = [str(p) for p in INSTALLED if p.exists() or p.is_symlink()]
    assert left == []
    for gone in ("/opt/agentd", "/usr/local/lib/agentd", "/etc/agentd", "/run/agentd",
                 "/usr/local/share/doc/agentd"):
        assert not Path(gone).exists(), gone
    assert run("getent", "group", "agentd", check=False).returncode == 2
    assert run("systemctl", "cat", UNIT, check=False).returncode != 0
    assert not unit.exists()  # no cgroup left behind either
    records = [json.loads(line) for line in RECORDS.read_text().splitlines()]
    assert any(r.get("session_id") == agent.id for r in records)
    for pid in filter(str.isdigit, os.listdir("/proc")):  # no daemon process survives
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        assert not any(part.endswith(b"/agentd") for part in cmd[:2]), (pid, cmd)
