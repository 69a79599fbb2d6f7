"""Ceilings that name themselves: each configured in `api:` (config/api.py) and refused with 400, an
OpenAI-style body whose `param` is the request's field and whose message gives the limit and the
knob that sets it (code `limit_exceeded`).

  field                                   ceiling                 checked
  request body                            api.max_body_bytes      before parsing (413: the body is never read whole)
  n                                       api.max_n               after the protocol model
  max_tokens / max_completion_tokens      api.max_output_tokens   after the protocol model
  stop                                    api.max_stop_strings    after the protocol model
  logprobs / top_logprobs                 api.max_logprobs        after the protocol model
  prompt / messages (tokens)              api.max_prompt_tokens   after tokenizing (chat: the rendered template)

The model's context (`prompt + max_tokens <= max_model_len`) is checked beside these (server.py);
the ceilings are a deployment's own, below it. A request that leaves `max_tokens` out is not refused
for the default it did not choose: `default_output_tokens` gives it the ceiling (or the protocol's
default, if lower) instead.
"""
from __future__ import annotations

from dataclasses import replace

from cluster.api.errors import APIError, invalid
from cluster.api.protocol import ChatCompletionRequest, CompletionRequest
from cluster.config import ApiConfig
from cluster.types import SamplingParams

CODE = "limit_exceeded"


def exceeded(param: str, value: int, limit: int, knob: str, what: str) -> APIError:
    return invalid(f"{param}={value} exceeds this server's limit of {limit} {what} (api.{knob})", param, code=CODE)


def check_request(api: ApiConfig, body: CompletionRequest | ChatCompletionRequest) -> None:
    """The ceilings a parsed request's own fields are held to."""
    if body.n > api.max_n:
        raise exceeded("n", body.n, api.max_n, "max_n", "completions per prompt")
    param, max_tokens = _output_tokens(body)
    explicit = param in body.model_fields_set  # a default left in place is capped instead (default_output_tokens)
    if api.max_output_tokens is not None and explicit and max_tokens is not None and max_tokens > api.max_output_tokens:
        raise exceeded(param, max_tokens, api.max_output_tokens, "max_output_tokens", "output tokens")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > api.max_stop_strings:
        raise exceeded("stop", len(stops), api.max_stop_strings, "max_stop_strings", "stop strings")
    param, logprobs = ("top_logprobs", body.top_logprobs) if isinstance(body, ChatCompletionRequest) else ("logprobs", body.logprobs)
    if logprobs is not None and logprobs > api.max_logprobs:
        raise exceeded(param, logprobs, api.max_logprobs, "max_logprobs", "logprobs per token")


def default_output_tokens(api: ApiConfig, body: CompletionRequest | ChatCompletionRequest,
                          params: SamplingParams) -> SamplingParams:
    """`params` with max_tokens at most api.max_output_tokens where the caller did not set it."""
    ceiling = api.max_output_tokens
    chosen = body.model_fields_set & {"max_tokens", "max_completion_tokens"}
    if ceiling is None or any(getattr(body, name) is not None for name in chosen):
        return params
    return replace(params, max_tokens=min(params.max_tokens or ceiling, ceiling))


def check_prompt(api: ApiConfig, num_tokens: int, param: str) -> None:
    if api.max_prompt_tokens is not None and num_tokens > api.max_prompt_tokens:
        raise invalid(f"{param} has {num_tokens} tokens, over this server's limit of {api.max_prompt_tokens} "
                      f"prompt tokens (api.max_prompt_tokens)", param, code=CODE)


def check_body_size(api: ApiConfig, num_bytes: int) -> None:
    if num_bytes > api.max_body_bytes:
        raise APIError(413, f"the request body ({num_bytes} bytes) exceeds this server's limit of {api.max_body_bytes} "
                       f"bytes (api.max_body_bytes)", param="body", code="body_too_large")


def _output_tokens(body: CompletionRequest | ChatCompletionRequest) -> tuple[str, int | None]:
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        return "max_completion_tokens", body.max_completion_tokens
    return "max_tokens", body.max_tokens
