"""`agentd`: the daemon's entry point (configuration, logging, the event loop)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from agentd import __version__, logs
from agentd.core.config import DEFAULT_PATH, ConfigError, default_toml, delegated_table, load_config
from agentd.policy.settings import PolicyConfigError, from_table
from agentd.policy.settings import default_toml as policy_toml

log = logging.getLogger("agentd")

# gRPC's EventEngine hands every read and write of a request to threads of its own; its classic poller does the
# I/O on the thread that polls. Measured on a 2-vCPU VM (bench/lifecycle.py): BeginToolCall 0.2-0.5 ms faster
# with the classic one. Read when gRPC starts; an operator's own GRPC_EXPERIMENTS wins (empty: gRPC's default).
CLASSIC_GRPC_IO = (
    "-event_engine_client,-event_engine_listener,-event_engine_for_all_other_endpoints,-event_engine_callback_cq"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentd", description="Per-tool-call resource control for AI agents")
    parser.add_argument("--config", type=Path, default=DEFAULT_PATH, help=f"TOML file (default {DEFAULT_PATH})")
    parser.add_argument("--print-config", action="store_true", help="print the documented defaults and exit")
    parser.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    parser.add_argument("--version", action="version", version=f"agentd {__version__}")
    args = parser.parse_args(argv)
    if args.print_config:
        sys.stdout.write(default_toml() + "\n" + policy_toml())
        return 0
    try:
        config = load_config(args.config)
        policy = from_table(delegated_table(args.config, "policy"))
    except (ConfigError, PolicyConfigError) as exc:
        print(f"agentd: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print("configuration OK")
        return 0
    logs.configure(config.log_level)
    os.environ.setdefault("GRPC_EXPERIMENTS", CLASSIC_GRPC_IO)
    from agentd.api.server import DaemonError, serve  # imports grpc: keep --print-config fast

    try:
        asyncio.run(serve(config, policy))
    except DaemonError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
