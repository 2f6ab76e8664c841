"""The contract between the two wings: everything the worker and the supervisor agree on.

Exit codes, worker states and their transitions, HTTP routes, environment names, marker
names and formats, the config model (and which process reads each setting), the health
payload, the credential gate, discovery records and backends, the journal line format.
The agent and the supervisor import each other only through this package (import-linter
checks it in `make lint`); it imports neither of them, nor vLLM or torch.
"""
