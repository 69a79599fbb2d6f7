"""Who may call the API: bearer keys checked before any route runs (a pure ASGI middleware, so
streams pass through untouched).

A request's path through it:
  (1) its path decides what it needs: `/admin/*` an admin key; `/v1/*` an API key (or an admin key)
      when any key is set, nothing otherwise; `/health` and `/metrics` an API key only when
      `api.health_needs_key` / `api.metrics_needs_key` say so; anything else (the OpenAPI document,
      unknown paths) nothing;
  (2) the key is read from `Authorization: Bearer <key>` (what every OpenAI client sends);
  (3) it is compared with every key in force in constant time (`hmac.compare_digest` of SHA-256
      digests, all keys compared, no early exit), so timing tells nothing of a key's prefix or length;
  (4) missing or wrong: 401 with an OpenAI-style body (`invalid_api_key`) and `WWW-Authenticate:
      Bearer`, counted as a rejection (reason `unauthorized`); the key itself is never logged or echoed.
Admin routes are off (404) while no admin key is in force.

`KeyRing` holds the keys and reads them again (config/keys.py) every `api.keys_reload_s` when a key
file changed, so a rotated Kubernetes Secret takes effect without a restart; a reload that fails keeps
the keys it had. `exposure_notes` is what `llm-cluster up` says at start about who can reach it.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable

from cluster.api.errors import error_response
from cluster.config import ApiConfig, ApiKeys, key_files, load_api_keys
from cluster.metrics import Metrics

log = logging.getLogger(__name__)
ADMIN, USER = "admin", "user"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class KeyRing:
    """The keys in force, as digests; reloaded from their files when those change."""

    def __init__(self, api: ApiConfig, loader: Callable[[], ApiKeys] | None = None):
        self.api = api
        self._loader = loader or (lambda: load_api_keys(api))
        self._checked_s = time.monotonic()
        self._stamp = self._file_stamp()
        self._set(self._loader())

    def _set(self, keys: ApiKeys) -> None:
        self.admin = [_digest(k) for k in sorted(keys.admin)]
        self.user = [_digest(k) for k in sorted(keys.api)] + self.admin  # an admin key may call the API too
        self.num_user, self.num_admin = len(keys.api), len(keys.admin)

    def _file_stamp(self) -> tuple:
        stamp = []
        for path in key_files(self.api):
            try:
                info = os.stat(path)
                stamp.append((path, info.st_mtime_ns, info.st_size, info.st_ino))
            except OSError:
                stamp.append((path, None))
        return tuple(stamp)

    def refresh(self, now_s: float | None = None) -> None:
        now = time.monotonic() if now_s is None else now_s
        if now - self._checked_s < self.api.keys_reload_s:
            return
        self._checked_s = now
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        try:
            self._set(self._loader())
            self._stamp = stamp
            log.info("API keys reloaded: %d api, %d admin", self.num_user, self.num_admin)
        except Exception as exc:  # noqa: BLE001 - a Secret mid-swap: keep the keys we had, try again later
            log.warning("API keys not reloaded (%s); the previous keys stay in force", exc)

    @property
    def open(self) -> bool:
        """No API key is set: /v1/* answers anyone who reaches the port (an admin key alone opens /admin/*
        to its holder and closes nothing else)."""
        return not self.num_user

    def allows(self, token: str | None, need: str) -> bool:
        """Constant time in the token: every digest of `need`'s list is compared."""
        if token is None:
            return False
        digest, ok = _digest(token), False
        for known in (self.admin if need == ADMIN else self.user):
            ok |= hmac.compare_digest(digest, known)
        return ok


def bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            return token.strip() or None if scheme.lower() == "bearer" else None
    return None


class KeyCheck:
    """ASGI middleware: (1)-(4) of the module docstring, in front of the whole app."""

    def __init__(self, app, ring: KeyRing, metrics: Metrics, model: str):
        self.app = app
        self.ring = ring
        self.metrics = metrics
        self.model = model

    def needs(self, path: str) -> str | None:
        api = self.ring.api
        if path.startswith("/admin/") or path == "/admin":
            return ADMIN
        if self.ring.open:
            return None
        if path.startswith("/v1/") or (path == "/health" and api.health_needs_key) or (
                path == "/metrics" and api.metrics_needs_key):
            return USER
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            self.ring.refresh()
            need = self.needs(scope["path"])
            if need == ADMIN and not self.ring.num_admin:
                response = error_response(404, "admin routes are off: no admin key is set (api.admin_keys_file, "
                                          "LLM_CLUSTER_ADMIN_KEYS)", code="not_found")
                await response(scope, receive, send)
                return
            if need is not None and not self.ring.allows(bearer(scope["headers"]), need):
                self.metrics.reject(self.model, "unauthorized")
                await self._refuse(scope, receive, send, need)
                return
        await self.app(scope, receive, send)

    async def _refuse(self, scope, receive, send, need: str) -> None:
        token = bearer(scope["headers"])
        what = "an admin key" if need == ADMIN else "an API key"
        message = (f"Incorrect API key provided: this route needs {what}." if token else
                   f"You didn't provide an API key: send {what} as `Authorization: Bearer <key>`.")
        response = error_response(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def exposure_notes(api: ApiConfig, ring: KeyRing) -> list[str]:
    """What `llm-cluster up` prints about who can reach it: keys or none, loopback or not."""
    where = f"{api.host}:{api.port}"
    admin = (f"admin routes need one of {ring.num_admin} admin key(s)" if ring.num_admin else
             "admin routes (/admin/*) are off: no admin key set")
    if not ring.open:
        return [f"API keys: {ring.num_user} key(s) in force for /v1/*; {admin}."]
    if api.loopback:
        return [f"no API key set: the API is open to anyone on this machine ({where}, loopback only); {admin}."]
    return [f"WARNING: no API key set and the API listens on {where}, beyond this machine: anyone who "
            f"reaches the port may call it. Set api.api_keys_file or LLM_CLUSTER_API_KEYS. {admin}."]
