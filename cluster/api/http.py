"""The HTTP plumbing the routes share: reading a bounded JSON body, waiting while watching for a
client that goes away, JSON answers, and an SSE response that closes its `Run` however it ends."""
from __future__ import annotations

import asyncio
import json

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from cluster.api.errors import ClientGone, invalid
from cluster.api.limits import check_body_size
from cluster.api.stream import Run
from cluster.config import ApiConfig

DISCONNECT_POLL_S = 0.2


class SSEResponse(StreamingResponse):
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


async def read_json(request: Request, api: ApiConfig) -> dict:
    """The body as a JSON object: no bigger than `api.max_body_bytes` (413, read no further), UTF-8,
    strict JSON (no NaN), an object; else 400 naming what is wrong."""
    declared = request.headers.get("content-length", "0")
    if declared.isdigit():
        check_body_size(api, int(declared))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        check_body_size(api, size)  # a chunked body is cut off as soon as it passes the limit
        chunks.append(chunk)
    raw = b"".join(chunks)
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


async def until_disconnected(request: Request, awaitable):
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


def json_response(model, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(model.model_dump_json(), status_code=status_code, headers=headers, media_type="application/json")
