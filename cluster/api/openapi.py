"""The OpenAPI 3.1 document the server publishes at `/openapi.json`: every route, every status it may
answer and the body of each, so an outside tool (schemathesis in tests/api/test_fuzz.py) can hold
every answer to it.

Built once per app from the protocol models (protocol.py, pydantic's JSON schemas) rather than from
FastAPI's introspection: the routes read their bodies themselves (strict JSON, a bounded size), so
FastAPI sees no body model. The document states this deployment's own facts:
  (1) `model` is the one served model (any other name: 404);
  (2) the configured ceilings (limits.py) as maxima: `n`, `max_tokens`, `logprobs`, `stop`; and what
      the protocol's validators refuse, where a schema can say it: empty prompts and stop strings,
      token ids outside the vocabulary, `echo`/`suffix` (unsupported), the roles a chat may use;
  (3) the bearer keys each route needs (auth.py): API keys on /v1/* when any is set (and /health,
      /metrics when they need one), admin keys on /admin/*;
  (4) every error as the OpenAI error body; 429 and 503 with Retry-After; a stream as
      `text/event-stream`.
"""
from __future__ import annotations

import copy

from pydantic.json_schema import models_json_schema

from cluster.api.protocol import (AddInstanceRequest, AddInstanceResponse, ChatCompletionChunk, ChatCompletionRequest,
                                  ChatCompletionResponse, CompletionRequest, CompletionResponse, ErrorResponse,
                                  HealthResponse, ModelList)
from cluster.config import ApiConfig

REF = "#/components/schemas/{model}"
_MODELS = [(CompletionRequest, "validation"), (ChatCompletionRequest, "validation"), (AddInstanceRequest, "validation"),
           (CompletionResponse, "serialization"), (ChatCompletionResponse, "serialization"),
           (ChatCompletionChunk, "serialization"), (ModelList, "serialization"), (HealthResponse, "serialization"),
           (ErrorResponse, "serialization"), (AddInstanceResponse, "serialization")]
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}}


def _schemas() -> dict:
    _, top = models_json_schema(_MODELS, ref_template=REF)
    return top["$defs"]


def _ref(name: str) -> dict:
    return {"$ref": REF.format(model=name)}


def _json(name: str, description: str, headers: dict | None = None) -> dict:
    out = {"description": description, "content": {"application/json": {"schema": _ref(name)}}}
    if headers:
        out["headers"] = headers
    return out


def _errors(*statuses: int) -> dict:
    what = {400: "invalid request (the error names the field and, for a ceiling, the limit)",
            401: "missing or wrong key", 404: "unknown model or route", 413: "request body over api.max_body_bytes",
            429: "overloaded: retry after Retry-After", 500: "server or engine error",
            503: "draining or unavailable: retry after Retry-After"}
    return {str(s): _json("ErrorResponse", what[s], _RETRY_AFTER if s in (429, 503) else None) for s in statuses}


def _set_limit(prop: dict, key: str, value: int | None, kind: str = "integer") -> None:
    """Set `key` (maximum, maxItems) on every branch of `prop` of JSON type `kind`."""
    if value is None:
        return
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") == kind:
            branch[key] = min(value, branch.get(key, value))


def _token_ids(vocab_size: int | None) -> dict:
    return {"type": "integer", "minimum": 0, **({"maximum": vocab_size - 1} if vocab_size else {})}


def _prompt(vocab_size: int | None) -> dict:
    """What `CompletionRequest._check_prompt` takes: nothing empty, token ids within the vocabulary."""
    ids = {"type": "array", "minItems": 1, "items": _token_ids(vocab_size)}
    return {"title": "Prompt", "anyOf": [
        {"type": "string", "minLength": 1}, ids,
        {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
        {"type": "array", "minItems": 1, "items": ids}]}


def _request_schemas(schemas: dict, model: str, api: ApiConfig, vocab_size: int | None) -> None:
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        props["model"] = {"type": "string", "enum": [model], "title": "Model"}
        _set_limit(props["n"], "maximum", api.max_n)
        _set_limit(props["max_tokens"], "maximum", api.max_output_tokens)
        props["stop"] = {"title": "Stop", "default": None, "anyOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "maxItems": api.max_stop_strings, "items": {"type": "string", "minLength": 1}},
            {"type": "null"}]}
        props["stop_token_ids"] = {"title": "Stop Token Ids", "default": None, "anyOf": [
            {"type": "array", "items": _token_ids(vocab_size)}, {"type": "null"}]}
    completion = schemas["CompletionRequest"]["properties"]
    completion["prompt"] = _prompt(vocab_size)
    completion["echo"] = {"title": "Echo", "default": False, "type": "boolean", "const": False}  # not supported
    completion["suffix"] = {"title": "Suffix", "default": None, "anyOf": [{"type": "string", "maxLength": 0},
                                                                             {"type": "null"}]}
    # the roles every chat template knows (a template may take more, e.g. `tool`)
    schemas["ChatMessage"]["properties"]["role"] = {"title": "Role", "type": "string",
                                                    "enum": ["system", "user", "assistant"]}
    _set_limit(schemas["CompletionRequest"]["properties"]["logprobs"], "maximum", api.max_logprobs)
    chat = schemas["ChatCompletionRequest"]["properties"]
    _set_limit(chat["max_completion_tokens"], "maximum", api.max_output_tokens)
    _set_limit(chat["top_logprobs"], "maximum", api.max_logprobs)


def _sse_event(chunk: str) -> dict:
    """One event of a stream (OpenAPI before 3.2: `schema` describes each event): a chunk, an error
    (a failure after the first byte: `ErrorResponse`), or the closing `[DONE]`."""
    payload = {"type": "string", "contentMediaType": "application/json",
               "contentSchema": {"anyOf": [_ref(chunk), _ref("ErrorResponse")]}}
    return {"type": "object", "required": ["data"], "description": f"`data: <{chunk}>` events, then `data: [DONE]`",
            "properties": {"event": {"type": "string"}, "data": {"anyOf": [{"const": "[DONE]"}, payload]}}}


def _generate(request: str, response: str, chunk: str | None, security: list) -> dict:
    stream = {"schema": _sse_event(chunk)}
    ok = {"description": "the completion (JSON), or with `stream: true` its SSE stream",
          "content": {"application/json": {"schema": _ref(response)}, "text/event-stream": stream}}
    return {"post": {
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
        "responses": {"200": ok, **_errors(400, 401, 404, 413, 429, 500, 503)}, "security": security}}


def openapi_document(model: str, api: ApiConfig, admin: list[str], keys_set: bool = False,
                     vocab_size: int | None = None) -> dict:
    """The document for a server of `model` under `api`; `admin`: which admin routes it has
    ("instances", "autoscaler"); `keys_set`: API keys are in force (/v1/* needs one); `vocab_size`:
    the model's, which bounds token ids."""
    schemas = copy.deepcopy(_schemas())
    _request_schemas(schemas, model, api, vocab_size)
    user = [{"apiKey": []}] if keys_set else []
    health_security = user if api.health_needs_key else []
    metrics_security = user if api.metrics_needs_key else []
    paths = {
        "/v1/completions": _generate("CompletionRequest", "CompletionResponse", "CompletionResponse", user),
        "/v1/chat/completions": _generate("ChatCompletionRequest", "ChatCompletionResponse", "ChatCompletionChunk", user),
        "/v1/models": {"get": {"responses": {"200": _json("ModelList", "the served model"), **_errors(401)},
                               "security": user}},
        "/health": {"get": {"responses": {"200": _json("HealthResponse", "serving: what admission sees of each instance"),
                                          "503": _json("HealthResponse", "draining or unhealthy"), **_errors(401)},
                            "security": health_security}},
        "/metrics": {"get": {"responses": {"200": {"description": "Prometheus text exposition",
                                                   "content": {"text/plain": {"schema": {"type": "string"}}}},
                                           **_errors(401)}, "security": metrics_security}},
    }
    admin_security = [{"adminKey": []}]
    if "instances" in admin:
        paths["/admin/instances"] = {"post": {
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("AddInstanceRequest")}}},
            "responses": {"200": _json("AddInstanceResponse", "the new instance, serving"), **_errors(400, 401, 404, 413, 500)},
            "security": admin_security}}
    if "autoscaler" in admin:
        paths["/admin/autoscaler"] = {"get": {
            "responses": {"200": {"description": "the autoscaler's mode and last decisions",
                                  "content": {"application/json": {"schema": {"type": "object"}}}}, **_errors(401, 404)},
            "security": admin_security}}
    bearer = {"type": "http", "scheme": "bearer"}
    return {"openapi": "3.1.0", "info": {"title": "llm-cluster", "version": "1"}, "paths": paths,
            "components": {"schemas": schemas, "securitySchemes": {
                "apiKey": {**bearer, "description": "an API key (api.api_keys_file, LLM_CLUSTER_API_KEYS)"},
                "adminKey": {**bearer, "description": "an admin key (api.admin_keys_file, LLM_CLUSTER_ADMIN_KEYS)"}}}}
