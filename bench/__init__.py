"""The client side of `dynamo-vllm bench`: a streaming load generator and its report.

Also the one server-sent-events parser that the bench tool, the soak and the tests share.
"""
