"""The launcher: start a command held before exec, so that agentd can place it into a tool call first, and
pass termination signals on to it.

The launched child is a shell that waits on fd 3 for "go" (sent once agentd has placed it), then execs the
command in place: the same pid, nothing run in between. posix_spawn (vfork) avoids copying the caller's
address space, and no Python runs in the child. The daemon recognises the waiting shell by its script
(WAIT_THEN_EXEC) and never auto-captures it: it is about to be placed into a declared call.

The command starts as it would from a shell: every signal at its default disposition, none blocked, whatever
the caller ignores (Python ignores SIGPIPE and SIGXFSZ) or blocks (agentctl blocks the signals it forwards).
os.posix_spawn cannot quite do it: its signal sets are built with sigaddset, which refuses glibc's two
internal signals (32 and 33), and glibc's posix_spawn sets those to SIG_IGN in the child unless they are in
the spawn-sigdefault set; an ignored signal stays ignored across exec. So libc's posix_spawn is called
through ctypes, with a sigdefault set holding every signal.

Signals (relay): a terminal sends SIGINT and SIGQUIT to its whole foreground process group, the tool included,
so those are not sent a second time; any other SIGHUP/SIGINT/SIGQUIT/SIGTERM the caller receives goes to the
tool through its pidfd (a pid may be reused once the tool is reaped; a pidfd may not).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import threading
from collections.abc import Sequence

WAIT_THEN_EXEC = 'read -r go <&3 && [ "$go" = go ] || exit 126; exec 3<&-; exec "$@"'
SHELL = "/bin/sh"

# glibc's spawn.h flags, and the sizes of its opaque types, rounded up (posix_spawnattr_t is 336 bytes,
# posix_spawn_file_actions_t 80, sigset_t 128 on every glibc architecture).
POSIX_SPAWN_SETSIGDEF = 0x04
POSIX_SPAWN_SETSIGMASK = 0x08
SPAWN_OPAQUE_BYTES = 1024
SIGSET_BYTES = 128
UNRESETTABLE = (signal.SIGKILL, signal.SIGSTOP)  # sigaction refuses them; they are never ignored anyway

FORWARDED = frozenset({signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM})
KEYBOARD = frozenset({signal.SIGINT, signal.SIGQUIT})  # the terminal sends these to its foreground group
SI_KERNEL = 0x80  # si_code of a signal the kernel generated (a terminal's), as opposed to kill() (SI_USER)
# How often the relay looks whether the tool has exited when no signal comes (a signal is passed on at once).
RELAY_POLL_SECONDS = 0.25

_libc = ctypes.CDLL(None, use_errno=True)


def launch(argv: Sequence[str]) -> tuple[int, int]:
    """Start argv held before exec; returns (pid, fd to release it with)."""
    read_fd, write_fd = os.pipe()
    try:
        pid = _spawn(SHELL, ["sh", "-c", WAIT_THEN_EXEC, "sh", *argv], read_fd)
    except BaseException:
        os.close(write_fd)
        raise
    finally:
        os.close(read_fd)
    return pid, write_fd


def release(go: int) -> None:
    """Let a launched child exec its command. A child that died meanwhile (a forwarded signal) is not an
    error here: its wait status tells."""
    try:
        os.write(go, b"go\n")
    except BrokenPipeError:
        pass
    finally:
        os.close(go)


def default_signals_set() -> bytes:
    """A raw sigset_t (an array of unsigned long, signal n at bit n-1) holding every signal but SIGKILL and
    SIGSTOP, glibc's internal ones included."""
    word_bits = ctypes.sizeof(ctypes.c_ulong) * 8
    words = [(1 << word_bits) - 1] * (SIGSET_BYTES * 8 // word_bits)
    for signum in UNRESETTABLE:
        words[(signum - 1) // word_bits] &= ~(1 << ((signum - 1) % word_bits))
    return bytes((ctypes.c_ulong * len(words))(*words))


def _spawn(path: str, argv: Sequence[str], fd3: int) -> int:
    """posix_spawn path with fd3 as its fd 3, default dispositions for all signals and an empty mask."""
    attr = ctypes.create_string_buffer(SPAWN_OPAQUE_BYTES)
    actions = ctypes.create_string_buffer(SPAWN_OPAQUE_BYTES)
    _check(_libc.posix_spawnattr_init(attr))
    _check(_libc.posix_spawn_file_actions_init(actions))
    try:
        _check(_libc.posix_spawnattr_setsigdefault(attr, ctypes.create_string_buffer(default_signals_set())))
        _check(_libc.posix_spawnattr_setsigmask(attr, ctypes.create_string_buffer(SIGSET_BYTES)))
        _check(_libc.posix_spawnattr_setflags(attr, ctypes.c_short(POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK)))
        _check(_libc.posix_spawn_file_actions_adddup2(actions, fd3, 3))
        pid = ctypes.c_int()
        _check(_libc.posix_spawn(ctypes.byref(pid), os.fsencode(path), actions, attr,
                                 _strings([os.fsencode(a) for a in argv]), _strings(_environment())))
        return pid.value
    finally:
        _libc.posix_spawn_file_actions_destroy(actions)
        _libc.posix_spawnattr_destroy(attr)


def _environment() -> list[bytes]:
    return [key + b"=" + value for key, value in os.environb.items()]


def _strings(items: Sequence[bytes]) -> ctypes.Array[ctypes.c_char_p]:
    """A NULL-terminated char *[] (argv, envp)."""
    return (ctypes.c_char_p * (len(items) + 1))(*items, None)


def _check(error: int) -> None:
    """posix_spawn* return an error number (0: success); they do not set errno."""
    if error:
        raise OSError(error, os.strerror(error))


# ----- signals ---------------------------------------------------------------------------------------------


def block_forwarded() -> None:
    """Keep the FORWARDED signals pending, for a relay to take, in this thread and every thread started after.
    Call it before any other thread starts (gRPC starts its own with the first channel): a thread that does
    not block them would take their default action, and end the caller."""
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)


def should_forward(signum: int, code: int, tool_in_our_group: bool) -> bool:
    """Whether a signal the caller received goes on to the tool: not when the terminal sent it to the
    foreground process group and the tool, still in the caller's group, got it too."""
    if signum not in FORWARDED:
        return False
    return not (signum in KEYBOARD and code == SI_KERNEL and tool_in_our_group)


def relay(pid: int) -> None:
    """Forward the FORWARDED signals to the launched child `pid` (not reaped yet) until it exits, from a
    thread of its own. The caller must have blocked them in every thread (block_forwarded)."""
    pidfd = os.pidfd_open(pid)
    try:
        threading.Thread(target=_relay, args=(pid, pidfd), name=f"agentd-relay-{pid}", daemon=True).start()
    except BaseException:
        os.close(pidfd)
        raise


def _relay(pid: int, pidfd: int) -> None:
    try:
        while not _exited(pidfd):
            info = signal.sigtimedwait(FORWARDED, RELAY_POLL_SECONDS)
            if info is not None and should_forward(info.si_signo, info.si_code, _in_our_group(pid)):
                _send(pidfd, info.si_signo)
    finally:
        os.close(pidfd)  # the thread owns it: closed by the caller, its number could name another process


def _exited(pidfd: int) -> bool:
    """A pidfd reads ready once its process has exited."""
    return bool(select.select([pidfd], [], [], 0)[0])


def _in_our_group(pid: int) -> bool:
    """Reaped meanwhile (its pid free or reused), the answer no longer matters: sends go through the pidfd."""
    try:
        return os.getpgid(pid) == os.getpgrp()
    except ProcessLookupError:
        return False


def _send(pidfd: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it exited meanwhile: nothing to stop
        signal.pidfd_send_signal(pidfd, signum)
