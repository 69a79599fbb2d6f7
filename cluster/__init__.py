"""llm-cluster: a serving cluster for large language models. The map of the code (floors, a
request's state machine, the engine's KV boundary, where to add things) is docs/architecture.md.

A request's path through the cluster:
  (1) api/       an OpenAI-compatible HTTP server tokenizes and validates it; runtime/admission.py
                 refuses it (429) if it would queue past the configured wait or decode step;
  (2) disagg/    the router picks a prefill instance (queued tokens, prefix hits)
                 and a decode instance (free KV blocks, batch size); runtime/links.py makes the
                 pair's KV link on demand;
  (3) engine/    the prefill instance runs the prompt in chunks and returns the first token;
  (4) disagg/    its KV streams in groups of layers, handed by the engine to the prefill worker's
                 sink (engine/kv_boundary.py) as they are written, to blocks the decode instance reserved;
  (5) engine/    the decode instance adds the request to its continuous batch, and the router tells
                 the prefill instance it may free its copy;
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
