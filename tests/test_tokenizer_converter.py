"""Tokenizers as transformers saves them export exactly as llama.cpp's own converter exports them.

Reference: convert_hf_to_gguf.py from the llama.cpp that llama-cpp-python 0.3.36 vendors (tests/upstream.py),
run with --vocab-only on the same folder. Every tokenizer.* field must be equal, field by field. Then
llama.cpp (through llama-cpp-python) must tokenise like transformers' AutoTokenizer with special tokens added.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import pytest
from conftest import require_llama_cpp, skip_or_fail

from so8t_export.demo import CHAT_TEMPLATE, SPECIAL_TOKENS
from so8t_export.export import export_gguf
from so8t_export.gguf_tokenizer import TokenizerError
from so8t_export.parity import DEFAULT_PROMPTS

TEXTS = DEFAULT_PROMPTS + ["", " ", "hello world", "  leading spaces\n\n\ttabs", "<think>\nreason\n</think>\n\nok",
                           "<|im_start|>user\nhi<|im_end|>\n", "Ünïcödé 🦙 ১২৩ ٣٤٥"]


def _with_tokenizer(qwen3_dir: Path, folder: Path, save) -> Path:
    """The tiny checkpoint with its tokenizer files replaced by what `save(folder)` writes."""
    shutil.copytree(qwen3_dir, folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja",
                 "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    save(folder)
    return folder


def _demo_backend(qwen3_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(qwen3_dir / "tokenizer.json"))


def _round_trip(qwen3_dir):
    """AutoTokenizer.from_pretrained(demo).save_pretrained(): chat_template.jinja, extra_special_tokens."""
    from transformers import AutoTokenizer

    return lambda folder: AutoTokenizer.from_pretrained(qwen3_dir).save_pretrained(folder)


def _built_in_code(qwen3_dir):
    """A Qwen2Tokenizer built in code from a vocabulary and merges: transformers 5 writes the no-op
    TemplateProcessing post-processor, and plain added tokens as special=false, normalized=true."""
    from transformers import Qwen2Tokenizer

    def save(folder):
        vocab = json.loads((qwen3_dir / "vocab.json").read_text(encoding="utf-8"))
        merges = [tuple(line.split()) for line in (qwen3_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
                  if line and not line.startswith("#")]
        tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                             pad_token="<|endoftext|>")
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
        tok.add_tokens(["<tool_call>", "</tool_call>", "<think>", "</think>"])
        tok.chat_template = CHAT_TEMPLATE
        tok.save_pretrained(folder)
    return save


def _template(qwen3_dir, single: str, pair: str, **specials):
    """The demo tokenizer with a TemplateProcessing post-processor, saved through transformers."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    def save(folder):
        backend = _demo_backend(qwen3_dir)
        named = sorted({t for t in (single + " " + pair).split() if not t.startswith("$")})
        backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, backend.token_to_id(t)) for t in named])
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
        tok.chat_template = CHAT_TEMPLATE
        tok.save_pretrained(folder)
    return save


VARIANTS = {
    "demo": None,
    "transformers-round-trip": _round_trip,
    "transformers-built-in-code": _built_in_code,
    "template-adds-bos": lambda d: _template(d, "<|endoftext|> $A", "<|endoftext|> $A $B:1",
                                             bos_token="<|endoftext|>", eos_token="<|im_end|>"),
    "template-adds-eos": lambda d: _template(d, "$A <|im_end|>", "$A <|im_end|> $B:1 <|im_end|>",
                                             eos_token="<|im_end|>"),
    "template-adds-both": lambda d: _template(d, "<|endoftext|> $A <|im_end|>",
                                              "<|endoftext|> $A <|im_end|> $B:1 <|im_end|>",
                                              bos_token="<|endoftext|>", eos_token="<|im_end|>"),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, qwen3_dir, tmp_path_factory) -> Path:
    make = VARIANTS[request.param]
    if make is None:
        return qwen3_dir
    return _with_tokenizer(qwen3_dir, tmp_path_factory.mktemp("tok") / request.param, make(qwen3_dir))


@pytest.fixture(scope="module")
def exported(variant, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "model-f32.gguf"
    export_gguf(variant, out, quant="f32")
    return out


def _tokenizer_fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {key: (field.types, field.contents()) for key, field in reader.fields.items()
            if key.startswith("tokenizer.")}


def test_every_tokenizer_field_equals_the_converters(variant, exported, tmp_path):
    from upstream import convert

    reference = tmp_path / "converter.gguf"
    try:
        result = convert(variant, reference, "--vocab-only")
    except Exception as err:  # the sdist could not be fetched or unpacked
        skip_or_fail(f"llama.cpp's converter is not available: {err}")
    assert result.returncode == 0, result.stderr[-3000:]
    ours, theirs = _tokenizer_fields(exported), _tokenizer_fields(reference)
    assert list(ours) == list(theirs)
    for key in theirs:
        assert ours[key] == theirs[key], key


def test_llama_cpp_tokenises_like_transformers_with_special_tokens(variant, exported):
    require_llama_cpp()
    import llama_cpp
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(variant)
    llm = llama_cpp.Llama(str(exported), vocab_only=True, verbose=False)
    for text in TEXTS:
        for add_special in (False, True):
            expected = hf(text, add_special_tokens=add_special).input_ids
            # llama-cpp-python's add_bos is llama_tokenize's add_special: BOS and EOS as the vocab says.
            assert llm.tokenize(text.encode(), add_bos=add_special, special=True) == expected, (text, add_special)


def test_a_bos_template_sets_add_bos(exported, variant):
    fields = _tokenizer_fields(exported)
    name = variant.name
    add_bos = fields.get("tokenizer.ggml.add_bos_token", (None, False))[1]
    add_eos = fields.get("tokenizer.ggml.add_eos_token", (None, False))[1]
    assert add_bos == ("bos" in name or "both" in name)
    assert add_eos == ("eos" in name or "both" in name)


def test_parity_on_a_transformers_saved_tokenizer(qwen3_dir, tmp_path):
    """The transformers-saved folder exports, matches transformers' logits and tokenises the parity set alike."""
    require_llama_cpp()
    from so8t_export.parity import run_parity

    folder = _with_tokenizer(qwen3_dir, tmp_path / "saved", _built_in_code(qwen3_dir))
    out = tmp_path / "saved-f32.gguf"
    export_gguf(folder, out, quant="f32")
    report = run_parity(folder, out, greedy_tokens=8)
    assert report.passed, report.table()
    assert all(row.tokens_equal for row in report.rows)


# ------------------------------------------------------------------------------------------- refused
REFUSED = {
    "template-adds-a-token-that-is-not-bos": (
        lambda d: _template(d, "<|im_start|> $A", "<|im_start|> $A $B:1", eos_token="<|im_end|>"),
        r"key 'post_processor' adds '<\|im_start\|>' before every text, but .*tokenizer_config.json names no "
        r"bos_token; set bos_token to '<\|im_start\|>'"),
    "template-adds-two-tokens-before": (
        lambda d: _template(d, "<|endoftext|> <|im_start|> $A", "<|endoftext|> <|im_start|> $A $B:1",
                            bos_token="<|endoftext|>"),
        r"transformers adds token ids \[\d+, \d+\] before every text"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_llama_cpp_cannot_express_is_refused(case, qwen3_dir, tmp_path):
    make, message = REFUSED[case]
    folder = _with_tokenizer(qwen3_dir, tmp_path / case, make(qwen3_dir))
    with pytest.raises(TokenizerError, match=message):
        export_gguf(folder, tmp_path / "out.gguf", quant="f32")
    assert not (tmp_path / "out.gguf").exists()


def test_the_post_processor_wins_over_add_bos_token(qwen3_dir, tmp_path):
    """As in the pinned converter: transformers follows the post-processor, and so does the GGUF."""
    folder = _with_tokenizer(qwen3_dir, tmp_path / "says-no", _template(
        qwen3_dir, "<|endoftext|> $A", "<|endoftext|> $A $B:1", bos_token="<|endoftext|>"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["add_bos_token"] = False  # transformers 5 drops the key on save: set it by hand
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    export_gguf(folder, tmp_path / "out.gguf", quant="f32")
    assert _tokenizer_fields(tmp_path / "out.gguf")["tokenizer.ggml.add_bos_token"][1] is True


def test_the_demo_specials_are_control_tokens(exported, variant):
    fields = _tokenizer_fields(exported)
    tokens, types = fields["tokenizer.ggml.tokens"][1], fields["tokenizer.ggml.token_type"][1]
    for special in SPECIAL_TOKENS:
        if special in tokens:
            assert types[tokens.index(special)] == gguf.TokenType.CONTROL, special
