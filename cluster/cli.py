"""`llm-cluster` command line.

  llm-cluster up [--config cluster.yaml]            start the cluster and its OpenAI API
  llm-cluster generate [--model DIR] "prompt" ...   complete prompts offline
  llm-cluster make-model --arch ARCH --out DIR ...  write a random HF checkpoint
  llm-cluster bench --url URL/v1 ...                load-test any OpenAI-compatible server
"""
from __future__ import annotations

import argparse
import sys


def _generate(args) -> int:
    from cluster import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, device=args.device)
    if args.model is None:
        print(f"(no --model given: using the tiny random model at {llm.engine.config.model.path})", file=sys.stderr)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    for prompt, out in zip(args.prompts, llm.generate(args.prompts, params)):
        print(f"{prompt}{out.outputs[0].text}")
    return 0


def _up(args) -> int:
    import asyncio

    from cluster.config import load_cluster_config

    overrides: dict = {}
    if args.model:
        overrides["engine"] = {"model": {"path": args.model}}
    if args.port is not None:
        overrides["api"] = {"port": args.port}
    config = load_cluster_config(args.config, overrides)
    if not config.engine.model.path:
        from dataclasses import replace

        from cluster.models.make import ensure_default_model

        print("no model configured: using the tiny random model (made once, cached)", file=sys.stderr)
        config = replace(config, engine=replace(config.engine, model=replace(config.engine.model, path=ensure_default_model())))
    from cluster.app import serve_cluster

    try:
        asyncio.run(serve_cluster(config))
    except KeyboardInterrupt:
        pass
    return 0


def _make_model(args) -> int:
    from cluster.models import make

    return make.run(args) or 0


def _bench(args) -> int:
    from cluster.loadgen import load

    return load.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-cluster", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the cluster (embedded default: local Ray, tiny model, 1 prefill + 1 decode on CPU)")
    up.add_argument("--config", default=None, help="cluster YAML (see examples/)")
    up.add_argument("--model", default=None, help="HF checkpoint directory (overrides the config)")
    up.add_argument("--port", type=int, default=None)
    up.set_defaults(func=_up)

    gen = sub.add_parser("generate", help="complete prompts with one in-process engine")
    gen.add_argument("prompts", nargs="+")
    gen.add_argument("--model", default=None, help="HF checkpoint directory (default: a tiny random model made once)")
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--device", default="auto")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=_generate)

    mk = sub.add_parser("make-model", help="write a random checkpoint in Hugging Face format")
    from cluster.models import make

    make.add_arguments(mk)
    mk.set_defaults(func=_make_model)

    bench = sub.add_parser("bench", help="load-test an OpenAI-compatible URL: latency percentiles, goodput, plots")
    from cluster.loadgen import load

    load.add_arguments(bench)
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"llm-cluster: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
