"""Names on the wire that the daemon and its clients must agree on (gRPC metadata keys)."""

from __future__ import annotations

# Request metadata: the session token of a Sandbox-service caller.
TOKEN_METADATA = "x-agentd-session-token"
# Trailing metadata of a BeginToolCall refused because its held process could not be placed (the command
# never ran), as opposed to the request itself being refused.
PLACEMENT_METADATA = "x-agentd-placement"
