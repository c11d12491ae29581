"""How fast this machine hands out memory: the kernel's anonymous page-fault rate on one CPU, measured.

A pressure domain cannot grow faster than its CPUs can fault pages in. The policy's watch paces its reads of a
domain's usage by that bound (policy/pace.py); measuring it at start, instead of assuming a hardware figure,
keeps the bound true on a slow machine (an emulator faults 10x slower) and on a fast one alike.
"""

from __future__ import annotations

import mmap
import os
import time

MADV_POPULATE_WRITE = 23  # Linux 5.14: fault every page of a range in, writable, without touching it from userspace
PROBE_BYTES = 16 << 20
PROBE_ROUNDS = 2  # the fastest of these: the first can pay for the kernel's page-table or allocator warm-up


def page_fault_rate(nbytes: int = PROBE_BYTES, rounds: int = PROBE_ROUNDS) -> float:
    """Bytes per second one CPU faults into fresh anonymous memory (the fastest of `rounds` probes of `nbytes`).
    The memory is unmapped after each probe."""
    best = 0.0
    for _ in range(rounds):
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            began = time.perf_counter()
            try:
                buf.madvise(MADV_POPULATE_WRITE)
            except OSError:  # an older kernel: write one byte per page, still a C loop
                buf[::mmap.PAGESIZE] = b"\1" * (nbytes // mmap.PAGESIZE)
            elapsed = time.perf_counter() - began
        finally:
            buf.close()
        best = max(best, nbytes / max(elapsed, 1e-9))
    return best


def usable_cpus() -> int:
    """The CPUs this process (and so, by default, the tool calls it starts) may run on."""
    return len(os.sched_getaffinity(0)) or 1
