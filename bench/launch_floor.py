"""The floor under agentd's CPU per declared call: a minimal Python server that answers `agentd-run` on the framed
join protocol while making the kernel do what agentd makes it do for such a call, and nothing else.

Per call, as agentd does: accept, SO_PEERCRED, the sender's /proc/<pid>/cgroup (its owner); the read carrying HELLO
and BEGIN with the pidfd; the pidfd's pid from fdinfo; both processes' /proc/<pid>/cgroup (placement's check); a
spare cgroup taken, its call label (setxattr), its cgroup.events opened and registered with epoll; the move
(cgroup.procs), the populated check (pread), oom_score_adj, the started label; BEGUN. Then END: cpu.stat, the result
label, RESULT; the record line appended to a file; the events watch dropped, rmdir, a new spare made (mkdir and its
cgroup id); the connection's EOF and close. Not done: BPF map updates and ring buffer reads (agentd makes ~3 `bpf`
calls per call), JSON, logs, metrics, admission, timers, validation: everything that is not a system call.

A plain epoll loop, not asyncio: what is left above the kernel's own time is the least Python can
spend to drive these calls. bench/launch.py starts it and runs the launcher against it:

    python bench/launch_floor.py --socket PATH --cgroup DIR    # prints "ready", serves until SIGTERM
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import struct
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agentd.api.gen import agentd_pb2 as pb  # noqa: E402
from agentd.api.join.wire import BEGUN, FD_SPACE, FRAME_READ_SIZE, RESULT, UCRED, frame, split_frames  # noqa: E402

# Label sizes as agentd writes them for `agentd-run -- true` (its call label is JSON of intent and limits).
CALL_LABEL = b"c" * 420
RESULT_LABEL = b"r" * 700
SPARES = 2


class Floor:
    def __init__(self, sock_path: str, root: Path, records: Path) -> None:
        self.root = root
        self.records = os.open(records, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.epoll = select.epoll()
        self.handlers: dict[int, Callable[[], None]] = {}
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        self.listener.bind(sock_path)
        self.listener.listen(256)
        self.register(self.listener.fileno(), select.EPOLLIN, self.accept)
        self.made = 0
        self.spares = [self.make() for _ in range(SPARES)]

    def make(self) -> tuple[str, int]:
        self.made += 1
        path = f"{self.root}/tc-{self.made}"
        os.mkdir(path)
        return path, os.stat(path).st_ino

    def register(self, fd: int, events: int, handler: Callable[[], None]) -> None:
        self.epoll.register(fd, events)
        self.handlers[fd] = handler

    def unregister(self, fd: int) -> None:
        self.epoll.unregister(fd)
        del self.handlers[fd]

    def accept(self) -> None:
        sock, _ = self.listener.accept()
        sock.setblocking(False)
        pid, _uid, _gid = UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size))
        read_small(f"/proc/{pid}/cgroup")
        self.register(sock.fileno(), select.EPOLLIN, Connection(self, sock, pid).readable)

    def serve(self) -> None:
        running = True

        def stop(*_: object) -> None:
            nonlocal running
            running = False

        signal.signal(signal.SIGTERM, stop)
        print("ready", flush=True)
        while running:
            for fd, _ in self.epoll.poll(1.0):
                handler = self.handlers.get(fd)  # gone if an earlier event of this batch closed it
                if handler is not None:
                    handler()


class Connection:
    def __init__(self, floor: Floor, sock: socket.socket, sender: int) -> None:
        self.floor, self.sock, self.sender = floor, sock, sender
        self.cgroup: tuple[str, int] | None = None
        self.events = -1

    def readable(self) -> None:
        data, ancdata, _flags, _ = self.sock.recvmsg(FRAME_READ_SIZE, FD_SPACE)
        if not data:
            self.floor.unregister(self.sock.fileno())
            self.sock.close()
            return
        frames, _ = split_frames(data)
        if ancdata:
            self.begin(frames[-1][1], struct.unpack("i", ancdata[0][2][:4])[0])
        else:
            self.end()

    def begin(self, payload: bytes, pidfd: int) -> None:
        pb.BeginToolCallRequest.FromString(payload)
        info = read_small(f"/proc/self/fdinfo/{pidfd}")
        pid = int(info.split("\nPid:", 1)[1].split(None, 1)[0])
        os.close(pidfd)
        for who in (self.sender, pid):
            read_small(f"/proc/{who}/cgroup")
        path, _cgroup_id = self.cgroup = self.floor.spares.pop()
        os.setxattr(path, "trusted.agentd.call", CALL_LABEL)
        self.events = os.open(f"{path}/cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
        self.floor.register(self.events, select.EPOLLPRI, lambda: None)  # as agentd watches it
        write_small(f"{path}/cgroup.procs", str(pid))
        os.pread(self.events, 4096, 0)
        write_small(f"/proc/{pid}/oom_score_adj", "0")
        os.setxattr(path, "trusted.agentd.started", b"1764745200.123456 12345")
        self.sock.send(frame(BEGUN, pb.BeginToolCallResponse(call_id="0123456789abcdef")))

    def end(self) -> None:
        assert self.cgroup is not None
        path, _cgroup_id = self.cgroup
        read_small(f"{path}/cpu.stat")
        os.setxattr(path, "trusted.agentd.result", RESULT_LABEL)
        self.sock.send(frame(RESULT, pb.ToolCallResult(call_id="0123456789abcdef", outcome=pb.OUTCOME_OK)))
        os.write(self.floor.records, RESULT_LABEL + b"\n")
        self.floor.unregister(self.events)
        os.close(self.events)
        os.rmdir(path)
        self.floor.spares.append(self.floor.make())


def read_small(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096).decode()
    finally:
        os.close(fd)


def write_small(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--cgroup", required=True, type=Path, help="an empty cgroup directory for its calls")
    parser.add_argument("--records", type=Path, default=Path(os.devnull))
    args = parser.parse_args()
    Floor(args.socket, args.cgroup, args.records).serve()


if __name__ == "__main__":
    main()
