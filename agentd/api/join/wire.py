"""The bytes on the join socket: its lines and frames, their sizes and kinds, wait statuses, and the descriptors
that travel with them (SCM_RIGHTS, pidfds). Pure functions of what was read; no state."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message

from agentd.api.decoding import undecodable_field
from agentd.api.gen import agentd_pb2 as pb
from agentd.core.errors import FailedPrecondition

M = TypeVar("M", bound=Message)

MAX_LINE = 512
READ_SIZE = 4096  # bytes taken per read: several pipelined lines at once, never a descriptor more
MAX_REF = 64
# Framed protocol: a frame is a 4-byte big-endian length of what follows (kind + payload), a kind, a payload.
FRAME_VERSION = 1
MAX_FRAME = 64 * 1024  # an intent's argv is for records only: clients cut it to fit
FRAME_HEADER = struct.Struct(">IB")
_LENGTH = struct.Struct(">I")
FRAME_READ_SIZE = MAX_FRAME + 1024  # a BEGIN frame (with the HELLO before it) arrives with its descriptor in one read
HELLO, BEGIN, END = 1, 2, 3
BEGUN, RESULT, ERROR = 129, 130, 255
EXPECTED = "expected 'HOLD <ref>', 'JOIN <token>' or 'END <call id> <wait status>'"
UCRED = struct.Struct("3i")  # SO_PEERCRED: pid, uid, gid
# Room for exactly one descriptor (CMSG_SPACE would round up to room for two on 64-bit).
FD_SPACE = socket.CMSG_LEN(struct.calcsize("i"))
# PIDFD_GET_INFO (Linux 6.13): _IOWR(0xFF, 11, struct pidfd_info), whose version 0 is 64 bytes beginning with
# the u64 mask asked and answered, the u64 cgroup id and the u32 pid; one system call where the pidfd's fdinfo in
# /proc takes three and a parse.
PIDFD_INFO_SIZE = 64
PIDFD_GET_INFO = (3 << 30) | (PIDFD_INFO_SIZE << 16) | (0xFF << 8) | 11
PIDFD_INFO_PID = 1
_PIDFD_INFO = struct.Struct("=QQI")
CTRUNC = int(socket.MSG_CTRUNC)  # a plain int: `flags & socket.MSG_CTRUNC` runs the enum's Python code, every read


def descriptor_fault(descriptors: int, flags: int, data: bytes) -> str | None:
    """Why a read breaks the rule that a descriptor comes alone with the end of its line, or None."""
    if flags & CTRUNC:
        return "more than one descriptor in a message"
    if descriptors and not data.endswith(b"\n"):
        return "a descriptor without the end of its line"
    return None


def parse_wait_status(text: str) -> int | None:
    """END's wait status as waitpid() gave it: an exit or a killing signal; "-" or nothing for unknown."""
    if text in ("", "-"):
        return None
    status = int(text)
    if not (0 <= status <= 0xFFFF and (os.WIFEXITED(status) or os.WIFSIGNALED(status))):
        raise ValueError(f"not the wait status of an exited or killed process: {text}")
    return status


def wait_status_of(request: pb.EndToolCallRequest) -> int | None:
    """An EndToolCallRequest's exit status as the wait status END carries (None: unknown)."""
    if not request.has_exit_status:
        return None
    if request.exit_signal:
        if not 0 < request.exit_signal < 0x7F:
            raise ValueError(f"exit_signal: not a signal: {request.exit_signal}")
        return int(request.exit_signal)
    if not 0 <= request.exit_code <= 255:
        raise ValueError(f"exit_code: must be 0-255, not {request.exit_code}")
    return int(request.exit_code) << 8


def split_frames(buffer: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The complete frames at the start of `buffer` as (kind, payload), and what is left; ValueError for a
    length outside 1..MAX_FRAME."""
    frames: list[tuple[int, bytes]] = []
    pos = 0
    while len(buffer) - pos >= _LENGTH.size:
        (length,) = _LENGTH.unpack_from(buffer, pos)
        if not 0 < length <= MAX_FRAME:
            raise ValueError(f"a frame of {length} bytes (1 to {MAX_FRAME})")
        end = pos + _LENGTH.size + length
        if end > len(buffer):
            break
        frames.append((buffer[pos + _LENGTH.size], buffer[pos + FRAME_HEADER.size : end]))
        pos = end
    return frames, buffer[pos:]


def decode(cls: type[M], payload: bytes) -> M:
    """A frame's payload as message `cls`; ValueError naming the field at fault and why when it does not decode."""
    try:
        return cls.FromString(payload)
    except DecodeError:
        descriptor: Any = cls.DESCRIPTOR
        field, why = undecodable_field(descriptor, payload)
        name = descriptor.name
        raise ValueError(f"{name}.{field}: {why}" if field != "request" else f"not a {name}: {why}") from None


def frame(kind: int, message: Any) -> bytes:
    """One frame holding a protobuf message."""
    payload: bytes = message.SerializeToString()
    return FRAME_HEADER.pack(len(payload) + 1, kind) + payload


def frame_descriptor_fault(frames: list[tuple[int, bytes]], rest: bytes) -> str | None:
    """Why frames read together with a descriptor break the rule that it comes alone with the end of a BEGIN
    frame (a HELLO may come first), or None."""
    kinds = [kind for kind, _ in frames]
    if rest or kinds not in ([BEGIN], [HELLO, BEGIN]):
        return "a descriptor not alone with the end of a BEGIN frame"
    return None


def pidfd_pid(fd: int) -> int:
    """The pid (in our namespace) a pidfd refers to; -1 once the process is gone."""
    info = bytearray(PIDFD_INFO_SIZE)
    _PIDFD_INFO.pack_into(info, 0, PIDFD_INFO_PID, 0, 0)
    try:
        fcntl.ioctl(fd, PIDFD_GET_INFO, info)
    except OSError:  # a kernel before 6.13, not a pidfd, a process gone or without a parent in our sight: /proc says
        return fdinfo_pid(fd)
    return int(_PIDFD_INFO.unpack_from(info)[2])


def fdinfo_pid(fd: int) -> int:
    """pidfd_pid() as the pidfd's fdinfo in /proc tells it (any kernel with pidfds)."""
    info = os.open(f"/proc/self/fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        text = os.read(info, 4096)
    finally:
        os.close(info)
    start = text.find(b"\nPid:")  # never the first line (pos: is)
    if start == -1:
        raise FailedPrecondition("the attached descriptor is not a pidfd")
    end = text.find(b"\n", start + 1)
    return int(text[start + 5 : end if end != -1 else len(text)])


def descriptors(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors a read's ancillary data carried (SCM_RIGHTS)."""
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(struct.unpack(f"{usable // 4}i", payload[:usable]))
    return fds
