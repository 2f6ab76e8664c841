"""The dynamo-vllm worker: one vLLM engine behind the OpenAI API, watched from inside."""
