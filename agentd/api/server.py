"""Run the daemon: cgroup tree, BPF programs, reconcile, gRPC servers on Unix sockets, join socket, metrics,
readiness."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
from pathlib import Path

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentd.api import convert, decoding, join, sdnotify
from agentd.api.gen import agentd_pb2 as pb
from agentd.api.gen import agentd_pb2_grpc as pb_grpc
from agentd.api.metrics import Metrics
from agentd.api.servicer import Service
from agentd.core import owners
from agentd.core.capture import AutoCapture
from agentd.core.config import Config, describe
from agentd.core.engine import Engine
from agentd.core.programs import load_programs
from agentd.core.reconcile import reconcile
from agentd.core.records import RecordStore
from agentd.core.results import ExitStatus
from agentd.core.tree import set_up
from agentd.kernel.watch import Watcher
from agentd.policy import settings as policy_settings
from agentd.policy.loop import PolicyLoop
from agentd.policy.settings import PolicyConfig

log = logging.getLogger(__name__)
STOP_GRACE_SECONDS = 2.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class DaemonError(RuntimeError):
    """Start-up failed in a way the operator must fix; the message says how."""


def _check_not_running(path: Path) -> None:
    """Refuse to steal the socket of a live daemon; remove a stale socket file."""
    if not path.exists() and not path.is_symlink():
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
            return
    raise DaemonError(f"another agentd is already listening on {path}")


def _secure(path: Path, mode: int, gid: int | None) -> None:
    if gid is not None:
        os.chown(path, 0, gid)
    os.chmod(path, mode)


async def _grpc_server(
    service: Service, socket_path: Path, mode: int, gid: int | None, max_connections: int
) -> grpc.aio.Server:
    server = grpc.aio.server(options=[("grpc.max_allowed_incoming_connections", max_connections)],
                             interceptors=[decoding.RequestDecoding(pb.DESCRIPTOR.services_by_name.values())])
    if service.sandbox:
        pb_grpc.add_SandboxServicer_to_server(service, server)  # type: ignore[no-untyped-call]
        name = "agentd.v1.Sandbox"
    else:
        pb_grpc.add_AdminServicer_to_server(service, server)  # type: ignore[no-untyped-call]
        name = "agentd.v1.Admin"
    checker = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    await checker.set("", health_pb2.HealthCheckResponse.SERVING)
    await checker.set(name, health_pb2.HealthCheckResponse.SERVING)
    if not server.add_insecure_port(f"unix:{socket_path}"):
        raise DaemonError(f"cannot listen on {socket_path}")
    await server.start()
    _secure(socket_path, mode, gid)
    return server


async def serve(config: Config, policy_config: PolicyConfig | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    # A blocked signal mask survives exec: a parent that blocked these (a supervisor, a program waiting in
    # sigwait) would otherwise leave agentd deaf to its stop signals.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    sockets = (config.admin_socket, config.sandbox_socket, config.join_socket)
    for path in sockets:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        _check_not_running(path)
    old_umask = os.umask(0o077)  # sockets are created private, then opened up to their configured mode
    tree, caps = set_up(config.cgroup_root)
    records = RecordStore(config.records_file, config.records_max_bytes, config.records_kept_in_memory)
    watcher = Watcher(loop)
    programs = load_programs(tree, caps)
    engine = Engine(config, tree, caps, records, watcher, loop, programs)
    if caps.bpf_lifecycle:
        AutoCapture(engine, config)  # subscribes to execs in agent leaves
    policy = PolicyLoop(engine, policy_config or PolicyConfig())
    metrics = Metrics(engine, policy)
    servers: list[grpc.aio.Server] = []
    join_server: join.JoinServer | None = None

    async def end_from_join(call_id: str, wait_status: int | None) -> pb.ToolCallResult:
        status = ExitStatus.from_wait_status(wait_status) if wait_status is not None else None
        return convert.result_to_pb(await engine.end_call(call_id, None, status))

    try:
        report = reconcile(engine)
        policy.start()
        join_server = join.JoinServer(
            loop, config.join_socket, lambda token, sender, target: engine.join(token, sender, target).id,
            end_from_join, engine.housekeeping_now, config.max_connections,
            owners.Owners(engine.tree),
        )
        _secure(config.join_socket, 0o666, None)
        sandbox = Service(engine, policy, metrics, join_server, sandbox=True)
        join_server.beginner = sandbox.begin_on_join  # BEGIN on the join socket: the Sandbox service's BeginToolCall
        servers.append(
            await _grpc_server(Service(engine, policy, metrics, join_server, sandbox=False), config.admin_socket,
                               config.admin_socket_mode, config.admin_gid, config.max_connections)
        )
        servers.append(
            await _grpc_server(sandbox, config.sandbox_socket, config.sandbox_socket_mode, None,
                               config.max_connections)
        )
        if config.metrics_address:
            metrics.serve(config.metrics_address)
        os.umask(old_umask)
        effective = describe(config) | policy_settings.describe(policy.config)
        log.info("effective configuration", extra={"config": effective})
        log.info(
            "agentd ready",
            extra={
                "cgroup_root": str(tree.root),
                "enforced": ",".join(sorted(caps.enforced)) or "none",
                "not_enforced": ",".join(sorted(caps.missing)) or "none",
                "bpf": ",".join(name for name, on in (("lifecycle", caps.bpf_lifecycle),
                                                      ("network", caps.bpf_network)) if on) or "none",
                "sessions": len(report.sessions),
                "adopted_calls": len(report.adopted_calls),
                "admin_socket": str(config.admin_socket),
            },
        )
        # What start-up allocated (modules, gRPC, protobuf, the reconciled state) lives as long as the daemon:
        # moved out of the collector's reach, a full collection no longer stalls the loop for tens of ms.
        gc.freeze()
        sdnotify.notify("READY=1\nSTATUS=serving")
        await stop.wait()
        sdnotify.notify("STOPPING=1")
        log.info("stopping; sessions and running calls stay for the next start to adopt")
    finally:
        if join_server is not None:
            join_server.close()
        await asyncio.gather(*(s.stop(STOP_GRACE_SECONDS) for s in servers))
        metrics.close()
        policy.close()
        engine.close()
        programs.close()
        watcher.close()
        for path in sockets:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
