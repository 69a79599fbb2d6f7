"""The chaos run's clients: `openai` streams whose own records say what happened to each request.

  (1) `SteadyLoad`: `num_clients` threads, each streaming one completion after another (a prompt of
      token ids: a shared prefix, so the prefix index has something to hold, and a tail of its own),
      `ignore_eos` so a whole answer is exactly `max_tokens` tokens; bounded by `max_requests` per
      client and by `stop()`;
  (2) `burst(n)`: n requests at once, one attempt each (the 10x overload);
  (3) every request is a `Record`: when it started and ended, its attempts, and how it ended:
        completed    finish_reason `length` and all `max_tokens` tokens (usage)
        clear_error  an HTTP status with an OpenAI error body (429/503 and the like), or an error
                     event in the stream: the client knows, and may retry after Retry-After
        hung         no byte for `timeout_s` (the client gave up), or still open when the run ended
        lost         anything else: a stream cut short with no error, a dropped connection
      a 429/503 or an error event is retried (at most `max_attempts`, after Retry-After, capped);
  (4) `summarize(records, t_fault, t_end)`: one fault's figures from the requests in flight at the
      fault or started before `t_end`.
"""
from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

RETRYABLE = (429, 503)
MAX_RETRY_WAIT_S = 2.0


@dataclass
class Record:
    kind: str  # "steady" or "burst"
    t_start: float
    t_end: float | None = None
    attempts: int = 0
    outcome: str | None = None  # completed | clear_error | hung | lost
    status: int | None = None  # the last attempt's HTTP status (None: a stream error event or no answer)
    error: str | None = None
    tokens: int = 0

    @property
    def retried(self) -> bool:
        return self.attempts > 1


@dataclass
class LoadSpec:
    model: str
    url: str  # .../v1
    max_tokens: int = 48
    prompt_tokens: tuple[int, int] = (64, 600)  # tail length range, after the shared prefix
    shared_prefix: list[int] = field(default_factory=lambda: [11 + (7 * i) % 900 for i in range(64)])
    timeout_s: float = 60.0
    max_attempts: int = 3


def one_request(spec: LoadSpec, record: Record, rng: random.Random, attempts: int) -> None:
    """(3): up to `attempts` tries; fills `record` (never raises)."""
    import openai

    client = openai.OpenAI(base_url=spec.url, api_key="none", max_retries=0, timeout=spec.timeout_s)
    tail = [rng.randrange(10, 1000) for _ in range(rng.randint(*spec.prompt_tokens))]
    while True:
        record.attempts += 1
        wait_s = _attempt(client, spec, spec.shared_prefix + tail, record)
        if wait_s is None or record.attempts >= attempts:
            break
        time.sleep(wait_s)
    record.t_end = time.monotonic()


def _attempt(client, spec: LoadSpec, prompt: list[int], record: Record) -> float | None:
    """One try; returns how long to wait before retrying, or None when the request has its outcome."""
    import openai

    finish, tokens = None, 0
    try:
        stream = client.completions.create(model=spec.model, prompt=prompt, max_tokens=spec.max_tokens, stream=True,
                                           temperature=0.0, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        record.status, record.tokens = 200, tokens
        whole = finish == "length" and tokens == spec.max_tokens
        record.outcome, record.error = ("completed", None) if whole else ("lost", f"finish={finish} tokens={tokens}")
        return None
    except openai.APITimeoutError as exc:
        record.outcome, record.error = "hung", repr(exc)
        return None
    except openai.APIStatusError as exc:
        record.status, record.error = exc.status_code, _message(exc.body)
        record.outcome = "clear_error" if record.error else "lost"
        if exc.status_code in RETRYABLE:
            return min(float(exc.response.headers.get("retry-after", 1)), MAX_RETRY_WAIT_S)
        return None
    except openai.APIConnectionError as exc:
        record.outcome, record.error = "lost", repr(exc)
        return None
    except openai.APIError as exc:  # an error event inside the stream: the body says what failed
        record.status, record.error = None, _message(exc.body)
        record.outcome = "clear_error" if record.error else "lost"
        return 0.2


def _message(body) -> str | None:
    if isinstance(body, dict):
        inner = body.get("error", body)
        return inner.get("message") if isinstance(inner, dict) else None
    return None


class SteadyLoad:
    """(1): started with `start()`, ended with `stop()` (which waits, bounded, for the clients)."""

    def __init__(self, spec: LoadSpec, num_clients: int, max_requests: int, seed: int = 0):
        self.spec = spec
        self.records: list[Record] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i, max_requests, seed), daemon=True)
                         for i in range(num_clients)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def _client(self, index: int, max_requests: int, seed: int) -> None:
        rng = random.Random(seed * 1000 + index)
        for _ in range(max_requests):
            if self._stop.is_set():
                return
            record = Record("steady", time.monotonic())
            self.records.append(record)
            one_request(self.spec, record, rng, self.spec.max_attempts)

    def in_flight(self) -> int:
        return sum(1 for r in self.records if r.t_end is None)

    def stop(self, timeout_s: float) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        close_open(self.records)


def burst(spec: LoadSpec, num_requests: int, timeout_s: float) -> list[Record]:
    """(2): `num_requests` at once, one attempt each; returns once all have ended (or `timeout_s`)."""
    records = [Record("burst", time.monotonic()) for _ in range(num_requests)]
    threads = [threading.Thread(target=one_request, args=(spec, r, random.Random(i), 1), daemon=True)
               for i, r in enumerate(records)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    close_open(records)
    return records


def close_open(records: list[Record]) -> None:
    """Whatever is still open now counts as hung."""
    now = time.monotonic()
    for r in records:
        if r.t_end is None:
            r.outcome, r.t_end = "hung", now


def summarize(records: list[Record], t_fault: float, t_end: float) -> dict:
    """(4): the requests in flight at `t_fault`, or started in [t_fault, t_end)."""
    hit = [r for r in records if r.t_start < t_end and (r.t_end is None or r.t_end > t_fault)]
    at_fault = [r for r in hit if r.t_start <= t_fault]
    outcomes = Counter(r.outcome or "hung" for r in hit)
    ends = [r.t_end - t_fault for r in at_fault if r.t_end is not None]
    return {
        "requests": len(hit), "in_flight_at_fault": len(at_fault),
        "completed": outcomes["completed"], "retried": sum(r.retried for r in hit),
        "retried_and_completed": sum(r.retried and r.outcome == "completed" for r in hit),
        "clear_errors": outcomes["clear_error"],
        "clear_error_statuses": dict(Counter(str(r.status or "stream") for r in hit if r.outcome == "clear_error")),
        "hung": outcomes["hung"], "lost": outcomes["lost"],
        "worst_time_to_end_s": round(max(ends), 3) if ends else None,
        "worst_duration_s": round(max((r.t_end or t_end) - r.t_start for r in hit), 3) if hit else None,
        "examples": {k: [asdict(r) for r in hit if r.outcome == k][:3] for k in ("clear_error", "lost", "hung")},
    }
