"""The dynamo-vllm supervisor: the systemd unit's main process (and the CLI)."""
