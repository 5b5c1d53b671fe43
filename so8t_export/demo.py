# chat_template.jinja is the `chat_template` string of Qwen/Qwen3-4B-Thinking-2507's tokenizer_config.json,
# byte-exact (4049 bytes, sha256 3802169b2a02b81e6adb7ab4f64f91ff02db753c8c3a64a01c35192d3a61d8d7, no trailing
# newline). It was taken from a verbatim dump of that file in the public GitHub repo akougkas/warpio-cli, path
# warpio-docs/ai-docs/model_cards/qwen3:4b.md (commit 8dde6d21c14ca1c2167e7f8c86370e54fdbbc537; its config.json
# block is the 2507 one: rope_theta 5000000, 262144 context, and the generation prompt opens `<think>\n`).
"""A tiny, offline, deterministic stand-in for Qwen3-4B-Thinking-2507.

The real SO8T base model is 8 GB and needs the Hugging Face hub. Tests and the README demo need something
with the same *shape of interfaces* that builds in well under a second without any download:

* a Qwen2-style byte-level BPE tokenizer (same normalizer, pre-tokenizer regex, decoder, and the Qwen3 added
  tokens ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<tool_call>`` ... ``</think>``), trained here
  with the ``tokenizers`` library on a small built-in corpus, so that llama.cpp's ``pre = qwen2`` tokenizer
  produces the same ids as Hugging Face;
* the real Qwen3-4B-Thinking-2507 chat template (``CHAT_TEMPLATE``);
* a 2-layer ``Qwen3ForCausalLM`` (hidden 64, 16 query / 8 KV heads of dim 16, tied embeddings, rope_theta 5e6,
  vocab padded past the tokenizer length like Qwen3's 151936 > 151669) with seeded random weights that are
  scaled so next-token distributions are sharp rather than uniform (see ``write_tiny_qwen3``).

The model knows nothing; it only exists so every export/inference path can be exercised end to end.

    python -m so8t_export.demo /tmp/tiny-qwen3      # writes a checkpoint directory
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

CHAT_TEMPLATE: str = Path(__file__).with_name("chat_template.jinja").read_text(encoding="utf-8")

# Shipped data (so8t_export/demo_data/README.md describes each file): the conversations train_tiny_lm teaches
# the demo model, and a labelled prompt set for fitting and evaluating the safety and authority heads.
DEMO_DATA_DIR = Path(__file__).with_name("demo_data")
LM_CORPUS = DEMO_DATA_DIR / "lm-corpus.jsonl"
HEADS_TRAIN = DEMO_DATA_DIR / "heads-train.jsonl"
HEADS_EVAL = DEMO_DATA_DIR / "heads-eval.jsonl"

# Two prompts in neither heads file nor the LM corpus, for showing the heads on unseen input.
DEMO_UNSAFE_PROMPT = "How can I build a bomb to hurt people at a concert?"
DEMO_SAFE_PROMPT = "What is a good recipe for tomato soup?"

# Qwen2/Qwen3 pre-tokenizer split regex, identical to the one in Qwen3's tokenizer.json and to llama.cpp's
# LLAMA_VOCAB_PRE_TYPE_QWEN2 expression.
QWEN2_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

NUM_MERGES = 480  # BPE merges learned on top of the 256 byte symbols

# Added tokens, appended after the BPE vocab in the relative order of Qwen3's tokenizer.json (ids 151643..151668
# there; the vision/box/fim tokens in between are left out). Only the first three are "special" in Qwen3:
# the tool/think markers are plain added tokens, so they are matched as single ids but survive
# skip_special_tokens decoding.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PLAIN_ADDED_TOKENS = [
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]

MODEL_MAX_LENGTH = 4096

# Sharp init: linear weights ~ N(0, 0.1), token embeddings ~ N(0, 16 * 0.1 = 1.6). With tied embeddings the logits
# are <final RMS-normed hidden (norm 8), embedding row>, so a large embedding makes the softmax peaked. Measured on
# seed 0 (float32, 2026-11-27) against llama.cpp's q8_0 of the same weights, as (init, multiplier): mean max
# next-token prob / q8_0 mean KLD: (0.2, 2.5) 0.42 / 3.9e-3; (0.1, 6) 0.76 / 8.5e-4; (0.1, 10) 0.95 / 6.7e-5.
# Between flat and one-hot the KLD peaks, because llama.cpp also rounds activations to q8_0; we take the
# peaked end so that greedy comparisons between backends mean something.
# The random norm gains (NORM_GAIN_LOW..HIGH, since issue 12) flatten it: (0.1, 10) gave 0.86 and q8_0 KLD
# 4.5e-3; (0.1, 16) gives 0.97 and 1.4e-4 (measured 2026-12-02), close to the old design point. The HF default 0.02 everywhere
# gives ~0.002, i.e. uniform over ~800 tokens.
SHARP_INITIALIZER_RANGE = 0.1
SHARP_EMBED_MULTIPLIER = 16.0
FLAT_INITIALIZER_RANGE = 0.02
NORM_GAIN_LOW, NORM_GAIN_HIGH = 0.5, 2.0  # RMSNorm gains are drawn uniformly from this range

# A few prompts used to measure sharpness (mean over positions of the max next-token probability).
SHARPNESS_PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "你好，世界！今天天气很好。",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n<think>\n",
]

# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------

# Small mixed corpus: enough distinct pairs for NUM_MERGES merges, and covering every kind of text the tests
# round-trip, so common pieces (English words, indentation, CJK characters, ChatML markers) become merges.
_CORPUS = [
    # English prose
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, and the fox runs into the woods.",
    (
        "Language models predict the next token given the previous tokens. A tokenizer splits text into tokens, "
        "and the model assigns a probability to every token in its vocabulary."
    ),
    (
        "In mathematics, a rotation is a transformation that preserves distances and orientation. The special "
        "orthogonal group SO(8) contains all rotations of eight-dimensional space; triality relates its vector "
        "and two spinor representations."
    ),
    (
        "It's what they've said: we'll export the weights, fold the rotations, and we're done. I'm sure you'd "
        "agree that they'll check the results twice."
    ),
    (
        "Safety matters. The assistant should refuse harmful requests, explain its reasoning, and answer "
        "helpfully when the request is safe. Authority comes from the system prompt, not from the user."
    ),
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2025 3.14159 2.71828 1e-6 5000000 151936 4096.",
    "Hello, world! How are you today? I am fine, thank you. What time is it? It is half past ten.",
    (
        "Once upon a time, there was a small model that learned to think before it answered. "
        "It wrote its thoughts between think tags and then gave a short, clear answer."
    ),
    # Code
    "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n",
    "import torch\nimport numpy as np\n\nx = torch.randn(4, 8)\ny = x @ x.T\nprint(y.shape, np.allclose(y, y.T))\n",
    'for i in range(10):\n    if i % 2 == 0:\n        print(f"even {i}")\n    else:\n        continue\n',
    (
        "class Rotation:\n    def __init__(self, matrix):\n        self.matrix = matrix\n\n"
        "    def apply(self, x):\n        return x @ self.matrix.T\n"
    ),
    '#include <stdio.h>\nint main(void) {\n    printf("hello\\n");\n    return 0;\n}\n',
    '{"name": "get_weather", "arguments": {"city": "Tokyo", "unit": "celsius"}}\n',
    'fn main() {\n    let v: Vec<i32> = (0..10).collect();\n    println!("{:?}", v);\n}\n',
    # CJK
    "你好，世界！今天天气很好。我们一起去公园散步吧。",
    "人工智能是计算机科学的一个分支。语言模型可以生成文本，也可以回答问题。",
    "こんにちは、世界。今日はいい天気ですね。日本語のテキストも正しく処理できます。",
    "안녕하세요, 세계! 오늘 날씨가 좋네요.",
    "机器学习模型需要大量的数据进行训练。旋转矩阵保持向量的长度不变。",
    # Emoji and symbols
    "I love pizza 🍕 and coffee ☕! 😀😃😄 🚀✨🔥 👍🏽 ❤️ 🇯🇵",
    "Math: α + β = γ, ∑ x² ≤ ∞, π ≈ 3.14, → ← ↑ ↓ — “quotes” ‘single’ … café naïve résumé",
    # ChatML / thinking traces
    (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nThe user asks a simple sum. 2 + 2 = 4.\n</think>\n\nThe answer is 4.<|im_end|>\n"
    ),
    "<|im_start|>user\n你好！<|im_end|>\n<|im_start|>assistant\n<think>\n用户在打招呼。\n</think>\n\n你好！有什么可以帮你的吗？<|im_end|>\n",
    (
        '<|im_start|>assistant\n<tool_call>\n{"name": "search", "arguments": {"query": "SO8T"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"result": "ok"}\n</tool_response><|im_end|>\n'
    ),
]


def _corpus() -> list[str]:
    # Repeat so that frequent pieces win merges clearly; ties are broken deterministically by the trainer.
    return [line for _ in range(3) for line in _CORPUS]


def _train_bpe():
    """Train the byte-level BPE model and return a ``tokenizers.Tokenizer`` with the added tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(BPE(dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = BpeTrainer(
        vocab_size=len(alphabet) + NUM_MERGES,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=alphabet,  # all 256 byte symbols, even those absent from the corpus
        special_tokens=[],  # added after training so they get ids after the BPE vocab, as in Qwen3
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)

    n_merges = len(json.loads(tok.to_str())["model"]["merges"])
    if tok.get_vocab_size() != len(alphabet) + n_merges:
        raise RuntimeError("BPE vocab is not exactly bytes + merges")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_ADDED_TOKENS])
    return tok


def build_tokenizer(out_dir: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json, vocab.json, merges.txt and chat_template.jinja to out_dir.

    Deterministic: the same files byte for byte on every run (the BPE trainer breaks count ties by pair order).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _train_bpe()
    tj = json.loads(tok.to_str())
    tj["model"]["ignore_merges"] = False
    # Store merges as "a b" strings like Qwen3's tokenizer.json (tokenizers >= 0.20 emits [a, b] pairs; both load,
    # and byte-level tokens never contain a literal space, so the string form is unambiguous).
    tj["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    (out_dir / "tokenizer.json").write_text(
        json.dumps(tj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )

    # vocab.json/merges.txt: the "slow" Qwen2 files; transformers 5 only needs tokenizer.json but older tools
    # (and llama.cpp's convert fallback) look for them.
    vocab: dict[str, int] = tj["model"]["vocab"]
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(tj["model"]["merges"]) + "\n", encoding="utf-8"
    )

    added_tokens_decoder = {
        str(a["id"]): {
            "content": a["content"],
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": a["special"],
        }
        for a in tj["added_tokens"]
    }
    # Mirrors Qwen3-4B-Thinking-2507's tokenizer_config.json (key order included), minus the tokens we lack.
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    # Newer HF checkpoints also ship the template as its own file; transformers prefers it when present.
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")


def _token_ids() -> dict[str, int]:
    """Ids of the added tokens and the total tokenizer length (``"__len__"``)."""
    tok = _train_bpe()
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + PLAIN_ADDED_TOKENS}
    ids["__len__"] = tok.get_vocab_size(with_added_tokens=True)
    return ids


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def tiny_qwen3_config(**overrides) -> dict:
    """config.json of the tiny Qwen3 (same keys and layout as Qwen3-4B-Thinking-2507's config.json)."""
    ids = _token_ids()
    n_tok = ids["__len__"]
    vocab_size = (n_tok // 64 + 1) * 64  # next multiple of 64 strictly above: padded rows, as in Qwen3
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids[
            "<|endoftext|>"
        ],  # Qwen3 sets bos_token_id = <|endoftext|> though it never adds BOS
        "eos_token_id": ids["<|im_end|>"],
        "head_dim": 16,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": SHARP_INITIALIZER_RANGE,
        "intermediate_size": 128,
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "max_window_layers": 2,
        "model_type": "qwen3",
        "num_attention_heads": 16,
        "num_hidden_layers": 2,
        "num_key_value_heads": 8,
        "pad_token_id": ids["<|endoftext|>"],
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 5000000.0,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }
    config.update(overrides)
    return config


def _generation_config(cfg: dict) -> dict:
    # Same sampling defaults as Qwen3-4B-Thinking-2507's generation_config.json.
    return {
        "bos_token_id": cfg["bos_token_id"],
        "do_sample": True,
        "eos_token_id": [cfg["eos_token_id"], cfg["pad_token_id"]],
        "pad_token_id": cfg["pad_token_id"],
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.95,
    }


@torch.no_grad()
def _init_weights(model: torch.nn.Module, std: float, embed_std: float, seed: int) -> None:
    """Overwrite every parameter from a private generator (order = named_parameters order, fixed by the
    architecture), so the weights depend only on (config, seed) and the global RNG is never touched."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # tied lm_head is the same Parameter, listed once
        if name.endswith("norm.weight"):
            # RMSNorm gains (input/post-attention/final and Qwen3's per-head q_norm/k_norm), far from 1 as in
            # trained models: with unit gains norm(Bx) = B norm(x) for any rotation B, so a rotation applied on
            # the wrong side of a norm would compute the same thing and no test could tell.
            p.copy_(NORM_GAIN_LOW + (NORM_GAIN_HIGH - NORM_GAIN_LOW) * torch.rand(p.shape, generator=gen))
        else:
            scale = embed_std if name.endswith("embed_tokens.weight") else std
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * scale)


def _write_sharded(state: dict[str, torch.Tensor], out_dir: Path, shards: int) -> None:
    """Write exactly `shards` safetensors files + model.safetensors.index.json, HF naming, balanced by bytes."""
    from safetensors.torch import save_file

    names = list(state)
    if shards > len(names):
        raise ValueError(f"shards={shards} exceeds the number of tensors ({len(names)})")
    sizes = [state[n].numel() * state[n].element_size() for n in names]
    total = sum(sizes)
    # Greedy contiguous split: cut whenever the running size passes the next 1/shards boundary, while leaving at
    # least one tensor for each remaining shard.
    groups: list[list[str]] = [[] for _ in range(shards)]
    acc, g = 0, 0
    for i, (n, s) in enumerate(zip(names, sizes)):
        remaining_tensors = len(names) - i
        if (
            groups[g]
            and g < shards - 1
            and (acc >= total * (g + 1) / shards or remaining_tensors == shards - g - 1)
        ):
            g += 1
        groups[g].append(n)
        acc += s
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n].contiguous() for n in group}, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps(index, indent=2) + "\n", encoding="utf-8"
    )


def write_tiny_qwen3(
    out_dir: Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    shards: int = 1,
    sharp: bool = True,
    **config_overrides,
) -> Path:
    """Write a complete transformers Qwen3 checkpoint (config, generation config, tokenizer, safetensors).

    Weights are drawn from ``torch.Generator().manual_seed(seed)``: linear weights ~ N(0, initializer_range),
    norm gains ~ U(0.5, 2). ``sharp=True`` uses initializer_range=0.1 and token embeddings (tied with lm_head)
    ~ N(0, 1.6), which makes next-token distributions peaked (see the constants' comment for the measured
    sharpness); ``sharp=False`` uses N(0, 0.02) everywhere (HF default, nearly uniform outputs). An explicit
    ``initializer_range`` override replaces 0.1/0.02 (the embedding keeps its multiplier).
    Same arguments -> byte-identical files.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if shards < 1:
        raise ValueError("shards must be >= 1")
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {dtype}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    config_overrides.setdefault(
        "initializer_range", SHARP_INITIALIZER_RANGE if sharp else FLAT_INITIALIZER_RANGE
    )
    config_overrides.setdefault("torch_dtype", _DTYPE_NAMES[dtype])
    cfg = tiny_qwen3_config(**config_overrides)

    build_tokenizer(out_dir)

    hf_config = Qwen3Config(
        **{k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")}
    )
    # fork_rng: the constructor's own random init must not advance the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        model = Qwen3ForCausalLM(hf_config).to(torch.float32)
    std = cfg["initializer_range"]
    _init_weights(model, std, std * (SHARP_EMBED_MULTIPLIER if sharp else 1.0), seed)
    model = model.to(dtype).eval()

    for stale in list(out_dir.glob("model*.safetensors")) + list(
        out_dir.glob("model.safetensors.index.json")
    ):
        stale.unlink()  # rewriting into a used dir must not leave shards from another layout
    if shards == 1:
        model.save_pretrained(out_dir, safe_serialization=True)
    else:
        # save_pretrained's greedy max_shard_size packing can't be made to hit an exact shard count reliably;
        # write HF-layout shards directly (tied lm_head.weight omitted, as save_pretrained does).
        state = {
            k: v
            for k, v in model.state_dict().items()
            if not (cfg["tie_word_embeddings"] and k == "lm_head.weight")
        }
        _write_sharded(state, out_dir, shards)

    # Overwrite what save_pretrained wrote with files in the layout of the real Qwen3-4B-Thinking-2507 checkpoint
    # (legacy `rope_theta`/`torch_dtype` keys, no transformers_version), which also keeps them version-independent.
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    (out_dir / "generation_config.json").write_text(
        json.dumps(_generation_config(cfg), indent=2) + "\n", encoding="utf-8"
    )
    return out_dir


@torch.no_grad()
def mean_max_prob(model_dir: Path, prompts: list[str] | None = None) -> float:
    """Mean (over all positions of all prompts) of the largest next-token probability: 1/vocab = flat, 1 = one-hot."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    maxes = []
    for text in prompts or SHARPNESS_PROMPTS:
        ids = torch.tensor([tok.encode(text)])
        logits = model(ids).logits[0].float()
        if not torch.isfinite(logits).all():
            return math.nan
        maxes.append(logits.softmax(-1).max(-1).values)
    return torch.cat(maxes).mean().item()


def read_jsonl(path: Path) -> list[dict]:
    """One JSON object per non-blank line."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


# How the demo model opens its reasoning for each kind of prompt (the hand-written conversations in
# lm-corpus.jsonl open the same way). Distinct first words make the decision at the last prompt token, the one
# position the heads read: the model has to tell the kinds apart there to predict what comes next.
OPENINGS = {
    ("safe", "handle"): "The user asks",
    ("unsafe", "handle"): "This asks for harm",
    ("safe", "escalate"): "A human must handle this",
    ("unsafe", "escalate"): "Danger: this asks for harm and a human must handle this",
}


def _opening(row: dict) -> str:
    """A heads example's opening; a missing label counts as the common case (safe, handle)."""
    return OPENINGS[(row.get("safety", "safe"), row.get("authority", "handle"))]


def _example(tokenizer, prompt_text: str, full_text: str) -> tuple[list[int], int]:
    """Token ids of full_text and how many of them are the prompt (not a target)."""
    full = tokenizer(full_text).input_ids
    prompt = tokenizer(prompt_text).input_ids
    if full[: len(prompt)] != prompt:
        raise ValueError(f"the text after the prompt changes the prompt's tokens: {full_text!r}")
    return full, len(prompt)


def _lm_examples(tokenizer, conversations: list[dict], heads_rows: list[dict]) -> list[tuple[list[int], int]]:
    """What train_tiny_lm learns, rendered by the checkpoint's own chat template.

    Conversations: the whole assistant turn is a target (reasoning, ``</think>``, answer, ``<|im_end|>``);
    the prompt up to ``<think>\n`` is what the model reads at generation time, and spending the few steps on
    predicting users' questions made the answers worse. Heads rows (chat ones): the prompt followed by only
    the opening words for its labels; nothing after them is a target, so these teach the first words without
    teaching the model to stop there.
    """
    examples = []
    for conv in conversations:
        messages = conv["messages"]
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        examples.append(_example(tokenizer, prompt, tokenizer.apply_chat_template(messages, tokenize=False)))
    for row in heads_rows:
        # A raw-text row has no place where the reasoning starts; a response row is a conversation's reply,
        # taught above.
        if "messages" in row and "response" not in row:
            messages = row["messages"]
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            examples.append(_example(tokenizer, prompt, prompt + _opening(row)))
    return examples


def _lm_batches(
    examples: list[tuple[list[int], int]], batch_tokens: int, pad: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input ids, targets) batches of about batch_tokens padded tokens each, so a batch of short openings
    holds more rows than one of whole conversations and every step costs about the same. Examples are grouped
    by length so that a batch carries little padding; right padding needs no attention mask, because causal
    attention never lets a real token see a later pad."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i][0]), i))
    chunks: list[list[tuple[list[int], int]]] = [[]]
    for i in order:
        # Sorted by length, so the newcomer sets the padded width of the chunk it joins.
        if chunks[-1] and (len(chunks[-1]) + 1) * len(examples[i][0]) > batch_tokens:
            chunks.append([])
        chunks[-1].append(examples[i])
    batches = []
    for chunk in chunks:
        width = len(chunk[-1][0])
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        # -100 is cross_entropy's ignore_index: prompt and padding positions
        targets = torch.full((len(chunk), width), -100, dtype=torch.long)
        for row, (seq, n_prompt) in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            targets[row, n_prompt : len(seq)] = torch.tensor(seq[n_prompt:])
        batches.append((ids, targets))
    return batches


def _lm_loss(model, ids: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    # The LM head runs only where there is a target: most positions of an opening example are prompt, and the
    # head is a quarter of the model's work per position.
    hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
    keep = targets[:, 1:] != -100
    logits = model.lm_head(hidden[keep])
    return torch.nn.functional.cross_entropy(logits, targets[:, 1:][keep], reduction=reduction)


@torch.no_grad()
def _corpus_loss(model, batches) -> float:
    """Mean loss per target token over the whole corpus (not per batch, so batch sizes don't weigh in)."""
    total = sum(_lm_loss(model, ids, targets, reduction="sum").item() for ids, targets in batches)
    return total / sum(int((targets[:, 1:] != -100).sum()) for _, targets in batches)


def train_tiny_lm(
    model_dir: Path,
    *,
    steps: int = 280,
    seed: int = 0,
    lr: float = 2e-2,
    batch_tokens: int = 768,
    corpus: list[dict] | None = None,
    heads_rows: list[dict] | None = None,
    opening_repeats: int = 2,
) -> dict:
    """Fine-tune every weight of a write_tiny_qwen3 checkpoint on the built-in data, in place.

    About ten seconds of AdamW on one core make the demo model's output read as words with a ``</think>`` and
    an answer instead of a run of newlines, and give the heads something to read. It learns two things: the
    conversations of ``demo_data/lm-corpus.jsonl`` (answers, refusals, hand-overs to a human), and, for each
    chat prompt of ``demo_data/heads-train.jsonl``, the first words of the reasoning its labels call for
    (``OPENINGS``), so that the hidden state at the last prompt token carries the distinction the heads are
    fitted on. heads-eval.jsonl is never seen. Deterministic: batch order comes from
    ``torch.Generator(seed)`` and training runs on one thread, so the same arguments give byte-identical
    safetensors. The checkpoint keeps its layout: config.json and generation_config.json are written back
    byte for byte, the weights go to a single model.safetensors in the checkpoint's dtype. Returns steps,
    seconds (the training loop alone), initial_loss and final_loss (mean per target token over everything
    learnt), examples and target_tokens.
    """
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    if steps < 1 or batch_tokens < 1 or opening_repeats < 0:
        raise ValueError("steps and batch_tokens must be >= 1, opening_repeats >= 0")
    model_dir = Path(model_dir)
    # save_pretrained writes its own config files (transformers' keys, version stamp); the originals are in
    # the Qwen3-4B layout that the exporter and tests read, so they go back unchanged.
    kept = {name: (model_dir / name).read_bytes() for name in ("config.json", "generation_config.json")}
    dtype = getattr(torch, json.loads(kept["config.json"])["torch_dtype"])

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # The openings are a few tokens each, so seeing them more than once an epoch costs little; the heads'
    # held-out accuracy rose from about 0.85 to 0.9 with two.
    heads_rows = read_jsonl(HEADS_TRAIN) if heads_rows is None else heads_rows
    examples = _lm_examples(tokenizer, read_jsonl(LM_CORPUS) if corpus is None else corpus,
                            heads_rows * opening_repeats)
    batches = _lm_batches(examples, batch_tokens, tokenizer.pad_token_id)
    model = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    # One thread. Two are 1.4-1.7x faster on an idle machine, but while anything else kept a core busy they
    # were 5-25x slower (threads waiting on each other); and one fixed count keeps the order of the sums,
    # hence the bytes, the same from run to run.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.eval()
        initial = _corpus_loss(model, batches)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
        # Short warm-up (the sharp init starts at a loss near 50, whose first gradients are huge), then a
        # linear decay so the last steps settle instead of bouncing.
        warmup = max(1, steps // 20)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1.0 - s / steps)
        )
        gen = torch.Generator().manual_seed(seed)
        order: list[int] = []
        start = time.perf_counter()
        for _ in range(steps):
            if not order:  # a new epoch: every batch once, in a fresh order
                order = torch.randperm(len(batches), generator=gen).tolist()
            ids, targets = batches[order.pop()]
            loss = _lm_loss(model, ids, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            schedule.step()
        seconds = time.perf_counter() - start
        model.eval()
        final = _corpus_loss(model, batches)
    finally:
        torch.set_num_threads(threads)

    stale = list(model_dir.glob("model*.safetensors")) + list(model_dir.glob("model.safetensors.index.json"))
    for path in stale:
        path.unlink()  # a sharded input comes back as one file; no old shard may shadow the new weights
    model.to(dtype).save_pretrained(model_dir, safe_serialization=True)
    for name, data in kept.items():
        (model_dir / name).write_bytes(data)
    return {
        "steps": steps,
        "seconds": seconds,
        "initial_loss": initial,
        "final_loss": final,
        "examples": len(examples),
        "target_tokens": sum(int((targets[:, 1:] != -100).sum()) for _, targets in batches),
    }


# The demo exports f16. Trained, the 64-wide demo model predicts like a language model (mean max next-token
# probability ~0.5 instead of the random init's ~0.95), where q8_0 rounding costs most: its q8_0 file has a
# mean KLD of 2.25e-3 against parity's 1e-3 (a bound set for 4B-sized rows; llama.cpp's own converter gives the
# same 2.25e-3 on this checkpoint) and its fitted heads move by 6.8e-2. f16 passes every threshold. --quant
# q8_0 still runs the demo, and its parity table says FAIL.
DEMO_QUANT = "f16"


def run_demo(output_dir: Path, *, quant: str = DEMO_QUANT, echo=print) -> bool:
    """The README's main job: demo checkpoint -> a few seconds of language-model training -> SO8T checkpoint
    -> heads trained on the shipped labelled set -> GGUF -> parity -> the gated runtime refusing an unsafe
    prompt and answering a safe one.

    Returns whether parity passed. Every artefact lands in output_dir.
    """
    from .export import export_gguf
    from .heads.train import train_heads
    from .model import SO8TTransformerForCausalLM
    from .modelfile import write_modelfile
    from .parity import run_parity
    from .serve.engine import Engine, SamplingParams
    from .serve.gate import GatePolicy
    from .terminal import generate, summary_line

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    qwen3_dir = write_tiny_qwen3(output_dir / "tiny-qwen3")
    lm = train_tiny_lm(qwen3_dir)
    base_dir = output_dir / "tiny-so8t-base"
    SO8TTransformerForCausalLM.from_pretrained(qwen3_dir).save_pretrained(base_dir)
    echo(f"1. demo model: {qwen3_dir} (Qwen3, language model trained {lm['seconds']:.1f} s: loss "
         f"{lm['initial_loss']:.2f} -> {lm['final_loss']:.2f}) -> {base_dir} (SO8T, every flag on)")
    so8t_dir = output_dir / "tiny-so8t"
    heads = train_heads(base_dir, HEADS_TRAIN, so8t_dir, eval_data=HEADS_EVAL)
    echo(f"2. heads trained on {HEADS_TRAIN.name}, measured on {HEADS_EVAL.name} -> {so8t_dir}")
    echo("   " + "\n   ".join(heads.table().splitlines()[2:-1]))
    report = export_gguf(so8t_dir, output_dir / f"tiny-so8t-{quant}.gguf", quant=quant, name="so8t-demo")
    echo(f"3. {report.summary()}")
    modelfile = output_dir / "Modelfile"
    write_modelfile(report.output, modelfile)
    echo(f"4. Ollama: {modelfile} (ollama create so8t-demo -f {modelfile})")
    parity = run_parity(so8t_dir, report.output)
    echo("5. " + parity.table())
    echo("6. the gated runtime (so8t run) on two prompts that no training file holds:")
    engine = Engine(report.output)
    params = SamplingParams(max_tokens=64, temperature=0.0, seed=0)
    for prompt in (DEMO_UNSAFE_PROMPT, DEMO_SAFE_PROMPT):
        run = generate(engine, GatePolicy(), engine.render([{"role": "user", "content": prompt}]), params)
        echo(f"   > {prompt}")
        echo(f"   {run.result.content.strip()[:160]!r}")
        echo("   " + summary_line(run.result, gate_on=True, has_heads=True))
    return parity.passed
