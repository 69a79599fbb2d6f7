"""llm-cluster: a serving cluster for large language models.

A request's path through the cluster:
  (1) api/       an OpenAI-compatible HTTP server tokenizes, validates and admits it;
  (2) disagg/    the router picks a prefill instance (queued tokens, prefix hits)
                 and a decode instance (free KV blocks, batch size);
  (3) engine/    the prefill instance runs the prompt in chunks and returns the first token;
  (4) disagg/    its KV streams layer by layer to blocks the decode instance reserved;
  (5) engine/    the decode instance adds the request to its continuous batch;
  (6) api/       tokens stream back to the client.
Offline, `LLM` runs one engine in-process (stages 3 and 5 in one instance).
"""
from cluster.types import CompletionOutput, FinishReason, RequestOutput, Role, SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "FinishReason", "Role"]


def __getattr__(name: str):
    if name == "LLM":  # imported lazily: `import cluster` must not load torch
        from cluster.llm import LLM

        return LLM
    raise AttributeError(name)
