"""Tokenizer metadata for a Qwen3 GGUF, as llama.cpp's converter writes it.

Identity preserved: ``add_tokenizer(writer, model_dir, vocab_size)`` adds the same ``tokenizer.*`` keys,
values, value types and order as ``convert_hf_to_gguf.py`` does for a Qwen3 checkpoint: ``_set_vocab_gpt2``
(``Qwen2Model.set_vocab`` falls back to it because Qwen3 ships no ``tokenizer.model``), which writes the token
list from ``get_vocab_base`` and then calls ``gguf.SpecialVocab(dir_model, load_merges=True).add_to_gguf``.
tests/test_tokenizer_converter.py runs the real converter (from the llama-cpp-python sdist) on the same folders
and compares every field.

* Merges, special token ids, ``add_bos``/``add_eos`` (including what SpecialVocab reads off a
  ``TemplateProcessing`` post-processor) and the chat template come from gguf-py's own ``SpecialVocab``,
  which is the converter's code. We only check its inputs first, so that malformed files give one clear line
  instead of an exception inside gguf-py, and check its result against what transformers would do.
* The token list is the converter's ``get_vocab_base`` loop over what ``AutoTokenizer`` holds, with the one
  deliberate difference below: ids below ``vocab_size`` that no text has become ``[PAD{i}]`` / UNUSED; an
  added token is CONTROL if ``special`` or ``does_token_look_special``, else USER_DEFINED; everything else
  NORMAL. The vocabulary and the added tokens' flags are derived from the files (``_transformers_vocab``)
  rather than by loading ``AutoTokenizer`` (seconds per export for Qwen's 151k-token tokenizer), following
  transformers 5: the added tokens come from tokenizer_config.json's ``added_tokens_decoder``
  (tokenizer.json's list only where it has none) and get their ids from the added vocabulary, so a token
  whose text is a base token keeps the base id; ``special`` is set by the named and listed special tokens
  (``additional_special_tokens`` / ``extra_special_tokens``) as well as by the flag.
* The deliberate difference: for an added token with ``normalized=false`` the converter writes
  ``tokenizer.decode(tokenizer.encode(text))`` instead of the text, and we write the text. For one added
  token that is tokenizers' ByteLevel decoder applied to the text: each character of the byte-level alphabet
  outside printable ASCII (U+00A1-U+00AC, U+00AE-U+0143) becomes the byte it stands for, and the bytes are
  read as UTF-8 with U+FFFD for what is invalid ('\u0120Hello' -> ' Hello', 'caf\u00e9' -> 'caf\ufffd');
  all other characters are kept. So the two differ exactly for ``normalized=false`` texts holding such a
  character (none of Qwen3's added tokens do). We keep the text because llama.cpp matches CONTROL and
  USER_DEFINED tokens against the raw input, and transformers matches a ``normalized=false`` token against
  the raw input too: with the converter's text llama.cpp would not find 'caf\u00e9' where transformers does,
  and would find ' Hello' where transformers does not. The CONTROL/USER_DEFINED verdict is the same for both
  texts (``does_token_look_special`` looks at ASCII, which the decoder keeps). The cost: llama.cpp detokenises
  such a token to its text, where transformers' decode gives the decoded bytes.
* Refused, because no GGUF makes llama.cpp tokenise ordinary text as transformers does: an added token with
  ``lstrip``, ``rstrip`` or ``single_word`` as transformers ends up holding it (Qwen2Tokenizer clears them on
  its named and listed special tokens), as llama.cpp has no key for them ("a <tok> b" keeps spaces that
  transformers strips; "x<tok>y" matches a single_word token that transformers skips); a USER_DEFINED token
  with U+2581, which the converter writes with spaces (its rule for SentencePiece vocabularies such as
  Gemma's, whose normaliser turns spaces into U+2581), so llama.cpp would find the token in "a x b" where
  transformers only matches "\u2581x\u2581"; another ``tokenizer_class``, which builds another tokenizer; and
  special_tokens_map.json / added_tokens.json beside a tokenizer_config.json without ``added_tokens_decoder``.
* ``tokenizer.ggml.pre``: the converter looks it up from a hash of token ids, "qwen2" for Qwen's tokenizers.
  Instead the pre-tokenizer *definition* in tokenizer.json is checked to be Qwen2's (NFC, Split on the Qwen2
  regex, ByteLevel without regex or prefix space), which is what llama.cpp's pre "qwen2" implements.
* Post-processors: transformers runs tokenizer.json's post-processor when ``add_special_tokens=True`` (5.24
  ignores tokenizer_config's ``add_bos_token`` for Qwen2Tokenizer), while llama.cpp can only add its BOS
  before and its EOS after a text. So the tokens the post-processor adds to a single text must be exactly
  ``[bos]`` / ``[eos]`` as SpecialVocab derived them; anything else is refused, naming the keys. The no-op
  ``TemplateProcessing`` that transformers 5 writes for Qwen2 tokenizers passes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gguf
import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .checkpoint import read_json
from .io import PathError, require_regular_file

__all__ = ["QWEN2_PRETOKENIZE_REGEX", "TokenizerError", "add_tokenizer", "does_token_look_special"]

# transformers models/qwen2/tokenization_qwen2.py PRETOKENIZE_REGEX == the regex in Qwen3's tokenizer.json ==
# the "original regex from tokenizer.json" comment of llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2.
QWEN2_PRETOKENIZE_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"



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
    Raises ``TokenizerError``, naming the file and key, for anything llama.cpp's Qwen2 path cannot represent.
    """
    model_dir = Path(model_dir)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size <= 0:
        raise TokenizerError(f"vocab_size must be a positive int, got {vocab_size!r}")
    tok_path = model_dir / "tokenizer.json"
    if not tok_path.exists():
        raise TokenizerError(f"{tok_path}: file not found (expected a Hugging Face fast tokenizer.json)")
    tokenizer = read_json(tok_path, "tokenizer.json", TokenizerError)
    _check_qwen2_bpe(tok_path, tokenizer)
    tokenizer_config = _check_special_vocab_inputs(model_dir, tokenizer)
    tokens, toktypes = _token_list(tok_path, tokenizer, model_dir, tokenizer_config, vocab_size)

    special = gguf.SpecialVocab(model_dir, load_merges=True)
    if not special.merges:
        # gguf-py silently drops an empty array, and llama.cpp then refuses the file
        # ("cannot find tokenizer merges in model file"), so fail here instead.
        raise TokenizerError(
            f"{tok_path}: key 'model.merges': expected a non-empty merge list (llama.cpp needs "
            f"tokenizer.ggml.merges for a gpt2 vocabulary), found none there or in merges.txt"
        )
    for typ, tid in special.special_token_ids.items():
        if tid >= vocab_size:
            raise TokenizerError(f"{model_dir}: special token {typ} has id {tid}; expected an id below vocab_size "
                                 f"{vocab_size} (tokenizer_config.json '{typ}_token' / config.json '{typ}_token_id')")
    decided = _post_processor_flags(tok_path, tokenizer, model_dir, tokenizer_config)
    flags = {**decided, **{typ: value for typ, value in special.add_special_token.items() if typ not in decided}}
    # Only bos/eos/sep have GGUFWriter handlers (SpecialVocab would skip the others with a warning).
    special.add_special_token = {typ: value for typ, value in flags.items() if typ in ("bos", "eos", "sep")}
    _check_added_specials(model_dir, tok_path, tokenizer, special)
    _check_chat_template(model_dir, special.chat_template)

    # The calls and their order are _set_vocab_gpt2's.
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(toktypes)
    special.add_to_gguf(writer, quiet=True)


def _check_special_vocab_inputs(model_dir: Path, tokenizer: dict) -> dict:
    """The shapes SpecialVocab assumes without checking, so that it never raises from inside gguf-py.
    Returns tokenizer_config.json ({} when the folder has none)."""
    tokenizer_config: dict = {}
    for name in ("tokenizer_config.json", "chat_template.json", "config.json"):
        path = model_dir / name
        if path.exists():
            data = read_json(path, name, TokenizerError)
            if not isinstance(data, dict):
                raise TokenizerError(f"{path}: a JSON {type(data).__name__}; expected an object")
            if name == "config.json" and "text_config" in data and not isinstance(data["text_config"], dict):
                raise TokenizerError(f"{path}: key 'text_config': expected an object, found {_describe(data['text_config'])}")
            if name == "tokenizer_config.json":
                _check_tokenizer_config(path, data)
                tokenizer_config = data
    texts = [model_dir / "chat_template.jinja", model_dir / "merges.txt"]
    texts += sorted((model_dir / "additional_chat_templates").glob("*.jinja"))
    for path in texts:
        if path.exists() or path.is_symlink():
            try:
                require_regular_file(path, path.name)
                path.read_text(encoding="utf-8")
            except PathError as err:
                raise TokenizerError(str(err)) from None
            except UnicodeDecodeError as err:
                raise TokenizerError(f"{path}: not UTF-8 text ({err})") from None
    post = tokenizer.get("post_processor")
    if post is None:
        return tokenizer_config
    processors = post.get("processors", [post]) if isinstance(post, dict) else None
    if not isinstance(processors, list) or not all(isinstance(p, dict) for p in processors):
        raise TokenizerError(f"{model_dir / 'tokenizer.json'}: key 'post_processor': expected a processor object "
                             f"or a Sequence of them, found {_describe(post)}")
    return tokenizer_config


def _check_tokenizer_config(path: Path, config: dict) -> None:
    """The keys SpecialVocab would silently skip when mistyped: the GGUF would then differ from transformers."""
    for typ in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"):
        entry = config.get(f"{typ}_token")
        if entry is not None and not isinstance(entry, str) and not (
                isinstance(entry, dict) and isinstance(entry.get("content"), str)):
            raise TokenizerError(f"{path}: key '{typ}_token': expected null, a token string or "
                                 f"{{\"content\": string}}, found {_describe(entry)}")
        flag = config.get(f"add_{typ}_token")
        if flag is not None and not isinstance(flag, bool):
            raise TokenizerError(f"{path}: key 'add_{typ}_token': expected true or false, found {_describe(flag)}")
    template = config.get("chat_template")
    if template is not None and not isinstance(template, (str, list)):
        raise TokenizerError(f"{path}: key 'chat_template': expected a string or a list of {{name, template}}, "
                             f"found {_describe(template)}")


def _post_processor_adds(path: Path, tokenizer: dict) -> tuple[list[int], list[int]]:
    """The token ids tokenizer.json's post-processor puts before and after a single text, as the tokenizers
    library applies it (a Sequence applies its processors in order, each wrapping the result so far)."""
    post = tokenizer.get("post_processor")
    if post is None:
        return [], []
    before: list[int] = []
    after: list[int] = []
    for i, processor in enumerate(post.get("processors", [post])):
        key = "post_processor" if processor is post else f"post_processor.processors[{i}]"
        kind = processor.get("type")
        if kind == "ByteLevel":
            continue
        if kind in ("RobertaProcessing", "BertProcessing"):
            ends = [processor.get("cls"), processor.get("sep")]
            if not all(isinstance(e, list) and len(e) == 2 and isinstance(e[1], int) for e in ends):
                raise TokenizerError(f"{path}: key '{key}': expected cls and sep as [token, id], found "
                                     f"{_describe(processor)}")
            before, after = [ends[0][1], *before], [*after, ends[1][1]]
            continue
        if kind != "TemplateProcessing":
            raise TokenizerError(f"{path}: key '{key}.type': expected ByteLevel, TemplateProcessing, "
                                 f"RobertaProcessing or BertProcessing, found {kind!r}")
        single, specials = processor.get("single"), processor.get("special_tokens", {})
        pair = processor.get("pair", [])
        if not isinstance(specials, dict) or not isinstance(pair, list) or not all(isinstance(p, dict) for p in pair):
            raise TokenizerError(f"{path}: key '{key}': expected 'pair' as a list of pieces and 'special_tokens' "
                                 f"as an object, found {_describe(processor)}")
        pieces = single if isinstance(single, list) else []
        sequences = [j for j, piece in enumerate(pieces) if isinstance(piece, dict) and "Sequence" in piece]
        if len(sequences) != 1 or pieces[sequences[0]]["Sequence"].get("id") != "A":
            raise TokenizerError(f"{path}: key '{key}.single': expected one $A with special tokens around it, "
                                 f"found {_describe(single)}")
        ids = []
        for piece in pieces:
            token = piece.get("SpecialToken", {}).get("id") if isinstance(piece, dict) else None
            if isinstance(piece, dict) and "Sequence" in piece:
                ids.append(None)
                continue
            entry = specials.get(token) if isinstance(token, str) else None
            if not isinstance(entry, dict) or not isinstance(entry.get("ids"), list) or \
                    not all(isinstance(t, int) and not isinstance(t, bool) for t in entry["ids"]):
                raise TokenizerError(f"{path}: key '{key}.single': piece {_describe(piece)} names no entry of "
                                     f"'{key}.special_tokens' with integer ids")
            ids.append(entry["ids"])
        at = sequences[0]
        before = [t for entry in ids[:at] for t in entry] + before
        after = after + [t for entry in ids[at + 1:] for t in entry]
    return before, after


def _post_processor_flags(path: Path, tokenizer: dict, model_dir: Path, config: dict) -> dict[str, bool]:
    """add_bos/add_eos as the converter of the llama.cpp we pin reads them off the post-processor.

    Its gguf-py (vendored at 0c1e57098) is newer than PyPI's gguf 0.19.0 in two rules, and its converter is our
    reference: a ByteLevel post-processor means "add neither", and what the post-processor says wins over
    tokenizer_config's add_bos_token/add_eos_token (PyPI's lets the config override it). Everything else
    (merges, ids, the pair template's sep, the chat template) is the same in both and comes from SpecialVocab.
    """
    post = tokenizer.get("post_processor")
    flags: dict[str, bool] = {}
    config_path = model_dir / "tokenizer_config.json"
    for processor in (post.get("processors", [post]) if isinstance(post, dict) else []):
        if processor.get("type") == "ByteLevel":
            flags.setdefault("bos", False)
            flags.setdefault("eos", False)
        elif processor.get("type") == "TemplateProcessing" and len(processor.get("single") or []) > 1:
            single = processor["single"]
            first = single[0].get("SpecialToken", {}).get("id") if isinstance(single[0], dict) else None
            last = single[-1].get("SpecialToken", {}).get("id") if isinstance(single[-1], dict) else None
            if first:
                named = [_content(config.get(f"{typ}_token")) for typ in ("bos", "cls")]
                if config and first not in named and not named[0]:
                    # The pinned converter would make this token the BOS (and CLS); PyPI's gguf-py would not.
                    raise TokenizerError(
                        f"{path}: key 'post_processor' adds {first!r} before every text, but {config_path} "
                        f"names no bos_token; set bos_token to {first!r} so that llama.cpp adds it too")
                flags["bos"] = first in named or not config or not named[1]  # it would become the CLS
            if last:
                flags["eos"] = True  # SpecialVocab makes the appended token the EOS when it is not already
    return flags


def _content(entry: Any) -> str | None:
    return entry.get("content") if isinstance(entry, dict) else entry if isinstance(entry, str) else None


def _check_added_specials(model_dir: Path, path: Path, tokenizer: dict, special: gguf.SpecialVocab) -> None:
    """llama.cpp adds its BOS before and its EOS after a text (tokenizer.ggml.add_bos_token/add_eos_token);
    transformers runs the post-processor. Refuse the files where the two would tokenise differently."""
    hf_before, hf_after = _post_processor_adds(path, tokenizer)
    llama_before = [special.special_token_ids.get("bos")] if special.add_special_token.get("bos") else []
    llama_after = [special.special_token_ids.get("eos")] if special.add_special_token.get("eos") else []
    for where, hf, llama, typ in (("before", hf_before, llama_before, "bos"),
                                  ("after", hf_after, llama_after, "eos")):
        if hf != llama:
            raise TokenizerError(
                f"{path}: key 'post_processor': transformers adds token ids {hf} {where} every text, but "
                f"llama.cpp would add {llama} (add_{typ}_token = {special.add_special_token.get(typ, False)}, "
                f"{typ} id {special.special_token_ids.get(typ)}, from {model_dir / 'tokenizer_config.json'} keys "
                f"'{typ}_token'/'add_{typ}_token' and the post-processor); a GGUF can only add its "
                f"{typ.upper()} token there, so make the files agree")


def _check_chat_template(model_dir: Path, template: Any) -> None:
    """SpecialVocab passes on any string or list; llama.cpp and Ollama need Jinja they can parse."""
    source = f"{model_dir / 'tokenizer_config.json'} key 'chat_template' (or chat_template.jinja)"
    if template is None:
        return
    named = template if isinstance(template, list) else [{"name": "default", "template": template}]
    env = ImmutableSandboxedEnvironment()
    for i, entry in enumerate(named):
        text = entry.get("template") if isinstance(entry, dict) else None
        if not isinstance(text, str) or not isinstance(entry.get("name"), str):
            raise TokenizerError(f"{source}: entry {i}: expected a string, or a list of {{name, template}} "
                                 f"strings, found {_describe(entry)}")
        try:
            env.parse(text)
        except jinja2.TemplateSyntaxError as err:
            raise TokenizerError(f"{source}: template {entry['name']!r} is not valid Jinja (line {err.lineno}: "
                                 f"{err.message})") from None


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
    merges = model.get("merges")
    if merges is not None and not (
        isinstance(merges, list)
        and (all(isinstance(m, str) for m in merges)
             or all(isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m) for m in merges))
    ):
        raise TokenizerError(
            f"{path}: key 'model.merges': expected a list of 'a b' strings or of [a, b] string pairs, "
            f"found {_describe(merges)}"
        )


# ------------------------------------------------------------------------ the vocabulary transformers loads
# transformers 5 (the version the converter runs in tests) decides the added tokens, not tokenizer.json alone.
NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
QWEN2_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast")  # also what AutoTokenizer picks for model_type qwen3
BACKEND_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
# Qwen2Tokenizer's keyword defaults, used for a named key that tokenizer_config.json lacks (null stays None).
QWEN2_NAMED_DEFAULTS = {"eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                        "pad_token": "<|endoftext|>"}
FLAGS = ("special", "normalized", "lstrip", "rstrip", "single_word")


@dataclass(frozen=True)
class AddedToken:
    """An added token with the flags transformers ends up holding for it (tokenizers' AddedToken fields)."""

    content: str
    special: bool = False
    normalized: bool = True
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False


class _AddedVocab:
    """The added vocabulary of a tokenizers BPE tokenizer, as add_tokens fills it.

    An added token keeps the id its text already has (an earlier added token's, else the model vocabulary's);
    new text gets the next id after both the model vocabulary (counted by entries) and the added ids. Adding a
    text again replaces its flags, which is how transformers turns a plain added token into a special one.
    """

    def __init__(self, model_vocab: dict[str, int]):
        self.model_vocab = model_vocab
        self.ids: dict[str, int] = {}
        self.tokens: dict[int, AddedToken] = {}

    def add(self, token: AddedToken) -> None:
        if not token.content:
            return
        token_id = self.ids.get(token.content, self.model_vocab.get(token.content))
        if token_id is None:
            size = len(self.model_vocab)
            token_id = max(size, max(self.ids.values()) + 1) if self.ids else size
        self.ids[token.content] = token_id
        self.tokens[token_id] = token


def _added_token(where: str, entry: Any) -> AddedToken:
    """An added-token object of tokenizer.json or tokenizer_config.json (absent flags: tokenizers' defaults)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("content"), str) or any(
            not isinstance(entry.get(flag, False), bool) for flag in FLAGS):
        raise TokenizerError(f"{where}: expected an object with a string 'content' and true/false "
                             f"{', '.join(FLAGS)}, found {_describe(entry)}")
    is_special = entry.get("special", False)
    return AddedToken(entry["content"], special=is_special,
                      normalized=entry.get("normalized", not is_special), lstrip=entry.get("lstrip", False),
                      rstrip=entry.get("rstrip", False), single_word=entry.get("single_word", False))


def _token_value(where: str, value: Any) -> str | AddedToken | None:
    """A special token named in tokenizer_config.json: null, its text, or an added-token object."""
    if value is None or isinstance(value, str):
        return value
    return _added_token(where, value)


def _text(token: str | AddedToken) -> str:
    return token.content if isinstance(token, AddedToken) else token


def _transformers_vocab(model_dir: Path, tok_path: Path, tokenizer: dict,
                        config: dict) -> tuple[dict[str, int], dict[int, AddedToken]]:
    """``tokenizer.vocab`` and ``tokenizer.added_tokens_decoder`` of ``AutoTokenizer.from_pretrained``
    (transformers 5), which is what convert_hf_to_gguf's ``get_vocab_base`` reads. Derived from its behaviour
    (tests/test_tokenizer_converter.py compares the result with the converter's file and with transformers):

    1. The class: tokenizer_config.json's ``tokenizer_class``; none means Qwen2Tokenizer (model_type qwen3).
       Qwen2Tokenizer builds its backend from tokenizer.json's vocabulary and merges only; TokenizersBackend
       (PreTrainedTokenizerFast) loads tokenizer.json, so its ``added_tokens`` go in first, in file order.
    2. The added tokens handed to the class: tokenizer_config.json's ``added_tokens_decoder`` if it has one
       (then Qwen2Tokenizer never sees tokenizer.json's list), else tokenizer.json's ``added_tokens``. Without
       ``added_tokens_decoder`` transformers would also read special_tokens_map.json and added_tokens.json
       (layouts older than 4.34, with rules of their own): such a folder is refused. The tokens are added in
       id order, but their ids come from the added vocabulary (``_AddedVocab``), not from the files: an added
       token whose text is a base token keeps the base id, and the id it was listed under stays empty.
    3. Special tokens: the named ones (bos_token ... mask_token, Qwen2Tokenizer's defaults for absent keys,
       any other ``*_token`` string, a dict ``extra_special_tokens``) and the listed ones
       (``extra_special_tokens``, else ``additional_special_tokens``). An added token whose text is a named
       one becomes special; named and listed texts not added yet are added as special, non-normalized tokens.
       Qwen2Tokenizer then adds every named and listed text once more as special, non-normalized and without
       strip flags, which replaces the flags those tokens had (a listed plain token becomes special).
    """
    config_path = model_dir / "tokenizer_config.json"
    cls = config.get("tokenizer_class")
    if cls is not None and cls not in QWEN2_CLASSES + BACKEND_CLASSES:
        raise TokenizerError(f"{config_path}: key 'tokenizer_class': expected one of "
                             f"{', '.join(QWEN2_CLASSES + BACKEND_CLASSES)} (or none), found "
                             f"{_describe(cls)}; another class builds another tokenizer from tokenizer.json")
    qwen2 = cls is None or cls in QWEN2_CLASSES
    listed = [_added_token(f"{tok_path}: key 'added_tokens[{i}]'", entry)
              for i, entry in enumerate(tokenizer.get("added_tokens", []))]

    declared: dict[int, AddedToken] = {}
    if "added_tokens_decoder" in config:
        table = config["added_tokens_decoder"]
        if not isinstance(table, dict):
            raise TokenizerError(f"{config_path}: key 'added_tokens_decoder': expected an object of id -> "
                                 f"added token, found {_describe(table)}")
        for key, entry in table.items():
            if not key.isdigit():
                raise TokenizerError(f"{config_path}: key 'added_tokens_decoder': expected token ids as "
                                     f"keys, found {key!r}")
            declared[int(key)] = _added_token(f"{config_path}: key 'added_tokens_decoder.{key}'", entry)
    else:
        for name in ("special_tokens_map.json", "added_tokens.json"):
            if (model_dir / name).exists():
                raise TokenizerError(
                    f"{model_dir / name}: transformers reads this file because {config_path} has no "
                    f"'added_tokens_decoder' (a layout older than transformers 4.34), and the exporter does "
                    f"not follow those rules; expected tokenizer_config.json with added_tokens_decoder (save "
                    f"the tokenizer again with transformers) or no {name}")
        declared = {entry["id"]: token for entry, token in zip(tokenizer.get("added_tokens", []), listed)}

    # The named special tokens in transformers' order: the standard keys, then the model's own.
    defaults = QWEN2_NAMED_DEFAULTS if qwen2 else {}
    named: dict[str, str | AddedToken | None] = {
        key: _token_value(f"{config_path}: key '{key}'", config[key]) if key in config else defaults.get(key)
        for key in NAMED_SPECIAL}
    for key, value in config.items():
        if key not in NAMED_SPECIAL and key.endswith("_token") and (
                isinstance(value, str) or isinstance(value, dict) and value.get("__type") == "AddedToken"):
            named[key] = _token_value(f"{config_path}: key '{key}'", value)
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(extra, dict):  # names of the model's own special tokens
        named.update({name: _token_value(f"{config_path}: key 'extra_special_tokens.{name}'", value)
                      for name, value in extra.items()})
        extra = []
    if not isinstance(extra, list):
        raise TokenizerError(f"{config_path}: key 'extra_special_tokens' (or 'additional_special_tokens'): "
                             f"expected a list of tokens, found {_describe(extra)}")
    extra = [_token_value(f"{config_path}: key 'extra_special_tokens[{i}]'", value)
             for i, value in enumerate(extra)]
    if any(value is None for value in extra):
        raise TokenizerError(f"{config_path}: key 'extra_special_tokens': expected tokens, found null")
    # A standard named text that is a declared token stands for that token, flags and all.
    by_text = {token.content: token for token in declared.values()}
    named = {key: by_text.get(value, value) if key in NAMED_SPECIAL and isinstance(value, str) else value
             for key, value in named.items()}
    named_texts = {_text(value) for value in named.values() if value}
    specials = [value for value in [*named.values(), *extra] if value]

    vocab = dict(tokenizer["model"]["vocab"])
    added = _AddedVocab(vocab)
    if not qwen2:
        for token in listed:
            added.add(token)
    present = set(added.ids) | set(by_text)
    for token in [declared[i] for i in sorted(declared)] + [v for v in specials if _text(v) not in present]:
        if isinstance(token, str):
            token = AddedToken(token, special=True, normalized=False)
        elif not token.special and token.content in named_texts:
            token = replace(token, special=True)
        added.add(token)
    if qwen2:
        for text in dict.fromkeys(_text(value) for value in specials):
            added.add(AddedToken(text, special=True, normalized=False))
    vocab.update(added.ids)
    return vocab, added.tokens


def _token_list(path: Path, tokenizer: dict, model_dir: Path, config: dict,
                vocab_size: int) -> tuple[list[str], list[int]]:
    """``get_vocab_base``: tokens and token types for ids 0..vocab_size-1 (see the module docstring)."""
    base: dict[str, int] = tokenizer["model"]["vocab"]
    added_list = tokenizer.get("added_tokens", [])
    if not isinstance(added_list, list):
        raise TokenizerError(f"{path}: key 'added_tokens': expected a list, found {_describe(added_list)}")
    for i, at in enumerate(added_list):
        if (
            not isinstance(at, dict)
            or not isinstance(at.get("id"), int)
            or isinstance(at.get("id"), bool)
            or not isinstance(at.get("content"), str)
        ):
            raise TokenizerError(
                f"{path}: key 'added_tokens[{i}]': expected an object with int 'id' and str 'content', "
                f"found {_describe(at)}"
            )
    bad = next((t for t, i in base.items() if not isinstance(i, int) or isinstance(i, bool) or i < 0), None)
    if bad is not None:
        raise TokenizerError(
            f"{path}: key 'model.vocab': expected non-negative int ids, found {bad!r}: {base[bad]!r}"
        )
    vocab, added = _transformers_vocab(model_dir, path, tokenizer, config)
    # The ids tokenizer.json lists count too: a file naming ids beyond the embedding is broken, even where
    # transformers would number its tokens otherwise.
    ids = [*vocab.values(), *(at["id"] for at in added_list)]
    if any(i < 0 for i in ids):
        raise TokenizerError(f"{path}: key 'added_tokens': expected non-negative ids, found {min(ids)}")
    max_id = max(ids, default=-1)
    if max_id >= vocab_size:
        raise TokenizerError(
            f"{path}: tokenizer has {len(vocab)} tokens with ids up to {max_id} (model.vocab + added_tokens), "
            f"expected all ids < vocab_size {vocab_size} (config.json 'vocab_size')"
        )
    reverse_vocab: dict[int, str] = {}
    for token, i in vocab.items():
        if i in reverse_vocab:
            raise TokenizerError(f"{path}: id {i} is both {reverse_vocab[i]!r} and {token!r} (model.vocab "
                                 f"and the added tokens as transformers numbers them); expected one text "
                                 f"per id")
        reverse_vocab[i] = token

    tokens: list[str] = []
    toktypes: list[int] = []
    for i in range(vocab_size):
        token = reverse_vocab.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            toktypes.append(gguf.TokenType.UNUSED)
            continue
        entry = added.get(i)
        if entry is not None:
            _check_matching_flags(path, i, entry)
            # The text as it is, not the converter's decode(encode(text)): see the module docstring.
            if entry.special or does_token_look_special(token):
                toktypes.append(gguf.TokenType.CONTROL)
            else:
                _check_no_metaspace(path, i, token)
                toktypes.append(gguf.TokenType.USER_DEFINED)
        else:
            toktypes.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, toktypes


def _check_matching_flags(path: Path, token_id: int, token: AddedToken) -> None:
    """lstrip/rstrip/single_word: transformers drops the whitespace next to such a token (or ignores it inside
    a word), and a GGUF has no key for that, so llama.cpp would tokenise ordinary text like "a <tok> b"
    differently. (Qwen2Tokenizer clears these flags on its named and listed special tokens; see
    ``_transformers_vocab``.)"""
    set_flags = " and ".join(f"{flag}=true" for flag in ("lstrip", "rstrip", "single_word")
                             if getattr(token, flag))
    if set_flags:
        raise TokenizerError(
            f"{path}: added token {token.content!r} (id {token_id}) has {set_flags}; llama.cpp has no such "
            f"setting (a GGUF has no key for it), so it would keep the whitespace transformers strips around "
            f"the token (or match it inside words); expected false, as in Qwen3's tokenizer")


def _check_no_metaspace(path: Path, token_id: int, token: str) -> None:
    """U+2581 in a USER_DEFINED token: the converter writes it as a space (its rule for SentencePiece
    vocabularies such as Gemma's), so llama.cpp would match ordinary text with spaces (" x ") where
    transformers matches only the U+2581 text; byte-level BPE has no U+2581 normaliser to make them agree."""
    if "\u2581" in token:
        raise TokenizerError(
            f"{path}: plain added token {token!r} (id {token_id}) contains U+2581; a GGUF writes it with "
            f"spaces ({token.replace(chr(0x2581), ' ')!r}), which llama.cpp would then match in ordinary "
            f"text where transformers does not; mark it special, or drop the U+2581")


def _describe(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
