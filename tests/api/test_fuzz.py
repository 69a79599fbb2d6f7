"""schemathesis against the API's own OpenAPI document (`/openapi.json`, api/openapi.py): a real
uvicorn on 127.0.0.1 over a LocalEngineClient (tiny llama, CPU), keys and ceilings set as a
deployment would set them. For every operation, a bounded number of generated requests, valid and
not: no 5xx, every answer's status, content type, headers and body conform to the document, bad
input is refused with 4xx, and a route that needs a key refuses a call without one.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from cluster.config import ApiConfig
from tests.api.test_hardening import ADMIN, KEY, Secured

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the test extras: make install-test")

MAX_EXAMPLES = 50  # per operation and phase: the whole test stays well under two minutes on 2 CPU cores
FUZZ_LIMITS = dict(max_prompt_tokens=64, max_output_tokens=8, max_n=2, max_stop_strings=4, max_logprobs=2,
                   max_body_bytes=64 << 10)


@pytest.fixture(scope="module")
def fuzzed(checkpoint_dir):
    s = Secured(checkpoint_dir("llama"), ApiConfig(api_keys=(KEY,), admin_keys=(ADMIN,), max_pending=32,
                                                   **FUZZ_LIMITS))
    yield s
    s.close()


@pytest.fixture(scope="module")
def api_schema(fuzzed):
    config = schemathesis.Config()
    config.projects.default.generation.update(max_examples=MAX_EXAMPLES, deterministic=True, database="none",
                                               modes=list(schemathesis.GenerationMode))
    return schemathesis.openapi.from_url(fuzzed.url + "/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("api_schema")
# a request the document calls valid may still be refused with 400: whether it fits depends on what
# a schema cannot say (its prompt's token count once tokenized against the context and
# api.max_prompt_tokens, `best_of` equal to `n`, a chat the model's template can render)
EXCLUDED = [schemathesis.checks.positive_data_acceptance]


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_every_answer_conforms_and_none_is_a_server_error(case, fuzzed):
    key = ADMIN if case.path.startswith("/admin/") else KEY
    case.call_and_validate(headers={"Authorization": f"Bearer {key}"}, timeout=60, excluded_checks=EXCLUDED)
