"""The demo model's few seconds of training (demo.train_tiny_lm) and the data shipped in so8t_export/demo_data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from so8t_export import demo

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = None

# Enough steps to move the loss far from the sharp init's ~47, few enough to run in about a second.
STEPS = 20

LABELS = {"safety": {"safe", "unsafe"}, "authority": {"handle", "escalate"}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict, Path]:
    """(a checkpoint trained with seed 0, its report, an untrained copy of it)."""
    root = tmp_path_factory.mktemp("lm")
    untrained = demo.write_tiny_qwen3(root / "untrained")
    ckpt = demo.write_tiny_qwen3(root / "a")
    report = demo.train_tiny_lm(ckpt, steps=STEPS, seed=0)
    return ckpt, report, untrained


def _prompt_text(row: dict) -> str:
    return row["text"] if "text" in row else row["messages"][-1]["content"]


# ------------------------------------------------------------------------------------------------- training


def test_training_lowers_the_loss(trained):
    _, report, _ = trained
    assert report["steps"] == STEPS
    assert report["seconds"] > 0
    assert report["initial_loss"] > 20  # the sharp random init is confidently wrong
    assert report["final_loss"] < report["initial_loss"] / 3
    assert report["examples"] > 300 and report["target_tokens"] > 5000


def test_training_is_deterministic(trained, tmp_path):
    ckpt, _, _ = trained
    again = demo.write_tiny_qwen3(tmp_path / "again")
    demo.train_tiny_lm(again, steps=STEPS, seed=0)
    assert (again / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
    other = demo.write_tiny_qwen3(tmp_path / "other")
    demo.train_tiny_lm(other, steps=STEPS, seed=1)
    assert (other / "model.safetensors").read_bytes() != (ckpt / "model.safetensors").read_bytes()


def test_training_keeps_the_checkpoint_layout(trained):
    import torch
    from safetensors import safe_open
    from transformers import Qwen3ForCausalLM

    ckpt, _, untrained = trained
    # Config, generation config and tokenizer files are the untrained checkpoint's, byte for byte.
    for name in sorted(p.name for p in untrained.iterdir() if p.suffix != ".safetensors"):
        assert (ckpt / name).read_bytes() == (untrained / name).read_bytes(), name
    assert sorted(p.name for p in ckpt.glob("*.safetensors")) == ["model.safetensors"]
    with safe_open(str(ckpt / "model.safetensors"), "pt") as new, \
            safe_open(str(untrained / "model.safetensors"), "pt") as old:
        assert sorted(new.keys()) == sorted(old.keys())
        # every weight moved (all of them are trained, norms included)
        assert all(not torch.equal(new.get_tensor(k), old.get_tensor(k)) for k in new.keys())
    model = Qwen3ForCausalLM.from_pretrained(ckpt)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_sharded_bf16_checkpoint_comes_back_as_one_bf16_file(tmp_path):
    import torch
    from safetensors import safe_open

    ckpt = demo.write_tiny_qwen3(tmp_path / "sharded", shards=3, dtype=torch.bfloat16)
    demo.train_tiny_lm(ckpt, steps=2)
    assert sorted(p.name for p in ckpt.glob("model*")) == ["model.safetensors"]
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_bad_arguments_are_one_line_errors(tmp_path):
    ckpt = demo.write_tiny_qwen3(tmp_path / "c")
    with pytest.raises(ValueError, match="steps"):
        demo.train_tiny_lm(ckpt, steps=0)


def test_the_training_text_is_what_generation_sees(trained):
    """The target of a conversation starts right after the generation prompt (``<think>\\n``)."""
    from transformers import AutoTokenizer

    ckpt, _, _ = trained
    tok = AutoTokenizer.from_pretrained(ckpt)
    conv = demo.read_jsonl(demo.LM_CORPUS)[0]
    [(ids, n_prompt)] = demo._lm_examples(tok, [conv], [])
    prompt = tok.apply_chat_template(conv["messages"][:1], tokenize=False, add_generation_prompt=True)
    assert tok.decode(ids[:n_prompt]) == prompt and prompt.endswith("<|im_start|>assistant\n<think>\n")
    reply = conv["messages"][1]
    assert tok.decode(ids[n_prompt:]) == f"{reply['reasoning_content']}\n</think>\n\n{reply['content']}<|im_end|>\n"


# ----------------------------------------------------------------------------------------------------- data


def test_lm_corpus_parses():
    rows = demo.read_jsonl(demo.LM_CORPUS)
    assert 60 <= len(rows) <= 150
    for row in rows:
        *prompt, reply = row["messages"]
        assert [m["role"] for m in prompt] in (["user"], ["system", "user"])
        assert reply["role"] == "assistant" and reply["reasoning_content"] and reply["content"]
        # every reasoning opens with the first word of one of the heads' openings, so that both sources teach
        # the same decision at the last prompt token
        first_words = {opening.split()[0] for opening in demo.OPENINGS.values()}
        assert reply["reasoning_content"].split()[0] in first_words, reply["reasoning_content"]


@pytest.mark.parametrize("path", [demo.HEADS_TRAIN, demo.HEADS_EVAL], ids=lambda p: p.name)
def test_heads_data_parses(path):
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for n, line in enumerate(lines, 1):
        row = json.loads(line)
        assert ("messages" in row) != ("text" in row), (path.name, n)
        assert set(row) - {"messages", "text", "response"} <= set(LABELS), (path.name, n)
        if "response" in row:  # a reply's beginning: only after messages, and only for training
            assert path == demo.HEADS_TRAIN and "messages" in row and isinstance(row["response"], str), n
            assert row["response"], (path.name, n)
        assert set(row) & set(LABELS), (path.name, n)  # at least one label
        for head, values in LABELS.items():
            assert row.get(head, next(iter(values))) in values, (path.name, n)
        if "messages" in row:
            assert [m["role"] for m in row["messages"]] in (["user"], ["system", "user"]), (path.name, n)
            assert all(isinstance(m["content"], str) and m["content"] for m in row["messages"]), (path.name, n)
        else:
            assert isinstance(row["text"], str) and row["text"], (path.name, n)
    # Roughly balanced: each class holds at least a third of the prompt rows that carry its head's label.
    rows = [row for row in map(json.loads, lines) if "response" not in row]
    for head, values in LABELS.items():
        counts = {v: sum(r.get(head) == v for r in rows) for v in values}
        assert min(counts.values()) >= sum(counts.values()) / 3, (path.name, head, counts)


def test_heads_data_sizes_and_no_overlap():
    rows, evals = demo.read_jsonl(demo.HEADS_TRAIN), demo.read_jsonl(demo.HEADS_EVAL)
    train = [row for row in rows if "response" not in row]
    assert 120 <= len(train) <= 200 and 40 <= len(evals) <= 60
    train_prompts, eval_prompts = [_prompt_text(r) for r in train], [_prompt_text(r) for r in evals]
    assert len(set(train_prompts)) == len(train_prompts) and len(set(eval_prompts)) == len(eval_prompts)
    assert not set(train_prompts) & set(eval_prompts)
    lm_prompts = {row["messages"][-2]["content"] for row in demo.read_jsonl(demo.LM_CORPUS)}
    for prompt in (demo.DEMO_UNSAFE_PROMPT, demo.DEMO_SAFE_PROMPT):
        assert prompt not in set(train_prompts) | set(eval_prompts) | lm_prompts


def test_response_rows_are_the_corpus_replies_cut_and_labelled_by_their_opening():
    """demo_data/README.md: one response row per lm-corpus conversation, its reply cut after some words, its
    labels those of the opening the reply starts with (safe, handle when it starts with none)."""
    responses = [row for row in demo.read_jsonl(demo.HEADS_TRAIN) if "response" in row]
    corpus = demo.read_jsonl(demo.LM_CORPUS)
    assert len(responses) == len(corpus)
    labels_of = {opening: labels for labels, opening in demo.OPENINGS.items()}
    for row, conversation in zip(responses, corpus):
        *prompt, reply = conversation["messages"]
        assert row["messages"] == prompt
        full = reply["reasoning_content"] + "\n</think>\n\n" + reply["content"]
        assert full.startswith(row["response"])
        openings = [o for o in labels_of if reply["reasoning_content"].startswith(o)]
        expected = labels_of[max(openings, key=len)] if openings else ("safe", "handle")
        assert (row["safety"], row["authority"]) == expected


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_demo_data_ships_with_the_package():
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text(encoding="utf-8"))
    assert "demo_data/*" in pyproject["tool"]["setuptools"]["package-data"]["so8t_export"]
