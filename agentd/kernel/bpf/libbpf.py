"""A small typed ctypes layer over libbpf.so.1: load an object, attach programs, use maps and ring buffers.

Every failure raises BpfError naming the action, the object and program or map, and the errno; libbpf's
own messages (such as the verifier log of a failed load) go to the logger and into the error text.
Objects are not thread-safe: use each from one thread (the daemon's event loop).
"""

from __future__ import annotations

import collections
import ctypes
import errno
import functools
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

LIBBPF_SONAME = "libbpf.so.1"
_BPF_ANY, _BPF_NOEXIST = 0, 1
_LIBBPF_INFO = 1  # levels: 0 warn, 1 info, 2 debug
_PRINT_BUFFER = 1 << 18  # a verifier log comes in one message

log = logging.getLogger(__name__)

_ptr = ctypes.c_void_p
_size = ctypes.c_size_t
_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, _ptr, _ptr, _size)
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, _ptr)  # va_list: x86-64 pointer

_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "bpf_object__open_file": (_ptr, [ctypes.c_char_p, _ptr]),
    "bpf_object__load": (ctypes.c_int, [_ptr]),
    "bpf_object__close": (None, [_ptr]),
    "bpf_object__find_program_by_name": (_ptr, [_ptr, ctypes.c_char_p]),
    "bpf_object__find_map_by_name": (_ptr, [_ptr, ctypes.c_char_p]),
    "bpf_program__attach": (_ptr, [_ptr]),
    "bpf_program__attach_cgroup": (_ptr, [_ptr, ctypes.c_int]),
    "bpf_link__destroy": (ctypes.c_int, [_ptr]),
    "bpf_map__fd": (ctypes.c_int, [_ptr]),
    "bpf_map__key_size": (ctypes.c_uint32, [_ptr]),
    "bpf_map__value_size": (ctypes.c_uint32, [_ptr]),
    "bpf_map__max_entries": (ctypes.c_uint32, [_ptr]),
    "bpf_map__lookup_elem": (ctypes.c_int, [_ptr, _ptr, _size, _ptr, _size, ctypes.c_uint64]),
    "bpf_map__update_elem": (ctypes.c_int, [_ptr, _ptr, _size, _ptr, _size, ctypes.c_uint64]),
    "bpf_map__delete_elem": (ctypes.c_int, [_ptr, _ptr, _size, ctypes.c_uint64]),
    "bpf_map__get_next_key": (ctypes.c_int, [_ptr, _ptr, _ptr, _size]),
    "ring_buffer__new": (_ptr, [ctypes.c_int, _SAMPLE_FN, _ptr, _ptr]),
    "ring_buffer__epoll_fd": (ctypes.c_int, [_ptr]),
    "ring_buffer__consume": (ctypes.c_int, [_ptr]),
    "ring_buffer__free": (None, [_ptr]),
    "libbpf_strerror": (ctypes.c_int, [ctypes.c_int, ctypes.c_char_p, _size]),
    "libbpf_set_print": (_ptr, [_PRINT_FN]),
}

_messages: collections.deque[str] = collections.deque(maxlen=60)  # libbpf output since the last check


class BpfError(Exception):
    """A libbpf operation failed. `errno` is positive (libbpf's own codes are >= 4000)."""

    def __init__(self, action: str, err: int, obj: str, item: str = "", detail: str = "") -> None:
        self.action, self.errno, self.obj, self.item = action, abs(err), obj, item
        name = errno.errorcode.get(self.errno, f"LIBBPF_ERRNO_{self.errno}")
        where = f"{obj}: {item}" if item else obj
        message = f"{action} failed for {where}: {name} ({_strerror(self.errno)})"
        super().__init__(f"{message}\n{detail}" if detail else message)


def _strerror(err: int) -> str:
    if err in errno.errorcode:
        return os.strerror(err)
    buf = ctypes.create_string_buffer(128)
    _lib().libbpf_strerror(err, buf, len(buf))
    return buf.value.decode(errors="replace")


def _on_libbpf_print(level: int, fmt: bytes | None, args: int | None) -> int:
    if level > _LIBBPF_INFO or fmt is None:
        return 0
    buf = ctypes.create_string_buffer(_PRINT_BUFFER)
    _vsnprintf(buf, len(buf), fmt, args)
    text = buf.value.decode(errors="replace").rstrip()
    log.debug("%s", text)  # warnings that matter reach the caller inside a BpfError
    _messages.extend(text.splitlines())
    return 0


_print_callback = _PRINT_FN(_on_libbpf_print)  # must outlive the library
_vsnprintf = ctypes.CDLL(None).vsnprintf
_vsnprintf.argtypes = [ctypes.c_char_p, _size, ctypes.c_char_p, _ptr]
_vsnprintf.restype = ctypes.c_int


@functools.cache
def _lib() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(LIBBPF_SONAME, use_errno=True)
    except OSError as exc:
        raise BpfError("load", errno.ENOENT, LIBBPF_SONAME, detail=f"{exc}; install libbpf1") from exc
    for name, (restype, argtypes) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    lib.libbpf_set_print(_print_callback)
    return lib


def _check_ptr(ptr: int | None, action: str, obj: str, item: str = "") -> int:
    """A pointer returned by libbpf, or BpfError from errno (libbpf 1.x returns NULL and sets errno)."""
    details = _drain_messages()
    if not ptr:
        raise BpfError(action, ctypes.get_errno() or errno.EINVAL, obj, item, details)
    return ptr


def _check_rc(rc: int, action: str, obj: str, item: str = "") -> int:
    """A libbpf return code, or BpfError if it is a negative errno."""
    details = _drain_messages()
    if rc < 0:
        raise BpfError(action, rc, obj, item, details)
    return rc


def _drain_messages() -> str:
    text = "\n".join(_messages)
    _messages.clear()
    return text


class Closing:
    """Context-manager support for classes with close()."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class BpfObject(Closing):
    """An opened and loaded BPF object file. It owns the links and ring buffers made through it;
    close() frees them and the object (programs and maps go away once nothing references them)."""

    def __init__(self, path: Path) -> None:
        self.name = path.name
        if not path.is_file():
            raise BpfError("open", errno.ENOENT, str(path), detail="build the BPF objects: make -C bpf")
        lib = _lib()
        opened = lib.bpf_object__open_file(os.fsencode(path), None)
        self._handle: int | None = _check_ptr(opened, "open", str(path))
        self._links: list[int] = []
        self._rings: list[RingBuffer] = []
        try:
            _check_rc(lib.bpf_object__load(self._handle), "load", self.name)
        except BaseException:
            self.close()
            raise

    def live_handle(self) -> int:
        """The libbpf object pointer; BpfError once closed (maps and programs point into it)."""
        if self._handle is None:
            raise BpfError("use", errno.EBADF, self.name, detail="the object is closed")
        return self._handle

    def attach(self, program: str) -> None:
        """Attach a program at the hook its section names (tp_btf/..., raw_tp/..., iter/...)."""
        link = _lib().bpf_program__attach(self._program(program))
        self._links.append(_check_ptr(link, "attach", self.name, program))

    def attach_cgroup(self, program: str, cgroup_dir: Path) -> None:
        """Attach a cgroup program through a BPF link: always multi-attach, so programs others attached at
        the same cgroup with BPF_F_ALLOW_MULTI or links keep running (an exclusive legacy attachment
        there makes this fail with EPERM)."""
        prog = self._program(program)
        fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            link = _lib().bpf_program__attach_cgroup(prog, fd)
        finally:
            os.close(fd)
        self._links.append(_check_ptr(link, f"attach at {cgroup_dir}", self.name, program))

    def map(self, name: str, key_size: int, value_size: int) -> Map:
        """A map of this object, checked against the key and value sizes the caller decodes."""
        found = _lib().bpf_object__find_map_by_name(self.live_handle(), name.encode())
        bpf_map = Map(self, name, _check_ptr(found, "find map", self.name, name))
        if (bpf_map.key_size, bpf_map.value_size) != (key_size, value_size):
            raise BpfError(
                "check map",
                errno.EINVAL,
                self.name,
                name,
                f"key/value sizes {bpf_map.key_size}/{bpf_map.value_size}, expected {key_size}/{value_size}:"
                " the object is out of date, rebuild with make -C bpf",
            )
        return bpf_map

    def ring_buffer(self, map_name: str, on_sample: Callable[[bytes], None]) -> RingBuffer:
        """A consumer for the ring buffer map `map_name`; on_sample gets each record's bytes."""
        ring = RingBuffer(self.name, self.map(map_name, 0, 0), on_sample)  # ring buffers have no keys/values
        self._rings.append(ring)
        return ring

    def close(self) -> None:
        """Free ring buffers, destroy links (detaching the programs) and close the object. Idempotent."""
        lib = _lib()
        while self._rings:
            self._rings.pop().free()
        while self._links:
            rc = lib.bpf_link__destroy(self._links.pop())
            if rc < 0:
                log.warning("destroying a link of %s failed: %s", self.name, os.strerror(-rc))
        if self._handle is not None:
            lib.bpf_object__close(self._handle)
            self._handle = None

    def _program(self, name: str) -> int:
        found = _lib().bpf_object__find_program_by_name(self.live_handle(), name.encode())
        return _check_ptr(found, "find program", self.name, name)


class Map:
    """A BPF map of a loaded object; keys and values are raw bytes of the map's sizes."""

    def __init__(self, owner: BpfObject, name: str, handle: int) -> None:
        self.name, self._owner, self._handle = name, owner, handle
        lib = _lib()
        self.key_size: int = lib.bpf_map__key_size(handle)
        self.value_size: int = lib.bpf_map__value_size(handle)
        self.max_entries: int = lib.bpf_map__max_entries(handle)

    @property
    def fd(self) -> int:
        return int(_lib().bpf_map__fd(self._live()))

    def lookup(self, key: bytes) -> bytes | None:
        """The value stored under key, or None."""
        value = ctypes.create_string_buffer(self.value_size)
        rc = _lib().bpf_map__lookup_elem(self._live(), key, len(key), value, self.value_size, 0)
        if rc == -errno.ENOENT:
            return None
        self._check(rc, "lookup in")
        return value.raw

    def update(self, key: bytes, value: bytes) -> None:
        """Create or replace the entry."""
        self._check(self._update(key, value, _BPF_ANY), "update")

    def insert(self, key: bytes, value: bytes) -> bool:
        """Create the entry unless the key exists; False if it did (the old value stays)."""
        rc = self._update(key, value, _BPF_NOEXIST)
        return rc != -errno.EEXIST and self._check(rc, "insert into") == 0

    def delete(self, key: bytes) -> bool:
        """Remove the entry; False if there was none."""
        rc = _lib().bpf_map__delete_elem(self._live(), key, len(key), 0)
        return rc != -errno.ENOENT and self._check(rc, "delete from") == 0

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Entries present while iterating (a hash map may repeat or skip keys changed meanwhile)."""
        previous: ctypes.Array[ctypes.c_char] | None = None
        while True:
            key = ctypes.create_string_buffer(self.key_size)
            rc = _lib().bpf_map__get_next_key(self._live(), previous, key, self.key_size)
            if rc == -errno.ENOENT:
                return
            self._check(rc, "iterate")
            value = self.lookup(key.raw)
            if value is not None:
                yield key.raw, value
            previous = key

    def _update(self, key: bytes, value: bytes, flags: int) -> int:
        return int(_lib().bpf_map__update_elem(self._live(), key, len(key), value, len(value), flags))

    def _live(self) -> int:
        self._owner.live_handle()
        return self._handle

    def _check(self, rc: int, action: str) -> int:
        return _check_rc(rc, f"{action} map", self._owner.name, self.name)


class RingBuffer:
    """Consumer of a BPF ring buffer map. Register epoll_fd() with an event loop (it becomes readable when
    records are available) and call consume() then; on_sample runs for each record, and an exception it
    raises stops consumption and propagates from consume()."""

    def __init__(self, obj_name: str, ring_map: Map, on_sample: Callable[[bytes], None]) -> None:
        self._obj_name, self._map_name, self._on_sample = obj_name, ring_map.name, on_sample
        self._error: BaseException | None = None
        self._callback = _SAMPLE_FN(self._sample)  # referenced for as long as libbpf may call it
        created = _lib().ring_buffer__new(ring_map.fd, self._callback, None, None)
        self._handle: int | None = _check_ptr(created, "create ring buffer on", obj_name, ring_map.name)

    def epoll_fd(self) -> int:
        return int(_lib().ring_buffer__epoll_fd(self._live()))

    def consume(self) -> int:
        """Deliver every available record without blocking; returns how many."""
        rc = int(_lib().ring_buffer__consume(self._live()))
        error, self._error = self._error, None
        if error is not None:
            raise error
        return _check_rc(rc, "consume ring buffer", self._obj_name, self._map_name)

    def free(self) -> None:
        if self._handle is not None:
            _lib().ring_buffer__free(self._handle)
            self._handle = None

    def _sample(self, _ctx: int | None, data: int, size: int) -> int:
        try:
            self._on_sample(ctypes.string_at(data, size))
        except BaseException as exc:  # re-raised by consume(); C code must not see it
            self._error = exc
            return -errno.ECANCELED
        return 0

    def _live(self) -> int:
        if self._handle is None:
            raise BpfError("use", errno.EBADF, self._obj_name, self._map_name, "the ring buffer is freed")
        return self._handle
