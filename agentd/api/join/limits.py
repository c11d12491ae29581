"""The join socket's quotas and timeouts, and why a connection or a HOLD is refused under them.

Code elsewhere in the package reads these constants as attributes of this module when it needs them
(`limits.MAX_HELD`), never as copies, so that a test patching one here changes what the socket does."""

from __future__ import annotations

from dataclasses import dataclass

IDLE_TIMEOUT_SECONDS = 30.0
IDLE_CHECK_SECONDS = 1.0  # idle connections are looked for at most this often (closed this much late at most)
ACCEPT_PAUSE_SECONDS = 0.1  # out of descriptors: stop accepting for a moment instead of spinning on the listener
ACCEPTS_PER_WAKEUP = 64  # then other work on the loop gets its turn
HOLD_WAIT_SECONDS = 5.0  # how long a BeginToolCall waits for the HOLD it names (sent just before it)
# Connections one owner may have open: one per running `agentctl run` (a session runs at most
# [sessions] max_active_calls_per_session calls, 256 by default, rarely more than a few at once) plus idle
# clients' (closed after IDLE_TIMEOUT_SECONDS). 32 owners at their quota fill [api] max_connections (4096).
MAX_CONNECTIONS_PER_OWNER = 128
# Unclaimed HOLDs (each keeps a pidfd open in agentd) per owner and per connection; a launcher's HOLD is claimed
# by its BeginToolCall a millisecond later, so only launches started at the very same moment count together.
MAX_HELD_PER_OWNER = 32
MAX_HELD_PER_CONNECTION = 16
MAX_HELD = 4096  # in all: 128 owners at their quota
MAX_PLACED_PER_CONNECTION = 256  # calls awaiting their END on one connection: as many as a session may run
MAX_REFUSED_REMEMBERED = 1024  # refused HOLDs whose BeginToolCall is told at once (older ones: after the wait)
LOG_INTERVAL_SECONDS = 1.0  # a refusal of one kind for one owner is logged at most this often


@dataclass
class Usage:
    """What one owner holds now."""

    connections: int = 0
    held: int = 0


def connection_refusal(open_in_all: int, max_connections: int, owner: str, usage: Usage) -> str | None:
    """Why a new connection of `owner` is refused, or None."""
    if open_in_all >= max_connections:
        return "too many join connections"
    if usage.connections >= MAX_CONNECTIONS_PER_OWNER:
        return f"too many join connections from {owner} ({usage.connections} open, at most {MAX_CONNECTIONS_PER_OWNER})"
    return None


def hold_refusal(on_connection: int, owner: str, usage: Usage, held_in_all: int) -> str | None:
    """Why one more HOLD is refused, or None."""
    if on_connection >= MAX_HELD_PER_CONNECTION:
        return f"{on_connection} unclaimed HOLDs on this connection (at most {MAX_HELD_PER_CONNECTION})"
    if usage.held >= MAX_HELD_PER_OWNER:
        return f"{usage.held} unclaimed HOLDs from {owner} (at most {MAX_HELD_PER_OWNER})"
    if held_in_all >= MAX_HELD:
        return f"{held_in_all} unclaimed HOLDs in all (at most {MAX_HELD})"
    return None
