"""BPF kernel adapters: a ctypes loader over libbpf and the programs agentd loads (lifecycle, netpolicy).

The compiled CO-RE objects (`make -C bpf`) live in `<repo>/bpf/build`; the environment variable
AGENTD_BPF_DIR points elsewhere. Everything here speaks in cgroup ids (a cgroup v2 directory's inode
number), never in daemon concepts.
"""

from __future__ import annotations

import os
from pathlib import Path

OBJECTS_DIR_ENV = "AGENTD_BPF_DIR"


def object_path(name: str) -> Path:
    """Path of the compiled object `<name>.bpf.o` (it may not exist; loading reports that clearly)."""
    override = os.environ.get(OBJECTS_DIR_ENV)
    directory = Path(override) if override else Path(__file__).resolve().parents[3] / "bpf" / "build"
    return directory / f"{name}.bpf.o"


def cgroup_id(cgroup_dir: Path) -> int:
    """The id BPF sees for a cgroup v2 directory (bpf_get_current_cgroup_id): its inode number."""
    return os.stat(cgroup_dir).st_ino
