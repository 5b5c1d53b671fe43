"""Tokenizer metadata for a Qwen3 GGUF, as llama.cpp's converter writes it, from the JSON files alone.

Identity preserved: ``add_tokenizer(writer, model_dir, vocab_size)`` adds the same ``tokenizer.*`` keys,
values, value types and order as ``convert_hf_to_gguf.py`` does for a Qwen3 checkpoint, i.e.
``TextModel._set_vocab_gpt2`` (``Qwen2Model.set_vocab`` falls back to it because Qwen3 ships no
``tokenizer.model``) followed by ``gguf.SpecialVocab(dir_model, load_merges=True).add_to_gguf``, without
importing transformers. Sources checked (search index, ggml-org/llama.cpp ``conversion/base.py`` @00bd27a6,
same logic as the older monolithic ``convert_hf_to_gguf.py``; gguf-py 0.19.0 ``gguf/vocab.py`` installed here):

* ``_set_vocab_gpt2``: ``add_tokenizer_model("gpt2")``, ``add_tokenizer_pre(tokpre)``, ``add_token_list``,
  ``add_token_types``, then ``SpecialVocab(...).add_to_gguf`` (merges, special ids, add_* flags, chat template).
* ``get_vocab_base``: ``reverse_vocab`` is ``tokenizer.vocab`` (BPE vocab with the added tokens inserted by
  content, so an added token shadows a base token with the same text) inverted; ids below ``vocab_size`` that
  are missing become ``[PAD{i}]`` / UNUSED; an added token is CONTROL if ``special`` or
  ``does_token_look_special`` (``<|...|>``, ``<｜...｜>``, ``<unused...>``, ``<pad>``, ``<mask>``, ``<2mass>``,
  ``[@BOS@]``), else USER_DEFINED with U+2581 replaced by a space; everything else NORMAL;
  ``assert max(tokenizer.vocab.values()) < vocab_size``.
  Not reproduced: for added tokens with ``normalized: false`` the converter replaces the text by
  ``decode(encode(text))``; with the byte-level decoder that is the identity for ASCII tokens (all Qwen3 added
  tokens), so the text is taken verbatim here.
* ``get_vocab_base_pre``: ``tokpre`` is looked up from a hash of the token ids of a fixed text, "qwen2" for the
  Qwen1.5/2/3 tokenizers. That needs the real vocabulary and a tokenizer runtime; instead the pre-tokenizer
  *definition* in tokenizer.json is checked to be the Qwen2 one (transformers ``Qwen2Converter``: NFC, Split on
  ``QWEN2_PRETOKENIZE_REGEX`` isolated, ByteLevel without regex/prefix space), which is what llama.cpp's
  ``LLAMA_VOCAB_PRE_TYPE_QWEN2`` (pre "qwen2", ``src/llama-vocab.cpp``) implements.
* ``SpecialVocab``: merges from tokenizer.json (list-of-pairs format joined with a space, spaces inside a part
  encoded as chr(ord(" ") + 256)); else merges.txt. Special ids for bos/eos/unk/sep/pad/cls/mask: tokenizer_config
  ``<typ>_token`` (str or {"content"}) matched against tokenizer.json ``added_tokens`` (first match), then
  config.json ``<typ>_token_id`` (or ``text_config``), first one set wins; no range check (``n_vocab=None``).
  ``add_<typ>_token`` booleans from tokenizer_config (only bos/eos/sep have writer handlers). Chat template:
  tokenizer_config ``chat_template`` if the key exists, else ``chat_template.jinja`` (with
  ``additional_chat_templates/*.jinja`` as named templates), else ``chat_template.json``; all of this only when
  tokenizer_config.json exists and is non-empty.

One deliberate addition: ``tokenizer.ggml.add_bos_token = False`` is written when tokenizer_config does not say
otherwise (it is llama.cpp's default for BPE vocabularies anyway, and what published Qwen3 GGUFs carry).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf

__all__ = ["QWEN2_PRETOKENIZE_REGEX", "TokenizerError", "add_tokenizer", "does_token_look_special"]

# transformers models/qwen2/tokenization_qwen2.py PRETOKENIZE_REGEX == the regex in Qwen3's tokenizer.json ==
# the "original regex from tokenizer.json" comment of llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2.
QWEN2_PRETOKENIZE_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# SpecialVocab's default special_token_types, in its order (the order of the written keys follows it).
_SPECIAL_TOKEN_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")


class TokenizerError(ValueError):
    """A tokenizer directory llama.cpp's Qwen2/Qwen3 path cannot represent; names file, key, expected vs found."""


def does_token_look_special(token: str) -> bool:
    """``TextModel.does_token_look_special`` of convert_hf_to_gguf: added tokens that are CONTROL even when
    their ``special`` flag is false."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> None:
    """Add the tokenizer keys convert_hf_to_gguf writes for Qwen3 (see module docstring) to ``writer``.

    ``vocab_size`` is config.json's ``vocab_size`` (the embedding rows); the token list is padded to it.
    Raises ``TokenizerError`` for a missing tokenizer.json, a non byte-level-BPE model, a pre-tokenizer that is
    not Qwen2's, token ids outside ``[0, vocab_size)`` or missing merges.
    """
    model_dir = Path(model_dir)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size <= 0:
        raise TokenizerError(f"vocab_size must be a positive int, got {vocab_size!r}")
    tok_path = model_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise TokenizerError(f"{tok_path}: file not found (expected a Hugging Face fast tokenizer.json)")
    tokenizer = _read_json(tok_path)
    _check_qwen2_bpe(tok_path, tokenizer)

    tokens, toktypes = _token_list(tok_path, tokenizer, vocab_size)
    merges = _merges(tok_path, tokenizer, model_dir)

    cfg_path = model_dir / "tokenizer_config.json"
    tokenizer_config: dict[str, Any] | None = _read_json(cfg_path) if cfg_path.is_file() else None
    if tokenizer_config is not None and not isinstance(tokenizer_config, dict):
        raise TokenizerError(f"{cfg_path}: expected a JSON object, found {type(tokenizer_config).__name__}")
    special_ids = _special_token_ids(tokenizer, tokenizer_config, model_dir)
    add_flags = _add_special_flags(tokenizer_config)
    chat_template = _chat_template(tokenizer_config, model_dir, cfg_path)

    # Same call order as _set_vocab_gpt2 + SpecialVocab.add_to_gguf.
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(toktypes)
    writer.add_token_merges(merges)
    for typ, tid in special_ids.items():
        getattr(writer, f"add_{typ}_token_id")(tid)
    for typ, value in add_flags.items():
        getattr(writer, f"add_add_{typ}_token")(value)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None


def _check_qwen2_bpe(path: Path, tokenizer: Any) -> None:
    """Byte-level BPE with the Qwen2 pre-tokenizer, i.e. what llama.cpp's gpt2 model + pre "qwen2" decode."""
    if not isinstance(tokenizer, dict) or not isinstance(tokenizer.get("model"), dict):
        raise TokenizerError(f"{path}: key 'model': expected an object, found {_describe(tokenizer)}")
    model = tokenizer["model"]
    if model.get("type") != "BPE":
        raise TokenizerError(f"{path}: key 'model.type': expected 'BPE', found {model.get('type')!r}")
    if model.get("byte_fallback", False):
        raise TokenizerError(
            f"{path}: key 'model.byte_fallback': expected false (byte-level BPE), found true"
        )
    if not isinstance(model.get("vocab"), dict):
        raise TokenizerError(
            f"{path}: key 'model.vocab': expected an object, found {_describe(model.get('vocab'))}"
        )
    decoder = tokenizer.get("decoder")
    decoder_type = decoder.get("type") if isinstance(decoder, dict) else decoder
    if decoder_type != "ByteLevel":
        raise TokenizerError(f"{path}: key 'decoder.type': expected 'ByteLevel', found {decoder_type!r}")

    pre = tokenizer.get("pre_tokenizer")
    expected = (
        "Sequence[Split(Regex=<Qwen2 regex>, behavior=Isolated, invert=false), "
        "ByteLevel(add_prefix_space=false, use_regex=false)]"
    )
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else None
    ok = isinstance(steps, list) and len(steps) == 2 and all(isinstance(step, dict) for step in steps)
    if ok:
        split, byte_level = steps
        ok = (
            split.get("type") == "Split"
            and split.get("pattern") == {"Regex": QWEN2_PRETOKENIZE_REGEX}
            and split.get("behavior") == "Isolated"
            and not split.get("invert", False)
            and byte_level.get("type") == "ByteLevel"
            and not byte_level.get("add_prefix_space", False)
            and not byte_level.get("use_regex", True)
        )
    if not ok:
        raise TokenizerError(
            f"{path}: key 'pre_tokenizer': expected the Qwen2 pre-tokenizer {expected} "
            f"(llama.cpp tokenizer.ggml.pre = 'qwen2'), found {_describe(pre)}"
        )
    normalizer = tokenizer.get("normalizer")
    if normalizer is not None and (not isinstance(normalizer, dict) or normalizer.get("type") != "NFC"):
        raise TokenizerError(
            f"{path}: key 'normalizer': expected null or {{'type': 'NFC'}} (Qwen2), found {_describe(normalizer)}"
        )
    # RobertaProcessing/TemplateProcessing would make SpecialVocab derive add_bos/add_eos/add_sep from the
    # template; Qwen uses ByteLevel (or none), for which SpecialVocab derives nothing.
    post = tokenizer.get("post_processor")
    procs = post.get("processors", [post]) if isinstance(post, dict) else []
    bad = [p.get("type") for p in procs if isinstance(p, dict) and p.get("type") != "ByteLevel"]
    if bad:
        raise TokenizerError(
            f"{path}: key 'post_processor': expected null or ByteLevel (Qwen2), found processor type(s) {bad}"
        )


def _token_list(path: Path, tokenizer: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """``get_vocab_base``: tokens and token types for ids 0..vocab_size-1."""
    vocab: dict[str, int] = dict(tokenizer["model"]["vocab"])
    added = tokenizer.get("added_tokens") or []
    added_by_id: dict[int, dict] = {}
    for i, at in enumerate(added):
        if (
            not isinstance(at, dict)
            or not isinstance(at.get("id"), int)
            or not isinstance(at.get("content"), str)
        ):
            raise TokenizerError(
                f"{path}: key 'added_tokens[{i}]': expected an object with int 'id' and str 'content', "
                f"found {_describe(at)}"
            )
        added_by_id[at["id"]] = at
    # tokenizer.vocab (transformers get_vocab / tokenizers get_vocab(with_added_tokens=True)): the model vocab
    # with every added token inserted by content, so an added token overrides a base entry with the same text.
    for at in added:
        vocab[at["content"]] = at["id"]
    added_contents = {at["content"] for at in added}

    ids = list(vocab.values())
    if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ids):
        bad = next(t for t, i in vocab.items() if not isinstance(i, int) or isinstance(i, bool) or i < 0)
        raise TokenizerError(
            f"{path}: key 'model.vocab': expected non-negative int ids, found {bad!r}: {vocab[bad]!r}"
        )
    max_id = max(ids, default=-1)
    if max_id >= vocab_size:
        raise TokenizerError(
            f"{path}: tokenizer has {len(vocab)} tokens with ids up to {max_id} (model.vocab + added_tokens), "
            f"expected all ids < vocab_size {vocab_size} (config.json 'vocab_size')"
        )

    reverse_vocab = {i: t for t, i in vocab.items()}
    tokens: list[str] = []
    toktypes: list[int] = []
    for i in range(vocab_size):
        token = reverse_vocab.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            toktypes.append(gguf.TokenType.UNUSED)
            continue
        if token in added_contents:
            # The converter reads added_tokens_decoder[i].special, i.e. the entry for this id.
            entry = added_by_id.get(i) or next(at for at in added if at["content"] == token)
            if entry.get("special", False) or does_token_look_special(token):
                toktypes.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")  # converter: pre-normalize user-defined spaces
                toktypes.append(gguf.TokenType.USER_DEFINED)
        else:
            toktypes.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, toktypes


def _merges(path: Path, tokenizer: dict, model_dir: Path) -> list[str]:
    """SpecialVocab merges: "a b" strings as stored, or [a, b] pairs joined with spaces inside parts encoded
    as chr(288) ('Ġ', the byte-level symbol for a space, ggml-org/llama.cpp#9692); merges.txt as fallback."""
    merges = tokenizer["model"].get("merges")
    if isinstance(merges, list) and merges:
        if all(isinstance(m, str) for m in merges):
            return list(merges)
        if all(isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m) for m in merges):
            return [" ".join(part.replace(" ", chr(ord(" ") + 256)) for part in pair) for pair in merges]
        raise TokenizerError(
            f"{path}: key 'model.merges': expected a list of 'a b' strings or of [a, b] string pairs, "
            f"found e.g. {_describe(merges[0])}"
        )
    txt = model_dir / "merges.txt"
    if txt.is_file():
        out = []
        with open(txt, encoding="utf-8") as fp:  # same line iteration as SpecialVocab._try_load_merges_txt
            lines = list(fp)
        if lines and lines[0].strip().startswith("#"):
            lines = lines[1:]
        for line in lines:
            parts = line.strip().split(None, 3)
            if len(parts) == 2:  # SpecialVocab ignores blank and malformed lines
                out.append(f"{parts[0]} {parts[1]}")
        if out:
            return out
    # gguf-py silently drops an empty array, and llama.cpp then refuses the file
    # ("cannot find tokenizer merges in model file"), so fail here instead.
    raise TokenizerError(
        f"{path}: key 'model.merges': expected a non-empty merge list (llama.cpp needs tokenizer.ggml.merges "
        f"for a gpt2 vocabulary), found {_describe(merges)} and no usable {txt.name}"
    )


def _special_token_ids(tokenizer: dict, tokenizer_config: dict | None, model_dir: Path) -> dict[str, int]:
    """SpecialVocab._try_load_from_tokenizer_json (special ids part) then _try_load_from_config_json."""
    ids: dict[str, int] = {}

    def set_id(typ: str, tid: Any) -> None:  # SpecialVocab._set_special_token with n_vocab=None
        if not isinstance(tid, int):
            return
        if tid < 0:
            raise TokenizerError(
                f"invalid value for special token type {typ}: {tid} (expected a non-negative id)"
            )
        ids.setdefault(typ, tid)

    added = tokenizer.get("added_tokens") or []
    if tokenizer_config:
        cfg = dict(tokenizer_config)
        # SpecialVocab: a missing bos/eos falls back to cls/sep.
        if not cfg.get("bos_token") and cfg.get("cls_token"):
            cfg["bos_token"] = cfg["cls_token"]
        if not cfg.get("eos_token") and cfg.get("sep_token"):
            cfg["eos_token"] = cfg["sep_token"]
        for typ in _SPECIAL_TOKEN_TYPES:
            entry = cfg.get(f"{typ}_token")
            if isinstance(entry, dict):
                entry = entry.get("content")
            if not isinstance(entry, str):
                continue
            set_id(typ, next((at.get("id") for at in added if at.get("content") == entry), None))

    config_path = model_dir / "config.json"
    if config_path.is_file():
        config = _read_json(config_path)
        if isinstance(config, dict):
            for typ in _SPECIAL_TOKEN_TYPES:
                tid = config.get(f"{typ}_token_id")
                if tid is None and isinstance(config.get("text_config"), dict):
                    tid = config["text_config"].get(f"{typ}_token_id")
                set_id(typ, tid)
    return ids


def _add_special_flags(tokenizer_config: dict | None) -> dict[str, bool]:
    """add_<typ>_token booleans SpecialVocab would write (only bos/eos/sep have GGUFWriter handlers), with
    add_bos defaulting to False."""
    flags: dict[str, bool] = {"bos": False}
    for typ in _SPECIAL_TOKEN_TYPES:
        value = (tokenizer_config or {}).get(f"add_{typ}_token")
        if isinstance(value, bool) and typ in ("bos", "eos", "sep"):
            flags[typ] = value
    return flags


def _chat_template(
    tokenizer_config: dict | None, model_dir: Path, cfg_path: Path
) -> str | list[dict[str, str]] | None:
    """SpecialVocab's chat template resolution (see module docstring)."""
    if not tokenizer_config:
        return None
    alt: str | list[dict[str, str]] | None = None
    jinja = model_dir / "chat_template.jinja"
    json_file = model_dir / "chat_template.json"
    if jinja.is_file():
        alt = jinja.read_text(encoding="utf-8")
        extra = sorted((model_dir / "additional_chat_templates").glob("*.jinja"))
        if extra:
            alt = [{"name": "default", "template": alt}]
            alt += [{"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in extra]
    elif json_file.is_file():
        data = _read_json(json_file)
        alt = data.get("chat_template") if isinstance(data, dict) else None
    template = tokenizer_config.get("chat_template", alt)
    if template is None or isinstance(template, (str, list)):
        return template or None  # GGUFWriter.add_string skips "" anyway
    raise TokenizerError(
        f"{cfg_path}: key 'chat_template': expected a string or a list of {{name, template}}, "
        f"found {_describe(template)}"
    )


def _describe(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
