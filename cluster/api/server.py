"""The OpenAI-compatible HTTP server: `build_app(client, metrics, served_model_name)`.

A request's path through it:
  (0) the key check (auth.py) has let it through, and the server is not draining (else 503 with
      Retry-After: a shutdown has begun, graceful.py);
  (1) the body is read and checked: its size (api.max_body_bytes), UTF-8, strict JSON (no NaN), a
      JSON object, then the protocol model (wrong types and values -> 400 naming the field), then the
      model name (404), then the configured ceilings (limits.py: n, max_tokens, stop, logprobs);
  (2) prompts are tokenized (chat: the tokenizer's chat template) and checked against the
      vocabulary, api.max_prompt_tokens and the context (`prompt + max_tokens <= max_model_len`, else 400);
  (3) a `Run` submits every prompt to the EngineClient and waits for each one's first token:
      Overloaded -> 429 (503 if unavailable) with Retry-After, ValueError -> 400;
  (4) streaming answers SSE chunks (stream.py); otherwise the deltas are gathered into one
      response. A client that goes away (stream closed, or a non-stream request whose
      connection dropped, polled every DISCONNECT_POLL_S) aborts its requests, freeing KV;
  (5) every call's metrics are recorded once (TTFT, ITL, E2E, tokens, finish reasons, rejections).
Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, /health, /metrics,
/openapi.json (openapi.py: what every answer conforms to), and, where the caller hands `build_app` a
way to add an instance or the autoscaler's status (cluster/app.py), POST /admin/instances and
GET /admin/autoscaler, which answer only to an admin key.
`drain` (the shutdown, graceful.py) stops admitting and gives in-flight requests their deadline.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from pydantic import ValidationError
from starlette.responses import JSONResponse, Response

from cluster.api.auth import KeyCheck, KeyRing
from cluster.api.errors import (APIError, ClientGone, from_overloaded, from_validation, from_value_error, guarded,
                               install_error_handlers, invalid)
from cluster.api.http import SSEResponse, json_response, read_json, until_disconnected
from cluster.api.limits import check_prompt, check_request, default_output_tokens
from cluster.api.openapi import openapi_document
from cluster.api.protocol import (AddInstanceRequest, AddInstanceResponse, ChatChoiceLogprobs, ChatCompletionChoice,
                                  ChatCompletionRequest, ChatCompletionResponse, ChatResponseMessage, CompletionChoice,
                                  CompletionLogprobs, CompletionRequest, CompletionResponse, ErrorInfo, HealthResponse,
                                  ModelCard, ModelList)
from cluster.api.stream import EngineCall, Run, TokenStrings, chat_sse, completion_sse
from cluster.client import EngineClient, Overloaded
from cluster.config import ApiConfig
from cluster.metrics import CONTENT_TYPE, Metrics
from cluster.types import Role, SamplingParams, TokenLogprob

DRAIN_RETRY_AFTER_S = 1  # a client refused while this server drains may retry at once: another replica serves


@dataclass
class _Choice:
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class OpenAIServer:
    def __init__(self, client: EngineClient, metrics: Metrics, served_model_name: str, api: ApiConfig = ApiConfig()):
        self.client = client
        self.metrics = metrics
        self.model = served_model_name
        self.api = api
        self.info = client.info()
        self.strings = TokenStrings(self.info.tokenizer)
        self.draining = False

    # -- routes --------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        start_s = time.monotonic()
        with self._rejections():
            self._check_admitting()
            body = CompletionRequest.model_validate(await read_json(request, self.api))
            self._check_model(body.model)
            check_request(self.api, body)
            params = self._check_params(default_output_tokens(self.api, body, body.sampling_params()))
            prompts = [self._encode(p) for p in body.prompts()]
        response_id = f"cmpl-{uuid.uuid4().hex}"
        run = self._run(response_id, prompts, params, start_s, "prompt")
        await self._start(request, run)
        if body.stream:
            return SSEResponse(completion_sse(run, response_id, body.include_usage, self.strings, body.continuous_usage), run)
        choices = await self._collect(request, run, len(prompts) * params.n)
        out = []
        for index, c in enumerate(choices):
            logprobs = None
            if params.logprobs is not None:
                logprobs = CompletionLogprobs()
                self.strings.completion(c.logprobs, logprobs, 0)
            out.append(CompletionChoice(index=index, text=c.text, logprobs=logprobs, finish_reason=c.finish_reason,
                                        stop_reason=c.stop_reason))
        return json_response(CompletionResponse(id=response_id, model=self.model, choices=out, usage=run.usage()))

    async def chat(self, request: Request) -> Response:
        start_s = time.monotonic()
        with self._rejections():
            self._check_admitting()
            body = ChatCompletionRequest.model_validate(await read_json(request, self.api))
            self._check_model(body.model)
            check_request(self.api, body)
            params = self._check_params(default_output_tokens(self.api, body, body.sampling_params()))
            prompt = self._render_chat(body)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        run = self._run(response_id, [prompt], params, start_s, "messages")
        await self._start(request, run)
        if body.stream:
            return SSEResponse(chat_sse(run, response_id, body.include_usage, self.strings, body.continuous_usage), run)
        choices = await self._collect(request, run, params.n)
        out = [ChatCompletionChoice(
            index=index, message=ChatResponseMessage(content=c.text), finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
            logprobs=ChatChoiceLogprobs(content=self.strings.chat(c.logprobs)) if params.logprobs is not None else None,
        ) for index, c in enumerate(choices)]
        return json_response(ChatCompletionResponse(id=response_id, model=self.model, choices=out, usage=run.usage()))

    async def models(self) -> Response:
        return json_response(ModelList(data=[ModelCard(id=self.model, max_model_len=self.info.max_model_len)]))

    async def health(self) -> Response:
        """200 while serving; 503 while draining (the load balancer takes this replica out first) or unhealthy."""
        if self.draining:
            error = ErrorInfo(message="draining: the server is shutting down and admits no new request",
                              type="service_unavailable", code="draining")
            return json_response(HealthResponse(status="draining", error=error), 503)
        try:
            status = await self.client.health()
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
            error = ErrorInfo(message=f"unhealthy: {exc}", type="service_unavailable", code="unhealthy")
            return json_response(HealthResponse(status="unhealthy", error=error), 503)
        return JSONResponse({**status, "status": "ok"})

    async def metrics_text(self) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def drain(self, timeout_s: float) -> int:
        """Stop admitting (503 + Retry-After, /health draining) and give the requests in flight
        `timeout_s` to finish; returns how many were still running then (they end with an error)."""
        self.draining = True
        return await self.client.drain(timeout_s)

    # -- (1)-(2) checking and tokenizing ----------------------------------------------------
    def _rejections(self):
        return _Rejections(self)

    def _check_admitting(self) -> None:
        if self.draining:
            raise APIError(503, "service unavailable: the server is shutting down (draining); retry on another replica",
                           code="draining", headers={"Retry-After": str(DRAIN_RETRY_AFTER_S)})

    def _check_model(self, name: str) -> None:
        if name != self.model:
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    def _check_params(self, params: SamplingParams) -> SamplingParams:
        vocab = self.info.vocab_size
        bad = next((t for t in params.stop_token_ids if t >= vocab), None)
        if bad is not None:
            raise invalid(f"stop_token_ids: {bad} is outside the vocabulary [0, {vocab})", "stop_token_ids")
        return params

    def _encode(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            ids = self._tokenize(prompt, "prompt", add_special_tokens=True)
            check_prompt(self.api, len(ids), "prompt")
            return prompt, ids
        vocab = self.info.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise invalid(f"prompt token id {bad} is outside the vocabulary [0, {vocab})", "prompt")
        check_prompt(self.api, len(prompt), "prompt")
        return None, list(prompt)

    def _render_chat(self, body: ChatCompletionRequest) -> tuple[str, list[int]]:
        tokenizer = self.info.tokenizer
        if tokenizer is None:
            raise invalid("this model has no tokenizer, so no chat template; use /v1/completions", "messages")
        try:
            text = tokenizer.apply_chat_template([m.for_template() for m in body.messages],
                                                 add_generation_prompt=body.add_generation_prompt)
        except Exception as exc:  # noqa: BLE001 - a template that rejects the messages is the caller's problem
            raise invalid(f"messages could not be rendered: {exc}", "messages") from exc
        ids = self._tokenize(text, "messages", add_special_tokens=False)  # the template adds BOS
        check_prompt(self.api, len(ids), "messages")
        return text, ids

    def _tokenize(self, text: str, param: str, add_special_tokens: bool) -> list[int]:
        tokenizer = self.info.tokenizer
        if tokenizer is None:
            raise invalid("this model has no tokenizer: send token ids", param)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise invalid(f"{param} is not valid Unicode (lone surrogate escapes)", param) from None
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _check_length(self, num_prompt_tokens: int, params: SamplingParams, param: str) -> None:
        limit = self.info.max_model_len
        max_tokens = params.max_tokens or 0
        if num_prompt_tokens >= limit or num_prompt_tokens + max_tokens > limit:
            raise invalid(f"This model's maximum context length is {limit} tokens. However, you requested "
                          f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the messages, {max_tokens} "
                          f"in the completion). Please reduce the length of the messages or completion.",
                          param, code="context_length_exceeded")

    # -- (3)-(4) running --------------------------------------------------------------------
    def _run(self, response_id: str, prompts: list[tuple[str | None, list[int]]], params: SamplingParams,
             start_s: float, param: str) -> Run:
        with self._rejections():
            for _, ids in prompts:
                self._check_length(len(ids), params, param)
        calls = [EngineCall(f"{response_id}-{i}", ids, text, params, start_s) for i, (text, ids) in enumerate(prompts)]
        return Run(self.client, self.metrics, self.model, calls)

    async def _start(self, request: Request, run: Run) -> None:
        try:
            with self._rejections():
                await until_disconnected(request, run.start())
        except BaseException:
            await run.close()
            raise

    async def _collect(self, request: Request, run: Run, num_choices: int) -> list[_Choice]:
        async def gather() -> list[_Choice]:
            choices = [_Choice() for _ in range(num_choices)]
            async for index, delta in run.deltas():
                if delta.error is not None:
                    raise APIError(500, f"generation failed: {delta.error}", code="engine_error")
                choice = choices[index]
                choice.text += delta.text
                choice.logprobs.extend(delta.logprobs or ())
                if delta.finish_reason is not None:
                    choice.finish_reason, choice.stop_reason = delta.finish_reason.value, delta.stop_reason
            return choices

        try:
            return await until_disconnected(request, gather())
        finally:
            await run.close()


class _Rejections:
    """Context manager: turns bad-input exceptions into APIErrors and counts each rejection."""

    def __init__(self, server: OpenAIServer):
        self.server = server

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or isinstance(exc, ClientGone):
            return False
        if isinstance(exc, ValidationError):
            error = from_validation(exc)
        elif isinstance(exc, Overloaded):
            error = from_overloaded(exc)
        elif isinstance(exc, APIError):
            error = exc
        elif isinstance(exc, ValueError):
            error = from_value_error(exc)
        else:
            return False
        self.server.metrics.reject(self.server.model, error.reason)
        if error is exc:
            return False
        raise error from exc


def build_app(client: EngineClient, metrics: Metrics, served_model_name: str,
              add_instance: Callable[[Role], Awaitable[str]] | None = None,
              autoscaler_status: Callable[[], dict] | None = None,
              api: ApiConfig = ApiConfig(), keys: KeyRing | None = None) -> FastAPI:
    """The app over `client`, held to `api`'s ceilings and keys (`keys`: the KeyRing in force; None:
    read from `api`). With `add_instance` (the caller's way to start an instance of a role and return
    its id) also `POST /admin/instances {"role": ...}`; with `autoscaler_status` also
    `GET /admin/autoscaler` (its mode and last decisions with their reasons): both answer an admin key
    only, and 404 while none is set."""
    server = OpenAIServer(client, metrics, served_model_name, api)
    ring = keys or KeyRing(api)
    app = FastAPI(title="llm-cluster", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.add_api_route("/v1/completions", guarded(server.completions), methods=["POST"])
    app.add_api_route("/v1/chat/completions", guarded(server.chat), methods=["POST"])
    app.add_api_route("/v1/models", server.models, methods=["GET"])
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.metrics_text, methods=["GET"])
    admin = []
    if add_instance is not None:
        async def add_instance_route(request: Request) -> Response:
            with server._rejections():
                body = AddInstanceRequest.model_validate(await read_json(request, api))
            return json_response(AddInstanceResponse(instance_id=await add_instance(Role(body.role))))

        app.add_api_route("/admin/instances", guarded(add_instance_route), methods=["POST"])
        admin.append("instances")
    if autoscaler_status is not None:
        app.add_api_route("/admin/autoscaler", lambda: JSONResponse(autoscaler_status()), methods=["GET"])
        admin.append("autoscaler")
    document = openapi_document(served_model_name, api, admin, keys_set=not ring.open,
                                vocab_size=server.info.vocab_size)
    app.add_api_route("/openapi.json", lambda: JSONResponse(document), methods=["GET"], include_in_schema=False)
    app.add_middleware(KeyCheck, ring=ring, metrics=metrics, model=served_model_name)
    app.state.server = server
    app.state.keys = ring
    return app


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
                keep_alive_s: float = ApiConfig.keep_alive_s):
    """A uvicorn.Server for `app` (run it with `.run()`, stop it with `.should_exit = True`); idle
    connections stay open `keep_alive_s` (ApiConfig.keep_alive_s says why)."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                                         timeout_graceful_shutdown=2, timeout_keep_alive=keep_alive_s))


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Serve until interrupted (127.0.0.1 by default: expose it on purpose, not by accident)."""
    make_server(app, host, port, log_level).run()
