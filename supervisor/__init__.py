"""The dynamo-vllm supervisor: the systemd unit's main process. It never imports vLLM or torch,
and of the agent only the contract (dynamo_vllm.contract)."""
