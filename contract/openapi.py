"""OpenAPI 3 documents of the agent's own HTTP routes (vLLM publishes its own at /openapi.json).

The worker serves its document at `/dynamo-vllm/openapi.json`, the supervisor at
`/openapi.json`. They are what a client may rely on, and what the schema fuzz test
(schemathesis) drives: every answer is one of the documented codes, never a 5xx.
"""

from __future__ import annotations

from typing import Any

from dynamo_vllm.contract.protocol import Route

VERSION = "3.0.3"

_ANSWER = {"type": "object", "properties": {"status": {"type": "string"},
                                            "message": {"type": "string"}}}
_ERROR = {"type": "object", "properties": {"error": {"type": "string"}}}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _responses(*codes: int, body: dict[str, Any] = _ANSWER) -> dict[str, Any]:
    meaning = {200: "done", 400: "a bad body, named", 401: "the bearer token is missing or "
               "wrong", 403: "not from loopback (workers.control_from_network)",
               404: "no such adapter", 405: "wrong method", 409: "not now, in this state",
               413: "the body is over 64 KiB",
               503: "not serving yet, or busy"}
    return {str(code): {"description": meaning.get(code, ""), **_json(body)} for code in codes}


def _post(summary: str, body: dict[str, Any] | None, *codes: int) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary,
                                 "responses": _responses(200, 400, 401, 403, 405, 413,
                                                         *codes)}
    if body is not None:
        operation["requestBody"] = {"required": False, **_json(body)}
    return {"post": operation}


def worker_document() -> dict[str, Any]:
    lora = {"type": "object", "required": ["lora_name"],
            "properties": {"lora_name": {"type": "string"}, "lora_path": {"type": "string"}},
            "additionalProperties": False}
    return {
        "openapi": VERSION,
        "info": {"title": "dynamo-vllm worker", "version": "1"},
        "paths": {
            Route.HEALTH: {"get": {"summary": "The worker's state (200 while serving)",
                                   "responses": {"200": {"description": "serving"},
                                                 "503": {"description": "not serving"}}}},
            Route.ENGINE_SLEEP: _post(
                "Unregister, drain, then pause (0) or sleep (1, 2)",
                {"type": "object", "properties": {"level": {"type": "integer",
                                                            "enum": [0, 1, 2]}},
                 "additionalProperties": False}, 409, 503),
            Route.ENGINE_WAKE: _post(
                "Wake (all, or only weights / kv_cache)",
                {"type": "object", "properties": {"tags": {
                    "type": "array", "minItems": 1,
                    "items": {"type": "string", "enum": ["weights", "kv_cache"]}}},
                 "additionalProperties": False}, 409, 503),
            Route.ENGINE_IS_SLEEPING: {"get": {"summary": "asleep or awake",
                                               "responses": _responses(200, 403, 503)}},
            Route.ENGINE_CLEAR_KV: _post("Reset the prefix cache", None, 409, 503),
            Route.ENGINE_SNAPSHOT: _post("Leave service and wait for a checkpoint", None,
                                         409, 503),
            Route.LOAD_LORA: _post("Load a LoRA adapter from an allowed root", lora, 404,
                                   409, 503),
            Route.UNLOAD_LORA: _post("Unload a LoRA adapter", lora, 404, 409, 503),
        },
    }


def supervisor_document() -> dict[str, Any]:
    def get(summary: str, *codes: int) -> dict[str, Any]:
        return {"get": {"summary": summary, "responses": {
            str(code): {"description": ""} for code in (200, *codes)}}}

    worker = {"type": "object", "properties": {"worker": {"type": "integer", "minimum": 0}},
              "additionalProperties": False}
    control = _responses(200, 400, 401, 403, 404, 409, 503, body=_ERROR)
    return {
        "openapi": VERSION,
        "info": {"title": "dynamo-vllm supervisor", "version": "1"},
        "paths": {
            Route.METRICS: get("Node, supervisor and every worker's metrics (Prometheus)"),
            Route.STATUS: get("Workers, states, restarts, checkpoints (JSON)"),
            Route.HEALTHZ: get("200 when at least min_ready workers serve", 503),
            Route.ENDPOINTS: get("What discovery holds for the instance", 503),
            Route.SERVICE_DISCOVERY: {"get": {
                "summary": "Prometheus HTTP service discovery",
                "parameters": [{"name": "scope", "in": "query", "required": False,
                                "schema": {"type": "string", "enum": ["fleet"]}}],
                "responses": {"200": {"description": ""}, "503": {"description": ""}}}},
            Route.CHECKPOINT: {"post": {"summary": "Take a checkpoint of a worker now",
                                        "requestBody": {"required": False, **_json(worker)},
                                        "responses": control}},
            Route.RESTORE: {"post": {"summary": "Restart a worker from its checkpoint",
                                     "requestBody": {"required": False, **_json(worker)},
                                     "responses": control}},
        },
    }
