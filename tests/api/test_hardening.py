"""Who may call the API, the ceilings each request is held to, and a drain: uvicorn on 127.0.0.1, a
LocalEngineClient over a tiny llama, the `openai` client and httpx.

  keys:    401 through the openai client without a key and with a wrong one, the right key serves;
           an admin key is a separate one and admin routes are off (404) while none is set; keys from
           the environment and from a mounted-Secret directory, reloaded when the file changes;
  limits:  each configured ceiling refused with 400 (413 for the body) naming the field and the limit;
  drain:   while draining, new requests get 503 + Retry-After and /health says draining; a request in
           flight still finishes.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from cluster.api.auth import KeyRing, exposure_notes
from cluster.api.server import build_app
from cluster.config import ApiConfig, ApiKeys, CacheConfig, ConfigError, EngineConfig, ModelConfig, RunnerConfig, load_api_keys
from cluster.metrics import Metrics
from cluster.runtime.local import LocalClientConfig, LocalEngineClient
from cluster.types import Role
from tests.api.test_server import MODEL, start_uvicorn

KEY, OTHER, ADMIN = "sk-test-user-0123", "sk-test-user-4567", "sk-test-admin-89ab"
LIMITS = dict(max_prompt_tokens=40, max_output_tokens=32, max_n=2, max_stop_strings=2, max_logprobs=3,
              max_body_bytes=4096)


class Secured:
    """A server with API keys, an admin key, every ceiling set low, and the admin routes wired to stubs."""

    def __init__(self, path: str, api: ApiConfig, keys: KeyRing | None = None):
        self.metrics = Metrics()
        config = EngineConfig(model=ModelConfig(path=path, max_model_len=512), cache=CacheConfig(num_blocks=512),
                              runner=RunnerConfig(device="cpu"))
        self.client = LocalEngineClient.from_config(config, LocalClientConfig(max_pending=64), self.metrics,
                                                    served_name=MODEL)
        self.added: list[Role] = []

        async def add_instance(role: Role) -> str:
            self.added.append(role)
            return f"{role.value}-{len(self.added)}"

        self.app = build_app(self.client, self.metrics, MODEL, add_instance=add_instance,
                             autoscaler_status=lambda: {"enabled": False}, api=api, keys=keys)
        self.server, self.thread, self.url = start_uvicorn(self.app)

    def openai(self, key: str | None) -> openai.OpenAI:
        """An openai client presenting `key` (None: sending no Authorization header at all)."""
        def no_key(request: httpx.Request) -> None:
            del request.headers["Authorization"]

        http = httpx.Client(event_hooks={"request": [no_key]}) if key is None else None
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "unused", max_retries=0, timeout=30,
                             http_client=http)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        asyncio.run(self.client.close())


@pytest.fixture(scope="module")
def secured(checkpoint_dir):
    s = Secured(checkpoint_dir("llama"), ApiConfig(api_keys=(KEY, OTHER), admin_keys=(ADMIN,), **LIMITS))
    yield s
    s.close()


def test_the_openai_client_gets_401_without_a_key_or_with_a_wrong_one(secured):
    for key in (None, "sk-wrong", KEY + "x", KEY[:-1]):
        with pytest.raises(openai.AuthenticationError) as info:
            secured.openai(key).completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
        assert KEY not in str(info.value.body) and (key is None or key not in str(info.value.body))
    with pytest.raises(openai.AuthenticationError):
        secured.openai("sk-wrong").models.list()
    for key in (KEY, OTHER, ADMIN):  # any API key, and the admin key too, may call /v1
        out = secured.openai(key).completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert out.usage.completion_tokens >= 1
    raw = httpx.post(secured.url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert raw.status_code == 401 and raw.headers["www-authenticate"] == "Bearer"
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(secured.url + "/health").status_code == 200  # open unless health_needs_key
    assert httpx.get(secured.url + "/metrics").status_code == 200
    rejected = httpx.get(secured.url + "/metrics").text
    assert 'reason="unauthorized"' in rejected


def test_admin_routes_need_the_admin_key(secured):
    body = {"role": "prefill"}
    for key in (None, KEY, "sk-wrong"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        for method, path in (("POST", "/admin/instances"), ("GET", "/admin/autoscaler")):
            r = httpx.request(method, secured.url + path, json=body if method == "POST" else None, headers=headers)
            assert r.status_code == 401, (key, path, r.text)
    assert secured.added == []  # nothing was started
    admin = {"Authorization": f"Bearer {ADMIN}"}
    r = httpx.post(secured.url + "/admin/instances", json=body, headers=admin)
    assert r.status_code == 200 and r.json() == {"instance_id": "prefill-1"} and secured.added == [Role.PREFILL]
    assert httpx.get(secured.url + "/admin/autoscaler", headers=admin).json() == {"enabled": False}
    bad = httpx.post(secured.url + "/admin/instances", json={"role": "wizard"}, headers=admin)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "role"


def test_admin_routes_are_off_without_an_admin_key(checkpoint_dir):
    s = Secured(checkpoint_dir("llama"), ApiConfig())  # the embedded default: no key at all
    try:
        for key in (None, ADMIN):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            r = httpx.post(s.url + "/admin/instances", json={"role": "decode"}, headers=headers)
            assert r.status_code == 404 and "no admin key" in r.json()["error"]["message"]
        assert s.added == []
        assert s.openai(None).completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens
    finally:
        s.close()


LIMIT_CASES = [  # (path, body fields, status, param, what the message names)
    ("/v1/completions", {"n": 3}, 400, "n", "limit of 2 completions per prompt (api.max_n)"),
    ("/v1/completions", {"max_tokens": 33}, 400, "max_tokens", "limit of 32 output tokens (api.max_output_tokens)"),
    ("/v1/chat/completions", {"max_completion_tokens": 40}, 400, "max_completion_tokens", "api.max_output_tokens"),
    ("/v1/completions", {"stop": ["a", "b", "c"]}, 400, "stop", "limit of 2 stop strings (api.max_stop_strings)"),
    ("/v1/completions", {"logprobs": 4}, 400, "logprobs", "limit of 3 logprobs per token (api.max_logprobs)"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 5}, 400, "top_logprobs", "api.max_logprobs"),
    ("/v1/completions", {"prompt": "word " * 60}, 400, "prompt", "limit of 40 prompt tokens (api.max_prompt_tokens)"),
    ("/v1/completions", {"prompt": list(range(5, 50))}, 400, "prompt", "limit of 40 prompt tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 60}]}, 400, "messages",
     "api.max_prompt_tokens"),
    ("/v1/completions", {"prompt": "x" * 5000}, 413, "body", "limit of 4096 bytes (api.max_body_bytes)"),
]


@pytest.mark.parametrize("path, fields, status, param, named", LIMIT_CASES, ids=[c[3] + str(i) for i, c in enumerate(LIMIT_CASES)])
def test_each_configured_limit_is_refused_naming_the_field_and_the_limit(secured, path, fields, status, param, named):
    base = {"model": MODEL, **({"prompt": "hi"} if path == "/v1/completions" else
                                {"messages": [{"role": "user", "content": "hi"}]})}
    r = httpx.post(secured.url + path, json={**base, **fields}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and named in error["message"], error
    assert error["code"] == ("body_too_large" if status == 413 else "limit_exceeded")


def test_a_chunked_body_over_the_limit_is_cut_off(secured):
    def chunks():
        yield b'{"model": "tiny-llama", "prompt": "'
        for _ in range(100):
            yield b"x" * 100
        yield b'"}'

    r = httpx.post(secured.url + "/v1/completions", content=chunks(),
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 413 and "api.max_body_bytes" in r.json()["error"]["message"]


def test_at_the_limits_requests_are_served(secured):
    api = secured.openai(KEY)
    out = api.completions.create(model=MODEL, prompt=list(range(5, 45)), max_tokens=32, n=2, stop=["zz", "yy"],
                                 logprobs=3, extra_body={"ignore_eos": True})
    assert len(out.choices) == 2 and all(len(c.logprobs.tokens) == 32 for c in out.choices)


def test_keys_come_from_the_environment_and_a_mounted_secret_and_are_reloaded(tmp_path):
    secret = tmp_path / "api-keys"  # a Secret as Kubernetes mounts it: a file per data key, hidden ..data
    secret.mkdir()
    (secret / "keys").write_text("sk-file-1\n# a comment\n\nsk-file-2  # trailing\n")
    (secret / "..data").mkdir()
    api = ApiConfig(api_keys_file=str(secret), admin_keys_file=str(secret / "keys"), keys_reload_s=0.01)
    keys = load_api_keys(api, {"LLM_CLUSTER_API_KEYS": "sk-env-1, sk-env-2", "LLM_CLUSTER_ADMIN_KEYS": "sk-adm"})
    assert keys == ApiKeys(frozenset({"sk-file-1", "sk-file-2", "sk-env-1", "sk-env-2"}),
                           frozenset({"sk-file-1", "sk-file-2", "sk-adm"}))
    assert "sk-" not in repr(keys) and "sk-" not in repr(api)
    ring = KeyRing(api, loader=lambda: load_api_keys(api, {}))
    assert ring.allows("sk-file-2", "user") and not ring.allows("sk-file-3", "user") and not ring.allows(None, "user")
    time.sleep(0.02)
    (secret / "keys").write_text("sk-file-3\n")  # the Secret rotated
    ring.refresh()
    assert ring.allows("sk-file-3", "user") and not ring.allows("sk-file-1", "user")
    (secret / "keys").unlink()
    time.sleep(0.02)
    ring.refresh()  # mid-swap: the keys it had stay in force
    assert ring.allows("sk-file-3", "user")
    with pytest.raises(ConfigError, match="api_keys_file"):
        load_api_keys(ApiConfig(api_keys_file=str(tmp_path / "missing")), {})
    with pytest.raises(ConfigError, match="<hidden>") as info:
        ApiConfig(api_keys=("has space",))
    assert "has space" not in str(info.value)


def test_start_notes_say_who_can_reach_it():
    open_local = exposure_notes(ApiConfig(), KeyRing(ApiConfig(), loader=lambda: ApiKeys()))
    assert "no API key set" in open_local[0] and "loopback only" in open_local[0] and "admin routes (/admin/*) are off" in open_local[0]
    exposed = exposure_notes(ApiConfig(host="0.0.0.0"), KeyRing(ApiConfig(), loader=lambda: ApiKeys()))
    assert exposed[0].startswith("WARNING: no API key set") and "0.0.0.0:8000" in exposed[0]
    keyed = exposure_notes(ApiConfig(host="0.0.0.0"), KeyRing(ApiConfig(), loader=lambda: ApiKeys(frozenset({"k"}))))
    assert "1 key(s) in force" in keyed[0] and "WARNING" not in keyed[0]


def test_draining_refuses_new_requests_with_503_and_lets_one_in_flight_finish(checkpoint_dir):
    s = Secured(checkpoint_dir("llama"), ApiConfig())
    try:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
        events: list[str] = []

        def stream():
            with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as resp:
                events.extend(line[6:] for line in resp.iter_lines() if line.startswith("data: "))

        reader = threading.Thread(target=stream)
        reader.start()
        while not s.client._num_admitted():
            time.sleep(0.01)
        cut = {}
        drainer = threading.Thread(target=lambda: cut.setdefault("n", asyncio.run(s.app.state.server.drain(30))))
        drainer.start()
        time.sleep(0.1)
        refused = httpx.post(s.url + "/v1/completions", json={**body, "stream": False})
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "draining"
        health = httpx.get(s.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "draining"
        reader.join(60)
        drainer.join(60)
        assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        assert cut["n"] == 0
    finally:
        s.close()


def test_a_request_that_leaves_max_tokens_out_gets_the_ceiling_not_a_refusal(secured):
    api = secured.openai(KEY)
    chat = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == LIMITS["max_output_tokens"] and chat.choices[0].finish_reason == "length"
    out = api.completions.create(model=MODEL, prompt="hi", extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 16  # the protocol's default, under the ceiling


def test_an_admin_key_alone_guards_admin_routes_and_leaves_the_api_open():
    ring = KeyRing(ApiConfig(), loader=lambda: ApiKeys(admin=frozenset({ADMIN})))
    assert ring.open and ring.allows(ADMIN, "admin") and not ring.allows(KEY, "admin")
