"""cgroupfs: the only module that writes cgroup v2 files (knobs, membership, freeze, kill, labels).

Everything else in agentd asks this module. Paths are absolute filesystem paths inside the cgroup2 mount.
Reads and writes use raw os.open/os.read/os.write and plain string paths: this is the tool-call hot path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

CONTROLLERS = ("memory", "cpu", "pids")  # io: agentd writes no io knob, so it enables none
LABEL_PREFIX = "user.agentd."


class CgroupError(OSError):
    """A cgroup operation failed; the message names the file and the operation."""


@dataclass(frozen=True)
class CgroupStats:
    """Accounting read from a cgroup before it is removed. -1 means the file does not exist here."""

    memory_peak: int = -1
    memory_events: Mapping[str, int] = field(default_factory=dict)
    cpu_usage_usec: int = 0
    cpu_user_usec: int = 0
    cpu_system_usec: int = 0
    cpu_throttled_usec: int = 0
    pids_peak: int = -1


def read_text(path: str | Path) -> str | None:
    """Read a small cgroup file; None if it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return os.read(fd, 65536).decode()
    finally:
        os.close(fd)


@dataclass(eq=False)
class KeptFiles:
    """Cgroup files re-read many times a second (the policy loop's), kept open: a re-read is one pread at offset 0,
    which makes the kernel render the file afresh, instead of open + read + close (the open is most of the cost).

    An open file pins its cgroup: a removed cgroup lingers as a dying one while a file of it is open. So the owner
    sweeps: sweep() closes every file not read since the previous sweep. With keep=False nothing is kept open
    (plain read_text), for readers without a sweep of their own."""

    keep: bool = True
    _fds: dict[str, int] = field(default_factory=dict)
    _read: set[str] = field(default_factory=set)

    def read(self, cgroup: str | Path, name: str) -> str | None:
        """<cgroup>/<name>, or None if it does not exist (or its cgroup was removed)."""
        path = f"{cgroup}/{name}"
        if not self.keep:
            return read_text(path)
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
            self._fds[path] = fd
        self._read.add(path)
        try:
            return os.pread(fd, 65536, 0).decode()
        except OSError as exc:
            if exc.errno != errno.ENODEV:  # ENODEV: the cgroup was removed under the open file
                raise
            self._close(path)
            return None

    def read_int(self, cgroup: str | Path, name: str) -> int:
        """A single-number file ("max" and absence read as -1)."""
        text = self.read(cgroup, name)
        if text is None:
            return -1
        text = text.strip()
        return -1 if text == "max" else int(text)

    def sweep(self) -> None:
        for path in set(self._fds) - self._read:
            self._close(path)
        self._read.clear()

    def close(self) -> None:
        for path in list(self._fds):
            self._close(path)
        self._read.clear()

    @property
    def open_count(self) -> int:
        return len(self._fds)

    def _close(self, path: str) -> None:
        fd = self._fds.pop(path, None)
        self._read.discard(path)
        if fd is not None:
            os.close(fd)


UNKEPT = KeptFiles(keep=False)


def parse_flat_keyed(text: str | None) -> dict[str, int]:
    """Parse 'key value' lines (memory.events, cpu.stat, cgroup.events)."""
    out: dict[str, int] = {}
    if text:
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            try:  # not contextlib.suppress: an object and two calls per line, on every call's and decision's path
                out[key] = int(value)
            except ValueError:
                continue
    return out


def write_file(path: str | Path, value: str) -> None:
    """Write one value to a cgroup file, raising CgroupError that names the file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise CgroupError(exc.errno, f"open {path}: {os.strerror(exc.errno or 0)}") from exc
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        raise CgroupError(exc.errno, f"write {value!r} to {path}: {os.strerror(exc.errno or 0)}") from exc
    finally:
        os.close(fd)


def controllers(path: Path) -> set[str]:
    """Controllers available in a cgroup (its cgroup.controllers)."""
    return set((read_text(f"{path}/cgroup.controllers") or "").split())


def subtree_controllers(path: Path) -> set[str]:
    """Controllers enabled for a cgroup's children (its cgroup.subtree_control)."""
    return set((read_text(f"{path}/cgroup.subtree_control") or "").split())


def enable_controllers(path: Path, wanted: Iterable[str]) -> set[str]:
    """Enable every wanted controller that is available in `path` for its children; return those enabled."""
    available = controllers(path)
    for name in wanted:
        if name in available:
            write_file(f"{path}/cgroup.subtree_control", f"+{name}")
    return subtree_controllers(path) & set(wanted)


def make(path: Path) -> int:
    """Create a cgroup; return its id (the directory's inode number)."""
    try:
        os.mkdir(path)
    except OSError as exc:
        raise CgroupError(exc.errno, f"mkdir {path}: {os.strerror(exc.errno or 0)}") from exc
    return os.stat(path).st_ino


def ensure(path: Path, parents: bool = False) -> None:
    """Create a cgroup if it does not exist yet (and, with `parents`, its missing ancestors)."""
    if parents:
        path.mkdir(parents=True, exist_ok=True)
        return
    with contextlib.suppress(FileExistsError):
        os.mkdir(path)


def pressure_trigger(path: Path, resource: str, trigger: str) -> int:
    """Register a PSI trigger ("some|full <stall us> <window us>") on <path>/<resource>.pressure; return the fd
    to poll for EPOLLPRI. Closing it removes the trigger. CgroupError where PSI is off (EINVAL, EOPNOTSUPP)."""
    file = f"{path}/{resource}.pressure"
    try:
        fd = os.open(file, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise CgroupError(exc.errno, f"open {file}: {os.strerror(exc.errno or 0)}") from exc
    try:
        os.write(fd, trigger.encode())
    except OSError as exc:
        os.close(fd)
        raise CgroupError(exc.errno, f"trigger {trigger!r} on {file}: {os.strerror(exc.errno or 0)}") from exc
    return fd


def cgroup_id(path: Path) -> int:
    return os.stat(path).st_ino


def apply_knobs(path: Path, knobs: Mapping[str, str], enabled: set[str]) -> list[str]:
    """Write knobs whose controller is enabled for this cgroup; return the knobs that were not applied."""
    skipped = []
    for knob, value in knobs.items():
        if knob.partition(".")[0] in enabled:  # its controller ('memory.max' -> 'memory')
            write_file(f"{path}/{knob}", value)
        else:
            skipped.append(knob)
    return skipped


def move(path: Path, pid: int) -> None:
    """Move a process (all its threads) into a cgroup."""
    write_file(f"{path}/cgroup.procs", str(pid))


def procs(path: Path) -> list[int]:
    text = read_text(f"{path}/cgroup.procs")
    return [int(p) for p in text.split()] if text else []


def populated(path: Path) -> bool:
    return parse_flat_keyed(read_text(f"{path}/cgroup.events")).get("populated", 0) == 1


def frozen(path: Path) -> bool:
    return parse_flat_keyed(read_text(f"{path}/cgroup.events")).get("frozen", 0) == 1


def kill(path: Path) -> None:
    """Kill every process in the subtree atomically (cgroup.kill)."""
    write_file(f"{path}/cgroup.kill", "1")


def freeze(path: Path, on: bool) -> None:
    write_file(f"{path}/cgroup.freeze", "1" if on else "0")


def remove(path: Path) -> bool:
    """rmdir a cgroup; False if it is still populated (EBUSY) or already gone."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return False
        raise CgroupError(exc.errno, f"rmdir {path}: {os.strerror(exc.errno or 0)}") from exc
    return True


def children(path: Path) -> Iterator[Path]:
    """Child cgroups (directories) of a cgroup."""
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield Path(entry.path)


def set_label(path: Path, key: str, value: bytes) -> None:
    """Store a label as a user xattr so a restarted daemon recognises what it created."""
    try:
        os.setxattr(path, LABEL_PREFIX + key, value)
    except OSError as exc:
        raise CgroupError(exc.errno, f"setxattr {key} on {path}: {os.strerror(exc.errno or 0)}") from exc


def get_label(path: Path, key: str) -> bytes | None:
    try:
        return os.getxattr(path, LABEL_PREFIX + key)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOENT, errno.EOPNOTSUPP):
            return None
        raise


def read_stats(path: Path, controllers: Collection[str]) -> CgroupStats:
    """Read the accounting that vanishes with rmdir: peak memory, memory events, CPU, pids. Only the files of
    `controllers` (those enabled for the cgroup) are looked for; cpu.stat always exists."""
    cpu = parse_flat_keyed(read_text(f"{path}/cpu.stat"))
    memory = "memory" in controllers
    return CgroupStats(
        memory_peak=UNKEPT.read_int(path, "memory.peak") if memory else -1,
        memory_events=parse_flat_keyed(read_text(f"{path}/memory.events")) if memory else {},
        cpu_usage_usec=cpu.get("usage_usec", 0),
        cpu_user_usec=cpu.get("user_usec", 0),
        cpu_system_usec=cpu.get("system_usec", 0),
        cpu_throttled_usec=cpu.get("throttled_usec", 0),
        pids_peak=UNKEPT.read_int(path, "pids.peak") if "pids" in controllers else -1,
    )


def memory_current(path: Path, files: KeptFiles = UNKEPT) -> int:
    return files.read_int(path, "memory.current")


def memory_peak(path: Path, files: KeptFiles = UNKEPT) -> int:
    """The cgroup's highest usage since it was made (-1: unreadable, e.g. a kernel before 5.19)."""
    return files.read_int(path, "memory.peak")


def cgroup_of_pid(mount: Path, pid: int) -> Path | None:
    """The cgroup v2 directory of a process, or None if it is gone."""
    where = cgroup_path_of_pid(str(mount), pid)
    return None if where is None else Path(where)


def cgroup_path_of_pid(mount: str, pid: int) -> str | None:
    """cgroup_of_pid() as a plain string (no pathlib: placement checks two processes per tool call)."""
    try:
        text = read_text(f"/proc/{pid}/cgroup")
    except ProcessLookupError:  # it exited between open and read
        return None
    if text is None:
        return None
    relative = v2_path_in(text)
    if relative is None:
        return None
    relative = relative.strip("/")
    return f"{mount.rstrip('/')}/{relative}" if relative else mount


def v2_path_in(proc_cgroup: str) -> str | None:
    """The cgroup v2 path in the text of /proc/<pid>/cgroup (its "0::<path>" line; on a hybrid host that line comes
    after one per v1 hierarchy), or None without one."""
    if proc_cgroup.startswith("0::"):
        start = 3
    else:
        found = proc_cgroup.find("\n0::")
        if found < 0:
            return None
        start = found + 4
    end = proc_cgroup.find("\n", start)
    return proc_cgroup[start:] if end < 0 else proc_cgroup[start:end]


def is_within(path: str, ancestor: str) -> bool:
    """Whether cgroup `path` is `ancestor` or below it (plain strings, as cgroup_path_of_pid() gives them)."""
    return path == ancestor or path.startswith(ancestor.rstrip("/") + "/")


def remove_tree(path: Path) -> None:
    """Kill everything in a subtree and remove it bottom-up (used for cleanup of owned trees)."""
    if not path.is_dir():
        return
    with contextlib.suppress(OSError):
        kill(path)
    for child in list(children(path)):
        remove_tree(child)
    for _ in range(200):
        if remove(path) or not path.exists():
            return
        time.sleep(0.005)
    raise CgroupError(errno.EBUSY, f"cgroup {path} stayed populated after cgroup.kill")
