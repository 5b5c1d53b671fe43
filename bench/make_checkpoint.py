"""Write a random-weight checkpoint with the exact layout of Qwen/Qwen3-4B-Thinking-2507-FP8 (and a bf16 twin).

    python bench/make_checkpoint.py [--out bench/.cache]

Writes <out>/qwen3-4b-fp8/ and <out>/qwen3-4b-bf16/, each a complete HF checkpoint folder (config.json,
generation_config.json, sharded safetensors + model.safetensors.index.json, tokenizer files). Skips a folder
that already holds a complete copy (a `.complete` stamp written last, keyed on the layout parameters).

Layout (Qwen3-4B): 36 layers, hidden 2560, intermediate 9728, 32 q heads / 8 kv heads, head_dim 128,
vocab 151936, tied embeddings (no lm_head.weight).
- FP8 folder: q/k/v/o/gate/up/down `.weight` are float8_e4m3fn with `.weight_scale_inv` per 128x128 block
  (bf16, as in Qwen's dense FP8 checkpoints), norms and embeddings bf16, 2 shards,
  `quantization_config = {activation_scheme: dynamic, fmt: e4m3, quant_method: fp8, weight_block_size: [128, 128]}`.
- bf16 folder: the same weights dequantised (w_fp8 * scale_inv) to bf16, 3 shards, no quantization_config.

Weights are N(0, 0.02) from a seeded generator per tensor, norm gains ~ U(0.5, 2). Everything is written
streaming: the safetensors headers are computed up front and each tensor is generated, quantised and appended
on its own, so memory stays at about one tensor (the embedding is generated in row chunks).

The tokenizer is so8t_export.demo's small Qwen-style BPE (tokenizer.json + tokenizer_config.json with the
chat template); config.vocab_size = 151936 and the GGUF writers pad the missing ids with [PAD{i}], as they do
for the real Qwen3 (151669 tokens, vocab_size 151936). The special-token ids in config.json are the small
tokenizer's (the real ones, 151643/151645, would point at padding ids here).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from so8t_export.demo import build_tokenizer
from so8t_export.quants import quantize_fp8

LAYERS = 36
HIDDEN = 2560
INTER = 9728
N_HEAD = 32
N_KV = 8
HEAD_DIM = 128
VOCAB = 151936
BLOCK = (128, 128)
STD = 0.02
SEED = 1234
FP8_SHARDS = 2
BF16_SHARDS = 3
EMBED_CHUNK_ROWS = 8192

FP8_DIR = "qwen3-4b-fp8"
BF16_DIR = "qwen3-4b-bf16"

QUANTIZED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def layout() -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) in HF order; kind is 'embed', 'norm' or 'linear'."""
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN), "embed")]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes = {
            "self_attn.q_proj": (N_HEAD * HEAD_DIM, HIDDEN),
            "self_attn.k_proj": (N_KV * HEAD_DIM, HIDDEN),
            "self_attn.v_proj": (N_KV * HEAD_DIM, HIDDEN),
            "self_attn.o_proj": (HIDDEN, N_HEAD * HEAD_DIM),
            "mlp.gate_proj": (INTER, HIDDEN),
            "mlp.up_proj": (INTER, HIDDEN),
            "mlp.down_proj": (HIDDEN, INTER),
        }
        out.append((p + "input_layernorm.weight", (HIDDEN,), "norm"))
        for mod, shape in shapes.items():
            out.append((p + mod + ".weight", shape, "linear"))
        out.append((p + "self_attn.q_norm.weight", (HEAD_DIM,), "norm"))
        out.append((p + "self_attn.k_norm.weight", (HEAD_DIM,), "norm"))
        out.append((p + "post_attention_layernorm.weight", (HIDDEN,), "norm"))
    out.append(("model.norm.weight", (HIDDEN,), "norm"))
    return out


def _entries(fp8: bool) -> list[tuple[str, tuple[int, ...], str, str]]:
    """(tensor name, shape, safetensors dtype, source name) of one folder, in write order."""
    out = []
    for name, shape, kind in layout():
        if kind == "linear" and fp8:
            out.append((name, shape, "F8_E4M3", name))
            scale_shape = tuple(math.ceil(s / b) for s, b in zip(shape, BLOCK))
            out.append((name + "_scale_inv", scale_shape, "BF16", name))
        else:
            out.append((name, shape, "BF16", name))
    return out


_BYTES = {"F8_E4M3": 1, "BF16": 2}


def _shard_plan(entries, shards: int) -> list[list[int]]:
    """Split entries into `shards` contiguous groups of about equal bytes, never splitting a layer."""
    sizes = [math.prod(shape) * _BYTES[dt] for _, shape, dt, _ in entries]
    total = sum(sizes)
    groups: list[list[int]] = [[] for _ in range(shards)]
    done, g, prev_layer = 0, 0, None
    for i, (name, _, _, _) in enumerate(entries):
        layer = name.split(".")[2] if name.startswith("model.layers.") else name
        if layer != prev_layer:
            g = max(g, min(shards - 1, int(done * shards / total)))
        groups[g].append(i)
        done += sizes[i]
        prev_layer = layer
    return [grp for grp in groups if grp]


class ShardedWriter:
    """Writes safetensors shards tensor by tensor: headers first (offsets known from shapes), then data."""

    def __init__(self, folder: Path, entries, shards: int):
        self.folder = folder
        self.entries = entries
        groups = _shard_plan(entries, shards)
        n = len(groups)
        self.files = {}
        self.shard_of = {}
        weight_map = {}
        self.expected = {}
        total = 0
        for k, group in enumerate(groups):
            fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            header, offset = {}, 0
            for i in group:
                name, shape, dt, _ = entries[i]
                nbytes = math.prod(shape) * _BYTES[dt]
                header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
                weight_map[name] = fname
                self.shard_of[name] = fname
            total += offset
            header["__metadata__"] = {"format": "pt"}
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            f = open(folder / (fname + ".partial"), "wb")  # noqa: SIM115 (one per shard, closed in close())
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            self.files[fname] = f
            self.expected[fname] = 8 + len(raw) + offset
        self.index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}

    def write(self, name: str, data: bytes | memoryview) -> None:
        self.files[self.shard_of[name]].write(data)

    def close(self) -> None:
        for fname, f in self.files.items():
            f.close()
            part = self.folder / (fname + ".partial")
            if part.stat().st_size != self.expected[fname]:
                raise RuntimeError(f"{part}: {part.stat().st_size} bytes; expected {self.expected[fname]}")
            os.replace(part, self.folder / fname)
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(self.index, indent=2) + "\n")


def _bytes(t: torch.Tensor) -> memoryview:
    t = t.contiguous()
    return memoryview(t.view(torch.uint8).numpy()).cast("B") if t.dtype != torch.uint8 else memoryview(t.numpy())


def qwen3_config(tok_dir: Path, fp8: bool) -> dict:
    added = {a["content"]: a["id"] for a in json.loads((tok_dir / "tokenizer.json").read_text())["added_tokens"]}
    # Field set and values of Qwen/Qwen3-4B-Thinking-2507-FP8's config.json (token ids: see module doc).
    cfg = {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": added["<|endoftext|>"],
        "eos_token_id": added["<|im_end|>"],
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTER,
        "max_position_embeddings": 262144,
        "max_window_layers": LAYERS,
        "model_type": "qwen3",
        "num_attention_heads": N_HEAD,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": N_KV,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 5000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": VOCAB,
    }
    if fp8:
        cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": list(BLOCK)}
    return cfg


def _stamp() -> str:
    key = json.dumps([LAYERS, HIDDEN, INTER, N_HEAD, N_KV, HEAD_DIM, VOCAB, BLOCK, STD, SEED, FP8_SHARDS,
                      BF16_SHARDS, "v1"])
    return hashlib.sha256(key.encode()).hexdigest()


def is_complete(folder: Path) -> bool:
    stamp = folder / ".complete"
    return stamp.is_file() and stamp.read_text().strip() == _stamp()


def make(out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    fp8_dir, bf16_dir = out / FP8_DIR, out / BF16_DIR
    if is_complete(fp8_dir) and is_complete(bf16_dir):
        print(f"checkpoints present and complete: {fp8_dir}, {bf16_dir}")
        return fp8_dir, bf16_dir
    start = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    for d in (fp8_dir, bf16_dir):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        build_tokenizer(d)
    for d, fp8 in ((fp8_dir, True), (bf16_dir, False)):
        cfg = qwen3_config(d, fp8)
        (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        gen = {"bos_token_id": cfg["bos_token_id"], "do_sample": True,
               "eos_token_id": [cfg["eos_token_id"], cfg["bos_token_id"]], "pad_token_id": cfg["bos_token_id"],
               "temperature": 0.6, "top_k": 20, "top_p": 0.95, "transformers_version": "4.51.0"}
        (d / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

    w8 = ShardedWriter(fp8_dir, _entries(True), FP8_SHARDS)
    w16 = ShardedWriter(bf16_dir, _entries(False), BF16_SHARDS)
    items = layout()
    for idx, (name, shape, kind) in enumerate(items):
        g = torch.Generator().manual_seed(SEED * 100003 + idx)
        if kind == "norm":  # gains far from 1, as trained models have (with unit gains norm(Bx) = B norm(x))
            t = (0.5 + 1.5 * torch.rand(shape, generator=g)).to(torch.bfloat16)
            w8.write(name, _bytes(t))
            w16.write(name, _bytes(t))
        elif kind == "embed":
            for r0 in range(0, shape[0], EMBED_CHUNK_ROWS):
                rows = min(EMBED_CHUNK_ROWS, shape[0] - r0)
                t = (torch.randn((rows, shape[1]), generator=g) * STD).to(torch.bfloat16)
                w8.write(name, _bytes(t))
                w16.write(name, _bytes(t))
        else:
            w = torch.randn(shape, generator=g) * STD
            q, scale = quantize_fp8(w, BLOCK)
            del w
            scale = scale.to(torch.bfloat16)
            w8.write(name, _bytes(q))
            w8.write(name + "_scale_inv", _bytes(scale))
            rows, cols = shape
            deq = (q.to(torch.float32).view(rows // BLOCK[0], BLOCK[0], cols // BLOCK[1], BLOCK[1])
                   * scale.to(torch.float32)[:, None, :, None]).view(rows, cols).to(torch.bfloat16)
            w16.write(name, _bytes(deq))
            del q, deq
        if idx % 40 == 0:
            print(f"  {idx + 1}/{len(items)} {name}  {time.perf_counter() - start:.0f}s", flush=True)
    w8.close()
    w16.close()
    for d in (fp8_dir, bf16_dir):
        (d / ".complete").write_text(_stamp() + "\n")
    print(f"wrote {fp8_dir} and {bf16_dir} in {time.perf_counter() - start:.0f}s")
    return fp8_dir, bf16_dir


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / ".cache")
    args = ap.parse_args(argv)
    make(args.out)


if __name__ == "__main__":
    main()
