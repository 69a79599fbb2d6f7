"""The OpenAI-compatible HTTP server: `build_app(client, metrics, served_model_name)`.

A request's path through it:
  (1) the body is read and checked: UTF-8, strict JSON (no NaN), a JSON object, then the
      protocol model (wrong types and values -> 400 naming the field), then the model name (404);
  (2) prompts are tokenized (chat: the tokenizer's chat template) and checked against the
      vocabulary and the context (`prompt + max_tokens <= max_model_len`, else 400);
  (3) a `Run` submits every prompt to the EngineClient and waits for each one's first token:
      Overloaded -> 429 (503 if unavailable) with Retry-After, ValueError -> 400;
  (4) streaming answers SSE chunks (stream.py); otherwise the deltas are gathered into one
      response. A client that goes away (stream closed, or a non-stream request whose
      connection dropped, polled every DISCONNECT_POLL_S) aborts its requests, freeing KV;
  (5) every call's metrics are recorded once (TTFT, ITL, E2E, tokens, finish reasons, rejections).
Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, /health, /metrics, and
POST /admin/instances where the caller hands `build_app` a way to add an instance (cluster/app.py).
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from fastapi import Body, FastAPI, Request
from pydantic import ValidationError
from starlette.responses import JSONResponse, Response, StreamingResponse

from cluster.api.errors import (APIError, ClientGone, from_overloaded, from_validation, from_value_error, guarded,
                               install_error_handlers, invalid)
from cluster.api.protocol import (ChatChoiceLogprobs, ChatCompletionChoice, ChatCompletionRequest, ChatCompletionResponse,
                                  ChatResponseMessage, CompletionChoice, CompletionLogprobs, CompletionRequest,
                                  CompletionResponse, ModelCard, ModelList)
from cluster.api.stream import EngineCall, Run, TokenStrings, chat_sse, completion_sse
from cluster.client import EngineClient, Overloaded
from cluster.config import ApiConfig
from cluster.metrics import CONTENT_TYPE, Metrics
from cluster.types import Role, SamplingParams, TokenLogprob

MAX_BODY_BYTES = 16 << 20
DISCONNECT_POLL_S = 0.2


@dataclass
class _Choice:
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class _SSEResponse(StreamingResponse):
    """An SSE stream that, however it ends (done, client gone, cancelled), closes its Run: aborts, metrics."""

    def __init__(self, content, run: Run):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.run = run

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                await self.run.close()


class OpenAIServer:
    def __init__(self, client: EngineClient, metrics: Metrics, served_model_name: str):
        self.client = client
        self.metrics = metrics
        self.model = served_model_name
        self.info = client.info()
        self.strings = TokenStrings(self.info.tokenizer)

    # -- routes --------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        start_s = time.monotonic()
        with self._rejections():
            body = CompletionRequest.model_validate(await _read_json(request))
            self._check_model(body.model)
            params = self._check_params(body.sampling_params())
            prompts = [self._encode(p) for p in body.prompts()]
        response_id = f"cmpl-{uuid.uuid4().hex}"
        run = self._run(response_id, prompts, params, start_s, "prompt")
        await self._start(request, run)
        if body.stream:
            return _SSEResponse(completion_sse(run, response_id, body.include_usage, self.strings, body.continuous_usage), run)
        choices = await self._collect(request, run, len(prompts) * params.n)
        out = []
        for index, c in enumerate(choices):
            logprobs = None
            if params.logprobs is not None:
                logprobs = CompletionLogprobs()
                self.strings.completion(c.logprobs, logprobs, 0)
            out.append(CompletionChoice(index=index, text=c.text, logprobs=logprobs, finish_reason=c.finish_reason,
                                        stop_reason=c.stop_reason))
        return _json(CompletionResponse(id=response_id, model=self.model, choices=out, usage=run.usage()))

    async def chat(self, request: Request) -> Response:
        start_s = time.monotonic()
        with self._rejections():
            body = ChatCompletionRequest.model_validate(await _read_json(request))
            self._check_model(body.model)
            params = self._check_params(body.sampling_params())
            prompt = self._render_chat(body)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        run = self._run(response_id, [prompt], params, start_s, "messages")
        await self._start(request, run)
        if body.stream:
            return _SSEResponse(chat_sse(run, response_id, body.include_usage, self.strings, body.continuous_usage), run)
        choices = await self._collect(request, run, params.n)
        out = [ChatCompletionChoice(
            index=index, message=ChatResponseMessage(content=c.text), finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
            logprobs=ChatChoiceLogprobs(content=self.strings.chat(c.logprobs)) if params.logprobs is not None else None,
        ) for index, c in enumerate(choices)]
        return _json(ChatCompletionResponse(id=response_id, model=self.model, choices=out, usage=run.usage()))

    async def models(self) -> Response:
        return _json(ModelList(data=[ModelCard(id=self.model, max_model_len=self.info.max_model_len)]))

    async def health(self) -> Response:
        try:
            status = await self.client.health()
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
            raise APIError(503, f"unhealthy: {exc}", code="unhealthy") from exc
        return JSONResponse({"status": "ok", **status})

    async def metrics_text(self) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    # -- (1)-(2) checking and tokenizing ----------------------------------------------------
    def _rejections(self):
        return _Rejections(self)

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
            return prompt, self._tokenize(prompt, "prompt", add_special_tokens=True)
        vocab = self.info.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise invalid(f"prompt token id {bad} is outside the vocabulary [0, {vocab})", "prompt")
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
        return text, self._tokenize(text, "messages", add_special_tokens=False)  # the template adds BOS

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
                await _until_disconnected(request, run.start())
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
            return await _until_disconnected(request, gather())
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


async def _read_json(request: Request) -> dict:
    declared = request.headers.get("content-length", "0")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"request body is larger than {MAX_BODY_BYTES} bytes", code="body_too_large")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"request body is larger than {MAX_BODY_BYTES} bytes", code="body_too_large")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(f"request body is not valid UTF-8: {exc.reason} at byte {exc.start}", code="invalid_json") from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise invalid(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid(f"request body must be a JSON object, not {type(data).__name__}", code="invalid_json")
    return data


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def _until_disconnected(request: Request, awaitable):
    """Await `awaitable`, but give up (cancelling it) if the HTTP client disconnects meanwhile."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _json(model) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def build_app(client: EngineClient, metrics: Metrics, served_model_name: str,
              add_instance: Callable[[Role], Awaitable[str]] | None = None,
              autoscaler_status: Callable[[], dict] | None = None) -> FastAPI:
    """The app over `client`; with `add_instance` (the caller's way to start an instance of a
    role and return its id) also `POST /admin/instances {"role": ...}`; with `autoscaler_status`
    also `GET /admin/autoscaler` (its mode and last decisions with their reasons)."""
    server = OpenAIServer(client, metrics, served_model_name)
    app = FastAPI(title="llm-cluster", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.add_api_route("/v1/completions", guarded(server.completions), methods=["POST"])
    app.add_api_route("/v1/chat/completions", guarded(server.chat), methods=["POST"])
    app.add_api_route("/v1/models", server.models, methods=["GET"])
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.metrics_text, methods=["GET"])
    if add_instance is not None:
        @app.post("/admin/instances")
        async def add_instance_route(body: dict = Body(...)):
            role = Role(body.get("role", "decode"))
            return {"instance_id": await add_instance(role)}
    if autoscaler_status is not None:
        app.add_api_route("/admin/autoscaler", lambda: autoscaler_status(), methods=["GET"])
    app.state.server = server
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
