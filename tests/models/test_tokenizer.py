"""The serving tokenizer equals transformers' on our checkpoints; streaming text equals decode()."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.models.make import make_model
from cluster.models.tokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer, Tokenizer, find_stop

transformers = pytest.importorskip("transformers")

TEXTS = (
    "", " ", "Hello world", "  leading and trailing  ", "tabs\tand\nnewlines\r\n", "The café's crème brûlée, naïve façade.",
    "Straße Müller Ångström Dvořák Łódź", "今天天气很好，我们去公园散步吧。", "東京の夜景はとてもきれいです。", "안녕하세요",
    "🙂🚀 emoji 👩‍💻 zwj 🇫🇷 flags", "مرحبا بالعالم", "def f(x):\n    return x ** 2  # comment", "3.14159 1,234,567 €42",
    "<|im_start|>user\nhi<|im_end|>", "text <|end_of_text|> more <|begin_of_text|>", "<|im_start", "a" * 500,
    "\u0000\u0001 control \u200b zero-width", "unknown-ish ☃ ♞ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "Ελπίζω να περάσετε", "नमस्ते",
)
CONVERSATIONS = (
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo 你好 🙂"},
     {"role": "assistant", "content": "Hi there", "tool_calls": None}, {"role": "user", "content": "  spaces  \n"}],
    [{"role": "user", "content": "<|im_end|> injected"}],
)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_model("llama", str(tmp_path_factory.mktemp("tok") / "m"), num_layers=1, hidden_size=32, num_heads=2,
                      num_kv_heads=1, intermediate_size=32, progress=False)


@pytest.fixture(scope="session")
def tok(model_dir: str) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="session")
def hf(model_dir: str):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def partial_utf8_ids(tok: Tokenizer) -> list[int]:
    """Ids whose own decode is not whole characters (single bytes of multi-byte UTF-8 and the like)."""
    ids = [i for i in range(tok.vocab_size) if REPLACEMENT_CHAR in tok.decode([i])]
    assert len(ids) > 50
    return ids


def test_encode_equals_transformers(tok: Tokenizer, hf) -> None:
    for text in TEXTS:
        for special in (True, False):
            assert tok.encode(text, add_special_tokens=special) == hf(text, add_special_tokens=special)["input_ids"], text
    assert tok.encode("hi")[0] == tok.bos_token_id == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60))
def test_encode_and_decode_round_trip_like_transformers(tok: Tokenizer, hf, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf(text)["input_ids"]
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids[1:], skip_special_tokens=False) == text  # text may hold special tokens' strings


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_decode_of_any_ids_equals_transformers(tok: Tokenizer, hf, partial_utf8_ids: list[int], data) -> None:
    ids = data.draw(st.lists(st.one_of(st.integers(0, tok.vocab_size - 1), st.sampled_from(partial_utf8_ids)), max_size=40))
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_special_ids_and_sizes(tok: Tokenizer, hf) -> None:
    assert tok.vocab_size == len(hf) == 1024
    assert tok.all_special_ids == set(hf.all_special_ids) == {0, 1, 2, 3, 4}
    assert tok.eos_token_ids == {1, 3}  # <|end_of_text|> and, from generation_config.json, <|im_end|>
    assert tok.bos_token_id == hf.bos_token_id


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_transformers(tok: Tokenizer, hf, add_generation_prompt: bool) -> None:
    for messages in CONVERSATIONS:
        ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.startswith("<|begin_of_text|><|im_start|>")


def test_chat_template_sources_and_errors(tmp_path, model_dir: str, tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="Unknown role"):
        tok.apply_chat_template([{"role": "wizard", "content": "x"}])
    copy = str(tmp_path / "copy")
    shutil.copytree(model_dir, copy)
    template = Path(copy, "chat_template.jinja").read_text(encoding="utf-8")
    os.remove(os.path.join(copy, "chat_template.jinja"))
    with pytest.raises(ValueError, match="has no chat template"):
        Tokenizer.from_dir(copy).apply_chat_template(CONVERSATIONS[0])
    config_path = Path(copy, "tokenizer_config.json")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    expected = tok.apply_chat_template(CONVERSATIONS[1])
    for entry in (template, [{"name": "tool_use", "template": "x"}, {"name": "default", "template": template}]):
        config_path.write_text(json.dumps({**config, "chat_template": entry}), encoding="utf-8")
        assert Tokenizer.from_dir(copy).apply_chat_template(CONVERSATIONS[1]) == expected
    probe = "{{ strftime_now('%Y') | length }}{{ messages | tojson }}{% generation %}!{% endgeneration %}"
    config_path.write_text(json.dumps({**config, "chat_template": probe}), encoding="utf-8")
    assert Tokenizer.from_dir(copy).apply_chat_template([{"role": "user", "content": "é"}]) == '4[{"role": "user", "content": "é"}]!'


def _stream(tok: Tokenizer, ids: list[int], chunks: list[int], prompt: list[int], skip: bool) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_token_ids=prompt, skip_special_tokens=skip)
    deltas, pos = [], 0
    for size in chunks:
        deltas.append(detok.push(ids[pos:pos + size]))
        pos += size
    deltas.append(detok.push(ids[pos:]))
    return deltas + [detok.flush()]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_incremental_deltas_concatenate_to_decode(tok: Tokenizer, partial_utf8_ids: list[int], data) -> None:
    token = st.one_of(st.integers(0, tok.vocab_size - 1), st.sampled_from(partial_utf8_ids), st.integers(0, 4))
    ids = data.draw(st.lists(token, max_size=40))
    prompt = data.draw(st.lists(token, max_size=6))
    chunks = data.draw(st.lists(st.integers(0, 3), max_size=20))
    skip = data.draw(st.booleans())
    assert "".join(_stream(tok, ids, chunks, prompt, skip)) == tok.decode(ids, skip_special_tokens=skip)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40), prompt=st.text(max_size=10))
def test_streaming_real_text_never_emits_half_a_character(tok: Tokenizer, text: str, prompt: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    deltas = _stream(tok, ids, [1] * len(ids), tok.encode(prompt), skip=False)
    assert "".join(deltas) == text
    assert not any(REPLACEMENT_CHAR in delta for delta in deltas if REPLACEMENT_CHAR not in text)


def test_incremental_decode_work_stays_small(tok: Tokenizer, monkeypatch) -> None:
    ids = tok.encode("今天天气很好 🙂 The café at dawn. " * 60, add_special_tokens=False)
    decoded_lengths: list[int] = []
    real_decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda i, **kw: decoded_lengths.append(len(i)) or real_decode(i, **kw))
    detok = IncrementalDetokenizer(tok, prompt_token_ids=tok.encode("prompt"))
    text = "".join(detok.push([token_id]) for token_id in ids) + detok.flush()
    assert len(ids) > 500 and text == real_decode(ids)
    assert max(decoded_lengths) <= 12  # a sliding window, not the whole output


def test_find_stop() -> None:
    assert find_stop("hello world", ("wor", "o"), 0) == (4, "o")
    assert find_stop("hello world", ("world", "lo w"), 0) == (3, "lo w")
    assert find_stop("hello world", ("xyz",), 0) is None
    assert find_stop("hello world", (), 0) is None and find_stop("abc", ("",), 0) is None
    # text[:8] was searched already; "wor" straddles 8 and is found, a match wholly before start is not new
    assert find_stop("hello world", ("wor",), 8) == (6, "wor")
    assert find_stop("ab STOP cd STOP", ("STOP",), 12) == (11, "STOP")
    assert find_stop("same place", ("same", "sam"), 0) == (0, "same")
