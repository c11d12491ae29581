"""Core: sessions, tool calls, intents and limits, results, records. Talks to the kernel via agentd.kernel."""
