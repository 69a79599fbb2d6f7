"""The HTTP API's knobs (`api:` in the cluster YAML): where it listens, who may call it, the ceilings
each request is held to, admission past saturation, and how long a shutdown waits for requests.

Keys are secrets: `api_keys`/`admin_keys` never appear in a repr or an error message (an error names
the field and the rule, not the value). Most deployments leave them out of the YAML and give a file
(`api_keys_file`: a mounted Kubernetes Secret) or an environment variable (config/keys.py reads both).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from cluster.config.fields import _is_positive_number, _positive_int, _require

HIDDEN = "<hidden>"  # what an error message shows in place of a key
MAX_N = 128  # completions per prompt: OpenAI's most, and the protocol's (api/protocol.py)
MAX_LOGPROBS = 20  # the sampler keeps at most this many alternatives per token (types.SamplingParams)


def _check_keys(name: str, keys: object) -> tuple[str, ...]:
    ok = isinstance(keys, (list, tuple)) and all(isinstance(k, str) and k and not any(c.isspace() for c in k)
                                                 for k in keys)
    _require(ok, "ApiConfig", name, HIDDEN, "must be a list of non-empty keys without spaces")
    return tuple(keys)


@dataclass(frozen=True)
class ApiConfig:
    """The OpenAI-compatible HTTP server."""

    host: str = "127.0.0.1"  # bind address (0.0.0.0 only inside a container/pod)
    port: int = 8000
    max_pending: int = 256  # requests admitted at once; beyond it 429 with Retry-After
    # a request that would wait longer than this before its prefill starts (the prompt tokens queued on
    # the least loaded prefill or mixed instance, over that instance's measured prefill rate) gets 429
    # with Retry-After at once, instead of a TTFT past its SLO; set it to the TTFT target less a
    # prompt's prefill time. None: max_pending alone bounds admission
    max_queue_wait_s: float | None = None
    # requests are refused (429) as every decode (or mixed) instance's mean step time since its last
    # heartbeat nears this: none under 3/4 of it, all over it, a share in proportion between (one more
    # stream would slow them all past their TPOT target; set it a little under that target). None: no limit
    max_decode_step_ms: float | None = None
    served_model_name: str | None = None  # /v1/models id; None: the checkpoint directory's name
    # how long an idle client connection stays open (uvicorn's default is 5 s): a client that pools
    # connections may send on one just as the server closes it, and gets "Server disconnected" with no
    # response (once in 706 requests on 2xH200); longer than clients keep idle ones makes that rare
    keep_alive_s: float = 75.0

    # -- who may call it (api/auth.py): `Authorization: Bearer <key>`; no key anywhere: open --------
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # keys for /v1/*; prefer a file or LLM_CLUSTER_API_KEYS
    api_keys_file: str | None = None  # keys one a line, or a directory of such files (a mounted Secret)
    admin_keys: tuple[str, ...] = field(default=(), repr=False)  # keys for /admin/*, which are off without one
    admin_keys_file: str | None = None  # as api_keys_file; LLM_CLUSTER_ADMIN_KEYS also adds keys
    health_needs_key: bool = False  # /health behind the API keys (probes then need one: keep it open for kubelets)
    metrics_needs_key: bool = False  # /metrics behind the API keys (the scraper sends one as a bearer token)
    keys_reload_s: float = 10.0  # key files are read again this often (a rotated Secret takes effect)

    # -- ceilings every request is held to: 400 naming the field and the limit (api/limits.py) -----------
    max_body_bytes: int = 16 << 20  # request body (413 past it, before it is parsed)
    max_prompt_tokens: int | None = None  # tokens of one prompt (chat: the rendered messages); None: the context only
    max_output_tokens: int | None = None  # `max_tokens` / `max_completion_tokens`; None: the context only
    max_n: int = 128  # completions per prompt (OpenAI's own limit)
    max_stop_strings: int = 16  # `stop` strings per request
    max_logprobs: int = 20  # `logprobs` (completions) / `top_logprobs` (chat)

    # -- shutdown (api/graceful.py): SIGTERM stops admitting (503 + Retry-After), in-flight requests get this
    # long to finish, the rest end with an error; keep it under the pod's terminationGracePeriodSeconds
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        _require(isinstance(self.port, int) and 0 <= self.port < 65536, "ApiConfig", "port", self.port, "must be a port number")
        _positive_int("ApiConfig", "max_pending", self.max_pending)
        for name, unit in (("max_queue_wait_s", "seconds"), ("max_decode_step_ms", "milliseconds")):
            limit = getattr(self, name)
            _require(limit is None or _is_positive_number(limit),
                     "ApiConfig", name, limit, f"must be a number of {unit} > 0 (or unset)")
        for name in ("keep_alive_s", "keys_reload_s", "drain_timeout_s"):
            _require(_is_positive_number(getattr(self, name)), "ApiConfig", name, getattr(self, name), "must be > 0 seconds")
        object.__setattr__(self, "api_keys", _check_keys("api_keys", self.api_keys))
        object.__setattr__(self, "admin_keys", _check_keys("admin_keys", self.admin_keys))
        for name in ("api_keys_file", "admin_keys_file"):
            value = getattr(self, name)
            _require(value is None or (isinstance(value, str) and value), "ApiConfig", name, value, "must be a path (or unset)")
        for name in ("max_body_bytes", "max_stop_strings"):
            _positive_int("ApiConfig", name, getattr(self, name))
        _require(isinstance(self.max_n, int) and not isinstance(self.max_n, bool) and 1 <= self.max_n <= MAX_N,
                 "ApiConfig", "max_n", self.max_n, f"must be an integer in [1, {MAX_N}] (OpenAI's most)")
        for name in ("max_prompt_tokens", "max_output_tokens"):
            if getattr(self, name) is not None:
                _positive_int("ApiConfig", name, getattr(self, name))
        _require(isinstance(self.max_logprobs, int) and not isinstance(self.max_logprobs, bool)
                 and 0 <= self.max_logprobs <= MAX_LOGPROBS, "ApiConfig", "max_logprobs", self.max_logprobs,
                 f"must be an integer in [0, {MAX_LOGPROBS}] (the sampler's most)")

    @property
    def loopback(self) -> bool:
        """Bound to this machine only (nobody else can reach the port)."""
        return self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")
