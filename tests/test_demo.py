"""Tests for the tiny offline Qwen3 demo checkpoint (so8t_export.demo)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from so8t_export import demo

# sha256 of Qwen/Qwen3-4B-Thinking-2507's tokenizer_config.json `chat_template` (see demo.py header).
CHAT_TEMPLATE_SHA256 = "3802169b2a02b81e6adb7ab4f64f91ff02db753c8c3a64a01c35192d3a61d8d7"

ROUND_TRIP_TEXTS = {
    "ascii": "The quick brown fox jumps over the lazy dog. It's 42, isn't it?",
    "cjk": "你好，世界！人工智能。こんにちは、世界。안녕하세요",
    "emoji": "I love pizza 🍕 and 🚀✨🔥 👍🏽 ❤️ 🇯🇵 (zwj: 👨‍👩‍👧)",
    "code": "def f(x):\n\tif x > 0:\n        return {'k': [1, 2]}\r\n    return None  # done\n\n\n",
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    "<|im_start|>assistant\n<think>\nok\n</think>\n\nhello<|im_end|><|endoftext|>",
    "unseen": "Ωμέγα ñandú Ünïcödé \u00a0nbsp  two  spaces \x00\x7f",
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return demo.write_tiny_qwen3(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def hf_tok(ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt)


# ---------------------------------------------------------------------------------------------------- template


def test_chat_template_is_the_pinned_thinking_template():
    assert hashlib.sha256(demo.CHAT_TEMPLATE.encode("utf-8")).hexdigest() == CHAT_TEMPLATE_SHA256
    assert demo.CHAT_TEMPLATE.endswith("{{- '<|im_start|>assistant\\n<think>\\n' }}\n{%- endif %}")
    assert "enable_thinking" not in demo.CHAT_TEMPLATE  # the 2507 Thinking template always thinks


def test_apply_chat_template(hf_tok):
    assert hf_tok.chat_template == demo.CHAT_TEMPLATE
    text = hf_tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    # History: the earlier assistant turn loses its reasoning, the final one keeps it.
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "<think>\nr1\n</think>\n\na1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2", "reasoning_content": "r2"},
    ]
    assert hf_tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"
        "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n<think>\nr2\n</think>\n\na2<|im_end|>\n"
    )


# --------------------------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("kind", sorted(ROUND_TRIP_TEXTS))
def test_round_trip(hf_tok, ckpt, kind):
    text = ROUND_TRIP_TEXTS[kind]
    ids = hf_tok.encode(text)
    assert hf_tok.decode(ids) == text
    # transformers rebuilds the Qwen2 pipeline from vocab/merges; it must agree with tokenizer.json itself,
    # which is what the GGUF export (pre = qwen2) reproduces.
    raw = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    assert raw.encode(text).ids == ids
    assert raw.decode(ids, skip_special_tokens=False) == text


def test_added_tokens(hf_tok, ckpt):
    tj = json.loads((ckpt / "tokenizer.json").read_text(encoding="utf-8"))
    n_bpe = len(tj["model"]["vocab"])
    assert n_bpe == 256 + len(tj["model"]["merges"])
    assert 300 <= len(tj["model"]["merges"]) <= 600
    added = [(a["id"], a["content"], a["special"]) for a in tj["added_tokens"]]
    names = demo.SPECIAL_TOKENS + demo.PLAIN_ADDED_TOKENS
    assert [a[0] for a in added] == list(range(n_bpe, n_bpe + len(names)))
    assert [a[1] for a in added] == names
    assert [a[2] for a in added] == [t in demo.SPECIAL_TOKENS for t in names]
    for t in names:
        assert hf_tok.encode(t) == [hf_tok.convert_tokens_to_ids(t)]
    assert len(hf_tok) == n_bpe + len(names)
    assert (
        hf_tok.eos_token == "<|im_end|>" and hf_tok.pad_token == "<|endoftext|>" and hf_tok.bos_token is None
    )
    # The first 256 ids are the byte symbols, in GPT-2 bytes_to_unicode order like Qwen ("!" = 0).
    assert tj["model"]["vocab"]["!"] == 0 and tj["model"]["vocab"]["Ġ"] == 220


def test_tokenizer_matches_qwen2_spec(ckpt):
    tj = json.loads((ckpt / "tokenizer.json").read_text(encoding="utf-8"))
    assert tj["normalizer"] == {"type": "NFC"}
    split, bl = tj["pre_tokenizer"]["pretokenizers"]
    assert split["pattern"]["Regex"] == demo.QWEN2_PATTERN
    assert (split["behavior"], split["invert"]) == ("Isolated", False)
    assert (bl["type"], bl["add_prefix_space"], bl["use_regex"]) == ("ByteLevel", False, False)
    assert tj["decoder"]["type"] == "ByteLevel"
    m = tj["model"]
    assert (m["type"], m["dropout"], m["unk_token"], m["byte_fallback"]) == ("BPE", None, None, False)
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer" and cfg["add_bos_token"] is False
    assert cfg["chat_template"] == demo.CHAT_TEMPLATE


# ------------------------------------------------------------------------------------------------------- model


def test_config(ckpt, hf_tok):
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg == demo.tiny_qwen3_config()
    assert cfg["vocab_size"] % 64 == 0 and cfg["vocab_size"] > len(hf_tok)
    assert cfg["eos_token_id"] == hf_tok.convert_tokens_to_ids("<|im_end|>")
    assert cfg["bos_token_id"] == cfg["pad_token_id"] == hf_tok.convert_tokens_to_ids("<|endoftext|>")
    assert cfg["rope_theta"] == 5e6 and cfg["head_dim"] * cfg["num_attention_heads"] == 256
    assert demo.tiny_qwen3_config(num_hidden_layers=3)["num_hidden_layers"] == 3


def test_loads_with_transformers(ckpt, hf_tok):
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(ckpt).eval()
    assert model.config.vocab_size == demo.tiny_qwen3_config()["vocab_size"]
    prompt = hf_tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([hf_tok.encode(prompt)])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    # Norm gains far from 1, so that a rotation on the wrong side of a norm changes the function (issue 12).
    gains = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith("norm.weight")])
    assert demo.NORM_GAIN_LOW <= gains.min() and gains.max() < demo.NORM_GAIN_HIGH and gains.std() > 0.3


def test_sharpness(ckpt, tmp_path):
    sharp = demo.mean_max_prob(ckpt)
    assert 0.9 <= sharp <= 0.99, sharp  # 0.966 measured on seed 0
    flat = demo.mean_max_prob(demo.write_tiny_qwen3(tmp_path / "flat", seed=0, sharp=False))
    assert flat < 0.005, flat  # 0.0026 measured: uniform over ~400 tokens


def test_sharded_write(ckpt, tmp_path):
    from transformers import Qwen3ForCausalLM

    out = demo.write_tiny_qwen3(tmp_path / "sharded", seed=0, shards=3)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        single = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert set(index["weight_map"]) == set(single)  # same tensors, tied lm_head omitted in both
    assert "lm_head.weight" not in single
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        a = Qwen3ForCausalLM.from_pretrained(ckpt)(ids).logits
        b = Qwen3ForCausalLM.from_pretrained(out)(ids).logits
    assert torch.equal(a, b)


def test_deterministic(ckpt, tmp_path):
    rng = torch.get_rng_state()
    again = demo.write_tiny_qwen3(tmp_path / "again", seed=0)
    assert torch.equal(torch.get_rng_state(), rng), "write_tiny_qwen3 must not touch the global RNG"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (ckpt / name).read_bytes() == (again / name).read_bytes(), name
    other = demo.write_tiny_qwen3(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (ckpt / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()


def test_bf16(tmp_path):
    out = demo.write_tiny_qwen3(tmp_path / "bf16", seed=0, dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert dtypes == {"BF16"}
    assert 0.9 <= demo.mean_max_prob(out) <= 0.99  # 0.966 measured on seed 0 in float32
