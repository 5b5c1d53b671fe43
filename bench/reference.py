"""Reference-model speed: SO8T prefill and decode against transformers' Qwen3 of the same shape, one run.

A few layers at Qwen3-4B widths (hidden 2560, MLP 9728, 32/8 heads, head_dim 128), float32 on CPU. Both
models hold the same weights (SO8T loads the Qwen3 checkpoint function-preserving), take turns in each
repetition, and the medians are compared. Target (issue 2): SO8T costs at most 10% more.

--context N prefills N tokens, so decode runs against an N-token KV cache (issue 12 measures 2048).
--before REV also times so8t_export/model.py as it was at git revision REV (or in the file REV, where no git
history is at hand), with the rest of the package as it is now and the same weights, so that a change to the
model is measured against its predecessor in one run.

    python bench/reference.py [--layers 4] [--context 512] [--decode 64] [--repeats 5] [--before REV]
    python bench/reference.py --layers 2 --context 2048 --decode 32 --repeats 3 --before b76385a
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from so8t_export.model import KVCache, SO8TTransformerForCausalLM

REPO = Path(__file__).resolve().parent.parent


def build(layers: int, folder: Path, max_positions: int) -> Qwen3ForCausalLM:
    config = Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=5e6,
                         tie_word_embeddings=True, max_position_embeddings=max_positions, dtype="float32")
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).eval()
    model.save_pretrained(folder)
    return model


def model_at_revision(revision: str, current: SO8TTransformerForCausalLM, folder: Path):
    """so8t_export/model.py of a git revision (or a file) as a module of the installed package (its relative
    imports resolve to today's config, rotation and triality), and that model holding current's weights
    (shared, not copied)."""
    if Path(revision).is_file():
        source = Path(revision).read_text()
    else:
        source = subprocess.run(["git", "show", f"{revision}:so8t_export/model.py"], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout
    path = folder / "model_before.py"
    path.write_text(source)
    name = "so8t_export._model_before"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    with torch.device("meta"):
        model = module.SO8TTransformerForCausalLM(current.config)
    model.load_state_dict(current.state_dict(), assign=True)
    return model.eval(), module.KVCache


@torch.inference_mode()
def time_run(model, prompt, decode, new_cache):
    """Seconds for the prefill and per decode token; new_cache() is the model's empty cache (None: the model
    makes its own, as transformers does)."""
    cache = new_cache()
    start = time.perf_counter()
    out = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - start
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(decode):
        out = model(token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return prefill, (time.perf_counter() - start) / decode


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--context", "--prefill", dest="context", type=int, default=512,
                        help="prompt tokens prefilled before decoding (default 512)")
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before", metavar="REV",
                        help="also time so8t_export/model.py of this git revision (or this file)")
    args = parser.parse_args()
    layers, total = args.layers, args.context + args.decode
    with tempfile.TemporaryDirectory() as folder:
        hf = build(layers, Path(folder), max(4096, total))
        so8t = SO8TTransformerForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
        runs = {"transformers Qwen3": (hf, lambda: None)}
        before_name = f"SO8T at {Path(args.before).stem if args.before else None}"
        if args.before:
            before, before_cache = model_at_revision(args.before, so8t, Path(folder))
            runs[before_name] = (before, lambda: before_cache(layers))
        # as generate() does: one cache sized for the prompt and every new token
        runs["SO8T reference"] = (so8t, lambda: KVCache(layers, max_length=total))
    prompt = torch.randint(0, 151936, (1, args.context), generator=torch.Generator().manual_seed(0))
    timings = {name: ([], []) for name in runs}
    for model, new_cache in runs.values():  # warm-up
        time_run(model, prompt[:, :32], 2, new_cache)
    for _ in range(args.repeats):
        for name, (model, new_cache) in runs.items():
            prefill, decode = time_run(model, prompt, args.decode, new_cache)
            timings[name][0].append(prefill)
            timings[name][1].append(decode)
    print(f"{layers} layers at Qwen3-4B widths, float32, {cpu_name()}, {torch.get_num_threads()} threads, "
          f"context {args.context} tokens, decode {args.decode} tokens after it, median of {args.repeats}")
    print(f"{'model':<24} {'prefill s':>10} {'decode ms/token':>16}   decode runs")
    medians = {}
    for name, (prefills, decodes) in timings.items():
        medians[name] = (statistics.median(prefills), statistics.median(decodes))
        runs_ms = ", ".join(f"{1e3 * d:.1f}" for d in decodes)
        print(f"{name:<24} {medians[name][0]:>10.3f} {1e3 * medians[name][1]:>16.2f}   {runs_ms}")
    base = medians["transformers Qwen3"]
    for name, (prefill, decode) in medians.items():
        if name != "transformers Qwen3":
            print(f"ratio {name} / transformers: prefill {prefill / base[0]:.3f}, decode {decode / base[1]:.3f} "
                  "(target <= 1.10)")
    if args.before:
        old, new = medians[before_name], medians["SO8T reference"]
        print(f"ratio SO8T reference / {before_name}: prefill {new[0] / old[0]:.3f}, "
              f"decode {new[1] / old[1]:.3f}")


if __name__ == "__main__":
    main()
