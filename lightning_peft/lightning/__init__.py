"""The Lightning-facing pieces: the callback base, adapter-only checkpoint IO, sharding (imports core only)."""
