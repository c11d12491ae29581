"""Requests protobuf cannot decode answer INVALID_ARGUMENT naming the field, not UNKNOWN.

gRPC decodes a request with the method's deserializer before any agentd code runs, and answers an exception
there with `UNKNOWN Unexpected DecodeError` (protobuf does not say which field). `RequestDecoding`, a server
interceptor, gives agentd's methods a deserializer that does not raise: on a DecodeError it walks the wire
format against the message descriptor to find the field at fault (a string that is not UTF-8, or framing
that is not protobuf at all) and the method answers `INVALID_ARGUMENT <field>: <why>` without running.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError

from agentd.core.errors import bounded

log = logging.getLogger(__name__)

NOT_UTF8 = "not valid UTF-8"
NOT_PROTOBUF = "not a valid protobuf encoding"
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5  # wire types; groups (3, 4) are not used by agentd


class _Malformed(Exception):
    """The bytes break protobuf's framing (a varint or a length past the end, an unknown wire type)."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise _Malformed


def _next_field(data: bytes, pos: int) -> tuple[int, bytes | None, int]:
    """(field number, payload if length-delimited, position after the field)."""
    key, pos = _varint(data, pos)
    number, wire = key >> 3, key & 7
    payload = None
    if number == 0:
        raise _Malformed
    if wire == _VARINT:
        _, pos = _varint(data, pos)
    elif wire == _FIXED64:
        pos += 8
    elif wire == _FIXED32:
        pos += 4
    elif wire == _LENGTH_DELIMITED:
        length, pos = _varint(data, pos)
        payload, pos = data[pos : pos + length], pos + length
    else:
        raise _Malformed
    if pos > len(data):
        raise _Malformed
    return number, payload, pos


def _fault(descriptor: Descriptor, data: bytes) -> tuple[list[str], str] | None:
    """The path (field names inside `descriptor`) and reason of the first fault in `data`, if any."""
    pos = 0
    seen: dict[int, int] = {}  # field number -> index of its last occurrence (repeated fields)
    while pos < len(data):
        try:
            number, payload, pos = _next_field(data, pos)
        except _Malformed:
            return [], NOT_PROTOBUF
        field = descriptor.fields_by_number.get(number)
        if payload is None or field is None:
            continue  # numbers and unknown fields cannot hold a string
        index = seen[number] = seen.get(number, -1) + 1
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        name = f"{field.name}[{index}]" if field.is_repeated and not is_map else field.name
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                payload.decode()
            except UnicodeDecodeError:
                return [name], NOT_UTF8
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
            inner = _fault(field.message_type, payload)
            if inner is not None:
                return ([name] if is_map else [name, *inner[0]]), inner[1]
    return None


def undecodable_field(descriptor: Descriptor, data: bytes) -> tuple[str, str]:
    """Which field of a `descriptor` message makes `data` undecodable, and why: ('intent.argv[1]', NOT_UTF8);
    ('request', NOT_PROTOBUF) when the fault is not inside a field (or not found)."""
    found = _fault(descriptor, data)
    if found is None or not found[0]:
        return "request", found[1] if found else NOT_PROTOBUF
    return ".".join(found[0]), found[1]


class Undecodable:
    """What the lenient deserializer returns for bytes that do not decode: the answer to give."""

    __slots__ = ("field", "message")

    def __init__(self, field: str, why: str) -> None:
        self.field = field
        self.message = bounded(f"{field}: {why}")


Behaviour = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


def _lenient(method: str, handler: grpc.RpcMethodHandler[Any, Any], descriptor: Descriptor) -> Any:
    parse = handler.request_deserializer
    behaviour: Behaviour = handler.unary_unary  # type: ignore[assignment]  # aio handlers are coroutines
    assert parse is not None

    def deserialize(raw: bytes) -> object:
        try:
            return parse(raw)
        except DecodeError:
            field, why = undecodable_field(descriptor, raw)
            return Undecodable(field, why)

    async def answer(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Undecodable):
            log.info("request refused: not decodable", extra={"method": method, "field": request.field})
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behaviour(request, context)

    return grpc.unary_unary_rpc_method_handler(
        answer, request_deserializer=deserialize, response_serializer=handler.response_serializer
    )


class RequestDecoding(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Lenient request decoding for the unary methods of the given services; other methods are untouched."""

    def __init__(self, services: Iterable[ServiceDescriptor]) -> None:
        self._inputs = {f"/{s.full_name}/{m.name}": m.input_type for s in services for m in s.methods}
        # method -> (the handler gRPC found, its lenient replacement): made once per method, not per call
        self._lenient: dict[str, tuple[object, object]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        descriptor = self._inputs.get(method)
        if handler is None or descriptor is None or handler.unary_unary is None:
            return handler
        cached = self._lenient.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._lenient[method] = (handler, _lenient(method, handler, descriptor))
        lenient: grpc.RpcMethodHandler[Any, Any] = cached[1]  # type: ignore[assignment]
        return lenient
