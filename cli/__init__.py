"""`dynamo-vllm`: the front door for both processes (`run` the supervisor, `worker` the
worker) and the operator's commands (status, sleep/wake, checkpoints, bench, tools).

Heavy modules (vLLM, torch, the worker) are imported inside the commands that need them, so
`dynamo-vllm run` starts the supervisor without them.
"""
