"""Reference-model speed: SO8T prefill and decode against transformers' Qwen3 of the same shape, one run.

A few layers at Qwen3-4B widths (hidden 2560, MLP 9728, 32/8 heads, head_dim 128), float32 on CPU. Both
models hold the same weights (SO8T loads the Qwen3 checkpoint function-preserving), take turns in each
repetition, and the medians are compared. Target (issue 2): SO8T costs at most 10% more.

    python bench/reference.py [--layers 4] [--prefill 512] [--decode 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from so8t_export.model import KVCache, SO8TTransformerForCausalLM


def build(layers: int, folder: Path) -> Qwen3ForCausalLM:
    config = Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=5e6,
                         tie_word_embeddings=True, max_position_embeddings=4096, dtype="float32")
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).eval()
    model.save_pretrained(folder)
    return model


@torch.inference_mode()
def time_hf(model, prompt, decode):
    start = time.perf_counter()
    out = model(prompt, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - start
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(decode):
        out = model(token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return prefill, (time.perf_counter() - start) / decode


@torch.inference_mode()
def time_so8t(model, prompt, decode):
    cache = KVCache(model.config.num_hidden_layers)
    start = time.perf_counter()
    out = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - start
    token = out.task_logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(decode):
        out = model(token, past_key_values=cache, use_cache=True)
        token = out.task_logits[:, -1:].argmax(-1)
    return prefill, (time.perf_counter() - start) / decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        hf = build(args.layers, Path(folder))
        so8t = SO8TTransformerForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    prompt = torch.randint(0, 151936, (1, args.prefill), generator=torch.Generator().manual_seed(0))
    runs = {"transformers Qwen3": ([], [], hf, time_hf), "SO8T reference": ([], [], so8t, time_so8t)}
    for name, (_, _, model, timer) in runs.items():  # warm-up
        timer(model, prompt[:, :32], 2)
    for _ in range(args.repeats):
        for name, (prefills, decodes, model, timer) in runs.items():
            prefill, decode = timer(model, prompt, args.decode)
            prefills.append(prefill)
            decodes.append(decode)
    print(f"{args.layers} layers at Qwen3-4B widths, float32, {torch.get_num_threads()} threads, "
          f"prefill {args.prefill} tokens, decode {args.decode} tokens, median of {args.repeats}")
    print(f"{'model':<20} {'prefill s':>10} {'decode ms/token':>16}")
    medians = {}
    for name, (prefills, decodes, _, _) in runs.items():
        medians[name] = (statistics.median(prefills), statistics.median(decodes))
        print(f"{name:<20} {medians[name][0]:>10.3f} {1e3 * medians[name][1]:>16.2f}")
    base, ours = medians["transformers Qwen3"], medians["SO8T reference"]
    print(f"ratio SO8T / transformers: prefill {ours[0] / base[0]:.3f}, decode {ours[1] / base[1]:.3f} "
          "(target <= 1.10)")


if __name__ == "__main__":
    main()
