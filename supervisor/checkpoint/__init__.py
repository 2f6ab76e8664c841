"""Checkpoint/restore (CHREK) on the supervisor's side: the coordinator (per-worker state
machine), the CRIU backend, the store, the identity (hash) of a checkpoint and the marker
watcher."""
