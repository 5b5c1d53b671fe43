"""Tokenizer metadata: our GGUF against the file llama.cpp's own converter writes from the same folder.

Reference: convert_hf_to_gguf.py from the llama.cpp that llama-cpp-python 0.3.36 vendors (tests/upstream.py),
run with --vocab-only on the same folder, with its own gguf-py. Every ``tokenizer.*`` field of both files,
read back with GGUFReader, must be equal: names, order, value types and values. Then llama.cpp (through
llama-cpp-python) must tokenise our file as transformers' AutoTokenizer tokenises the folder.

The wrapper (bench/convert_hf_wrapper.py) makes the converter's ``get_vocab_base_pre`` return "qwen2": it
recognises a pre-tokenizer by the sha256 of the ids its ``chktxt`` encodes to, and our tiny vocabularies
have no known hash. So ``tokenizer.ggml.pre`` is equal by construction; what the hash stands for is tested
instead: llama.cpp with pre "qwen2" tokenises ``chktxt`` exactly as transformers does.

At the end: the folders the exporter refuses (llama.cpp could not tokenise them as transformers does, and on
the converter's file it indeed does not), and the one difference from the converter we keep.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import pytest
from conftest import require_llama_cpp, skip_or_fail

from so8t_export.demo import CHAT_TEMPLATE
from so8t_export.export import export_gguf
from so8t_export.gguf_tokenizer import TokenizerError
from so8t_export.parity import DEFAULT_PROMPTS

TEXTS = DEFAULT_PROMPTS + ["", " ", "hello world", "  leading spaces\n\n\ttabs", "<think>\nreason\n</think>\n\nok",
                           "<|im_start|>user\nhi<|im_end|>\n", "Ünïcödé 🦙 ১২৩ ٣٤٥", "<tool_call>x</tool_call>",
                           "a <|fim_pad|> b <unused0> <pad>c multi\nline",
                           "plain_normalized <special_normalized> <special\u2581space>",
                           "a <special_stripped> b <|im_end|> c\n<|im_end|>\nd"]
# Added tokens that llama.cpp cannot tokenise as transformers does (U+2581 in a plain token, lstrip, rstrip,
# single_word) are refused by the exporter: see MISMATCHED at the end.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja",
                   "special_tokens_map.json", "chat_template.json")


# ------------------------------------------------------------------------------------------ the folders
def _with_tokenizer(qwen3_dir: Path, folder: Path, save) -> Path:
    """The tiny checkpoint with its tokenizer files replaced by what `save(folder)` writes."""
    shutil.copytree(qwen3_dir, folder)
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    save(folder)
    return folder


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _demo_backend(qwen3_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(qwen3_dir / "tokenizer.json"))


def _auto(qwen3_dir, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen3_dir, **kwargs)


def _round_trip(qwen3_dir, folder):
    """AutoTokenizer.from_pretrained(demo).save_pretrained(): chat_template.jinja, extra_special_tokens."""
    return _with_tokenizer(qwen3_dir, folder, _auto(qwen3_dir).save_pretrained)


def _built_in_code(qwen3_dir, folder):
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
    return _with_tokenizer(qwen3_dir, folder, save)


def _post_processor(make, **specials):
    """The demo tokenizer with the post-processor `make(backend)`, saved through transformers."""
    from transformers import PreTrainedTokenizerFast

    def build(qwen3_dir, folder):
        def save(folder):
            backend = _demo_backend(qwen3_dir)
            backend.post_processor = make(backend)
            tok = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
            tok.chat_template = CHAT_TEMPLATE
            tok.save_pretrained(folder)
        return _with_tokenizer(qwen3_dir, folder, save)
    return build


def _template(single: str, pair: str, **specials):
    """A TemplateProcessing post-processor (Llama 3 style when it adds a BOS)."""
    from tokenizers import processors

    def make(backend):
        named = sorted({t for t in (single + " " + pair).split() if not t.startswith("$")})
        return processors.TemplateProcessing(single=single, pair=pair,
                                             special_tokens=[(t, backend.token_to_id(t)) for t in named])
    return _post_processor(make, **specials)


def _roberta(backend):
    from tokenizers import processors

    return processors.RobertaProcessing(("<|im_end|>", backend.token_to_id("<|im_end|>")),
                                        ("<|endoftext|>", backend.token_to_id("<|endoftext|>")),
                                        trim_offsets=False, add_prefix_space=False)


def _byte_level_then_template(backend):
    from tokenizers import processors

    bos = ("<|endoftext|>", backend.token_to_id("<|endoftext|>"))
    return processors.Sequence([processors.ByteLevel(trim_offsets=False), processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A <|endoftext|> $B:1", special_tokens=[bos])])


def _bert(backend):
    from tokenizers import processors

    return processors.BertProcessing(("<|im_end|>", backend.token_to_id("<|im_end|>")),
                                     ("<|endoftext|>", backend.token_to_id("<|endoftext|>")))


def _config_says_no_bos(qwen3_dir, folder):
    """A template that adds BOS, and tokenizer_config add_bos_token = false: the post-processor wins, in
    transformers and in the pinned converter (PyPI's gguf 0.19 would let the config win)."""
    _template("<|endoftext|> $A", "<|endoftext|> $A $B:1", bos_token="<|endoftext|>")(qwen3_dir, folder)
    # transformers 5 drops the key on save: set it by hand
    _edit_json(folder / "tokenizer_config.json", lambda c: c.update(add_bos_token=False))
    return folder


def _config_says_add_bos_and_eos(qwen3_dir, folder):
    """The demo's ByteLevel post-processor, and tokenizer_config asking for BOS and EOS: ByteLevel wins."""
    _round_trip(qwen3_dir, folder)
    _edit_json(folder / "tokenizer_config.json",
               lambda c: c.update(add_bos_token=True, add_eos_token=True, bos_token="<|endoftext|>"))
    return folder


def _added_tokens_of_every_kind(qwen3_dir, folder):
    """transformers' add_tokens/add_special_tokens: plain tokens that look special (CONTROL anyway, U+2581
    kept), U+2581 in a special token, the normalized flag, and lstrip/rstrip on a special token
    (Qwen2Tokenizer clears them on its listed special tokens, so they are no reason to refuse)."""
    from tokenizers import AddedToken

    def save(folder):
        tok = _auto(qwen3_dir)
        tok.add_tokens([AddedToken("<|fim_pad|>", special=False, normalized=False),
                        AddedToken("<unused0>", special=False, normalized=False),
                        AddedToken("<pad>", special=False, normalized=False),
                        AddedToken("<\uff5ctool\u2581sep\uff5c>", special=False, normalized=False),
                        AddedToken("plain_normalized", special=False, normalized=True),
                        AddedToken("multi\nline", special=False, normalized=False)])
        tok.add_special_tokens({"additional_special_tokens": [
            "<|im_start|>", AddedToken("<special_normalized>", special=True, normalized=True),
            AddedToken("<special\u2581space>", special=True, normalized=False),
            AddedToken("<special_stripped>", special=True, normalized=False, lstrip=True, rstrip=True)]})
        tok.save_pretrained(folder)
    return _with_tokenizer(qwen3_dir, folder, save)


def _promoted_to_special(qwen3_dir, folder):
    """add_special_tokens() on a token that was a plain added token: transformers rewrites both files."""
    def save(folder):
        tok = _auto(qwen3_dir)
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<tool_call>"]})
        tok.save_pretrained(folder)
    return _with_tokenizer(qwen3_dir, folder, save)


def _every_special_named(qwen3_dir, folder):
    """unk, bos, sep, cls and mask named too (llama.cpp has no key for cls: SpecialVocab skips it)."""
    tok = _auto(qwen3_dir, unk_token="<|endoftext|>", bos_token="<|endoftext|>", sep_token="<|im_end|>",
                cls_token="<|im_start|>", mask_token="<think>")
    return _with_tokenizer(qwen3_dir, folder, tok.save_pretrained)


def _ids_from_config_json(qwen3_dir, folder):
    """tokenizer_config.json names no special token: the ids come from config.json."""
    _round_trip(qwen3_dir, folder)
    _edit_json(folder / "tokenizer_config.json",
               lambda c: [c.pop(k, None) for k in ("bos_token", "eos_token", "pad_token", "unk_token")])
    return folder


def _template_only_in(where: str):
    def build(qwen3_dir, folder):
        def save(folder):
            shutil.copy(qwen3_dir / "tokenizer.json", folder)
            config = json.loads((qwen3_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
            del config["chat_template"]
            (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
            if where == "chat_template.jinja":
                (folder / where).write_text("{{ 'from the jinja file' }}", encoding="utf-8")
            else:
                (folder / where).write_text(json.dumps({"chat_template": "{{ 'from the json file' }}"}))
        return _with_tokenizer(qwen3_dir, folder, save)
    return build


def _named_chat_templates(qwen3_dir, folder):
    """A dict of templates: transformers writes additional_chat_templates/*.jinja beside
    chat_template.jinja."""
    tok = _auto(qwen3_dir)
    tok.chat_template = {"default": CHAT_TEMPLATE, "tool_use": "{{ messages[0]['content'] }}",
                         "rag": "{{ 'r' }}"}
    return _with_tokenizer(qwen3_dir, folder, tok.save_pretrained)


def _no_tokenizer_config(qwen3_dir, folder):
    return _with_tokenizer(qwen3_dir, folder, lambda f: shutil.copy(qwen3_dir / "tokenizer.json", f))


def _vocab_size_equals_tokenizer_length(qwen3_dir, folder):
    """No [PAD{i}] entries: config.json vocab_size is the tokenizer's length."""
    from so8t_export.demo import write_tiny_qwen3

    return write_tiny_qwen3(folder, vocab_size=len(_auto(qwen3_dir)))


# How transformers 5 numbers and flags the added tokens (so8t_export.gguf_tokenizer._transformers_vocab): the
# first four folders made our file differ from the converter's before the exporter followed those rules.
def _added_token_repeats_a_base_token(qwen3_dir, folder):
    """tokenizer.json lists an added token whose text is a base-vocabulary token's, under a new id."""
    def save(folder):
        shutil.copy(qwen3_dir / "tokenizer_config.json", folder)
        data = json.loads((qwen3_dir / "tokenizer.json").read_text(encoding="utf-8"))
        new_id = max(a["id"] for a in data["added_tokens"]) + 1
        data["added_tokens"].append({"id": new_id, "content": "\u0120the", "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": False})
        (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return _with_tokenizer(qwen3_dir, folder, save)


def _config_edit(*edits):
    """The demo's tokenizer.json and tokenizer_config.json (with added_tokens_decoder, as transformers 4
    saves it), the config edited by each of `edits` in turn."""
    def build(qwen3_dir, folder):
        _with_tokenizer(qwen3_dir, folder, lambda f: [shutil.copy(qwen3_dir / n, f) for n in
                                                     ("tokenizer.json", "tokenizer_config.json")])
        for edit in edits:
            _edit_json(folder / "tokenizer_config.json", edit)
        return folder
    return build


def _decoder_entry(content: str, **flags):
    """Set flags on the added_tokens_decoder entry of `content`."""
    def edit(config):
        entry = next(e for e in config["added_tokens_decoder"].values() if e["content"] == content)
        entry.update(flags)
    return edit


def _decoder_adds(token_id: int, content: str, special: bool = False):
    def edit(config):
        config["added_tokens_decoder"][str(token_id)] = {
            "content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special}
    return edit


def _listed_special(*contents, key="additional_special_tokens"):
    def edit(config):
        config[key] = [*config.pop("additional_special_tokens"), *contents]
    return edit


def _tokenizer_json_adds(content: str):
    """tokenizer.json lists one added token more than tokenizer_config.json's added_tokens_decoder."""
    def build(qwen3_dir, folder):
        _config_edit()(qwen3_dir, folder)
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        data["added_tokens"].append({"id": max(a["id"] for a in data["added_tokens"]) + 1, "content": content,
                                     "single_word": False, "lstrip": False, "rstrip": False,
                                     "normalized": False, "special": False})
        (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        return folder
    return build


VARIANTS = {
    "demo": None,
    "transformers-round-trip": _round_trip,
    "transformers-built-in-code": _built_in_code,
    "template-adds-bos": _template("<|endoftext|> $A", "<|endoftext|> $A $B:1",
                                   bos_token="<|endoftext|>", eos_token="<|im_end|>"),
    "template-adds-eos": _template("$A <|im_end|>", "$A <|im_end|> $B:1 <|im_end|>", eos_token="<|im_end|>"),
    "template-adds-both": _template("<|endoftext|> $A <|im_end|>", "<|endoftext|> $A <|im_end|> $B:1 <|im_end|>",
                                    bos_token="<|endoftext|>", eos_token="<|im_end|>"),
    "template-pair-with-sep": _template("$A <|im_end|>", "$A <|im_end|> <|im_start|> $B:1 <|im_end|>",
                                        eos_token="<|im_end|>", sep_token="<|im_start|>"),
    "template-adds-bos-config-says-no": _config_says_no_bos,
    "byte-level-config-says-add-bos-and-eos": _config_says_add_bos_and_eos,
    "byte-level-then-template": _post_processor(_byte_level_then_template, bos_token="<|endoftext|>",
                                                eos_token="<|im_end|>"),
    "roberta-processing": _post_processor(_roberta, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                          cls_token="<|endoftext|>", sep_token="<|im_end|>"),
    "added-tokens-of-every-kind": _added_tokens_of_every_kind,
    "plain-token-promoted-to-special": _promoted_to_special,
    "every-special-named": _every_special_named,
    "ids-from-config-json": _ids_from_config_json,
    "template-only-in-chat-template-jinja": _template_only_in("chat_template.jinja"),
    "template-only-in-chat-template-json": _template_only_in("chat_template.json"),
    "named-chat-templates": _named_chat_templates,
    "no-tokenizer-config": _no_tokenizer_config,
    "vocab-size-equals-tokenizer-length": _vocab_size_equals_tokenizer_length,
    # the rules of _transformers_vocab
    "added-token-repeats-a-base-token": _added_token_repeats_a_base_token,
    "added-tokens-decoder-marks-special": _config_edit(_decoder_entry("<think>", special=True)),
    "additional-special-tokens-marks-special": _config_edit(_listed_special("</think>")),
    "extra-special-tokens-marks-special": _config_edit(_listed_special("</think>",
                                                                       key="extra_special_tokens")),
    "token-only-in-added-tokens-decoder": _config_edit(_decoder_adds(750, "<new>")),  # numbered 745
    "token-only-in-tokenizer-json": _tokenizer_json_adds("<orphan>"),  # transformers never sees it
    "model-specific-special-tokens": _config_edit(lambda c: c.update(image_token="<tool_call>",
                                                                     video_token="<video>")),
    "extra-special-tokens-as-names": _config_edit(lambda c: c.update(extra_special_tokens={"audio_token":
                                                                                           "<think>"})),
    "named-special-token-not-added-yet": _config_edit(lambda c: c.update(mask_token="<mask_me>")),
    "named-special-token-with-lstrip": _config_edit(_decoder_entry("<|im_end|>", lstrip=True, rstrip=True)),
    # TokenizersBackend keeps the flags of a listed plain token (Qwen2Tokenizer makes it special)
    "tokenizers-backend-class": _config_edit(lambda c: c.update(tokenizer_class="TokenizersBackend"),
                                             _decoder_entry("<think>", special=True),
                                             _listed_special("</think>")),
}


# Plain and special added tokens (normalized=false) whose text holds characters of the byte-level alphabet
# beyond printable ASCII: the converter replaces each by transformers' decode(encode(text)), which runs them
# through the ByteLevel decoder ('café' -> 'caf\ufffd', 'Ġx' -> ' x'). We keep the text: llama.cpp matches
# USER_DEFINED and CONTROL text against the raw input, and transformers matches these tokens there too (the
# module docstring of so8t_export/gguf_tokenizer.py states the rule).
BYTE_LEVEL_TEXT = ["caf\u00e9", "na\u00efve", "\u0120Hello", "<\u0120special>"]


def _byte_level_text_tokens(qwen3_dir, folder):
    from tokenizers import AddedToken

    def save(folder):
        tok = _auto(qwen3_dir)
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in BYTE_LEVEL_TEXT[:-1]])
        tok.add_special_tokens({"additional_special_tokens": [
            "<|im_start|>", AddedToken(BYTE_LEVEL_TEXT[-1], special=True, normalized=False)]})
        tok.save_pretrained(folder)
    return _with_tokenizer(qwen3_dir, folder, save)


# Added tokens that llama.cpp cannot tokenise as transformers does: the exporter refuses them. The converter
# writes them anyway, and on its file llama.cpp tokenises the ordinary text given here unlike transformers.
def _plain_added(content: str, **flags):
    def build(qwen3_dir, folder):
        from tokenizers import AddedToken

        def save(folder):
            tok = _auto(qwen3_dir)
            tok.add_tokens([AddedToken(content, special=False, normalized=False, **flags)])
            tok.save_pretrained(folder)
        return _with_tokenizer(qwen3_dir, folder, save)
    return build


MISMATCHED = {
    "plain-token-with-lstrip": (_plain_added("<ls>", lstrip=True), "hello <ls> world",
                                r"added token '<ls>' \(id \d+\) has lstrip=true; llama.cpp has no such "
                                r"setting"),
    "plain-token-with-rstrip": (_plain_added("<rs>", rstrip=True), "hello <rs> world",
                                r"added token '<rs>' \(id \d+\) has rstrip=true"),
    "plain-token-with-single-word": (_plain_added("<sw>", single_word=True), "foo<sw>bar",
                                     r"added token '<sw>' \(id \d+\) has single_word=true"),
    # the converter writes ' x ' (U+2581 as a space), which llama.cpp then finds in "a x b"
    "plain-token-with-u2581": (_plain_added("\u2581x\u2581"), "a x b",
                               "plain added token '\u2581x\u2581' \\(id \\d+\\) contains U\\+2581; a GGUF "
                               "writes it with spaces \\(' x '\\)"),
    # Qwen2Tokenizer would clear lstrip on this named special token; TokenizersBackend keeps it
    "special-token-with-lstrip-in-tokenizers-backend": (
        _config_edit(lambda c: c.update(tokenizer_class="TokenizersBackend"),
                     _decoder_entry("<|im_end|>", lstrip=True)),
        "hi <|im_end|>", r"added token '<\|im_end\|>' \(id \d+\) has lstrip=true"),
}

ALL = {**VARIANTS, **{name: make for name, (make, _, _) in MISMATCHED.items()},
       "byte-level-text-in-added-tokens": _byte_level_text_tokens}


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def folders(qwen3_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {name: qwen3_dir if make is None else make(qwen3_dir, root / name) for name, make in ALL.items()}


@pytest.fixture(scope="module")
def converter() -> Path:
    from upstream import fetch_converter

    try:
        return fetch_converter()
    except Exception as err:  # no registry, no sdist, a broken tarball: a skip here, a failure in CI
        skip_or_fail(f"llama.cpp's converter (llama-cpp-python sdist) could not be fetched: {err}")


@pytest.fixture(scope="module")
def references(converter, folders, tmp_path_factory) -> dict[str, Path]:
    """Every folder through the converter, --vocab-only, in one process (see upstream.convert_each)."""
    from upstream import convert_each

    out = tmp_path_factory.mktemp("converter")
    files = {name: out / f"{name}.gguf" for name in folders}
    errors = convert_each([(folders[name], files[name]) for name in folders], "--vocab-only")
    for name, folder in folders.items():
        if errors[folder] is not None:
            files[name] = errors[folder]  # reported by the test that reads it
    return files


def _reference(references, name: str) -> Path:
    path = references[name]
    assert isinstance(path, Path), f"llama.cpp's converter failed on {name}:\n{path}"
    return path


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def exported(variant, folders, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ours") / f"{variant}-f32.gguf"
    export_gguf(folders[variant], out, quant="f32")
    return out


# ------------------------------------------------------------------------------------------ comparison
CHAT_TEMPLATES = "tokenizer.chat_templates"


def _fields(path: Path, prefix: str = "tokenizer.") -> dict:
    reader = gguf.GGUFReader(path)
    return {key: (list(field.types), field.contents()) for key, field in reader.fields.items()
            if key.startswith(prefix) and not key.startswith("GGUF.")}


def _differences(ours: dict, theirs: dict) -> list[str]:
    """One line per field that differs: missing, extra, order, value type or value (for lists, where)."""
    problems = [f"{key}: missing from ours (converter: {_short(theirs[key][1])})"
                for key in theirs if key not in ours]
    problems += [f"{key}: ours only ({_short(ours[key][1])})" for key in ours if key not in theirs]
    if not problems and list(ours) != list(theirs):
        problems.append(f"key order: ours {list(ours)}, converter {list(theirs)}")
    for key in (k for k in theirs if k in ours):
        (our_types, our_value), (their_types, their_value) = ours[key], theirs[key]
        if key == CHAT_TEMPLATES:
            # gguf-py's add_chat_template writes list(set(names)): the order follows string hashing, which
            # differs between processes (PYTHONHASHSEED) on both sides. llama.cpp looks templates up by name.
            our_value, their_value = sorted(our_value), sorted(their_value)
        if our_types != their_types:
            problems.append(f"{key}: value type {[t.name for t in our_types]}, converter "
                            f"{[t.name for t in their_types]}")
        elif our_value != their_value:
            problems.append(f"{key}: {_where(our_value, their_value)}")
    return problems


def _where(ours, theirs) -> str:
    if not isinstance(ours, list) or not isinstance(theirs, list):
        return f"ours {_short(ours)}, converter {_short(theirs)}"
    common = min(len(ours), len(theirs))
    diff = [i for i in range(max(len(ours), len(theirs))) if i >= common or ours[i] != theirs[i]]
    shown = ", ".join(f"[{i}] ours {_short(ours[i] if i < len(ours) else '<none>')} converter "
                      f"{_short(theirs[i] if i < len(theirs) else '<none>')}" for i in diff[:5])
    return f"{len(diff)} of {len(theirs)} entries differ (lengths {len(ours)}, {len(theirs)}): {shown}"


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _assert_same_tokenizer_fields(ours: Path, theirs: Path) -> None:
    problems = _differences(_fields(ours), _fields(theirs))
    assert not problems, "tokenizer fields that differ from llama.cpp's converter:\n" + "\n".join(problems)


# ------------------------------------------------------------------------------------------ the tests
def test_every_tokenizer_field_equals_the_converters(variant, exported, references):
    reference = _reference(references, variant)
    assert _fields(reference), "the converter wrote no tokenizer.* field"
    _assert_same_tokenizer_fields(exported, reference)


def test_the_comparison_names_the_field_that_differs(tmp_path, references):
    """The checker itself: a file without the chat template, other token types and another EOS id fails,
    naming each of the three fields."""
    reference = _reference(references, "demo")
    theirs = _fields(reference)
    ours = dict(theirs)
    types, token_types = theirs["tokenizer.ggml.token_type"]
    ours["tokenizer.ggml.token_type"] = (types, [int(gguf.TokenType.NORMAL)] * len(token_types))
    ours["tokenizer.ggml.eos_token_id"] = (theirs["tokenizer.ggml.eos_token_id"][0],
                                           theirs["tokenizer.ggml.eos_token_id"][1] + 1)
    del ours["tokenizer.chat_template"]
    problems = _differences(ours, theirs)
    assert [p.split(":")[0] for p in problems] == ["tokenizer.chat_template", "tokenizer.ggml.token_type",
                                                   "tokenizer.ggml.eos_token_id"], problems
    first = next(i for i, t in enumerate(token_types) if t != gguf.TokenType.NORMAL)
    assert f"entries differ (lengths {len(token_types)}, {len(token_types)}): [{first}] ours 1 converter " \
           f"{token_types[first]}," in problems[1], problems[1]


def test_a_batched_conversion_equals_a_run_of_its_own(folders, references, tmp_path):
    """convert_each runs the converter on every folder in one process; the last folder, converted after all
    the others, gives the same file (every field, general.* and qwen3.* too) as a process of its own."""
    from upstream import convert

    name = list(folders)[-1]
    result = convert(folders[name], tmp_path / "alone.gguf", "--vocab-only")
    assert result.returncode == 0, result.stderr[-3000:]
    batched, alone = _fields(_reference(references, name), ""), _fields(tmp_path / "alone.gguf", "")
    assert len(alone) > 10 and not _differences(batched, alone), _differences(batched, alone)


@pytest.fixture(scope="module")
def chktxt(converter) -> str:
    from upstream import converter_chktxt

    return converter_chktxt()


def test_llama_cpp_tokenises_like_transformers_with_special_tokens(variant, folders, exported, chktxt):
    require_llama_cpp()
    import llama_cpp
    from transformers import AutoTokenizer

    assert "\U0001f680 (normal)" in chktxt and len(chktxt) > 300  # the converter's hash text, read from it
    hf = AutoTokenizer.from_pretrained(folders[variant])
    llm = llama_cpp.Llama(str(exported), vocab_only=True, verbose=False)
    for text in TEXTS + [chktxt]:
        for add_special in (False, True):
            expected = hf(text, add_special_tokens=add_special).input_ids
            # llama-cpp-python's add_bos is llama_tokenize's add_special: BOS and EOS as the vocab says.
            assert llm.tokenize(text.encode(), add_bos=add_special, special=True) == expected, (text, add_special)


def test_add_bos_and_add_eos_say_what_transformers_adds(variant, folders, exported):
    """The flags against transformers directly: it puts [bos] before a text exactly when add_bos_token is
    true, [eos] after it exactly when add_eos_token is true, and nothing else."""
    from transformers import AutoTokenizer

    fields = _fields(exported)
    hf = AutoTokenizer.from_pretrained(folders[variant])
    plain = hf("hello world", add_special_tokens=False).input_ids
    special = hf("hello world", add_special_tokens=True).input_ids
    start = next(i for i in range(len(special) - len(plain) + 1) if special[i:i + len(plain)] == plain)
    before, after = special[:start], special[start + len(plain):]
    add_bos = fields.get("tokenizer.ggml.add_bos_token", (None, False))[1]
    add_eos = fields.get("tokenizer.ggml.add_eos_token", (None, False))[1]
    assert before == ([fields["tokenizer.ggml.bos_token_id"][1]] if add_bos else [])
    assert after == ([fields["tokenizer.ggml.eos_token_id"][1]] if add_eos else [])


def test_transformers_special_tokens_are_control_tokens(variant, folders, exported):
    """Every added token transformers treats as special is CONTROL; every other added token is CONTROL only
    when it looks special (<|...|>, <unused...>, ...), else USER_DEFINED."""
    from transformers import AutoTokenizer

    fields = _fields(exported)
    tokens, types = fields["tokenizer.ggml.tokens"][1], fields["tokenizer.ggml.token_type"][1]
    hf = AutoTokenizer.from_pretrained(folders[variant])
    decoder = hf.added_tokens_decoder
    assert decoder
    for token_id, added in decoder.items():
        if added.special:
            assert types[token_id] == gguf.TokenType.CONTROL, (token_id, added.content)
        else:
            assert types[token_id] in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED), \
                (token_id, added.content)
    assert all(t == gguf.TokenType.UNUSED for t, text in zip(types, tokens) if text.startswith("[PAD"))
    assert types.count(gguf.TokenType.NORMAL) == len(hf.vocab) - len(decoder)


def test_parity_on_a_transformers_saved_tokenizer(folders, tmp_path):
    """The transformers-saved folder exports, matches transformers' logits and tokenises the parity set alike."""
    require_llama_cpp()
    from so8t_export.parity import run_parity

    folder = folders["transformers-built-in-code"]
    out = tmp_path / "saved-f32.gguf"
    export_gguf(folder, out, quant="f32")
    report = run_parity(folder, out, greedy_tokens=8)
    assert report.passed, report.table()
    assert all(row.tokens_equal for row in report.rows)


# ------------------------------------------------------------------------------------------- refused
def _legacy_special_tokens_map(qwen3_dir, folder):
    """A layout older than transformers 4.34: no added_tokens_decoder, a special_tokens_map.json."""
    _config_edit(lambda c: c.pop("added_tokens_decoder"))(qwen3_dir, folder)
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}), encoding="utf-8")
    return folder


REFUSED = {
    "template-adds-a-token-that-is-not-bos": (
        _template("<|im_start|> $A", "<|im_start|> $A $B:1", eos_token="<|im_end|>"),
        r"key 'post_processor' adds '<\|im_start\|>' before every text, but .*tokenizer_config.json names no "
        r"bos_token; set bos_token to '<\|im_start\|>'"),
    "template-adds-two-tokens-before": (
        _template("<|endoftext|> <|im_start|> $A", "<|endoftext|> <|im_start|> $A $B:1", bos_token="<|endoftext|>"),
        r"transformers adds token ids \[\d+, \d+\] before every text"),
    # The converter writes this folder without add_bos_token (SpecialVocab reads no flag off BertProcessing),
    # so llama.cpp would add nothing where transformers adds [CLS] ... [SEP].
    "bert-processing": (
        _post_processor(_bert, bos_token="<|endoftext|>", eos_token="<|im_end|>", cls_token="<|endoftext|>",
                        sep_token="<|im_end|>"),
        r"transformers adds token ids \[\d+\] before every text, but llama.cpp would add \[\]"),
    # GPT2Tokenizer would build its own pre-tokenizer, not tokenizer.json's
    "another-tokenizer-class": (
        _config_edit(lambda c: c.update(tokenizer_class="GPT2Tokenizer")),
        r"tokenizer_config.json: key 'tokenizer_class': expected one of Qwen2Tokenizer, .* found "
        r"'GPT2Tokenizer'"),
    "special-tokens-map-without-added-tokens-decoder": (
        _legacy_special_tokens_map,
        r"special_tokens_map.json: transformers reads this file because .*tokenizer_config.json has no "
        r"'added_tokens_decoder'"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_llama_cpp_cannot_express_is_refused(case, qwen3_dir, tmp_path):
    make, message = REFUSED[case]
    folder = make(qwen3_dir, tmp_path / case)
    with pytest.raises(TokenizerError, match=message):
        export_gguf(folder, tmp_path / "out.gguf", quant="f32")
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("case", list(MISMATCHED))
def test_tokens_llama_cpp_cannot_match_are_refused(case, folders, tmp_path):
    _, _, message = MISMATCHED[case]
    with pytest.raises(TokenizerError, match=message):
        export_gguf(folders[case], tmp_path / "out.gguf", quant="f32")
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("case", list(MISMATCHED))
def test_the_refusal_is_needed_on_the_converters_file(case, folders, references):
    """Why those folders are refused: llama.cpp on the converter's file (which keeps such tokens) tokenises
    an ordinary text unlike transformers. Should llama.cpp learn the flag, this fails and the refusal can
    go."""
    require_llama_cpp()
    import llama_cpp
    from transformers import AutoTokenizer

    _, text, _ = MISMATCHED[case]
    hf = AutoTokenizer.from_pretrained(folders[case])
    llm = llama_cpp.Llama(str(_reference(references, case)), vocab_only=True, verbose=False)
    expected = hf(text, add_special_tokens=False).input_ids
    assert llm.tokenize(text.encode(), add_bos=False, special=True) != expected, (text, expected)


# ------------------------------------------------------------------------------- the added-token rules
def test_an_added_token_that_repeats_a_base_token_keeps_the_base_id(folders, references, tmp_path):
    """transformers (and so the converter) keep 'Ġthe' at its base id, NORMAL, and leave the id tokenizer.json
    lists it under empty. Before the fix we wrote [base] '[PAD{base}]' UNUSED and [listed] 'Ġthe'
    USER_DEFINED, and llama.cpp tokenised ' the' as the listed id."""
    require_llama_cpp()
    import llama_cpp
    from transformers import AutoTokenizer

    name = "added-token-repeats-a-base-token"
    data = json.loads((folders[name] / "tokenizer.json").read_text(encoding="utf-8"))
    base, listed = data["model"]["vocab"]["\u0120the"], data["added_tokens"][-1]["id"]
    assert data["added_tokens"][-1]["content"] == "\u0120the" and base != listed
    ours_path = tmp_path / "ours.gguf"
    export_gguf(folders[name], ours_path, quant="f32")
    for fields in (_fields(ours_path), _fields(_reference(references, name))):
        tokens, types = fields["tokenizer.ggml.tokens"][1], fields["tokenizer.ggml.token_type"][1]
        assert (tokens[base], types[base]) == ("\u0120the", gguf.TokenType.NORMAL)
        assert (tokens[listed], types[listed]) == (f"[PAD{listed}]", gguf.TokenType.UNUSED)
    hf = AutoTokenizer.from_pretrained(folders[name])
    llm = llama_cpp.Llama(str(ours_path), vocab_only=True, verbose=False)
    assert hf(" the", add_special_tokens=False).input_ids == [base]
    assert llm.tokenize(b" the", add_bos=False, special=True) == [base]


@pytest.mark.parametrize("case, content", [
    ("added-tokens-decoder-marks-special", "<think>"),  # tokenizer.json says special=false
    ("additional-special-tokens-marks-special", "</think>"),  # a plain added token, listed as special
    ("extra-special-tokens-marks-special", "</think>"),
    ("model-specific-special-tokens", "<tool_call>"),  # image_token
    ("extra-special-tokens-as-names", "<think>"),  # extra_special_tokens {"audio_token": ...}
])
def test_tokenizer_config_makes_a_plain_token_special(case, content, folders, references, tmp_path):
    """tokenizer_config.json wins over tokenizer.json's special=false, in transformers and so in the
    converter: the token is CONTROL (we wrote USER_DEFINED, 4, before the fix)."""
    from transformers import AutoTokenizer

    token_id = AutoTokenizer.from_pretrained(folders[case]).convert_tokens_to_ids(content)
    listed = json.loads((folders[case] / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    assert any(a["content"] == content and a["id"] == token_id and not a["special"] for a in listed)
    ours_path = tmp_path / "ours.gguf"
    export_gguf(folders[case], ours_path, quant="f32")
    for fields in (_fields(ours_path), _fields(_reference(references, case))):
        assert fields["tokenizer.ggml.tokens"][1][token_id] == content
        assert fields["tokenizer.ggml.token_type"][1][token_id] == gguf.TokenType.CONTROL


# ----------------------------------------------------------------------------- where we differ, on purpose
def test_byte_level_text_in_added_tokens_is_kept(folders, references, tmp_path):
    """The one difference we keep (see BYTE_LEVEL_TEXT): for those tokens the converter's text is what
    transformers decodes them to, ours the text transformers and llama.cpp match in the input."""
    require_llama_cpp()
    import llama_cpp
    from transformers import AutoTokenizer

    name = "byte-level-text-in-added-tokens"
    ours_path = tmp_path / "ours.gguf"
    export_gguf(folders[name], ours_path, quant="f32")
    ours, theirs = _fields(ours_path), _fields(_reference(references, name))
    hf = AutoTokenizer.from_pretrained(folders[name])
    llm = llama_cpp.Llama(str(ours_path), vocab_only=True, verbose=False)
    our_tokens, their_tokens = ours["tokenizer.ggml.tokens"][1], theirs["tokenizer.ggml.tokens"][1]
    for text in BYTE_LEVEL_TEXT:
        token_id = hf.convert_tokens_to_ids(text)
        decoded = hf.decode(hf.encode(text, add_special_tokens=False))
        assert decoded != text and their_tokens[token_id] == decoded, (text, their_tokens[token_id])
        assert our_tokens[token_id] == text
        assert hf(text, add_special_tokens=False).input_ids == [token_id]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == [token_id], text
        their_tokens[token_id] = text
    assert not _differences(ours, theirs), _differences(ours, theirs)  # and nothing else differs
