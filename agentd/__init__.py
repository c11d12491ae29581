"""agentd: per-tool-call resource control for sandboxed AI agents on cgroup v2."""

__version__ = "0.1.0"
