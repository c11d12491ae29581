"""What is live: sessions, unfinished tool calls, session tokens and one-time join tokens; lookups scoped to a
caller. State only, no kernel work: every other part of the core reads and registers through here."""

from __future__ import annotations

import secrets

from agentd.core import sessions as sess
from agentd.core.errors import FailedPrecondition, NotFound, PermissionDenied
from agentd.core.records import RecordStore
from agentd.core.results import Result
from agentd.core.sessions import Session
from agentd.core.toolcalls import ToolCall

JOIN_TOKEN_BYTES = 24


class Registry:
    def __init__(self, records: RecordStore) -> None:
        self.records = records  # finished calls
        self.sessions: dict[str, Session] = {}
        self.calls: dict[str, ToolCall] = {}
        self._by_token: dict[str, Session] = {}  # by the hash of the session token
        self._join_tokens: dict[str, str] = {}  # one-time join token -> call id
        self._token_of: dict[str, str] = {}  # call id -> its unused join token

    # ----- sessions -----

    def add_session(self, session: Session) -> None:
        self.sessions[session.id] = session
        self._by_token[session.token_sha256] = session

    def remove_session(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        self._by_token.pop(session.token_sha256, None)

    def session(self, session_id: str) -> Session:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise NotFound(f"no session {session_id!r}") from None

    def session_for_token(self, token: str) -> Session:
        session = self._by_token.get(sess.token_hash(token))
        if session is None:
            raise PermissionDenied("unknown session token")
        return session

    # ----- calls -----

    def add_call(self, session: Session, call: ToolCall) -> None:
        self.calls[call.id] = call
        session.calls[call.id] = call

    def remove_call(self, call: ToolCall) -> Session | None:
        """Forget an unfinished call (it finished); its session if that still exists."""
        self.calls.pop(call.id, None)
        self.drop_join_token(call)
        session = self.sessions.get(call.session_id)
        if session is not None:
            session.calls.pop(call.id, None)
        return session

    def lookup(self, call_id: str, scope: Session | None) -> ToolCall | Result:
        """An active call or a finished one's result, visible to `scope` (None = admin)."""
        found: ToolCall | Result | None = self.calls.get(call_id) or self.records.get(call_id)
        if found is None:
            raise NotFound(f"no tool call {call_id!r}")
        if scope is not None and found.session_id != scope.id:
            raise PermissionDenied(f"tool call {call_id!r} belongs to another session")
        return found

    def active(self, call_id: str, scope: Session | None) -> ToolCall:
        found = self.lookup(call_id, scope)
        if isinstance(found, Result):
            raise FailedPrecondition(f"tool call {call_id!r} has finished")
        return found

    # ----- join tokens -----

    def new_join_token(self, call: ToolCall) -> str:
        token = secrets.token_urlsafe(JOIN_TOKEN_BYTES)
        self._join_tokens[token] = call.id
        self._token_of[call.id] = token
        return token

    def call_for_join_token(self, token: str) -> ToolCall | None:
        call_id = self._join_tokens.get(token)
        return self.calls.get(call_id) if call_id else None

    def drop_join_token(self, call: ToolCall) -> None:
        """The call's join token is used, expired or moot."""
        token = self._token_of.pop(call.id, None)
        if token is not None:
            del self._join_tokens[token]
