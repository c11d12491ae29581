"""`agentctl`: run commands as tool calls and manage sessions from a shell."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import json_format

from agentd.api.gen import agentd_pb2 as pb
from agentd.cli import top
from agentd.client import Client, RunError
from agentd.core.units import format_size, parse_size
from agentd.launch import block_forwarded

CPU_CLASSES = {"background": pb.CPU_CLASS_BACKGROUND, "normal": pb.CPU_CLASS_NORMAL,
               "interactive": pb.CPU_CLASS_INTERACTIVE}
MEMORY_CLASSES = {"low": pb.MEMORY_CLASS_LOW, "medium": pb.MEMORY_CLASS_MEDIUM, "high": pb.MEMORY_CLASS_HIGH}
PRIORITIES = {"high": pb.PRIORITY_HIGH, "normal": pb.PRIORITY_NORMAL, "low": pb.PRIORITY_LOW}
NETWORK = {"any": pb.NETWORK_ANY, "none": pb.NETWORK_NONE}
CAPTURE = {"default": pb.CAPTURE_UNSPECIFIED, "on": pb.CAPTURE_ON, "off": pb.CAPTURE_OFF}
EXIT_USAGE = 2
EXIT_AGENTD = 125  # agentd refused or failed; the command did not run


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _memory(text: str) -> tuple[int, int]:
    """--memory takes bytes/size or a class name; returns (bytes, class)."""
    if text.lower() in MEMORY_CLASSES:
        return 0, MEMORY_CLASSES[text.lower()]
    return _size(text), 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentctl", description="Control agentd: tool calls and sessions")
    parser.add_argument("--socket", help="agentd socket (default: $AGENTD_SOCKET, else the admin socket, or the "
                        "sandbox socket when $AGENTD_SESSION_TOKEN is set)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a command in its own tool call")
    run.add_argument("--session", default=os.environ.get("AGENTD_SESSION", ""), help="session id ($AGENTD_SESSION)")
    run.add_argument("--tool", default="", help="tool name for records (default: the command's basename)")
    run.add_argument("--memory", type=_memory, default=(0, 0), help="expected memory: size (2G) or low|medium|high")
    run.add_argument("--memory-max", type=_size, default=0, help="hard memory limit (memory.max)")
    run.add_argument("--cpu", choices=sorted(CPU_CLASSES), default="normal", help="CPU class")
    run.add_argument("--cpu-max", type=float, default=0.0, help="CPU cap in CPUs (0.5 = half a core)")
    run.add_argument("--pids-max", type=int, default=0)
    run.add_argument("--timeout", type=float, default=0.0, help="seconds (default from agentd's config)")
    run.add_argument("--network", choices=sorted(NETWORK), default="any")
    run.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--json", action="store_true", help="print the result as JSON to stderr")
    run.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")

    session = sub.add_parser("session", help="manage sessions (admin)")
    ssub = session.add_subparsers(dest="verb", required=True)
    create = ssub.add_parser("create")
    create.add_argument("--id", default="")
    create.add_argument("--priority", choices=sorted(PRIORITIES), default="normal")
    create.add_argument("--memory-budget", type=_size, default=0)
    create.add_argument("--memory-protected", type=_size, default=0)
    create.add_argument("--pids-budget", type=int, default=0)
    create.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    create.add_argument("--capture", choices=sorted(CAPTURE), default="default",
                        help="auto-capture of undeclared commands in agent/ (default: agentd's config)")
    ssub.add_parser("list")
    show = ssub.add_parser("show")
    show.add_argument("id")
    delete = ssub.add_parser("delete")
    delete.add_argument("id")
    delete.add_argument("--force", action="store_true", help="also kill the agent's own processes")
    place = ssub.add_parser("place", help="move a process (and its descendants) into the session's agent/ cgroup")
    place.add_argument("id")
    place.add_argument("pid", type=int)
    place.add_argument("--no-descendants", action="store_true")

    calls = sub.add_parser("calls", help="recent and active tool calls")
    calls.add_argument("--session", default="")
    calls.add_argument("--limit", type=int, default=20)
    calls.add_argument("--json", action="store_true")

    for verb in ("freeze", "thaw", "kill", "show-call"):
        p = sub.add_parser(verb, help=f"{verb} a running tool call (admin)")
        p.add_argument("call_id")
        if verb == "kill":
            p.add_argument("--reason", default="")

    sub.add_parser("status", help="what is enforced on this kernel, pressure, counts")
    watch = sub.add_parser("watch", help="follow the memory policy's events (pressure, throttle, freeze, kill, ...)")
    watch.add_argument("--session", default="", help="one session's events (a sandbox sees only its own)")
    watch.add_argument("--json", action="store_true", help="one JSON object per event")
    top.add_arguments(sub.add_parser("top", help="live view: sessions, active calls, recent outcomes (q quits)"))
    return parser


def _labels(items: Sequence[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"agentctl: --label expects KEY=VALUE, got {item!r}")
        labels[key] = value
    return labels


def _print_json(message: Any, stream: Any = sys.stdout) -> None:
    stream.write(json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True), indent=2) + "\n")


def describe_result(result: pb.ToolCallResult) -> str:
    outcome = pb.Outcome.Name(result.outcome).removeprefix("OUTCOME_")
    peak = format_size(result.memory_peak_bytes)
    lines = [f"agentd: tool call {result.call_id} {outcome} (peak memory {peak}, "
             f"{result.duration_seconds:.2f} s)", f"agentd: {result.feedback}"]
    return "\n".join(lines) + "\n"


def cmd_run(client: Client, args: argparse.Namespace) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        print("agentctl run: missing command (agentctl run [options] -- COMMAND ARGS...)", file=sys.stderr)
        return EXIT_USAGE
    expected, memory_class = args.memory
    fields = dict(
        tool=args.tool, expected_memory_bytes=expected, memory_class=memory_class, memory_max_bytes=args.memory_max,
        cpu_class=CPU_CLASSES[args.cpu], cpu_max_millicores=round(args.cpu_max * 1000), pids_max=args.pids_max,
        timeout_seconds=args.timeout, network=NETWORK[args.network], labels=_labels(args.label),
    )
    try:
        outcome = client.run(argv, args.session, forward_signals=True, **fields)
    except RunError as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    if args.json:
        _print_json(outcome.result, sys.stderr)
    elif outcome.result.outcome not in (pb.OUTCOME_OK, pb.OUTCOME_EXITED):
        sys.stderr.write(describe_result(outcome.result))
    return outcome.exit_code


def cmd_session(client: Client, args: argparse.Namespace) -> int:
    if args.verb == "create":
        spec = pb.SessionSpec(
            id=args.id, priority=PRIORITIES[args.priority], memory_budget_bytes=args.memory_budget,
            memory_protected_bytes=args.memory_protected, pids_budget=args.pids_budget, labels=_labels(args.label),
            capture=CAPTURE[args.capture],
        )
        _print_json(client.call("CreateSession", pb.CreateSessionRequest(spec=spec), admin=True))
    elif args.verb == "list":
        for s in client.call("ListSessions", pb.ListSessionsRequest(), admin=True).sessions:
            print(f"{s.spec.id}\t{pb.Priority.Name(s.spec.priority).removeprefix('PRIORITY_')}\t"
                  f"calls={s.active_calls}\tagent_procs={s.agent_processes}\tmemory={format_size(s.memory_current_bytes)}")
    elif args.verb == "show":
        _print_json(client.call("GetSession", pb.GetSessionRequest(session_id=args.id)))
    elif args.verb == "delete":
        _print_json(client.call("DeleteSession", pb.DeleteSessionRequest(session_id=args.id, force=args.force),
                                admin=True))
    elif args.verb == "place":
        request = pb.PlaceAgentRequest(session_id=args.id, pid=args.pid, include_descendants=not args.no_descendants)
        _print_json(client.call("PlaceAgent", request, admin=True))
    return 0


def cmd_calls(client: Client, args: argparse.Namespace) -> int:
    request = pb.ListToolCallsRequest(session_id=args.session, limit=args.limit, include_active=True)
    reply = client.call("ListToolCalls", request)
    if args.json:
        _print_json(reply)
        return 0
    for call in reply.active:
        print(f"{call.call_id}\t{call.session_id}\t{pb.CallState.Name(call.state).removeprefix('CALL_STATE_')}\t"
              f"{call.intent.tool}\tmemory={format_size(call.memory_current_bytes)}")
    for result in reply.finished:
        print(f"{result.call_id}\t{result.session_id}\t{pb.Outcome.Name(result.outcome).removeprefix('OUTCOME_')}\t"
              f"{result.tool}\tpeak={format_size(result.memory_peak_bytes)}\t{result.duration_seconds:.2f}s")
    return 0


def cmd_status(client: Client) -> int:
    status = client.call("GetStatus", pb.GetStatusRequest())
    print(f"agentd {status.version}, cgroup root {status.cgroup_root}")
    print(f"enforced controllers: {', '.join(status.controllers_enforced) or 'none'}")
    if status.controllers_missing:
        print(f"NOT enforced: {', '.join(status.controllers_missing)}")
    print(f"PSI triggers: {'yes' if status.psi_available else 'no'}; "
          f"sched_ext: {'yes' if status.sched_ext_available else 'no'}")
    print(f"BPF: lifecycle {'yes' if status.bpf_lifecycle else 'no'}; network policy "
          f"{'yes' if status.bpf_network else 'no'}; auto-capture {'on' if status.auto_capture else 'off'}")
    for error in status.bpf_errors:
        print(f"BPF error: {error}")
    print(f"sessions: {status.sessions}, active tool calls: {status.active_calls}")
    for p in status.pressure:
        print(f"pressure {p.resource}: some avg10 {p.some_avg10:.2f}%, full avg10 {p.full_avg10:.2f}%")
    for warning in status.warnings:
        print(f"warning: {warning}")
    policy = status.policy
    print(f"memory policy: {'on' if policy.enabled else 'off'} ({policy.signals or 'no signals'})")
    for d in policy.domains:
        stall = f", stall {d.stall_pct:.1f}%" if d.stall_pct >= 0 else ""
        print(f"  {d.domain}: {format_size(d.usage_bytes)} of {format_size(d.limit_bytes)} "
              f"({format_size(max(d.headroom_bytes, 0))} free{stall}), ladder {d.level}, {d.calls_held} calls held")
    return 0


def describe_event(event: pb.PolicyEvent) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(event.time_unix)) + f".{int(event.time_unix % 1 * 1000):03d}"
    what = f"{event.kind} {event.call_id} ({event.session_id}, uses {format_size(event.call_usage_bytes)}, " \
           f"declared {format_size(event.call_expected_bytes)})" if event.call_id else event.kind
    if event.kind in ("throttle", "restore") and event.memory_high_bytes:
        what += f" memory.high {format_size(event.memory_high_bytes)}"
    domain = f"{event.domain} {format_size(event.domain_usage_bytes)}/{format_size(event.domain_limit_bytes)}"
    return f"{when} {domain}: {what}" + (f": {event.reason}" if event.reason else "") + "\n"


def cmd_watch(client: Client, args: argparse.Namespace) -> int:
    """Follow the policy's events until interrupted (Ctrl-C ends it quietly)."""
    stream = client.watch_policy(args.session)
    try:
        for event in stream:
            if args.json:
                sys.stdout.write(json.dumps(json_format.MessageToDict(event, preserving_proto_field_name=True)) + "\n")
            else:
                sys.stdout.write(describe_event(event))
            sys.stdout.flush()
    except KeyboardInterrupt:
        stream.cancel()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        # Termination signals wait for the relay, which passes them on to the tool: agentctl itself stays to
        # report the end. Blocked before the client exists, so that gRPC's threads inherit the mask.
        block_forwarded()
    client = Client.from_env(args.socket)
    try:
        if args.command == "run":
            return cmd_run(client, args)
        if args.command == "session":
            return cmd_session(client, args)
        if args.command == "calls":
            return cmd_calls(client, args)
        if args.command == "status":
            return cmd_status(client)
        if args.command == "watch":
            return cmd_watch(client, args)
        if args.command == "top":
            return top.main(client, args.session, args.limit, args.interval, args.once)
        if args.command == "show-call":
            _print_json(client.call("GetToolCall", pb.ToolCallRequest(call_id=args.call_id)))
        elif args.command == "kill":
            result = client.call("KillToolCall", pb.KillToolCallRequest(call_id=args.call_id, reason=args.reason),
                                 admin=True)
            sys.stdout.write(describe_result(result))
        else:
            method = "FreezeToolCall" if args.command == "freeze" else "ThawToolCall"
            _print_json(client.call(method, pb.ToolCallRequest(call_id=args.call_id), admin=True))
        return 0
    except grpc.RpcError as exc:
        print(f"agentctl: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return EXIT_AGENTD
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
