"""SO8TConfig: the Qwen3 config.json fields plus the SO8T fields, validated once."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .io import write_bytes_atomic

MODEL_TYPE = "so8t"
ARCHITECTURE = "SO8TTransformerForCausalLM"
QWEN3_ARCHITECTURE = "Qwen3ForCausalLM"


UINT32_MAX = 2**32 - 1
INT32_MAX = 2**31 - 1
LLAMA_MAX_LAYERS = 512  # llama.cpp src/llama-hparams.h; the loader asserts n_layer <= it


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_int(value) -> bool:
    return value is None or (_int(value) and value >= 0)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_FIELD_TYPES: dict[str, tuple] = {
    **{key: (_int, "an integer") for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "max_window_layers",
        "so8t_rotation_dim", "so8t_rotation_seed")},
    **{key: (_number, "a number") for key in ("rope_theta", "rms_norm_eps", "attention_dropout",
                                              "initializer_range", "so8t_safety_threshold",
                                              "so8t_authority_threshold")},
    **{key: (lambda v: isinstance(v, bool), "true or false") for key in (
        "attention_bias", "tie_word_embeddings", "use_sliding_window", "use_cache", "so8t_triality_symmetry",
        "so8t_cross_head_interaction", "so8t_non_commutative_gates", "so8t_vector_representation",
        "so8t_spinor_plus_representation", "so8t_spinor_minus_representation")},
    "hidden_act": (lambda v: isinstance(v, str), "a string"),
    "use_flash_attention": (lambda v: isinstance(v, bool), "true or false"),
    "so8t_folded_weights": (lambda v: isinstance(v, bool), "true or false"),
    "torch_dtype": (lambda v: isinstance(v, str), "a string"),
    "rope_scaling": (lambda v: v is None or isinstance(v, dict), "null or an object"),
    "sliding_window": (lambda v: v is None or _int(v), "null or an integer"),
    "bos_token_id": (_optional_int, "null or a non-negative token id"),
    "pad_token_id": (_optional_int, "null or a non-negative token id"),
    "eos_token_id": (lambda v: _optional_int(v) or (isinstance(v, list) and all(_int(i) and i >= 0 for i in v)),
                     "null, a token id or a list of token ids"),
}


# The --quant choices (quants.OUTPUT_TYPES maps them to ggml types); here so that the command line can offer
# them without importing the encoders (torch, numba).
OUTPUT_TYPE_NAMES = ("f32", "f16", "bf16", "q8_0")
# The types llama.cpp's own quantiser makes from a float GGUF (llama_quantize.py; llama.cpp's mixes of k- and
# i-quant tensor types), from the most bits per weight to the fewest (llama-quantize's Llama-3-8B sizes and
# nominal bits per weight), and --quant auto (the smallest of them under a KLD bound).
LLAMA_QUANT_TYPE_NAMES = ("q6_k", "q5_1", "q5_k_m", "q5_k_s", "q5_0", "q4_1", "q4_k_m", "q4_k_s", "iq4_nl", "q4_0",
                          "iq4_xs", "q3_k_l", "q3_k_m", "iq3_m", "q3_k_s", "iq3_s", "iq3_xxs", "q2_k", "iq2_m",
                          "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s")
AUTO_QUANT = "auto"

# attn_implementation's values, as transformers names them: the explicit softmax, SDPA choosing its kernel,
# and SDPA held to its FLASH_ATTENTION kernel (PyTorch's own, not the flash-attn package).
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")

# The classes of the two heads, in logit order (so8t.*_head.labels in the GGUF schema).
HEAD_LABELS = {"safety": ("safe", "unsafe"), "authority": ("handle", "escalate")}


def triality_types(count: int, triality_symmetry: bool) -> list[int]:
    """Triality type of each of count heads (or layers): index % 3 (0 vector/task, 1 spinor+/safety,
    2 spinor-/authority), or all 0 (vector) when the symmetry is off."""
    return [i % 3 if triality_symmetry else 0 for i in range(count)]


class ConfigError(ValueError):
    """A config.json that SO8T cannot represent; the message names the file and the key."""


@dataclass
class SO8TConfig:
    # Qwen3 fields; names are the config.json keys. Defaults are Qwen3-4B-Thinking-2507's.
    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    max_position_embeddings: int = 262144
    rope_theta: float = 5_000_000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 36
    use_cache: bool = True
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    # How attention runs (not part of the function): attn_implementation names the backend (None: "sdpa");
    # use_flash_attention, the seed's switch, means "flash_attention_2".
    attn_implementation: str | None = None
    use_flash_attention: bool = False

    # SO8T fields (README, "Configuration", says what each flag does).
    so8t_rotation_dim: int = 8
    so8t_triality_symmetry: bool = True
    so8t_cross_head_interaction: bool = True
    so8t_non_commutative_gates: bool = True
    so8t_vector_representation: bool = True
    so8t_spinor_plus_representation: bool = True
    so8t_spinor_minus_representation: bool = True
    so8t_rotation_seed: int = 8
    # P(unsafe) / P(escalate) at which the runtime's gate acts unless told otherwise; train-heads sets them
    # (its --target-fpr), the export carries them as so8t.<head>_head.threshold.
    so8t_safety_threshold: float = 0.5
    so8t_authority_threshold: float = 0.5
    # How the checkpoint stores q/k/v/gate/up, not what the model computes: true when they are the folded
    # (stock Qwen3) weights, as save_pretrained writes a folded model, so that nothing is rotated and rounded
    # on the way out; loading then unfolds them as it does a plain Qwen3 checkpoint's.
    so8t_folded_weights: bool = False

    model_type: str = field(default=MODEL_TYPE, init=False)
    architectures: list[str] = field(default_factory=lambda: [ARCHITECTURE], init=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self, source: str = "config") -> None:
        def fail(key: str, expected: str) -> None:
            raise ConfigError(f"{source}: {key} = {getattr(self, key)!r}; expected {expected}")

        # JSON types first: a "false" string is truthy, and a float head count would slip through arithmetic.
        for key, (check, expected) in _FIELD_TYPES.items():
            if not check(getattr(self, key)):
                fail(key, expected)
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if not 0 < getattr(self, key) <= UINT32_MAX:
                fail(key, f"a positive integer that fits GGUF's uint32 (<= {UINT32_MAX})")
        if self.vocab_size > INT32_MAX:
            fail("vocab_size", f"at most {INT32_MAX} (llama.cpp token ids are int32)")
        if self.num_hidden_layers > LLAMA_MAX_LAYERS:
            fail("num_hidden_layers", f"at most {LLAMA_MAX_LAYERS} (llama.cpp's LLAMA_MAX_LAYERS)")
        if not (math.isfinite(self.rms_norm_eps) and 0 < self.rms_norm_eps < 1):
            fail("rms_norm_eps", "a finite number in (0, 1) (llama.cpp asserts eps >= 0 and aborts on NaN)")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            fail("rope_theta", "a finite positive number")
        if not (math.isfinite(self.initializer_range) and self.initializer_range >= 0):
            fail("initializer_range", "a finite non-negative number")
        if not 0 <= self.so8t_rotation_seed < 2**32:
            fail("so8t_rotation_seed", "an integer in [0, 2**32)")
        for head in HEAD_LABELS:
            if not 0 <= self.head_threshold(head) <= 1:  # NaN fails too
                fail(f"so8t_{head}_threshold", "a probability in [0, 1]")
        if self.so8t_rotation_dim != 8:
            fail("so8t_rotation_dim", "8 (SO(8) triality exists only in dimension 8)")
        if self.head_dim % 8:
            fail("head_dim", "a multiple of 8, so each head splits into 8-dim rotation blocks")
        if self.hidden_size % 8:
            fail("hidden_size", "a multiple of 8, so the MLP input splits into 8-dim rotation blocks")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_attention_heads", f"a multiple of num_key_value_heads={self.num_key_value_heads}")
        if self.so8t_cross_head_interaction:
            for key in ("num_attention_heads", "num_key_value_heads"):
                if getattr(self, key) % 8:
                    fail(key, "a multiple of 8 while so8t_cross_head_interaction is on "
                              "(heads are mixed in groups of 8); turn the flag off for this model")
        if self.hidden_act != "silu":
            fail("hidden_act", "'silu' (Qwen3's SwiGLU)")
        if self.attention_bias:
            fail("attention_bias", "false (Qwen3 has no q/k/v bias)")
        if self.use_sliding_window:
            fail("use_sliding_window", "false (Qwen3-4B attends over the full context)")
        if self.rope_scaling and self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) != "default":
            fail("rope_scaling", "null or rope_type 'default' (scaled RoPE is not implemented)")
        if self.attn_implementation is not None and self.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            fail("attn_implementation", f"null or one of {', '.join(map(repr, ATTENTION_IMPLEMENTATIONS))}")
        if self.use_flash_attention and self.attn_implementation not in (None, "flash_attention_2"):
            fail("attn_implementation", "null or 'flash_attention_2' while use_flash_attention is true")
        if self.torch_dtype not in ("float32", "float16", "bfloat16", "float64"):
            fail("torch_dtype", "one of float32, float16, bfloat16, float64")

    # ------------------------------------------------------------------ derived values
    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config", **overrides: Any) -> SO8TConfig:
        """Build from a Qwen3 or SO8T config.json dict. Unknown keys (quantization_config, ...) are dropped."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: a JSON {type(raw).__name__}; expected an object")
        raw = {**raw, **overrides}
        model_type = raw.get("model_type", "qwen3")
        if model_type not in ("qwen3", MODEL_TYPE):
            raise ConfigError(f"{source}: model_type = {model_type!r}; expected 'qwen3' or '{MODEL_TYPE}'")
        # transformers >= 5 nests rope_theta inside rope_parameters; Qwen's own files keep it flat.
        rope = raw.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: rope_parameters = {rope!r:.80}; expected an object")
        if "rope_theta" not in raw and "rope_theta" in rope:
            raw["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default" and not raw.get("rope_scaling"):
            raw["rope_scaling"] = rope
        if "torch_dtype" not in raw and isinstance(raw.get("dtype"), str):
            raw["torch_dtype"] = raw["dtype"]
        if (raw.get("head_dim") is None and _int(raw.get("hidden_size")) and _int(raw.get("num_attention_heads"))
                and raw["num_attention_heads"] > 0):
            raw["head_dim"] = raw["hidden_size"] // raw["num_attention_heads"]
        if raw.get("num_key_value_heads") is None and "num_attention_heads" in raw:
            raw["num_key_value_heads"] = raw["num_attention_heads"]
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(key for key in raw if key.startswith("so8t_") and key not in names)
        if unknown:  # a misspelt flag would silently keep its default
            known = sorted(n for n in names if n.startswith("so8t_"))
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"{source}: unknown key {unknown[0]}; {hint}expected one of {', '.join(known)}")
        config = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            if f.name in names and f.name in raw:
                value = raw[f.name]
            elif f.default is not dataclasses.MISSING:
                value = f.default
            else:
                value = f.default_factory()  # type: ignore[misc]
            setattr(config, f.name, value)
        config.validate(source)
        return config

    def check_token_ids(self, source: str = "config") -> None:
        """A checkpoint's config.json must name token ids its vocabulary has (the defaults are Qwen3-4B's, so
        this is checked on files, not on every config built in code)."""
        ids = {"bos_token_id": [self.bos_token_id], "pad_token_id": [self.pad_token_id],
               "eos_token_id": self.eos_token_ids}
        for key, values in ids.items():
            if any(v is not None and v >= self.vocab_size for v in values):
                raise ConfigError(f"{source}: {key} = {getattr(self, key)!r}; expected token ids below vocab_size "
                                  f"{self.vocab_size}")

    @classmethod
    def from_json_file(cls, path: str | Path, **overrides: Any) -> SO8TConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json (expected a Qwen3 or SO8T checkpoint folder)") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(raw, source=str(path), **overrides)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **overrides: Any) -> SO8TConfig:
        return cls.from_json_file(Path(model_dir) / "config.json", **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save_pretrained(self, model_dir: str | Path) -> None:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        write_bytes_atomic(Path(model_dir) / "config.json", text.encode())

    def head_threshold(self, head: str) -> float:
        return getattr(self, f"so8t_{head}_threshold")

    def so8t_flags(self) -> dict[str, bool]:
        """The boolean so8t_* flags of the model's maths, keyed without their prefix (as GGUF metadata names
        them); so8t_folded_weights says how a file stores the weights, so it is none of them."""
        return {f.name.removeprefix("so8t_"): getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name.startswith("so8t_") and isinstance(getattr(self, f.name), bool)
                and f.name != "so8t_folded_weights"}
