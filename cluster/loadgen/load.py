"""Load generator (`llm-cluster bench`): vLLM's `bench serve` against any OpenAI-compatible URL.

    llm-cluster bench --url http://127.0.0.1:8000/v1 --num-requests 200 --request-rate 4 \\
        --input-len 512 --output-len 128 --slo-ttft-ms 500 --slo-tpot-ms 50 --out results.json --plot-dir plots

  (1) the model is `--model`, else the first id of GET {url}/models;
  (2) the workload is built up front from `--seed`: each request's input and output length are
      uniform in [len * (1 - range_ratio), len * (1 + range_ratio)]; prompts are random token
      ids sent as `prompt: list[int]` (exact lengths) or random words (`--prompt-mode text`);
      `ignore_eos: true` makes every output exactly as long as asked;
  (3) arrival offsets are Poisson (exponential gaps of mean 1/R) or fixed (1/R apart) from a
      seeded generator; R = inf sends everything at once;
  (4) each request leaves at its offset, waits for a `--max-concurrency` slot, and streams
      (aiohttp, SSE); every content chunk is timestamped into a `RequestResult`; the run is
      bounded in count (`--num-requests`) and time: nothing is sent after `--duration-s`, and
      each request gives up after `--request-timeout-s`;
  (5) `report.summarize` turns the results into throughput, goodput and latency percentiles,
      printed as a table, written as JSON (`--out`, with the exact args) and plotted (`--plot-dir`);
  (6) `--sweep-rates 1,2,4` repeats (3)-(5) per rate on the same workload and adds goodput vs rate.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from enum import Enum

import numpy as np

from cluster.loadgen import report
from cluster.loadgen.report import RequestResult

# Words for `--prompt-mode text`: short and common, so that each is about one token in most vocabularies.
WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up "
         "other about out many then them these so some her would make like him into time has look two more write "
         "go see number no way could people my than first water been call who oil its now find long down day did "
         "get come made may part").split()


class Arrival(str, Enum):
    POISSON = "poisson"
    FIXED = "fixed"


class PromptMode(str, Enum):
    TOKENS = "tokens"
    TEXT = "text"


class Endpoint(str, Enum):
    COMPLETIONS = "completions"
    CHAT = "chat"


@dataclass(frozen=True)
class LoadConfig:
    """One benchmark run: where to send, what, and how fast."""

    url: str = "http://127.0.0.1:8000/v1"  # base URL of the OpenAI-compatible API
    model: str | None = None  # None: the first id of GET {url}/models
    endpoint: Endpoint = Endpoint.COMPLETIONS  # /completions, or /chat/completions (text prompts only)
    num_requests: int = 100  # requests in the run (fewer are sent if duration_s runs out first)
    request_rate: float = math.inf  # mean arrivals per second; inf sends all at once
    arrival: Arrival = Arrival.POISSON
    max_concurrency: int | None = None  # requests in flight at once; None: no cap
    duration_s: float = 600.0  # nothing is sent after this many seconds from the start
    request_timeout_s: float = 600.0  # one request's limit, from sending to its last byte
    input_len: int = 128  # prompt tokens (mean when range_ratio > 0)
    output_len: int = 64  # output tokens (mean when range_ratio > 0)
    range_ratio: float = 0.0  # lengths uniform in [len * (1 - ratio), len * (1 + ratio)]
    prompt_mode: PromptMode = PromptMode.TOKENS
    min_token_id: int = 100  # random prompt token ids are drawn from [min_token_id, max_token_id)
    max_token_id: int = 1000  # keep below the model's vocabulary size
    seed: int = 0  # seeds the workload and the arrivals
    slo_ttft_ms: float | None = None  # goodput SLO on time to first token; None: no bound
    slo_tpot_ms: float | None = None  # goodput SLO on time per output token; None: no bound
    continuous_usage: bool = True  # ask for usage in every chunk, to count tokens per chunk (see _StreamTimer)

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"LoadConfig.{name}={getattr(self, name)!r} {what}")

        need(self.url.startswith(("http://", "https://")), "url", "must be an http(s) URL")
        need(self.num_requests >= 1, "num_requests", "must be >= 1")
        need(self.request_rate > 0, "request_rate", "must be > 0 (inf: all at once)")
        need(self.max_concurrency is None or self.max_concurrency >= 1, "max_concurrency", "must be >= 1")
        need(0 < self.duration_s < math.inf, "duration_s", "must be > 0 and finite")
        need(0 < self.request_timeout_s < math.inf, "request_timeout_s", "must be > 0 and finite")
        need(self.input_len >= 1, "input_len", "must be >= 1")
        need(self.output_len >= 1, "output_len", "must be >= 1")
        need(0 <= self.range_ratio < 1, "range_ratio", "must be in [0, 1)")
        need(0 <= self.min_token_id < self.max_token_id, "max_token_id", "must be > min_token_id >= 0")
        need(self.endpoint is Endpoint.COMPLETIONS or self.prompt_mode is PromptMode.TEXT, "endpoint",
             "needs --prompt-mode text (chat messages cannot carry token ids)")
        for name in ("slo_ttft_ms", "slo_tpot_ms"):
            need(getattr(self, name) is None or getattr(self, name) > 0, name, "must be > 0")


@dataclass(frozen=True)
class RequestSpec:
    prompt: list[int] | str
    num_prompt_tokens: int  # exact for token ids, the number of words for text
    num_output_tokens: int


@dataclass
class LoadRun:
    """One run at one request rate: what was sent and how long it took."""

    config: LoadConfig
    results: list[RequestResult]  # one per request sent, in sending order
    duration_s: float  # from the first send to the last byte of the last request


def arrival_offsets_s(num_requests: int, request_rate: float, arrival: Arrival, seed: int) -> np.ndarray:
    """When each request leaves, in seconds from the start; the first leaves at 0."""
    if math.isinf(request_rate):
        return np.zeros(num_requests)
    if arrival is Arrival.FIXED:
        gaps_s = np.full(num_requests - 1, 1.0 / request_rate)
    else:
        gaps_s = np.random.default_rng([seed, 1]).exponential(1.0 / request_rate, num_requests - 1)
    return np.concatenate([[0.0], np.cumsum(gaps_s)])


def build_workload(config: LoadConfig) -> list[RequestSpec]:
    rng = np.random.default_rng([config.seed, 0])

    def lengths(mean: int) -> np.ndarray:
        low, high = max(1, int(mean * (1 - config.range_ratio))), int(mean * (1 + config.range_ratio))
        return rng.integers(low, max(low, high) + 1, config.num_requests)

    specs = []
    for num_in, num_out in zip(lengths(config.input_len), lengths(config.output_len)):
        if config.prompt_mode is PromptMode.TOKENS:
            prompt: list[int] | str = rng.integers(config.min_token_id, config.max_token_id, num_in).tolist()
        else:
            prompt = " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), num_in))
        specs.append(RequestSpec(prompt, int(num_in), int(num_out)))
    return specs


def request_body(config: LoadConfig, model: str, spec: RequestSpec) -> dict:
    stream_options = {"include_usage": True, **({"continuous_usage_stats": True} if config.continuous_usage else {})}
    body = {"model": model, "max_tokens": spec.num_output_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": stream_options}
    if config.endpoint is Endpoint.CHAT:
        return {**body, "messages": [{"role": "user", "content": spec.prompt}]}
    return {**body, "prompt": spec.prompt}


class _StreamTimer:
    """Timestamps the content chunks of one SSE stream into a RequestResult.

    A chunk's token count is the growth of its `usage.completion_tokens` when the server sends
    usage in every chunk (vLLM's `continuous_usage_stats`), else the length of its logprobs, else
    one per chunk with text. Tokens of chunks without text (a server may hold back a partial
    character) join the next content chunk, whose gap then counts as that many ITLs.
    """

    def __init__(self, result: RequestResult, sent_s: float):
        self.result, self.sent_s = result, sent_s
        self.last_s: float | None = None  # the previous content chunk
        self.num_counted = 0  # output tokens seen in chunks so far
        self.num_pending = 0  # tokens counted but not yet shown as text (they join the next content chunk)
        self.done = False

    def on_event(self, data: str, now_s: float) -> None:
        if data == "[DONE]":
            self.done = True
            return
        event = json.loads(data)
        if not isinstance(event, dict) or event.get("error") is not None:
            message = event.get("error", event) if isinstance(event, dict) else event
            raise ValueError(f"error event: {json.dumps(message)[:300]}")
        usage = event.get("usage") or {}
        choices = event.get("choices") or []
        if usage.get("prompt_tokens") is not None:
            self.result.num_prompt_tokens = usage["prompt_tokens"]
        if choices:
            self._on_choices(choices, usage, now_s)
        if usage.get("completion_tokens") is not None:
            self.result.num_output_tokens = usage["completion_tokens"]

    def _on_choices(self, choices: list[dict], usage: dict, now_s: float) -> None:
        text = "".join((c.get("text") or (c.get("delta") or {}).get("content") or "") for c in choices)
        if usage.get("completion_tokens") is not None:  # per-chunk usage (vLLM's continuous_usage_stats)
            num_new = usage["completion_tokens"] - self.num_counted
        else:
            num_new = sum(len((c.get("logprobs") or {}).get("tokens") or []) for c in choices) or int(bool(text))
        self.num_counted += num_new
        self.num_pending += num_new
        if not text and num_new <= 0:  # with usage per chunk, a token counts when it comes, text or not
            return
        if self.last_s is None:
            self.result.ttft_s = now_s - self.sent_s
        else:
            num_tokens = max(1, self.num_pending)  # a chunk of k tokens counts as k gaps of gap/k
            self.result.itl_s.extend([(now_s - self.last_s) / num_tokens] * num_tokens)
        self.last_s, self.num_pending = now_s, 0

    def finish(self, now_s: float) -> None:
        if not self.done:
            raise ValueError("stream ended without data: [DONE]")
        if self.last_s is None:
            raise ValueError("stream had no content")
        self.result.e2e_s = now_s - self.sent_s
        self.result.num_output_tokens = self.result.num_output_tokens or self.num_counted
        self.result.ok = True


async def send_one(session, url: str, body: dict, spec: RequestSpec, run_start_s: float) -> RequestResult:
    """Stream one request; failures end up in the result, never raised."""
    import aiohttp

    result = RequestResult(num_prompt_tokens=spec.num_prompt_tokens, num_output_tokens_asked=spec.num_output_tokens)
    sent_s = time.perf_counter()
    result.start_s = sent_s - run_start_s
    timer = _StreamTimer(result, sent_s)
    try:
        async with session.post(url, json=body) as resp:
            result.status = resp.status
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return result
            buffer = b""
            async for data in resp.content.iter_any():
                now_s = time.perf_counter()
                *lines, buffer = (buffer + data).split(b"\n")
                for line in lines:
                    line = line.rstrip(b"\r")
                    if line.startswith(b"data:"):
                        timer.on_event(line[5:].strip().decode(), now_s)
            timer.finish(time.perf_counter())
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, TypeError, KeyError, AttributeError) as exc:
        # ValueError: an error event or a broken stream; the last three: a malformed chunk
        result.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return result


async def resolve_model(session, url: str) -> str:
    import aiohttp

    try:
        async with session.get(f"{url}/models") as resp:
            if resp.status != 200:
                raise ValueError(f"GET {url}/models answered HTTP {resp.status}; pass --model")
            models = (await resp.json()).get("data") or []
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise ValueError(f"cannot reach {url}/models: {type(exc).__name__}: {exc}") from None
    if not models:
        raise ValueError(f"GET {url}/models lists no model; pass --model")
    return models[0]["id"]


async def run_load(session, config: LoadConfig, model: str, specs: list[RequestSpec]) -> LoadRun:
    """Send the workload on its arrival schedule."""
    url = f"{config.url}/{'chat/completions' if config.endpoint is Endpoint.CHAT else 'completions'}"
    offsets_s = arrival_offsets_s(len(specs), config.request_rate, config.arrival, config.seed)
    slots = asyncio.Semaphore(config.max_concurrency or len(specs))
    start_s = time.perf_counter()
    deadline_s = start_s + config.duration_s

    async def one(spec: RequestSpec) -> RequestResult | None:
        async with slots:
            if time.perf_counter() >= deadline_s:
                return None  # it waited for a slot past the run's end: never sent
            return await send_one(session, url, request_body(config, model, spec), spec, start_s)

    tasks = []
    for spec, offset_s in zip(specs, offsets_s):
        if offset_s >= config.duration_s:
            break
        delay_s = start_s + offset_s - time.perf_counter()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        tasks.append(asyncio.create_task(one(spec)))
    results = [r for r in await asyncio.gather(*tasks) if r is not None]
    return LoadRun(config, results, time.perf_counter() - start_s)


def rate_configs(config: LoadConfig, rates: list[float]) -> list[LoadConfig]:
    """One run's config per rate, each with a seed of its own (`config.seed` + its index): a run that
    sent the prompts of the run before would find their KV in the server's prefix cache and prefill
    nothing (2xH200, 2026-11-30: admitted 2k-token prompts came back in 32 ms, under one prefill)."""
    return [replace(config, request_rate=rate, seed=config.seed + i) for i, rate in enumerate(rates)]


async def run_rates(config: LoadConfig, rates: list[float]) -> tuple[str, list[LoadRun]]:
    """One run per rate, each on a workload of its own; returns the model's name and the runs."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=config.request_timeout_s)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        model = config.model or await resolve_model(session, config.url)
        runs = []
        for run_config in rate_configs(config, rates):
            specs = build_workload(run_config)
            print(f"bench: {model} at {run_config.request_rate} req/s: {len(specs)} requests to {config.url}",
                  file=sys.stderr)
            runs.append(await run_load(session, run_config, model, specs))
    return model, runs


# -- command line -----------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    d = LoadConfig()
    p.add_argument("--url", default=d.url, help="base URL of the OpenAI-compatible API, ending in /v1")
    p.add_argument("--model", default=None, help="model name (default: first id of GET {url}/models)")
    p.add_argument("--endpoint", choices=[e.value for e in Endpoint], default=d.endpoint.value)
    p.add_argument("--num-requests", type=int, default=d.num_requests)
    p.add_argument("--request-rate", type=float, default=d.request_rate, help="req/s; inf: all at once")
    p.add_argument("--arrival", choices=[a.value for a in Arrival], default=d.arrival.value)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--duration-s", type=float, default=d.duration_s, help="send nothing after this long")
    p.add_argument("--request-timeout-s", type=float, default=d.request_timeout_s)
    p.add_argument("--input-len", type=int, default=d.input_len)
    p.add_argument("--output-len", type=int, default=d.output_len)
    p.add_argument("--range-ratio", type=float, default=d.range_ratio)
    p.add_argument("--prompt-mode", choices=[m.value for m in PromptMode], default=d.prompt_mode.value)
    p.add_argument("--min-token-id", type=int, default=d.min_token_id)
    p.add_argument("--max-token-id", type=int, default=d.max_token_id, help="exclusive; below the vocab size")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--no-continuous-usage", dest="continuous_usage", action="store_false",
                   help="do not ask for usage in every chunk (for servers that reject stream_options."
                        "continuous_usage_stats); ITL then counts one token per content chunk")
    p.add_argument("--sweep-rates", default=None, help="comma-separated request rates, one run each (e.g. 1,2,4,inf)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--plot-dir", default=None, help="write latency_cdf.png (and goodput_vs_rate.png) here")


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    return LoadConfig(
        url=args.url.rstrip("/"), model=args.model, endpoint=Endpoint(args.endpoint), num_requests=args.num_requests,
        request_rate=args.request_rate, arrival=Arrival(args.arrival), max_concurrency=args.max_concurrency,
        duration_s=args.duration_s, request_timeout_s=args.request_timeout_s, input_len=args.input_len,
        output_len=args.output_len, range_ratio=args.range_ratio, prompt_mode=PromptMode(args.prompt_mode),
        min_token_id=args.min_token_id, max_token_id=args.max_token_id, seed=args.seed,
        slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms, continuous_usage=args.continuous_usage)


def _parse_rates(text: str) -> list[float]:
    try:
        return [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise ValueError(f"--sweep-rates={text!r} must be comma-separated numbers (or inf)") from None


def run(args: argparse.Namespace) -> int:
    """`llm-cluster bench`: 0 if any request completed, 1 if none did."""
    config = config_from_args(args)
    rates = _parse_rates(args.sweep_rates) if args.sweep_rates else [config.request_rate]
    for rate in rates:
        replace(config, request_rate=rate)  # validates each rate before anything is sent
    model, runs = asyncio.run(run_rates(config, rates))
    summaries = [report.summarize(r.results, r.duration_s, config.slo_ttft_ms, config.slo_tpot_ms) for r in runs]
    for r, summary in zip(runs, summaries):
        print(report.format_table(summary, f"{model} @ {r.config.request_rate} req/s"))
    if args.out:
        payload = {
            "args": {k: v for k, v in vars(args).items() if not callable(v)}, "model": model,
            "runs": [{"request_rate": r.config.request_rate, "summary": s, "requests": r.results}
                     for r, s in zip(runs, summaries)],
            "goodput_vs_rate": [{"request_rate": r, "goodput": s.goodput, "goodput_fraction": s.goodput_fraction,
                                 "request_throughput": s.request_throughput} for r, s in zip(rates, summaries)],
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report.to_jsonable(payload), f, indent=1, allow_nan=False)
    if args.plot_dir:
        report.plot_cdfs({f"{r.config.request_rate:g} req/s": r.results for r in runs},
                         os.path.join(args.plot_dir, "latency_cdf.png"))
        if args.sweep_rates:
            report.plot_sweep(rates, summaries, os.path.join(args.plot_dir, "goodput_vs_rate.png"))
    return 0 if any(s.num_completed for s in summaries) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.loadgen.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
