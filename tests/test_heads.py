"""train-heads, eval-heads and set-heads on tiny models, against independent references: scikit-learn's
roc_auc_score, the PyTorch reference's own head outputs, llama.cpp loading the rewritten file, and the tensor
bytes of the original."""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import require_llama_cpp
from so8t_export.cli import main

SAFETY_WORDS = {"unsafe": ["poison", "weapon", "explosive", "malware", "steal", "attack"],
                "safe": ["garden", "recipe", "music", "travel", "history", "poem"]}
AUTHORITY_WORDS = {"escalate": ["lawyer", "refund", "emergency", "manager", "complaint"],
                   "handle": ["weather", "colour", "number", "cat", "song"]}
FILLER = ["please", "tell", "me", "about", "the", "a", "how", "to", "make", "with", "my", "friend", "today"]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def learnable(n: int, seed: int, *, messages: bool = False) -> list[dict]:
    """Examples whose label follows the last word: what the last token's hidden state sees, even in a tiny
    random model. Safety and authority examples alternate, each carrying one label; with messages, every
    example is a chat turn carrying both labels (what the reference and llama.cpp must agree on)."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        if messages:
            safety, authority = rng.choice(list(SAFETY_WORDS)), rng.choice(list(AUTHORITY_WORDS))
            words = rng.sample(FILLER, 4) + [rng.choice(SAFETY_WORDS[safety]), rng.choice(AUTHORITY_WORDS[authority])]
            records.append({"messages": [{"role": "user", "content": " ".join(words)}], "safety": safety,
                            "authority": authority})
            continue
        head, words = ("safety", SAFETY_WORDS) if i % 2 == 0 else ("authority", AUTHORITY_WORDS)
        label = list(words)[(i // 2) % 2]
        records.append({"text": " ".join(rng.sample(FILLER, 5) + [rng.choice(words[label])]), head: label})
    return records


def run_cli(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout  # the progress bar goes to stderr


def fail_cli(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code != 0 and result.exception is None or isinstance(result.exception, SystemExit), \
        result.output
    assert "Traceback" not in result.output
    return result.output


def reference_probabilities(model_dir: Path, records: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """P(class 1) of each head, one unbatched forward per example through the saved model's own heads."""
    import torch
    from transformers import AutoTokenizer

    from so8t_export.config import HEAD_LABELS
    from so8t_export.model import SO8TTransformerForCausalLM

    model = SO8TTransformerForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = {head: ([], []) for head in HEAD_LABELS}
    for record in records:
        text = record.get("text") or tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True,
                                                                    tokenize=False)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
        with torch.no_grad():
            result = model(ids)
        for head, labels in HEAD_LABELS.items():
            if head in record:
                logits = getattr(result, f"{head}_logits")[0, -1].double()
                out[head][0].append(float(logits.softmax(-1)[1]))
                out[head][1].append(labels.index(record[head]))
    return {head: (np.array(p), np.array(y)) for head, (p, y) in out.items()}


# ------------------------------------------------------------------------------------------------ data
BAD_LINES = [
    ("not-json", "{\"text\": \"a\", \"safety\": ", "not valid JSON"),
    ("array", "[1, 2]", "expected a JSON object, found list"),
    ("unknown-key", '{"text": "a", "saftey": "safe"}', "unknown key 'saftey'"),
    ("both", '{"text": "a", "messages": [], "safety": "safe"}', "found both"),
    ("neither", '{"safety": "safe"}', "found neither"),
    ("empty-text", '{"text": "", "safety": "safe"}', "'text' must be a non-empty string"),
    ("messages-not-list", '{"messages": "hi", "safety": "safe"}', "'messages' must be a non-empty list"),
    ("bad-role", '{"messages": [{"role": "bot", "content": "x"}], "safety": "safe"}', "messages[0].role = \"bot\""),
    ("content-null", '{"messages": [{"role": "user", "content": null}], "safety": "safe"}',
     "messages[0].content must be a string"),
    ("bad-label", '{"text": "a", "safety": "dangerous"}', "'safety' = \"dangerous\"; expected 'safe' or 'unsafe'"),
    ("label-int", '{"text": "a", "authority": 1}', "'authority' = 1; expected 'handle' or 'escalate'"),
    ("no-label", '{"text": "a"}', "no label"),
]


@pytest.mark.parametrize("name,line,message", BAD_LINES, ids=[c[0] for c in BAD_LINES])
def test_bad_lines_name_the_line_and_key(tmp_path, so8t_dir, name, line, message):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "fine", "safety": "safe"}\n\n' + line + "\n", encoding="utf-8")
    output = fail_cli("train-heads", so8t_dir, "--data", data, "-o", tmp_path / "out")
    assert f"{data}:3: " in output and message in output, output
    assert not (tmp_path / "out").exists()


def test_messy_files_read(tmp_path):
    """A byte-order mark, CRLF line ends, blank lines, non-ASCII text and an id."""
    from so8t_export.heads.data import read_examples

    data = tmp_path / "windows.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + '{"text": "caf\u00e9 \u2615", "safety": "safe", "id": 7}\r\n\r\n'
                     '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], '
                     '"authority": "escalate"}\r\n'.encode())
    first, second = read_examples(data)
    assert first.text == "caf\u00e9 \u2615" and first.labels == {"safety": 0} and first.line == 1
    assert second.line == 3 and second.labels == {"authority": 1} and len(second.messages) == 2


@pytest.mark.parametrize("content,message", [(b"", "no examples"), (b"\xff\xfe{}\n", "not UTF-8")])
def test_bad_files(tmp_path, content, message):
    from so8t_export.heads.data import DataError, read_examples

    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_examples(data)


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def trained(so8t_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("heads")
    train = _write_jsonl(out / "train.jsonl", learnable(160, seed=1))
    held = _write_jsonl(out / "eval.jsonl", learnable(80, seed=2))
    run_cli("train-heads", so8t_dir, "--data", train, "--eval", held, "-o", out / "trained", "--target-fpr", "0.1")
    return out / "trained", json.loads(held.read_text().replace("\n", ",").rstrip(",").join("[]"))


def test_heads_learn_and_metrics_match_scikit_learn(trained):
    """Held-out accuracy >= 0.95 for both heads, and the reported numbers equal an independent computation
    on the saved model's own outputs."""
    from sklearn.metrics import roc_auc_score

    out_dir, held = trained
    report = json.loads((out_dir / "heads_report.json").read_text())
    config = json.loads((out_dir / "config.json").read_text())
    for head, (p, y) in reference_probabilities(out_dir, held).items():
        metrics = report["heads"][head]["metrics"]
        threshold = config[f"so8t_{head}_threshold"]
        assert metrics["threshold"] == pytest.approx(threshold, abs=1e-6)
        assert metrics["accuracy"] >= 0.95, (head, metrics)
        assert metrics["accuracy"] == pytest.approx(np.mean((p >= threshold) == y), abs=1e-9)
        assert metrics["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-6)
        flagged = p >= threshold
        assert metrics["precision"] == pytest.approx((flagged & (y == 1)).sum() / flagged.sum(), abs=1e-6)
        assert metrics["recall"] == pytest.approx((flagged & (y == 1)).sum() / (y == 1).sum(), abs=1e-6)
        fpr = (flagged & (y == 0)).sum() / (y == 0).sum()
        assert metrics["false_positive_rate"] == pytest.approx(fpr, abs=1e-6) and fpr <= 0.1 + 1e-9
        ece = 0.0
        for b in range(10):  # bins of equal width in P(class 1); P = 1 in the last
            inside = [(pi, yi) for pi, yi in zip(p, y) if min(int(pi * 10), 9) == b]
            if inside:
                ece += len(inside) / len(p) * abs(np.mean([pi for pi, _ in inside]) - np.mean([yi for _, yi in inside]))
        assert metrics["expected_calibration_error"] == pytest.approx(ece, abs=1e-5)


def test_base_weights_untouched(trained, so8t_dir):
    from safetensors.numpy import load_file

    before = load_file(str(so8t_dir / "model.safetensors"))
    after = load_file(str(trained[0] / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = sorted(name for name in before if not np.array_equal(before[name], after[name]))
    assert changed == ["authority_head.bias", "authority_head.weight", "safety_head.bias", "safety_head.weight"]


def test_held_out_split_without_eval(tmp_path, so8t_dir):
    from so8t_export.heads.train import train_heads

    data = _write_jsonl(tmp_path / "train.jsonl", learnable(100, seed=3))
    report = train_heads(so8t_dir, data, tmp_path / "out", holdout=0.25)
    sizes = {head: r.metrics.examples for head, r in report.heads.items()}
    assert sum(sizes.values()) == 25 and min(sizes.values()) >= 10, sizes
    assert "held out" in report.evaluated_on


def test_a_head_without_labels_keeps_its_weights(tmp_path, so8t_dir):
    from safetensors.numpy import load_file

    from so8t_export.heads.train import train_heads

    records = [r for r in learnable(80, seed=4) if "safety" in r]
    report = train_heads(so8t_dir, _write_jsonl(tmp_path / "t.jsonl", records), tmp_path / "out")
    before = load_file(str(so8t_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert np.array_equal(before["authority_head.weight"], after["authority_head.weight"])
    assert report.heads["authority"].trained_on == 0 and any("authority" in n for n in report.notes)


def test_one_class_is_refused(tmp_path, so8t_dir):
    records = [{"text": f"hello {i}", "safety": "safe"} for i in range(10)]
    output = fail_cli("train-heads", so8t_dir, "--data", _write_jsonl(tmp_path / "t.jsonl", records),
                      "-o", tmp_path / "out")
    assert "every safety-labelled training example is 'safe'" in output


def test_output_may_not_be_the_input(tmp_path, so8t_dir):
    copy = tmp_path / "model"
    shutil.copytree(so8t_dir, copy)
    data = _write_jsonl(tmp_path / "t.jsonl", learnable(20, seed=5))
    assert "is the model folder this command reads" in fail_cli("train-heads", copy, "--data", data, "-o", copy)


# ------------------------------------------------------------------------------------------------ GGUF
@pytest.fixture(scope="module")
def exported(so8t_dir, tmp_path_factory):
    require_llama_cpp()
    from so8t_export.export import export_gguf

    out = tmp_path_factory.mktemp("heads-gguf")
    return export_gguf(so8t_dir, out / "tiny-f32.gguf", quant="f32").output


def test_gguf_features_fit_the_same_heads(tmp_path, so8t_dir, exported):
    """Heads fitted to llama.cpp's hidden states of the f32 file equal the reference-fitted ones: their
    probabilities on the eval set differ by at most 1e-3."""
    from so8t_export.heads.train import train_heads

    train = _write_jsonl(tmp_path / "train.jsonl", learnable(60, seed=6, messages=True))
    held = _write_jsonl(tmp_path / "eval.jsonl", learnable(30, seed=7, messages=True))
    from_reference = train_heads(so8t_dir, train, tmp_path / "ref", eval_data=held)
    from_gguf = train_heads(so8t_dir, train, tmp_path / "gguf", eval_data=held, gguf=exported)
    assert "tiny-f32.gguf" in from_gguf.features
    for head in ("safety", "authority"):
        a, b = from_reference.heads[head].probabilities, from_gguf.heads[head].probabilities
        assert a.size == 30 and np.abs(a - b).max() <= 1e-3, (head, np.abs(a - b).max())
    records = json.loads("[" + ",".join(held.read_text().splitlines()) + "]")
    ref = reference_probabilities(tmp_path / "ref", records)
    gguf = reference_probabilities(tmp_path / "gguf", records)
    for head in ref:
        assert np.abs(ref[head][0] - gguf[head][0]).max() <= 1e-3


def _tensor_bytes(path: Path) -> dict[str, str]:
    import gguf

    reader = gguf.GGUFReader(path)
    return {t.name: hashlib.sha256(np.ascontiguousarray(t.data).tobytes()).hexdigest() for t in reader.tensors}


def test_set_heads(tmp_path, trained, exported):
    """The runtime then gives the new heads' probabilities (1e-4 of the reference for f32), every tensor's
    bytes are unchanged, the thresholds are the file's defaults, and llama.cpp still loads the file."""
    from so8t_export.gguf_file import read_gguf_header
    from so8t_export.metadata import read_so8t_metadata
    from so8t_export.runtime import SO8TRuntime
    from so8t_export.serve.engine import Engine
    from so8t_export.serve.gate import GatePolicy

    out_dir, held = trained
    target = tmp_path / "model.gguf"
    shutil.copyfile(exported, target)
    before = _tensor_bytes(target)
    output = run_cli("set-heads", target, "--from", out_dir)
    assert "heads replaced" in output and "MiB of tensor data copied unchanged" in output
    assert _tensor_bytes(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # no temporary file left
    metadata = read_so8t_metadata(read_gguf_header(target), target)
    config = json.loads((out_dir / "config.json").read_text())
    assert metadata.version == 2
    for head in ("safety", "authority"):
        assert metadata.thresholds[head] == pytest.approx(config[f"so8t_{head}_threshold"], abs=1e-7)

    runtime = SO8TRuntime(target)  # llama.cpp loads it
    expected = reference_probabilities(out_dir, held)
    got = {"safety": [], "authority": []}
    for record in held:
        tokens = runtime.tokenize(record["text"])
        safety, authority = (p[-1] for p in runtime.heads(runtime.evaluate(tokens).hidden[-1:]))
        got["safety" if "safety" in record else "authority"].append((safety if "safety" in record else authority)[1])
    for head in got:
        assert np.abs(np.array(got[head]) - expected[head][0]).max() <= 1e-4
    del runtime
    engine = Engine(target, n_ctx=256)
    policy = GatePolicy().resolved(engine.runtime.metadata)
    assert policy.refuse_above == policy.stop_above == metadata.thresholds["safety"]
    assert policy.escalate_above == metadata.thresholds["authority"]
    run_cli("inspect", target)


def test_set_heads_refuses_bad_input_and_leaves_the_file(tmp_path, trained, exported):
    import torch
    from safetensors.torch import load_file, save_file

    out_dir, _ = trained
    target = tmp_path / "model.gguf"
    shutil.copyfile(exported, target)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()

    narrow = tmp_path / "narrow"
    shutil.copytree(out_dir, narrow)
    state = load_file(str(narrow / "model.safetensors"))
    state["safety_head.weight"] = torch.zeros(2, 32)
    save_file(state, str(narrow / "model.safetensors"), metadata={"format": "pt"})
    assert "safety_head.weight has shape [2, 32]" in fail_cli("set-heads", target, "--from", narrow)
    assert "heads folder is missing" in fail_cli("set-heads", target, "--from", tmp_path / "nowhere")

    from fuzz.mutate import gguf_rewrite

    stock = tmp_path / "stock.gguf"
    gguf_rewrite(exported, stock, drop=lambda key: key.startswith("so8t."))
    stock_digest = hashlib.sha256(stock.read_bytes()).hexdigest()
    assert "no so8t.* metadata" in fail_cli("set-heads", stock, "--from", out_dir)
    assert hashlib.sha256(target.read_bytes()).hexdigest() == digest
    assert hashlib.sha256(stock.read_bytes()).hexdigest() == stock_digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "narrow", "stock.gguf"]


def test_set_heads_upgrades_a_version_1_file(tmp_path, trained, exported):
    """A file exported before thresholds existed (schema 1) reads with 0.5 and gains them."""
    import gguf

    from fuzz.mutate import gguf_rewrite
    from so8t_export.gguf_file import read_gguf_header
    from so8t_export.metadata import read_so8t_metadata

    old = tmp_path / "v1.gguf"
    gguf_rewrite(exported, old, drop=lambda key: key.endswith("_head.threshold"),
                 replace={"so8t.version": (1, gguf.GGUFValueType.UINT32, None)})
    assert read_so8t_metadata(read_gguf_header(old), old).thresholds == {"safety": 0.5, "authority": 0.5}
    before = _tensor_bytes(old)
    run_cli("set-heads", old, "--from", trained[0], "-o", tmp_path / "v2.gguf")
    new = read_so8t_metadata(read_gguf_header(tmp_path / "v2.gguf"), tmp_path / "v2.gguf")
    assert new.version == 2 and new.thresholds != {"safety": 0.5, "authority": 0.5}
    assert _tensor_bytes(tmp_path / "v2.gguf") == before


def test_eval_heads_on_checkpoint_and_gguf(tmp_path, trained, exported):
    """The same metrics from the reference and from llama.cpp on the f32 file after set-heads, and a plot."""
    out_dir, held = trained
    data = _write_jsonl(tmp_path / "eval.jsonl", held)
    target = tmp_path / "model.gguf"
    run_cli("set-heads", exported, "--from", out_dir, "-o", target)
    reference = json.loads(run_cli("eval-heads", out_dir, "--data", data, "--json"))
    llama = json.loads(run_cli("eval-heads", target, "--data", data, "--json", "--plot", tmp_path / "roc.png"))
    for head in ("safety", "authority"):
        a, b = reference["heads"][head]["metrics"], llama["heads"][head]["metrics"]
        for key in ("accuracy", "auroc", "threshold"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), (head, key)
    assert (tmp_path / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lowered = json.loads(run_cli("eval-heads", out_dir, "--data", data, "--json", "--threshold", "safety=0"))
    assert lowered["heads"]["safety"]["metrics"]["recall"] == 1.0


def test_eval_heads_needs_heads(tmp_path, exported):
    from fuzz.mutate import gguf_rewrite

    stock = tmp_path / "stock.gguf"
    gguf_rewrite(exported, stock, drop=lambda key: key.startswith("so8t."))
    data = _write_jsonl(tmp_path / "d.jsonl", learnable(4, seed=8))
    assert "no so8t.* metadata" in fail_cli("eval-heads", stock, "--data", data)
    assert "expected HEAD=P" in fail_cli("eval-heads", stock, "--data", data, "--threshold", "saftey=0.3")


# ------------------------------------------------------------------------------------------------ fine-tuning
def test_gradient_checkpointing_gives_the_same_gradients(so8t_dir):
    import torch

    from so8t_export.model import SO8TTransformerForCausalLM

    model = SO8TTransformerForCausalLM.from_pretrained(so8t_dir).train()
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))

    def gradients():
        model.zero_grad()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = model(ids)
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        (loss + out.safety_logits.sum() + out.authority_logits.sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)

    plain, plain_saved = gradients()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    checkpointed, checkpointed_saved = gradients()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-6, msg=name)
    assert checkpointed_saved < plain_saved / 2  # the layers' activations are not kept
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


def test_set_heads_without_copy_file_range(tmp_path, trained, exported, monkeypatch):
    """Where the kernel cannot copy between the two files (EXDEV, an old kernel), the data goes through
    Python and comes out the same."""
    import errno
    import os

    def refuse(*args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    run_cli("set-heads", exported, "--from", trained[0], "-o", tmp_path / "kernel.gguf")
    monkeypatch.setattr(os, "copy_file_range", refuse)
    run_cli("set-heads", exported, "--from", trained[0], "-o", tmp_path / "python.gguf")
    assert (tmp_path / "kernel.gguf").read_bytes() == (tmp_path / "python.gguf").read_bytes()


def test_a_near_constant_dimension_gets_no_weight():
    """A hidden dimension that is constant up to rounding must not be standardised into a huge weight (an f16
    file would hold Inf); the fit equals scikit-learn's on the informative dimensions alone."""
    from sklearn.linear_model import LogisticRegression

    from so8t_export.heads.fit import fit_head

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 6))
    y = (x[:, 0] + 0.5 * x[:, 1] + 0.3 * rng.standard_normal(300) > 0).astype(int)
    x[:, 4] = 7.0 + 1e-12 * rng.standard_normal(300)
    head = fit_head(x, y)
    assert abs(head.weight[1, 4]) < 1e-6
    informative = np.delete(x, 4, axis=1)
    mean, scale = informative.mean(0), informative.std(0)
    reference = LogisticRegression(C=1.0, max_iter=5000, tol=1e-10).fit((informative - mean) / scale, y)
    assert np.allclose(2 * np.delete(head.weight[1], 4), reference.coef_[0] / scale, atol=1e-5)


def test_set_heads_reports_a_real_copy_error(tmp_path, trained, exported, monkeypatch):
    """EIO or ENOSPC from the kernel copy is a failure to report, not a cue to retry through Python."""
    import errno
    import os

    def fail(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "copy_file_range", fail)
    result = CliRunner().invoke(main, ["set-heads", str(exported), "--from", str(trained[0]), "-o",
                                       str(tmp_path / "full.gguf")])
    assert result.exit_code != 0 and "No space left on device" in result.output
    assert "Traceback" not in result.output and not list(tmp_path.glob("*full*"))


def test_set_heads_in_place_through_a_link_keeps_the_link(tmp_path, trained, exported):
    target = tmp_path / "models" / "tiny.gguf"
    target.parent.mkdir()
    shutil.copyfile(exported, target)
    link = tmp_path / "current.gguf"
    link.symlink_to(target)
    run_cli("set-heads", link, "--from", trained[0])
    assert link.is_symlink() and link.resolve() == target
    assert target.read_bytes() != exported.read_bytes()  # the heads changed in the file the link names
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_a_response_is_scored_after_the_generation_prompt(so8t_dir):
    """A response example's features are the hidden state at the response's last token, rendered after the
    chat template's generation prompt; the reference model computes the same state from the joined text."""
    import torch
    from transformers import AutoTokenizer

    from so8t_export.heads.data import parse_example
    from so8t_export.heads.features import ReferenceFeatures
    from so8t_export.model import SO8TTransformerForCausalLM

    line = json.dumps({"messages": [{"role": "user", "content": "How do I make soup?"}],
                       "response": "The user asks", "safety": "safe"})
    example = parse_example(line, "data.jsonl", 1)
    features = ReferenceFeatures.from_pretrained(so8t_dir)
    tokenizer = AutoTokenizer.from_pretrained(so8t_dir)
    text = tokenizer.apply_chat_template(list(example.messages), add_generation_prompt=True, tokenize=False)
    assert text.endswith("<think>\n")
    ids = tokenizer(text + "The user asks", add_special_tokens=False).input_ids
    assert features.tokens(example, "data.jsonl") == ids
    model = SO8TTransformerForCausalLM.from_pretrained(so8t_dir).eval()
    with torch.no_grad():
        expected = model(torch.tensor([ids])).last_hidden_state[0, -1].double().numpy()
    assert np.allclose(features([example], "data.jsonl")[0], expected, atol=1e-5)


@pytest.mark.parametrize("record, message", [
    ({"text": "hi", "response": "x", "safety": "safe"}, "'response' must be a non-empty string after 'messages'"),
    ({"messages": [{"role": "user", "content": "hi"}], "response": "", "safety": "safe"},
     "'response' must be a non-empty string after 'messages', found \"\""),
    ({"messages": [{"role": "user", "content": "hi"}], "response": 3, "safety": "safe"},
     "'response' must be a non-empty string after 'messages', found 3"),
])
def test_bad_responses_name_the_line(record, message):
    from so8t_export.heads.data import DataError, parse_example

    with pytest.raises(DataError, match=re.escape(f"data.jsonl:4: {message}")):
        parse_example(json.dumps(record), "data.jsonl", 4)
