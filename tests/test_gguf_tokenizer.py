"""so8t_export.gguf_tokenizer on hand-made tokenizer folders: each key's value and type, and bad input.

The comparison with llama.cpp's real converter, on folders that transformers itself saved, is in
tests/test_tokenizer_converter.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import require_llama_cpp

from so8t_export.gguf_tokenizer import QWEN2_PRETOKENIZE_REGEX, TokenizerError, add_tokenizer

CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen3 marks these added tokens special=false; <|fim_pad|> still becomes CONTROL via does_token_look_special.
PLAIN = ["<tool_call>", "</tool_call>", "<think>", "</think>", "<|fim_pad|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away!",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "你好，世界！今天天气很好。 naïve café résumé 3.14 1234567",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n<think>\n2+2=4\n</think>\n4<|im_end|>\n",
] * 3
VOCAB_SIZE = 512  # > tokenizer length, like Qwen3's 151936 > 151669


def _train(n_merges: int = 120):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(BPE(dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = BpeTrainer(
        vocab_size=len(alphabet) + n_merges,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=alphabet,
        special_tokens=[],
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN])
    return tok


@pytest.fixture(scope="module")
def tokenizer_json() -> dict:
    return json.loads(_train().to_str())


def _write_dir(
    d: Path,
    tj: dict,
    *,
    merges_format: str = "pairs",
    chat_template_in_config: bool = True,
    tokenizer_config: dict | None = None,
) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    tj = json.loads(json.dumps(tj))
    merges = tj["model"]["merges"]
    if merges_format == "strings":
        tj["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in merges]
    else:
        tj["model"]["merges"] = [m.split(" ") if isinstance(m, str) else m for m in merges]
    (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    if tokenizer_config is None:
        tokenizer_config = {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": {
                str(a["id"]): {
                    k: a[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
                }
                for a in tj["added_tokens"]
            },
            "additional_special_tokens": SPECIAL[1:],
            "bos_token": None,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 4096,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        }
        if chat_template_in_config:
            tokenizer_config["chat_template"] = CHAT_TEMPLATE
    (d / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config, ensure_ascii=False), encoding="utf-8"
    )
    endoftext = next(a["id"] for a in tj["added_tokens"] if a["content"] == "<|endoftext|>")
    im_end = next(a["id"] for a in tj["added_tokens"] if a["content"] == "<|im_end|>")
    # Qwen3 config.json: bos_token_id = <|endoftext|>, eos_token_id = <|im_end|>.
    (d / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["Qwen3ForCausalLM"],
                "vocab_size": VOCAB_SIZE,
                "bos_token_id": endoftext,
                "eos_token_id": im_end,
            }
        ),
        encoding="utf-8",
    )
    return d


def _write_gguf(path: Path, fill) -> gguf.GGUFReader:
    w = gguf.GGUFWriter(path, "qwen3")
    fill(w)
    w.add_tensor("dummy.weight", np.arange(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf.GGUFReader(path)


def _fields(r: gguf.GGUFReader) -> dict:
    return {k: (list(f.types), f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}


def test_every_key_value_and_type(tmp_path, tokenizer_json):
    d = _write_dir(tmp_path / "model", tokenizer_json)
    r = _write_gguf(tmp_path / "t.gguf", lambda w: add_tokenizer(w, d, VOCAB_SIZE))
    f = _fields(r)
    V = gguf.GGUFValueType
    T = gguf.TokenType
    base = tokenizer_json["model"]["vocab"]
    added = {a["content"]: a["id"] for a in tokenizer_json["added_tokens"]}
    n_tok = len(base) + len(added)
    assert max(added.values()) == n_tok - 1 < VOCAB_SIZE

    assert list(f) == [
        "general.architecture",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_eos_token",
        "tokenizer.chat_template",
    ]
    assert f["tokenizer.ggml.model"] == ([V.STRING], "gpt2")
    assert f["tokenizer.ggml.pre"] == ([V.STRING], "qwen2")

    types, tokens = f["tokenizer.ggml.tokens"]
    assert types == [V.ARRAY, V.STRING] and len(tokens) == VOCAB_SIZE
    types, toktypes = f["tokenizer.ggml.token_type"]
    assert types == [V.ARRAY, V.INT32] and len(toktypes) == VOCAB_SIZE
    for text, i in base.items():
        assert tokens[i] == text and toktypes[i] == T.NORMAL
    for text in SPECIAL + ["<|fim_pad|>"]:
        assert tokens[added[text]] == text and toktypes[added[text]] == T.CONTROL
    for text in ["<tool_call>", "</tool_call>", "<think>", "</think>"]:
        assert tokens[added[text]] == text and toktypes[added[text]] == T.USER_DEFINED
    for i in range(n_tok, VOCAB_SIZE):
        assert tokens[i] == f"[PAD{i}]" and toktypes[i] == T.UNUSED

    types, merges = f["tokenizer.ggml.merges"]
    assert types == [V.ARRAY, V.STRING]
    assert merges == [" ".join(m) for m in tokenizer_json["model"]["merges"]] and len(merges) > 0

    assert f["tokenizer.ggml.eos_token_id"] == ([V.UINT32], added["<|im_end|>"])  # tokenizer_config eos_token
    assert f["tokenizer.ggml.padding_token_id"] == ([V.UINT32], added["<|endoftext|>"])  # pad_token
    assert f["tokenizer.ggml.bos_token_id"] == (
        [V.UINT32],
        added["<|endoftext|>"],
    )  # config.json bos_token_id
    assert f["tokenizer.ggml.add_bos_token"] == ([V.BOOL], False)
    assert f["tokenizer.ggml.add_eos_token"] == ([V.BOOL], False)  # a ByteLevel post-processor adds neither
    assert f["tokenizer.chat_template"] == ([V.STRING], CHAT_TEMPLATE)


def test_pair_merges_with_spaces_are_encoded_like_special_vocab(tmp_path, tokenizer_json):
    tj = json.loads(json.dumps(tokenizer_json))
    tj["model"]["merges"] = [["a b", "c"], ["d", " e"]] + [
        m.split(" ") if isinstance(m, str) else m for m in tj["model"]["merges"]
    ]
    d = tmp_path / "model"
    _write_dir(d, tj)
    (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    r = _write_gguf(tmp_path / "t.gguf", lambda w: add_tokenizer(w, d, VOCAB_SIZE))
    merges = r.fields["tokenizer.ggml.merges"].contents()
    assert merges[:2] == ["a\u0120b c", "d \u0120e"]
    assert merges == gguf.SpecialVocab(d, load_merges=True).merges


def test_chat_template_jinja_file_and_add_eos(tmp_path, tokenizer_json):
    d = _write_dir(tmp_path / "model", tokenizer_json, chat_template_in_config=False)
    cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["add_eos_token"] = True
    (d / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    (d / "chat_template.jinja").write_text("{{ messages[0]['content'] }}\n", encoding="utf-8")
    r = _write_gguf(tmp_path / "t.gguf", lambda w: add_tokenizer(w, d, VOCAB_SIZE))
    assert r.fields["tokenizer.chat_template"].contents() == "{{ messages[0]['content'] }}\n"
    # transformers (and the pinned converter) follow the ByteLevel post-processor, which adds no EOS
    assert r.fields["tokenizer.ggml.add_eos_token"].contents() is False
    assert r.fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert gguf.SpecialVocab(d).chat_template == "{{ messages[0]['content'] }}\n"


def test_config_key_beats_jinja_file_and_no_template_without_config(tmp_path, tokenizer_json):
    d = _write_dir(tmp_path / "model", tokenizer_json)
    (d / "chat_template.jinja").write_text("file template", encoding="utf-8")
    r = _write_gguf(tmp_path / "a.gguf", lambda w: add_tokenizer(w, d, VOCAB_SIZE))
    assert r.fields["tokenizer.chat_template"].contents() == CHAT_TEMPLATE
    (d / "tokenizer_config.json").unlink()
    r = _write_gguf(tmp_path / "b.gguf", lambda w: add_tokenizer(w, d, VOCAB_SIZE))
    # SpecialVocab reads neither template nor *_token strings without tokenizer_config.json; config.json ids stay.
    assert "tokenizer.chat_template" not in r.fields
    assert "tokenizer.ggml.padding_token_id" not in r.fields
    added = {a["content"]: a["id"] for a in tokenizer_json["added_tokens"]}
    assert r.fields["tokenizer.ggml.eos_token_id"].contents() == added["<|im_end|>"]
    assert r.fields["tokenizer.ggml.bos_token_id"].contents() == added["<|endoftext|>"]


def test_exact_vocab_size_has_no_padding(tmp_path, tokenizer_json):
    n = len(tokenizer_json["model"]["vocab"]) + len(tokenizer_json["added_tokens"])
    d = _write_dir(tmp_path / "model", tokenizer_json)
    r = _write_gguf(tmp_path / "t.gguf", lambda w: add_tokenizer(w, d, n))
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == n and not any(t.startswith("[PAD") for t in tokens)


def test_demo_tokenizer_if_available(tmp_path):
    demo = pytest.importorskip("so8t_export.demo")
    if not hasattr(demo, "build_tokenizer"):
        pytest.skip("so8t_export.demo has no build_tokenizer")
    demo.build_tokenizer(tmp_path)
    n = len(json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"])
    r = _write_gguf(tmp_path / "t.gguf", lambda w: add_tokenizer(w, tmp_path, n + 100))
    assert r.fields["tokenizer.ggml.pre"].contents() == "qwen2"
    assert len(r.fields["tokenizer.ggml.tokens"].contents()) == n + 100


# ------------------------------------------------------------------------------------------------ errors


def _add(d: Path, vocab_size: int = VOCAB_SIZE) -> None:
    add_tokenizer(gguf.GGUFWriter(None, "qwen3"), d, vocab_size)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: file not found"):
        _add(tmp_path)
    assert issubclass(TokenizerError, ValueError)


def test_not_bpe(tmp_path, tokenizer_json):
    tj = json.loads(json.dumps(tokenizer_json))
    tj["model"] = {"type": "Unigram", "vocab": [["a", 0.0]], "unk_id": 0}
    d = _write_dir(tmp_path / "m", tokenizer_json)
    (d / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    with pytest.raises(
        TokenizerError, match=r"tokenizer\.json: key 'model\.type': expected 'BPE', found 'Unigram'"
    ):
        _add(d)


def test_byte_fallback_bpe_rejected(tmp_path, tokenizer_json):
    tj = json.loads(json.dumps(tokenizer_json))
    tj["model"]["byte_fallback"] = True
    d = _write_dir(tmp_path / "m", tj)
    with pytest.raises(TokenizerError, match=r"model\.byte_fallback"):
        _add(d)


def test_tokenizer_longer_than_vocab_size(tmp_path, tokenizer_json):
    n = len(tokenizer_json["model"]["vocab"]) + len(tokenizer_json["added_tokens"])
    d = _write_dir(tmp_path / "m", tokenizer_json)
    with pytest.raises(TokenizerError, match=rf"tokenizer\.json: .*ids up to {n - 1}.*vocab_size {n - 1}"):
        _add(d, n - 1)


@pytest.mark.parametrize(
    "pre",
    [
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},  # GPT-2
        None,
        "llama3",  # Split with a different regex
        "prefix_space",
    ],
)
def test_non_qwen2_pre_tokenizer(tmp_path, tokenizer_json, pre):
    tj = json.loads(json.dumps(tokenizer_json))
    if pre == "llama3":
        tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = (
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        )
    elif pre == "prefix_space":
        tj["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = True
    else:
        tj["pre_tokenizer"] = pre
    d = _write_dir(tmp_path / "m", tj)
    with pytest.raises(
        TokenizerError, match=r"tokenizer\.json: key 'pre_tokenizer': expected the Qwen2 pre-tokenizer"
    ):
        _add(d)


def test_missing_merges(tmp_path, tokenizer_json):
    tj = json.loads(json.dumps(tokenizer_json))
    tj["model"]["merges"] = []
    d = _write_dir(tmp_path / "m", tj)
    with pytest.raises(TokenizerError, match=r"model\.merges"):
        _add(d)
    # ... but merges.txt is used as SpecialVocab does
    (d / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in tokenizer_json["model"]["merges"]) + "\n",
        encoding="utf-8",
    )
    r = _write_gguf(tmp_path / "t.gguf", lambda w: add_tokenizer(w, d, VOCAB_SIZE))
    assert r.fields["tokenizer.ggml.merges"].contents() == gguf.SpecialVocab(d, load_merges=True).merges


def test_negative_vocab_size(tmp_path, tokenizer_json):
    d = _write_dir(tmp_path / "m", tokenizer_json)
    with pytest.raises(TokenizerError, match="vocab_size"):
        _add(d, 0)


# ------------------------------------------------------------------------------------------ llama.cpp


@pytest.mark.llama
def test_llama_cpp_tokenizes_like_hf(tmp_path, tokenizer_json):
    """End to end: llama.cpp reading our keys (gpt2 + pre qwen2) gives the ids of the HF tokenizer."""
    require_llama_cpp()
    import llama_cpp
    from tokenizers import Tokenizer

    d = _write_dir(tmp_path / "m", tokenizer_json)
    path = tmp_path / "vocab.gguf"

    def fill(w: gguf.GGUFWriter) -> None:
        # Minimal qwen3 hparams so the loader gets as far as the vocabulary (vocab_only skips tensors).
        w.add_context_length(256)
        w.add_embedding_length(64)
        w.add_feed_forward_length(128)
        w.add_block_count(1)
        w.add_head_count(4)
        w.add_head_count_kv(2)
        w.add_key_length(16)
        w.add_value_length(16)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_rope_freq_base(1e6)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        add_tokenizer(w, d, VOCAB_SIZE)

    w = gguf.GGUFWriter(path, "qwen3")
    fill(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    hf = Tokenizer.from_str(json.dumps(tokenizer_json))
    for text in CORPUS[:4] + ["Hello  world\n\n\tx", "I've 12345 apples", "<think>ok</think><|im_end|>"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf.encode(text).ids, text
    assert llm.token_eos() == tokenizer_json["added_tokens"][2]["id"]


def test_template_post_processor_adding_an_unnamed_token_rejected(tmp_path, tokenizer_json):
    """A template token that tokenizer_config does not name as bos_token: llama.cpp could not add it."""
    tj = json.loads(json.dumps(tokenizer_json))
    tj["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [],
        "special_tokens": {},
    }
    d = _write_dir(tmp_path / "m", tj)
    with pytest.raises(TokenizerError, match=r"key 'post_processor' adds '<\|im_start\|>' before every text.*"
                                             r"names no bos_token"):
        _add(d)


@pytest.mark.parametrize("content, flags, message", [
    ("\u2581x\u2581", {}, r"plain added token '\u2581x\u2581' \(id \d+\) contains U\+2581"),
    ("<ls>", {"lstrip": True}, r"added token '<ls>' \(id \d+\) has lstrip=true"),
    ("<sw>", {"single_word": True, "rstrip": True},
     r"added token '<sw>' \(id \d+\) has rstrip=true and single_word=true"),
])
def test_added_tokens_llama_cpp_cannot_match_rejected(tmp_path, tokenizer_json, content, flags, message):
    """llama.cpp would tokenise ordinary text unlike transformers (shown in test_tokenizer_converter.py)."""
    tj = json.loads(json.dumps(tokenizer_json))
    tj["added_tokens"].append({"id": max(a["id"] for a in tj["added_tokens"]) + 1, "content": content,
                               "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                               "special": False, **flags})
    d = _write_dir(tmp_path / "m", tj)
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: " + message):
        _add(d)
