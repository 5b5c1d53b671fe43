"""The SO8T reference model: Qwen3 with fixed SO(8) triality rotations and safety/authority heads.

Shapes: B batch, S new tokens, T cached + new tokens, H query heads, K key/value heads, D head_dim.
Unlike stock Qwen3, q/k/v are rotated right after their projections (before q_norm/k_norm and RoPE) and
the MLP input right after post_attention_layernorm; rotation.py defines those maps and fold.py folds them.
A folded model (fold_(), from_pretrained(fold=True)) holds the folded weights and runs as plain Qwen3.

Every tensor the forward makes is made on the input's device, in the activations' dtype or in the rotation
buffers' float32, so the model runs wherever its weights are; the forward has no graph breaks under
torch.compile (tests/test_devices.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from . import triality
from .config import HEAD_LABELS, SO8TConfig  # noqa: F401 - HEAD_LABELS is part of this module's API
from .fold import fold_weight, role, unfold_weight
from .rotation import (FusedRotations, RotationPlan, apply_head_blocks, apply_head_blocks_fusible,
                       fuse_rotations, plan_rotations, rotate_blocks, rotate_blocks_fusible)


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
    """cos and sin [positions, D] in float32, built once per device and grown by doubling, so that a decode
    step indexes its row instead of recomputing inv_freq and the trigonometry (gpt-fast precomputes them the
    same way). compute() does the same arithmetic for given positions: what a compiled forward runs (inductor
    fuses it into the RoPE kernel, and a table grown inside a graph would be state the graph cannot keep).

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

    def compute(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin [B, S, D] in dtype for positions [B, S], computed for them alone."""
        angles = self._angles(positions.float(), positions.device)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def _angles(self, positions: torch.Tensor, device: torch.device) -> torch.Tensor:
        even = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device)
        inv_freq = 1.0 / (self.theta ** (even.float() / self.head_dim))
        freqs = positions[..., None] * inv_freq
        return torch.cat([freqs, freqs], dim=-1)  # NEOX: dimension i and i + D/2 share a frequency

    def _build(self, capacity: int, device: torch.device) -> None:
        # Normal tensors even when the first forward runs under inference_mode: a later training forward
        # must be able to use them.
        with torch.inference_mode(False), torch.no_grad():
            angles = self._angles(torch.arange(capacity, dtype=torch.int64, device=device).float(), device)
            self.cos, self.sin = angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, S, D]; pairs dimension i with i + D/2 (NEOX), as llama.cpp's qwen3 graph does."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class KVCache:
    """Per-layer keys and values [B, K, T, D] for inference, in preallocated buffers as gpt-fast keeps them.

    Growing (the default): a step appends its own tokens in place (where concatenating copied the whole
    cache every step, O(T^2) bytes over a generation) and attention reads views of the first T positions.
    max_length fixes the capacity (generate passes prompt + max_new_tokens) and a step past it is an error;
    without it the buffers are sized by the first update and double when full (amortised O(T) copies).

    static=True (needs max_length), for torch.compile and CUDA graphs, as transformers' StaticCache: every
    shape is fixed, the buffers are allocated once (zeros) and marked as static addresses, the new tokens are
    written at their positions (index_copy_) and attention reads all max_length positions under a mask. The
    count of tokens written is a device tensor updated in place, so a compiled decode step needs no
    recompilation; positions must stay below max_length.
    """

    def __init__(self, num_layers: int, max_length: int | None = None, static: bool = False):
        if max_length is not None and max_length <= 0:
            raise ValueError(f"KVCache max_length = {max_length}; expected a positive number of tokens")
        if static and max_length is None:
            raise ValueError("a static KVCache needs max_length (its fixed number of positions)")
        self.max_length, self.static = max_length, static
        self._keys: list[torch.Tensor | None] = [None] * num_layers  # [B, K, capacity, D]
        self._values: list[torch.Tensor | None] = [None] * num_layers
        self._lengths = [0] * num_layers  # growing caches
        self.seen: torch.Tensor | None = None  # static caches: tokens written, int64 scalar on the device

    @property
    def length(self) -> int:
        """Tokens cached (layer 0's count, which a forward updates first). A static cache reads its device
        counter (a synchronisation)."""
        if self.static:
            return 0 if self.seen is None else int(self.seen)
        return self._lengths[0]

    @property
    def keys(self) -> list[torch.Tensor | None]:
        return self._filled(self._keys)

    @property
    def values(self) -> list[torch.Tensor | None]:
        return self._filled(self._values)

    def _filled(self, buffers: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        lengths = [self.length] * len(buffers) if self.static else self._lengths
        return [None if t is None else t[:, :, :n] for t, n in zip(buffers, lengths)]

    def reset(self) -> None:
        """Empty the cache and keep its buffers (a static cache keeps its addresses, so compiled steps stay)."""
        self._lengths = [0] * len(self._lengths)
        if self.seen is not None:
            self.seen.zero_()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Growing cache: append k, v [B, K, S, D] to layer's cache; returns all its keys and values so far,
        [B, K, T, D]."""
        start = self._lengths[layer]
        end = start + k.shape[2]
        if self._keys[layer] is None or self._keys[layer].shape[2] < end:
            self._reserve(layer, k, v, end)
        keys, values = self._keys[layer], self._values[layer]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        self._lengths[layer] = end
        return keys[:, :, :end], values[:, :, :end]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor,
              positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Static cache: k, v [B, K, S, D] into positions [S] of layer's buffers; returns the whole buffers,
        [B, K, max_length, D]."""
        keys, values = self._keys[layer], self._values[layer]
        keys.index_copy_(2, positions, k)
        values.index_copy_(2, positions, v)
        return keys, values

    def allocate(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        """Static cache: the buffers and the counter, once (the model calls this on its first step)."""
        shape = (batch, heads, self.max_length, head_dim)
        if torch.compiler.is_compiling():  # allocated inside a graph: works, but CUDA graphs then copy them
            self._keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in self._keys]
            self._values = [torch.zeros(shape, dtype=dtype, device=device) for _ in self._values]
            self.seen = torch.zeros((), dtype=torch.int64, device=device)
            return
        # Normal tensors even under inference_mode, so that the cache can be reset or reused outside it.
        with torch.inference_mode(False):
            self._keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in self._keys]
            self._values = [torch.zeros(shape, dtype=dtype, device=device) for _ in self._values]
            self.seen = torch.zeros((), dtype=torch.int64, device=device)
        if self.seen.is_cuda:  # as StaticCache: CUDA graphs then write them in place
            for tensor in (*self._keys, *self._values, self.seen):
                torch._dynamo.mark_static_address(tensor)

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


# ---------------------------------------------------------------------------------------------- rotations
def rotation_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: in bf16 the 8x8 matrices themselves would be orthogonal only to ~3e-3."""
    return torch.promote_types(dtype, torch.float32)


def _exact_matmuls(device: torch.device):
    """Autocast off around the rotations: under mixed precision their matmuls would run in float16."""
    if device.type in ("cpu", "cuda", "mps", "xpu") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# Under torch.compile, steps of at most this many tokens (decoding) rotate q/k/v in the fusible form, which
# inductor merges with the casts and the q/k norms (no kernel of its own); longer ones (prefill) keep the
# batched matmul, whose cost grows slower with the tokens than the fusible form's 64 products per output.
FUSIBLE_MAX_TOKENS = 32


def rotated_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor):
    """q [..., H*D], k and v [..., K*D] through rotate_heads, all three in one batched matmul over the
    stacked blocks (FusedRotations.qkv), in float32 (float64 stays float64) and rounded back once to the
    activations' dtype, as RMSNorm normalises in float32: a bf16 model then rounds once where stock Qwen3
    rounds its projection."""
    qkv = torch.cat([q, k, v], dim=-1)  # [B, S, (H + 2K) D]
    with _exact_matmuls(qkv.device):
        if torch.compiler.is_compiling() and qkv.shape[:-1].numel() <= FUSIBLE_MAX_TOKENS:
            rotated = apply_head_blocks_fusible(qkv, blocks, qkv.dtype)
        else:
            rotated = apply_head_blocks(qkv, blocks, qkv.dtype)
    return rotated.split([q.shape[-1], k.shape[-1], v.shape[-1]], dim=-1)


def rotated_blocks(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """rotate_blocks in the rotation's dtype (float32, or float64), rounded back once to x's dtype."""
    with _exact_matmuls(x.device):
        if torch.compiler.is_compiling():
            return rotate_blocks_fusible(x.to(rotation.dtype), rotation).to(x.dtype)
        return rotate_blocks(x.to(rotation.dtype), rotation).to(x.dtype)


# ---------------------------------------------------------------------------------------------- attention
class AttentionBackendError(RuntimeError):
    """The configured attention backend cannot run on these inputs (one line naming setting, device, dtype)."""


def attention_backend(config: SO8TConfig) -> str:
    """The attn_implementation in effect: use_flash_attention (the seed's switch) means flash_attention_2."""
    if config.use_flash_attention:
        return "flash_attention_2"
    return config.attn_implementation or "sdpa"


_FLASH_CHECKED: set[tuple] = set()


def _check_flash(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Before SDPA is asked for its flash kernel: refuse in one line what it cannot run, instead of
    PyTorch's page of warnings and then a RuntimeError."""
    key = (q.device, q.dtype, mask is None, q.shape[-1], q.shape[1] != k.shape[1])
    if key in _FLASH_CHECKED or q.device.type != "cuda":  # the CPU's flash kernel takes every float dtype
        return
    reasons = []
    if q.dtype not in (torch.float16, torch.bfloat16):
        reasons.append("it takes float16 or bfloat16 inputs (load with torch_dtype=torch.bfloat16)")
    if mask is not None:
        reasons.append("it takes no attention mask (a left-padded batch, a prompt appended to a KV cache "
                       "and a static KVCache all need one)")
    if not reasons:
        params = torch.backends.cuda.SDPAParams(q, k, k, mask, 0.0, mask is None and q.shape[2] > 1,
                                                q.shape[1] != k.shape[1])
        if not torch.backends.cuda.can_use_flash_attention(params, False):
            reasons.append(f"PyTorch's flash kernel does not support this GPU or head_dim {q.shape[-1]}")
    if reasons:
        raise AttentionBackendError(
            f"attn_implementation = 'flash_attention_2' (SDPA's FLASH_ATTENTION backend) cannot run on "
            f"{q.device} with {str(q.dtype).removeprefix('torch.')} inputs: {'; '.join(reasons)}; "
            "use attn_implementation='sdpa' to let SDPA choose")
    _FLASH_CHECKED.add(key)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """scaled_dot_product_attention with GQA: q [B, H, S, D], k and v [B, K, T, D], mask [B, 1, S, T] or None
    (causal when S > 1)."""
    groups = q.shape[1] // k.shape[1]
    if groups == 1 or mask is None or q.device.type != "cuda":
        # A branch, not the comparison itself: with a dynamic sequence length under torch.compile that is
        # symbolic, and SDPA takes only a real bool (dynamo guards on the branch instead).
        causal = True if mask is None and q.shape[2] > 1 else False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=groups > 1)
    # CUDA's fused kernels take GQA only without a mask; with one SDPA would fall back to its math kernel
    # (transformers' sdpa_attention does the same two things).
    b, h, s, d = q.shape
    if s == 1:  # one query: each KV head's queries become rows of one attention ([B, 1, 1, T] broadcasts)
        return F.scaled_dot_product_attention(q.reshape(b, k.shape[1], groups, d), k, v,
                                              attn_mask=mask).reshape(b, h, 1, d)
    return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                          attn_mask=mask)


def attend(q, k, v, mask, backend: str, want_weights: bool):
    """out [B, H, S, D] and, on the explicit path, the weights [B, H, S, T]."""
    if want_weights or backend == "eager":  # the explicit softmax, as transformers' eager attention
        groups = q.shape[1] // k.shape[1]
        k_all, v_all = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scores = (q @ k_all.transpose(-1, -2)) * q.shape[-1] ** -0.5
        scores = scores.masked_fill(~mask, float("-inf")) if mask is not None else scores
        weights = scores.float().softmax(-1).to(q.dtype)
        return weights @ v_all, weights
    if backend == "flash_attention_2":
        compiling = torch.compiler.is_compiling()
        if not compiling:
            _check_flash(q, k, mask)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            if compiling:
                return sdpa(q, k, v, mask), None
            try:
                return sdpa(q, k, v, mask), None
            except RuntimeError as err:  # a device _check_flash does not know (MPS, XPU)
                raise AttentionBackendError(
                    f"attn_implementation = 'flash_attention_2' (SDPA's FLASH_ATTENTION backend) cannot run on "
                    f"{q.device} with {str(q.dtype).removeprefix('torch.')} inputs: "
                    f"{str(err).splitlines()[0]}; use attn_implementation='sdpa'") from None
    return sdpa(q, k, v, mask), None


# ---------------------------------------------------------------------------------------------- layers
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

    def forward(self, x, cos, sin, mask, rotations: FusedRotations | None, cache: KVCache | None,
                positions: torch.Tensor | None, backend: str, want_weights: bool):
        b, s, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, S, H*D], [B, S, K*D]
        if rotations is not None:
            # SO8T: rotate each projection's output before q_norm/k_norm and RoPE, where folding stays exact
            q, k, v = rotated_qkv(q, k, v, rotations.qkv)
        q = self.q_norm(q.view(b, s, self.num_heads, self.head_dim)).transpose(1, 2)  # [B, H, S, D]
        k = self.k_norm(k.view(b, s, self.num_kv_heads, self.head_dim)).transpose(1, 2)  # [B, K, S, D]
        v = v.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # [B, K, T, D]
            if cache.static:
                k, v = cache.write(self.layer_idx, k, v, positions)
            else:
                k, v = cache.update(self.layer_idx, k, v)
        out, weights = attend(q, k, v, mask, backend, want_weights)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), weights


class SO8TMLP(nn.Module):
    def __init__(self, config: SO8TConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rotations: FusedRotations | None) -> torch.Tensor:
        if rotations is not None:  # SO8T: rotate the normed MLP input, in float32 as the attention's rotations
            x = rotated_blocks(x, rotations.mlp[self.layer_idx])
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SO8TTransformerLayer(nn.Module):
    def __init__(self, config: SO8TConfig, layer_idx: int):
        super().__init__()
        self.self_attn = SO8TMultiHeadAttention(config, layer_idx)
        self.mlp = SO8TMLP(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, rotations, cache, positions, backend, want_weights):
        attn, weights = self.self_attn(self.input_layernorm(x), cos, sin, mask, rotations, cache, positions,
                                       backend, want_weights)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x), rotations), weights


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
        self.folded = False  # the q/k/v/gate/up weights hold the rotations (fold_): no rotation runs
        self.rope = RopeTable(config.head_dim, config.rope_theta)
        # (buffers, their versions, flags, plan, {rotation dtype: FusedRotations}): see rotation_plan
        self._plan_cache: tuple | None = None
        # Fixed rotations, saved with the model. Kept in float32 whatever the weights' dtype (see _apply).
        self.register_buffer("triality_rotations", torch.empty(3, 8, 8, dtype=torch.float32))
        self.register_buffer("cross_head_rotation", torch.empty(8, 8, dtype=torch.float32))
        if not self.triality_rotations.is_meta:  # on meta (while loading) the checkpoint supplies them
            self.triality_rotations.copy_(triality.triality_rotations(config.so8t_rotation_seed))
            self.cross_head_rotation.copy_(triality.cross_head_rotation(config.so8t_rotation_seed))
            self.prepare_rotations()
        # load_state_dict writes (or, with assign=True, replaces) the buffers: rebuild then, eagerly, so that
        # a model compiled afterwards finds its rotations ready.
        self.register_load_state_dict_post_hook(lambda module, _: module.prepare_rotations())

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
        self.prepare_rotations()
        return self

    def _flags(self) -> tuple:
        return (tuple(self.config.so8t_flags().items()), self.config.num_attention_heads,
                self.config.num_key_value_heads, self.config.num_hidden_layers)

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
        flags = self._flags()
        cached = self._plan_cache
        if (cached is None or cached[0][0] is not buffers[0] or cached[0][1] is not buffers[1]
                or cached[1] != versions or cached[2] != flags):
            self._plan_cache = cached = (buffers, versions, flags, self._build_plan(), {})
        return cached[3]

    def fused_rotations(self, dtype: torch.dtype = torch.float32) -> FusedRotations:
        """The plan as the forward applies it (rotation.fuse_rotations), for rotations computed in dtype
        (float32, or float64); cached with the plan, once per dtype (and device, since a move drops it)."""
        plan = self.rotation_plan()
        cached = self._plan_cache
        if cached is None or cached[3] is not plan:  # inference-mode buffers: nothing is cached
            return self._fuse(plan, dtype)
        if dtype not in cached[4]:
            cached[4][dtype] = self._fuse(plan, dtype)
        return cached[4][dtype]

    def prepare_rotations(self) -> None:
        """Build the plan and the fused rotations for the weights' dtype now (a compiled forward reads them
        as they are; see _rotations)."""
        if any(b.is_inference() for b in (self.triality_rotations, self.cross_head_rotation)):
            # Made or loaded under inference_mode: such buffers have no version counter, so no plan could be
            # cached on them, and a compiled forward would then build it inside its graph, which CUDA graphs
            # fail to replay ("storage data ptrs are not allocated in pool"). Normal copies (a few KB) can be.
            with torch.inference_mode(False):
                self.triality_rotations = self.triality_rotations.clone()
                self.cross_head_rotation = self.cross_head_rotation.clone()
        self.fused_rotations(rotation_dtype(self.embed_tokens.weight.dtype))

    def _rotations(self, dtype: torch.dtype) -> FusedRotations | None:
        """What the layers apply to activations of dtype; None for a folded model."""
        if self.folded:
            return None
        dtype = rotation_dtype(dtype)
        if not torch.compiler.is_compiling():
            return self.fused_rotations(dtype)
        # Under torch.compile the version counters cannot be read (they would be data-dependent), so the
        # rotations are the ones built eagerly (construction, loading, .to(), load_state_dict), checked against
        # the flags (a guard: editing one recompiles); built inside the graph where none are cached.
        cached = self._plan_cache
        if cached is not None and cached[2] == self._flags() and dtype in cached[4]:
            return cached[4][dtype]
        plan = plan_rotations(self.config, self.triality_rotations, self.cross_head_rotation)
        return fuse_rotations(plan, dtype)

    def _build_plan(self) -> RotationPlan:
        # Normal tensors even under inference_mode, so that a plan cached by generate() serves training too.
        with torch.inference_mode(False), torch.no_grad():
            return plan_rotations(self.config, self.triality_rotations, self.cross_head_rotation)

    @staticmethod
    def _fuse(plan: RotationPlan, dtype: torch.dtype) -> FusedRotations:
        with torch.inference_mode(False), torch.no_grad():
            fused = fuse_rotations(plan, dtype)
        if fused.qkv.is_cuda and not torch.compiler.is_compiling():
            # CUDA graphs then read them in place instead of copying them in at each replay (only CUDA: the
            # call imports torch._dynamo, 1.3 s that a CPU load need not pay)
            torch._dynamo.mark_static_address(fused.qkv)
            torch._dynamo.mark_static_address(fused.mlp)
        return fused

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                output_hidden_states=False, output_attentions=False, cache_position=None):
        b, s = input_ids.shape
        static = cache is not None and cache.static
        x = self.embed_tokens(input_ids)
        # positions [S]: the new tokens' slots (a static cache counts them on the device)
        if static:
            if cache.seen is None:
                cache.allocate(b, self.config.num_key_value_heads, self.config.head_dim, x.dtype, x.device)
            elif cache._keys[0].shape[0] != b:
                raise ValueError(f"this static KVCache holds a batch of {cache._keys[0].shape[0]}; the input "
                                 f"has {b}")
            past = 0  # not read: the mask comes from the positions
            positions = (cache_position if cache_position is not None
                         else cache.seen + torch.arange(s, device=x.device))
        else:
            past = cache.length if cache is not None else 0
            positions = (cache_position if cache_position is not None
                         else torch.arange(past, past + s, device=x.device))
        explicit = position_ids is not None or (cache_position is not None and not static)
        if position_ids is None:
            if attention_mask is not None:  # left padding: count only real tokens
                counted = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                position_ids = counted.index_select(1, positions) if static or explicit else counted[:, past:]
            else:
                position_ids = positions[None].expand(b, s)
        if torch.compiler.is_compiling() or explicit:
            cos, sin = self.rope.compute(position_ids, x.dtype)  # [B, S, D]
        else:
            # Positions stay below the mask's length, past + s or the static capacity: no device sync to size.
            limit = (cache.max_length if static else attention_mask.shape[-1] if attention_mask is not None
                     else past + s)
            cos, sin = self.rope.lookup(position_ids, limit, x.dtype)
        backend = attention_backend(self.config)
        eager = output_attentions or backend == "eager"
        if static:
            mask = self._static_mask(b, s, positions, cache.max_length, attention_mask)
        else:
            mask = self._mask(b, s, past, attention_mask, x.device, eager)
        rotations = self._rotations(x.dtype)  # float32; the layers rotate in float32 and round back to x.dtype
        hidden_states, attentions = [], []
        # Recompute each layer in the backward pass instead of keeping its activations. Not with a KV cache:
        # the recomputation would append to it a second time.
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for layer in self.layers:
            if output_hidden_states:
                hidden_states.append(x)
            if checkpointed:
                x, weights = checkpoint(layer, x, cos, sin, mask, rotations, None, None, backend, output_attentions,
                                        use_reentrant=False)
            else:
                x, weights = layer(x, cos, sin, mask, rotations, cache, positions, backend, output_attentions)
            if output_attentions:
                attentions.append(weights)
        if static:
            cache.seen.copy_(positions[-1] + 1)
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

    @staticmethod
    def _static_mask(b, s, positions, capacity, attention_mask) -> torch.Tensor:
        """Boolean [B, 1, S, max_length] mask for a static cache: slot t is attended from position p when
        t <= p (later slots hold stale or no tokens) and the attention mask, padded with ones, allows it."""
        causal = torch.arange(capacity, device=positions.device)[None, :] <= positions[:, None]  # [S, capacity]
        mask = causal[None, None].expand(b, 1, s, capacity)
        if attention_mask is not None:
            if attention_mask.shape[-1] > capacity:
                raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions; this static KVCache "
                                 f"holds max_length = {capacity}")
            allowed = F.pad(attention_mask.bool(), (0, capacity - attention_mask.shape[-1]), value=True)
            mask = mask & allowed[:, None, None, :]
            mask = mask | (~mask.any(-1, keepdim=True) & (positions[:, None] == torch.arange(
                capacity, device=positions.device)[None, :])[None, None])
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
                logits_to_keep: int = 0, return_dict: bool = True,
                cache_position: torch.Tensor | None = None) -> SO8TCausalLMOutput:
        """logits_to_keep > 0 scores only the last that many positions (generation needs only the last).
        cache_position [S]: the cache slots of the new tokens, as in transformers (by default the next ones)."""
        if use_cache and past_key_values is None:
            past_key_values = KVCache(self.config.num_hidden_layers)
        hidden, all_hidden, attentions = self.model(input_ids, attention_mask, position_ids, past_key_values,
                                                    output_hidden_states, output_attentions, cache_position)
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

    # ------------------------------------------------------------------------------------------ folding
    @property
    def is_folded(self) -> bool:
        """True when the rotations live in the q/k/v/gate/up weights (fold_) and the forward runs as Qwen3."""
        return self.model.folded

    def rotation_plan_float64(self) -> RotationPlan:
        """The plan in float64 (where the device has it; else on the CPU), as the fold and unfold use it."""
        device = self.model.triality_rotations.device
        work = device if device.type in ("cpu", "cuda", "meta") else torch.device("cpu")
        return plan_rotations(self.config, self.model.triality_rotations.to(work, torch.float64),
                              self.model.cross_head_rotation.to(work, torch.float64))

    def rotated_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The q/k/v/gate/up weights a fold changes, with their checkpoint names."""
        return [(name, p) for name, p in self.named_parameters() if role(name).side != "none"]

    @torch.no_grad()
    def fold_(self) -> SO8TTransformerForCausalLM:
        """Fold the rotations into the q/k/v (rows) and gate/up (columns) weights, in place, with the exporter's
        fold_weight (in float64, rounded once to the weights' dtype); the forward then runs as plain Qwen3
        with no rotation at all. The rotation buffers and the heads stay, and save_pretrained still writes an
        SO8T checkpoint (unfolding on the way out). Returns the model."""
        if not self.is_folded:
            self._refold(fold_weight)
            self.model.folded = True
        return self

    @torch.no_grad()
    def unfold_(self) -> SO8TTransformerForCausalLM:
        """The inverse of fold_ (fold.unfold_weight): the SO8T weights back, to the dtype's rounding."""
        if self.is_folded:
            self._refold(unfold_weight)
            self.model.folded = False
        return self

    def _refold(self, transform) -> None:
        plan = self.rotation_plan_float64()
        work = plan.q_heads.device
        for name, weight in self.rotated_parameters():
            folded = transform(name, weight.detach().to(work, torch.float64), plan)
            weight.copy_(folded.to(device=weight.device, dtype=weight.dtype))

    # Checkpoint IO and generation live in their own modules; these are the familiar entry points.
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, torch_dtype=None, dtype=None, *, device_map=None, device=None,
                        fold: bool = False, **config_overrides) -> SO8TTransformerForCausalLM:
        """device_map ("auto", "cpu", "cuda", "cuda:0", a torch.device or {"": device}) or device places the
        whole model; fold=True loads it folded (fold_). attn_implementation, use_flash_attention and any
        other config field are config overrides."""
        from .generation import GenerationConfig
        from .loading import load_pretrained

        model = load_pretrained(model_dir, torch_dtype=dtype if dtype is not None else torch_dtype,
                                device_map=device_map, device=device, fold=fold, **config_overrides)
        model.generation_config = GenerationConfig.from_pretrained(model_dir, model.config)
        return model

    def save_pretrained(self, model_dir: str | Path, max_shard_bytes: int = 4 << 30) -> None:
        from .loading import save_pretrained

        save_pretrained(self, model_dir, max_shard_bytes=max_shard_bytes)

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        from .generation import generate

        return generate(self, input_ids, **kwargs)
