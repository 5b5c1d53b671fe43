"""The gate's text handling (pure) and the gated generation on a tiny exported GGUF."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require_llama_cpp
from hypothesis import given
from hypothesis import strategies as st

from so8t_export.serve.gate import GatePolicy, GatedRun, _StopStrings
from so8t_export.thinking import OPENING_WHITESPACE, ThinkingSplitter, split_thinking

PIECES = st.lists(st.sampled_from(["a", "b", "\n", "<", "/", "think", ">", "</think>", "<think>", "x y", "é"]),
                  max_size=30)


def _split(pieces: list[str], prompt: str | None) -> tuple[str, str]:
    splitter = ThinkingSplitter(prompt)
    out = {"reasoning": "", "content": ""}
    for piece in pieces:
        for delta in splitter.feed(piece):
            out[delta.kind] += delta.text
    for delta in splitter.flush():
        out[delta.kind] += delta.text
    return out["reasoning"], out["content"]


@given(PIECES, st.integers(0, 5))
def test_the_thinking_split_does_not_depend_on_how_text_is_cut(pieces, cut):
    text = "".join(pieces)
    whole = _split([text], "<|im_start|>assistant\n<think>\n")
    cut_up = [text[i:i + cut + 1] for i in range(0, len(text), cut + 1)]
    assert _split(cut_up, "<|im_start|>assistant\n<think>\n") == whole


@given(PIECES)
def test_a_prompt_ending_in_think_opens_the_reasoning(pieces):
    text = "".join(pieces)
    reasoning, content = _split([text], "...<think>\n")
    opened = text.lstrip()  # a model that opens its reasoning again: that <think> is dropped
    near = len(text) - len(opened) <= OPENING_WHITESPACE
    body = opened.removeprefix("<think>") if near and opened.startswith("<think>") else text
    if "</think>" in body:
        expected_reasoning, rest = body.split("</think>", 1)
        assert reasoning == expected_reasoning and content == rest.lstrip("\n")
    else:  # unterminated: everything is reasoning, the answer stays empty
        assert (reasoning, content) == (body, "")
    if text.count("</think>") == 1:  # the same split as the one used on whole texts elsewhere
        assert (reasoning.strip(), content.strip()) == tuple(part.strip() for part in split_thinking(text))


def test_a_model_that_writes_only_newlines_is_not_held_back():
    splitter = ThinkingSplitter("...<think>\n")
    sent = [d.text for _ in range(OPENING_WHITESPACE + 1) for d in splitter.feed("\n")]
    assert "".join(sent) == "\n" * (OPENING_WHITESPACE + 1)


def test_without_a_split_everything_is_content():
    assert _split(["<think>a</think>b"], None) == ("", "<think>a</think>b")


@given(st.text(alphabet="ab\n", max_size=40), st.lists(st.text(alphabet="ab\n", min_size=1, max_size=3),
                                                        max_size=3), st.integers(1, 5))
def test_stop_strings_cut_at_the_first_match_however_text_arrives(text, stops, size):
    filt = _StopStrings(tuple(stops))
    out, hit = "", False
    for i in range(0, len(text), size):
        piece, hit = filt.feed(text[i:i + size])
        out += piece
        if hit:
            break
    if not hit:
        out += filt.flush()
    # as a streaming server must: the first stop string to be complete ends the text, at the earliest match
    # seen by then (a longer one that began earlier but is not complete yet cannot be known)
    expected, found = text, False
    for end in range(min(size, len(text)), len(text) + size, size):
        seen = text[:end]
        cuts = [seen.find(s) for s in stops if s in seen]
        if cuts:
            expected, found = seen[:min(cuts)], True
            break
    assert (out, hit) == (expected, found)


def test_policy_rejects_thresholds_outside_zero_one():
    with pytest.raises(ValueError, match="refuse_above"):
        GatePolicy(refuse_above=1.5)
    assert not GatePolicy.off().enabled


# ------------------------------------------------------------------------------- on a real engine
@pytest.fixture(scope="module")
def engine(so8t_dir, tmp_path_factory):
    require_llama_cpp()
    from so8t_export.export import export_gguf
    from so8t_export.serve.engine import Engine

    out = tmp_path_factory.mktemp("gate") / "tiny-f32.gguf"
    export_gguf(so8t_dir, out, quant="f32")
    return Engine(out, n_ctx=256)


def _run(engine, policy, prompt, **params):
    from so8t_export.serve.engine import SamplingParams

    run = GatedRun(engine, policy, prompt, SamplingParams(temperature=0.0, seed=0, **params))
    run.start()
    deltas = list(run.stream())
    return run, deltas


def test_scores_per_token_equal_a_full_evaluation(engine, so8t_dir):
    """The gate's per-token P(unsafe) is the head on llama.cpp's own hidden states of that sequence."""
    from so8t_export.runtime import SO8TRuntime
    from so8t_export.serve.engine import SamplingParams

    prompt = engine.render([{"role": "user", "content": "Hello there"}])
    tokens = engine.tokenize(prompt)
    engine.prefill(tokens)
    steps = list(engine.generate(tokens, SamplingParams(max_tokens=8, temperature=0.0, seed=0)))
    reference = SO8TRuntime(engine.path, n_ctx=256, f32_kv_cache=True).evaluate(tokens + [s.token for s in steps])
    got = np.array([s.unsafe for s in steps])
    want = reference.safety[len(tokens):, 1]
    assert np.abs(got - want).max() < 1e-4


def test_refusal_at_the_prompt(engine):
    run, deltas = _run(engine, GatePolicy(refuse_above=0.0), engine.render([{"role": "user", "content": "x"}]),
                       max_tokens=4)
    assert [d.text for d in deltas] == [GatePolicy().refusal]
    assert run.result.finish_reason == "content_filter" and run.result.so8t["decision"] == "refuse"
    assert run.result.so8t["stage"] == "input" and run.result.completion_tokens == 0


def test_the_output_gate_stops_at_the_crossing_and_sends_nothing_after(engine):
    prompt = engine.render([{"role": "user", "content": "Tell me a story"}])
    free, free_deltas = _run(engine, GatePolicy(refuse_above=None, escalate_above=None, stop_above=1.0), prompt,
                             max_tokens=12)
    from so8t_export.serve.engine import SamplingParams

    tokens = engine.tokenize(prompt)
    engine.prefill(tokens)
    steps = list(engine.generate(tokens, SamplingParams(max_tokens=12, temperature=0.0, seed=0)))
    unsafe = [s.unsafe for s in steps]
    # The crossing: the latest token whose score rises above every score before it (a threshold halfway
    # between lets the earlier tokens through), or the first token when none does.
    rises = [k for k in range(1, len(unsafe)) if unsafe[k] > max(unsafe[:k])]
    k = rises[-1] if rises else 0
    threshold = (max(unsafe[:k]) + unsafe[k]) / 2 if k else unsafe[0] / 2
    run, deltas = _run(engine, GatePolicy(refuse_above=None, escalate_above=None, stop_above=threshold), prompt,
                       max_tokens=12)
    sent = "".join(d.text for d in deltas)
    allowed = "".join(s.text for s in steps[:k])
    assert run.result.finish_reason == "content_filter" and run.result.so8t["decision"] == "stop"
    assert run.result.so8t["output"]["at_token"] == k
    assert allowed.startswith(sent) and len(sent) <= len(allowed)  # nothing of token k or later
    assert "".join(d.text for d in free_deltas).startswith(sent)


def test_unterminated_reasoning_leaves_the_answer_empty(engine):
    run, deltas = _run(engine, GatePolicy.off(), engine.render([{"role": "user", "content": "hi"}]), max_tokens=6)
    assert run.result.finish_reason == "length"
    if "</think>" not in run.result.reasoning:
        assert run.result.content == "" and all(d.kind == "reasoning" for d in deltas)
