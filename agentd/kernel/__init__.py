"""Kernel adapters: cgroupfs (the only writer of cgroup knobs), event watching, capability probing, BPF."""
