"""The policy loop's decision logic: the pressure ladder (throttle -> freeze -> kill -> recover) and admission,
as pure functions of immutable snapshots. The loop that reads the kernel and writes through
`agentd/kernel/cgroupfs.py` sits beside the core and calls these; nothing here does I/O. See docs/policy.md.
"""
