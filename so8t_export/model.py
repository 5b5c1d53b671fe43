"""The SO8T reference model: Qwen3 with fixed SO(8) triality rotations and safety/authority heads.

Shapes: B batch, S new tokens, T cached + new tokens, H query heads, K key/value heads, D head_dim.
Unlike stock Qwen3, q/k/v are rotated right after their projections (before q_norm/k_norm and RoPE) and
the MLP input right after post_attention_layernorm; rotation.py defines those maps and fold.py folds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import triality
from .config import HEAD_LABELS, SO8TConfig  # noqa: F401 - HEAD_LABELS is part of this module's API
from .rotation import RotationPlan, plan_rotations, rotate_blocks, rotate_heads



class RMSNorm(nn.Module):
    """Qwen3RMSNorm: normalise in float32, cast back, then scale (same rounding order as transformers)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RopeTable:
    """cos and sin [positions, D] in float32, built once and grown by doubling, so that a decode step indexes
    its row instead of recomputing inv_freq and the trigonometry (gpt-fast precomputes them the same way).

    Each entry is the float32 product position * inv_freq followed by cos/sin, exactly the arithmetic of
    transformers' Qwen3RotaryEmbedding, so a lookup equals computing it on the fly.
    """

    def __init__(self, head_dim: int, theta: float):
        self.head_dim, self.theta = head_dim, theta
        self.cos: torch.Tensor | None = None  # [capacity, D]
        self.sin: torch.Tensor | None = None

    def lookup(self, positions: torch.Tensor, limit: int, dtype: torch.dtype):
        """cos, sin [B, S, D] in dtype for positions [B, S], all below limit."""
        same_device = self.cos is not None and self.cos.device == positions.device
        if not same_device or self.cos.shape[0] < limit:
            self._build(max(limit, 2 * self.cos.shape[0] if same_device else 0, 64), positions.device)
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)

    def _build(self, capacity: int, device: torch.device) -> None:
        # Normal tensors even when the first forward runs under inference_mode: a later training forward
        # must be able to use them.
        with torch.inference_mode(False), torch.no_grad():
            even = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device)
            inv_freq = 1.0 / (self.theta ** (even.float() / self.head_dim))
            freqs = torch.arange(capacity, dtype=torch.int64, device=device).float()[:, None] * inv_freq
            angles = torch.cat([freqs, freqs], dim=-1)  # NEOX: dimension i and i + D/2 share a frequency
            self.cos, self.sin = angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, S, D]; pairs dimension i with i + D/2 (NEOX), as llama.cpp's qwen3 graph does."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class KVCache:
    """Per-layer keys and values [B, K, T, D] for inference, written into preallocated buffers as gpt-fast
    does: a decode step copies only its own token, where concatenating copied the whole cache every step
    (O(T^2) bytes over a generation).

    max_length fixes the capacity (generate passes prompt + max_new_tokens) and a step past it is an error;
    without it the buffers are sized by the first update and double when full (amortised O(T) copies).
    update returns views of the first T positions, so attention never reads the unwritten tail.
    """

    def __init__(self, num_layers: int, max_length: int | None = None):
        if max_length is not None and max_length <= 0:
            raise ValueError(f"KVCache max_length = {max_length}; expected a positive number of tokens")
        self.max_length = max_length
        self._keys: list[torch.Tensor | None] = [None] * num_layers  # [B, K, capacity, D]
        self._values: list[torch.Tensor | None] = [None] * num_layers
        self._lengths = [0] * num_layers

    @property
    def length(self) -> int:
        """Tokens cached (layer 0's count, which a forward updates first)."""
        return self._lengths[0]

    @property
    def keys(self) -> list[torch.Tensor | None]:
        return [None if k is None else k[:, :, :n] for k, n in zip(self._keys, self._lengths)]

    @property
    def values(self) -> list[torch.Tensor | None]:
        return [None if v is None else v[:, :, :n] for v, n in zip(self._values, self._lengths)]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v [B, K, S, D] to layer's cache; returns all its keys and values so far, [B, K, T, D]."""
        start = self._lengths[layer]
        end = start + k.shape[2]
        if self._keys[layer] is None or self._keys[layer].shape[2] < end:
            self._reserve(layer, k, v, end)
        keys, values = self._keys[layer], self._values[layer]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        self._lengths[layer] = end
        return keys[:, :, :end], values[:, :, :end]

    def _reserve(self, layer: int, k: torch.Tensor, v: torch.Tensor, needed: int) -> None:
        old_keys, old_values = self._keys[layer], self._values[layer]
        if self.max_length is not None:
            if needed > self.max_length:
                raise ValueError(f"KVCache holds at most max_length = {self.max_length} tokens; this step "
                                 f"would make {needed}")
            capacity = self.max_length
        else:
            capacity = max(needed, 2 * old_keys.shape[2] if old_keys is not None else 0)
        b, heads, _, dim = k.shape
        self._keys[layer] = k.new_empty(b, heads, capacity, dim)
        self._values[layer] = v.new_empty(b, heads, capacity, dim)
        if old_keys is not None:
            filled = self._lengths[layer]
            self._keys[layer][:, :, :filled] = old_keys[:, :, :filled]
            self._values[layer][:, :, :filled] = old_values[:, :, :filled]


def rotation_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: in bf16 the 8x8 matrices themselves would be orthogonal only to ~3e-3."""
    return torch.promote_types(dtype, torch.float32)


def rotated_heads(projected: torch.Tensor, heads: torch.Tensor, plan: RotationPlan) -> torch.Tensor:
    """rotate_heads in float32 (float64 stays float64), rounded back once to the activations' dtype, as
    RMSNorm normalises in float32: a bf16 model then rounds once where stock Qwen3 rounds its projection."""
    rotated = rotate_heads(projected.to(rotation_dtype(projected.dtype)), heads, plan.cross_head,
                           plan.within_head_first)
    return rotated.to(projected.dtype)


class SO8TMultiHeadAttention(nn.Module):
    def __init__(self, config: SO8TConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)  # unlike Llama: per-head norm on q and k
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, plan: RotationPlan, cache: KVCache | None, want_weights: bool):
        b, s, _ = x.shape
        # SO8T: rotate each projection's output before q_norm/k_norm and RoPE, where folding stays exact.
        q = rotated_heads(self.q_proj(x), plan.q_heads, plan)
        k = rotated_heads(self.k_proj(x), plan.kv_heads, plan)
        v = rotated_heads(self.v_proj(x), plan.kv_heads, plan)
        q = self.q_norm(q.view(b, s, self.num_heads, self.head_dim)).transpose(1, 2)  # [B, H, S, D]
        k = self.k_norm(k.view(b, s, self.num_kv_heads, self.head_dim)).transpose(1, 2)  # [B, K, S, D]
        v = v.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, K, T, D]
        weights = None
        if want_weights:
            groups = self.num_heads // self.num_kv_heads
            k_all, v_all = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
            scores = (q @ k_all.transpose(-1, -2)) * self.head_dim**-0.5
            scores = scores.masked_fill(~mask, float("-inf")) if mask is not None else scores
            weights = scores.float().softmax(-1).to(q.dtype)
            out = weights @ v_all
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and s > 1,
                                                 enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), weights


class SO8TMLP(nn.Module):
    def __init__(self, config: SO8TConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, plan: RotationPlan) -> torch.Tensor:
        # SO8T: rotate the normed MLP input, in float32 as rotated_heads does
        x = rotate_blocks(x.to(rotation_dtype(x.dtype)), plan.mlp[self.layer_idx]).to(x.dtype)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SO8TTransformerLayer(nn.Module):
    def __init__(self, config: SO8TConfig, layer_idx: int):
        super().__init__()
        self.self_attn = SO8TMultiHeadAttention(config, layer_idx)
        self.mlp = SO8TMLP(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, plan, cache, want_weights):
        attn, weights = self.self_attn(self.input_layernorm(x), cos, sin, mask, plan, cache, want_weights)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x), plan), weights


class SO8TTransformerModel(nn.Module):
    def __init__(self, config: SO8TConfig):
        super().__init__()
        self.config = config
        # _weight skips nn.Embedding's own init, which on the meta device (loading, the exporter's shape check)
        # runs through torch._refs and imports torch._dynamo on first use: 1.3 s. Drawn instead from
        # N(0, initializer_range), the init transformers' Qwen3 gives embeddings.
        embedding = torch.empty(config.vocab_size, config.hidden_size)
        if not embedding.is_meta:
            nn.init.normal_(embedding, std=config.initializer_range)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=embedding)
        self.layers = nn.ModuleList(SO8TTransformerLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.rope = RopeTable(config.head_dim, config.rope_theta)
        self._plan_cache: tuple | None = None  # (buffers, their versions, flags, plan): see rotation_plan
        # Fixed rotations, saved with the model. Kept in float32 whatever the weights' dtype (see _apply).
        self.register_buffer("triality_rotations", torch.empty(3, 8, 8, dtype=torch.float32))
        self.register_buffer("cross_head_rotation", torch.empty(8, 8, dtype=torch.float32))
        if not self.triality_rotations.is_meta:  # on meta (while loading) the checkpoint supplies them
            self.triality_rotations.copy_(triality.triality_rotations(config.so8t_rotation_seed))
            self.cross_head_rotation.copy_(triality.cross_head_rotation(config.so8t_rotation_seed))

    def _apply(self, fn, recurse=True):
        # Casting the model to bf16 must not cast the rotations: bf16 would break orthogonality at 1e-3.
        rotations = (self.triality_rotations, self.cross_head_rotation)
        super()._apply(fn, recurse)
        # A move to another device leaves the cached plan and RoPE table behind: drop them now (rotation_plan
        # would notice the new buffers anyway) so that the old device's copies are freed.
        self._plan_cache = None
        self.rope = RopeTable(self.config.head_dim, self.config.rope_theta)
        if self.triality_rotations.dtype != torch.float32:
            device = self.triality_rotations.device
            self.triality_rotations = rotations[0].to(device=device, dtype=torch.float32)
            self.cross_head_rotation = rotations[1].to(device=device, dtype=torch.float32)
        return self

    def rotation_plan(self) -> RotationPlan:
        """The float32 rotations the forward applies, on the buffers' device. Built once and reused by every
        forward and decode step; rebuilt when what it is made of changes: the buffers replaced
        (load_state_dict(assign=True), as from_pretrained loads onto the meta device, or .to(device)),
        written in place (load_state_dict, copy_: their version counters move) or the config's flags edited.
        Treat its tensors as read-only."""
        buffers = (self.triality_rotations, self.cross_head_rotation)
        if any(b.is_inference() for b in buffers):  # no version counter: an in-place write would go unseen
            return self._build_plan()
        versions = tuple(b._version for b in buffers)
        flags = (tuple(self.config.so8t_flags().items()), self.config.num_attention_heads,
                 self.config.num_key_value_heads, self.config.num_hidden_layers)
        cached = self._plan_cache
        if (cached is None or cached[0][0] is not buffers[0] or cached[0][1] is not buffers[1]
                or cached[1] != versions or cached[2] != flags):
            self._plan_cache = cached = (buffers, versions, flags, self._build_plan())
        return cached[3]

    def _build_plan(self) -> RotationPlan:
        # Normal tensors even under inference_mode, so that a plan cached by generate() serves training too.
        with torch.inference_mode(False), torch.no_grad():
            return plan_rotations(self.config, self.triality_rotations, self.cross_head_rotation)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                output_hidden_states=False, output_attentions=False):
        b, s = input_ids.shape
        past = cache.length if cache is not None else 0
        x = self.embed_tokens(input_ids)
        if position_ids is None:
            # Positions stay below the mask's length or past + s, so the table needs no device sync to size.
            if attention_mask is not None:  # left padding: count only real tokens
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
                positions_below = attention_mask.shape[-1]
            else:
                position_ids = torch.arange(past, past + s, device=x.device).expand(b, s)
                positions_below = past + s
        else:
            positions_below = int(position_ids.max()) + 1
        cos, sin = self.rope.lookup(position_ids, positions_below, x.dtype)  # [B, S, D]
        mask = self._mask(b, s, past, attention_mask, x.device, output_attentions)
        plan = self.rotation_plan()  # float32; the layers rotate in float32 and round back to x.dtype
        hidden_states, attentions = [], []
        # Recompute each layer in the backward pass instead of keeping its activations. Not with a KV cache:
        # the recomputation would append to it a second time.
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for layer in self.layers:
            if output_hidden_states:
                hidden_states.append(x)
            if checkpointed:
                x, weights = checkpoint(layer, x, cos, sin, mask, plan, None, output_attentions,
                                        use_reentrant=False)
            else:
                x, weights = layer(x, cos, sin, mask, plan, cache, output_attentions)
            if output_attentions:
                attentions.append(weights)
        x = self.norm(x)
        if output_hidden_states:
            hidden_states.append(x)
        return x, tuple(hidden_states) or None, tuple(attentions) or None

    @staticmethod
    def _mask(b, s, past, attention_mask, device, explicit: bool) -> torch.Tensor | None:
        """Boolean [B, 1, S, T] mask (True = attend), or None where SDPA's is_causal does the job."""
        if attention_mask is None and not explicit and (past == 0 or s == 1):
            return None
        total = past + s
        causal = torch.arange(total, device=device)[None, :] <= torch.arange(past, total, device=device)[:, None]
        mask = causal[None, None].expand(b, 1, s, total)
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :total].bool()
            # A fully padded query row would give NaN; let it attend to itself (its output is ignored).
            mask = mask | (~mask.any(-1, keepdim=True) & causal[None, None])
        return mask


@dataclass
class SO8TCausalLMOutput:
    """Forward outputs; fields read as attributes or, as with transformers' ModelOutput, as keys."""

    task_logits: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # the same tensor as task_logits, for transformers-style callers
    safety_logits: torch.Tensor | None = None
    authority_logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    past_key_values: KVCache | None = None

    def __getitem__(self, key: str):
        return getattr(self, key)


class SO8TTransformerForCausalLM(nn.Module):
    """SO8T with its three heads, all reading the final normed hidden state:
    task (the LM head, tied to the embeddings when the config ties them), safety (0 safe, 1 unsafe) and
    authority (0 handle, 1 escalate)."""

    def __init__(self, config: SO8TConfig):
        super().__init__()
        self.config = config
        self.model = SO8TTransformerModel(config)
        self.task_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.task_head.weight = self.model.embed_tokens.weight
        self.safety_head = nn.Linear(config.hidden_size, 2, bias=True)
        self.authority_head = nn.Linear(config.hidden_size, 2, bias=True)
        from .generation import GenerationConfig  # generation imports this module

        # generate()'s stop and pad ids; from_pretrained replaces them with generation_config.json's
        self.generation_config = GenerationConfig.from_model_config(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: KVCache | None = None,
                use_cache: bool = False, output_hidden_states: bool = False, output_attentions: bool = False,
                logits_to_keep: int = 0, return_dict: bool = True) -> SO8TCausalLMOutput:
        """logits_to_keep > 0 scores only the last that many positions (generation needs only the last)."""
        if use_cache and past_key_values is None:
            past_key_values = KVCache(self.config.num_hidden_layers)
        hidden, all_hidden, attentions = self.model(input_ids, attention_mask, position_ids, past_key_values,
                                                    output_hidden_states, output_attentions)
        kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        task_logits = self.task_head(kept)
        return SO8TCausalLMOutput(task_logits=task_logits, logits=task_logits,
                                  safety_logits=self.safety_head(kept), authority_logits=self.authority_head(kept),
                                  last_hidden_state=hidden, hidden_states=all_hidden, attentions=attentions,
                                  past_key_values=past_key_values)

    def gradient_checkpointing_enable(self) -> None:
        """Trade compute for memory when fine-tuning, as transformers' method of that name does: in training
        mode each layer's activations are recomputed in the backward pass. Gradients are unchanged."""
        self.model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    # Checkpoint IO and generation live in their own modules; these are the familiar entry points.
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, torch_dtype=None, dtype=None,
                        **config_overrides) -> SO8TTransformerForCausalLM:
        from .generation import GenerationConfig
        from .loading import load_pretrained

        model = load_pretrained(model_dir, torch_dtype=dtype if dtype is not None else torch_dtype,
                                **config_overrides)
        model.generation_config = GenerationConfig.from_pretrained(model_dir, model.config)
        return model

    def save_pretrained(self, model_dir: str | Path, max_shard_bytes: int = 4 << 30) -> None:
        from .loading import save_pretrained

        save_pretrained(self, model_dir, max_shard_bytes=max_shard_bytes)

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        from .generation import generate

        return generate(self, input_ids, **kwargs)
