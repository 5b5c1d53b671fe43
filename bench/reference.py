"""Reference-model speed and parity: SO8T (online rotations, and folded) against transformers' Qwen3, one run.

Both models load the same checkpoint, which transformers builds with random weights and saves (SO8T loads it
function-preserving, so all three compute the same function). Measured: prefill (no cache, the last
position's logits) at each --prefill length, and decode ms/token for --decode tokens after a --context
prompt; eagerly and under torch.compile (both models compiled the same way: --compile-mode, prefill with a
dynamic sequence length so one graph serves every length, decode with static shapes on a preallocated
static cache sized context + decode, so nothing grows while it is timed). Every repetition runs the models
in turn; medians of --repeats. Also the logit parity in the run's dtype: max |SO8T - transformers| over the
context prompt, relative to the largest |logit| of transformers. Targets (issue 13): online <= 1.10 and
folded <= 1.02 of transformers in the same mode.

    python bench/reference.py --device cuda              # Qwen3-4B shape, 36 layers, bf16 (~8 min on an H200)
    python bench/reference.py --device cpu --quick       # smoke run: 2 small layers, both modes (~1 min)
    python bench/reference.py [--layers 4] [--context 512] [--decode 64] [--before REV]   # CPU, float32, eager

On the CPU the defaults are 4 layers at Qwen3-4B widths in float32, eager only, as before. --before REV also
times so8t_export/model.py as it was at git revision REV (or in the file REV), with the rest of the package as
it is now and the same weights (eager only). Decoding uses each model's usual cache: eagerly transformers'
DynamicCache and our growing KVCache sized for the run; compiled, transformers' StaticCache and our static
KVCache, with explicit cache positions, and CUDA graphs with --compile-mode reduce-overhead (the default on
CUDA).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import inspect
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM, StaticCache

from so8t_export.model import KVCache, SO8TTransformerForCausalLM

REPO = Path(__file__).resolve().parent.parent
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
TARGETS = {"SO8T online": 1.10, "SO8T folded": 1.02}
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128)
QUICK = dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_attention_heads=16,
             num_key_value_heads=8, head_dim=32)
TRANSFORMERS_FORWARD = inspect.signature(Qwen3ForCausalLM.forward).parameters
START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] {message}", flush=True)


def build(folder: Path, sizes: dict, layers: int, dtype: torch.dtype, device: torch.device) -> None:
    """A random-weight Qwen3 made and saved by transformers (weights drawn on the device: fast on a GPU)."""
    config = Qwen3Config(**sizes, num_hidden_layers=layers, rope_theta=5e6, tie_word_embeddings=True,
                         max_position_embeddings=40960, dtype=str(dtype).removeprefix("torch."))
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config)
    model.to(dtype).save_pretrained(folder)
    del model


def load_transformers(folder: Path, dtype: torch.dtype, device: torch.device) -> Qwen3ForCausalLM:
    try:
        return Qwen3ForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device).eval()
    except (ImportError, ValueError):  # device_map needs accelerate in some versions
        return Qwen3ForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()


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


class Runner:
    """One model's forward for the timings, eager or compiled, with the cache its mode decodes with."""

    def __init__(self, name: str, model, kind: str, total: int, compiled=None, cache_class=KVCache):
        self.name, self.model, self.kind, self.total = name, model, kind, total
        self.forward = compiled if compiled is not None else model
        self.compiled = compiled is not None
        self.cache_class = cache_class
        self._static = None  # compiled decoding reuses one static cache: its buffers are the graphs' addresses

    def new_cache(self):
        layers = self.model.config.num_hidden_layers
        if self.kind == "transformers":
            if not self.compiled:
                return DynamicCache(config=self.model.config)
            if self._static is None:
                self._static = StaticCache(config=self.model.config, max_cache_len=self.total)
        elif not self.compiled:
            try:
                return self.cache_class(layers, max_length=self.total)
            except TypeError:  # an older model.py (--before) whose cache always grows
                return self.cache_class(layers)
        elif self._static is None:
            self._static = KVCache(layers, max_length=self.total, static=True)
        self._static.reset()
        return self._static

    def call(self, forward, ids: torch.Tensor, cache) -> torch.Tensor:
        """The last position's logits; the cache, when given, is filled. Both caches with static shapes count
        their tokens on the device, so no positions are passed."""
        if self.kind == "transformers":
            key = "cache" if "cache" in TRANSFORMERS_FORWARD else "past_key_values"  # renamed in 5.2x
            return forward(ids, **{key: cache}, use_cache=cache is not None, logits_to_keep=1).logits
        return forward(ids, past_key_values=cache, use_cache=cache is not None, logits_to_keep=1).logits

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()
        return self.call(self.forward, ids, None)

    def decode(self, prompt: torch.Tensor, steps: int, sync) -> float:
        """Seconds per token of steps greedy decode steps after prompt (the prompt's prefill is not timed; it
        runs eagerly, filling the cache the compiled steps read)."""
        cache = self.new_cache()
        token = self.call(self.model, prompt, cache)[:, -1:].argmax(-1)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            if self.compiled:
                torch.compiler.cudagraph_mark_step_begin()
            token = self.call(self.forward, token, cache)[:, -1:].argmax(-1)
        sync()
        return (time.perf_counter() - start) / steps


def compiled(model, mode: str):
    """How both models are compiled: static shapes unless an input is marked dynamic."""
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)


def parity(reference: torch.Tensor, model, prompt: torch.Tensor) -> float:
    """max |logits - reference| / max |reference| over every position of prompt."""
    logits = model(prompt).logits.float()
    return ((logits - reference).abs().max() / reference.abs().max()).item()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {torch.get_num_threads()} threads"
    return "CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 layers of small widths, short prompts, both modes")
    parser.add_argument("--layers", type=int, help="default: 36 on CUDA, 4 on the CPU, 2 with --quick")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA and with --quick, else f32")
    parser.add_argument("--prefill", help="comma-separated prefill lengths (default 512,2048 on CUDA, else "
                                          "the context)")
    parser.add_argument("--context", "--prompt", dest="context", type=int,
                        help="prompt tokens before decoding (default 512; 64 with --quick)")
    parser.add_argument("--decode", type=int, help="decode steps timed (default 64; 8 with --quick)")
    parser.add_argument("--repeats", type=int, help="timed repetitions, median reported (default 5; 2 with --quick)")
    parser.add_argument("--modes", help="eager, compile or both, comma-separated (default both on CUDA and with "
                                        "--quick, else eager)")
    parser.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead",
                                                                   "max-autotune-no-cudagraphs"],
                        help="torch.compile mode for both models (default reduce-overhead on CUDA, else default)")
    parser.add_argument("--budget", type=float,
                        help="seconds: skip a model's warm-up (compilation) once it would likely end past this "
                             "(default 480 on CUDA, none elsewhere); the table shows what was measured")
    parser.add_argument("--before", metavar="REV",
                        help="also time so8t_export/model.py of this git revision (or this file), eagerly")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of a model that fails")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    cuda = device.type == "cuda"
    quick = args.quick
    layers = args.layers or (2 if quick else 36 if cuda else 4)
    dtype = DTYPES[args.dtype or ("bf16" if cuda or quick else "f32")]
    context = args.context or (64 if quick else 512)
    prefills = [int(n) for n in args.prefill.split(",")] if args.prefill else (
        [64, 128] if quick else [512, 2048] if cuda else [context])
    decode = args.decode or (8 if quick else 64)
    repeats = args.repeats or (2 if quick else 5)
    modes = args.modes.split(",") if args.modes else (["eager", "compile"] if cuda or quick else ["eager"])
    if set(modes) - {"eager", "compile"}:
        parser.error(f"--modes {args.modes}: expected eager, compile or both")
    compile_mode = args.compile_mode or ("reduce-overhead" if cuda else "default")
    if args.budget is None and cuda:
        args.budget = 480
    sizes = QUICK if quick else QWEN3_4B
    total = context + decode

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        log(f"building a {layers}-layer random Qwen3 ({dtype}) with transformers {transformers.__version__}")
        build(Path(folder), sizes, layers, dtype, device)
        hf = load_transformers(Path(folder), dtype, device)
        log("transformers loaded; loading SO8T (absorbing the rotations)")
        online = SO8TTransformerForCausalLM.from_pretrained(folder, torch_dtype=dtype, device=device)
        folded = copy.deepcopy(online).fold_()
        models = {"transformers": hf, "SO8T online": online, "SO8T folded": folded}
        log("SO8T loaded and folded")
        before = None
        if args.before:
            before_model, before_cache = model_at_revision(args.before, online, Path(folder))
            before = Runner(f"SO8T at {Path(args.before).stem}", before_model, "so8t", total,
                            cache_class=before_cache)

        gen = torch.Generator().manual_seed(0)
        longest = max(prefills + [context])
        tokens = torch.randint(0, sizes["vocab_size"], (1, longest), generator=gen).to(device)
        prompt = tokens[:, :context].clone()
        inputs = {length: tokens[:, :length].clone() for length in prefills}

        reference = hf(prompt).logits.float()
        parities = {name: parity(reference, model, prompt) for name, model in models.items()
                    if name != "transformers"}
        del reference
        log("parity: " + ", ".join(f"{name} {value:.2e}" for name, value in parities.items()))
        # The scale for those figures: each model against transformers run in float32 on the same weights,
        # transformers' own rounding error included.
        float32_parities = {}
        if dtype != torch.float32:
            hf32 = load_transformers(Path(folder), torch.float32, device)
            reference = hf32(prompt).logits.float()
            del hf32
            float32_parities = {name: parity(reference, model, prompt) for name, model in models.items()}
            del reference
            log("against float32 transformers: " + ", ".join(f"{name} {value:.2e}"
                                                              for name, value in float32_parities.items()))

        results: dict[tuple[str, str, str], list[float]] = {}  # (mode, measure, model) -> seconds
        failed: dict[tuple[str, str], str] = {}  # (mode, model) -> why its cells are empty
        header = (f"{layers} layers at {'small (--quick)' if quick else 'Qwen3-4B'} widths, "
                  f"{str(dtype).removeprefix('torch.')}, {device_name(device)}, torch {torch.__version__}, "
                  f"transformers {transformers.__version__}, {datetime.date.today().isoformat()}; median of "
                  f"{repeats}; compile mode {compile_mode}; decode: {decode} tokens after {context}, ms per token")
        measures = [f"prefill {n}" for n in prefills] + [f"decode after {context}"]
        names = list(models) + ([before.name] if before is not None else [])
        done: list[str] = []
        for mode in modes:
            runners = []
            for name, model in models.items():
                kind = "transformers" if name == "transformers" else "so8t"
                runners.append(Runner(name, model, kind, total,
                                      compiled=compiled(model, compile_mode) if mode == "compile" else None))
            if mode == "eager" and before is not None:
                runners.append(before)
            log(f"{mode}: warming up" + (f" (compiling, mode {compile_mode})" if mode == "compile" else ""))
            ready, longest_warmup = [], 0.0
            for runner in runners:
                elapsed = time.perf_counter() - START
                if args.budget and elapsed + longest_warmup > args.budget:
                    failed[(mode, runner.name)] = "skipped (time budget)"
                    log(f"  {runner.name}: skipped, {elapsed:.0f} s gone of the {args.budget} s budget")
                    continue
                begin = time.perf_counter()
                try:
                    for ids in inputs.values():
                        if runner.compiled:
                            torch._dynamo.maybe_mark_dynamic(ids, 1)  # one prefill graph for every length
                        for _ in range(3 if runner.compiled else 1):  # CUDA graphs record on a later call
                            runner.prefill(ids)
                    runner.decode(prompt, 4 if runner.compiled else 2, sync)
                    sync()
                except Exception as err:  # noqa: BLE001 - report it and measure the others
                    first = str(err).splitlines()[0][:200] if str(err) else ""
                    failed[(mode, runner.name)] = f"failed: {type(err).__name__}: {first}"
                    log(f"  {runner.name}: {failed[(mode, runner.name)]}")
                    if args.verbose:
                        traceback.print_exc()
                    continue
                longest_warmup = max(longest_warmup, time.perf_counter() - begin)
                ready.append(runner)
                log(f"  {runner.name}: {time.perf_counter() - begin:.1f} s")
            for _ in range(repeats):
                for runner in ready:
                    for length, ids in inputs.items():
                        sync()
                        begin = time.perf_counter()
                        runner.prefill(ids)
                        sync()
                        results.setdefault((mode, f"prefill {length}", runner.name), []).append(
                            time.perf_counter() - begin)
                    results.setdefault((mode, f"decode after {context}", runner.name), []).append(
                        runner.decode(prompt, decode, sync))
            log(f"{mode}: timed")
            done.append(mode)  # the table so far, in case a later mode does not finish
            print_table(header, done, measures, names, results, failed, parities, dtype, context,
                        float32_parities)
    log("done")


def print_table(header, modes, measures, names, results, failed, parities, dtype, context,
                float32_parities) -> None:
    medians = {key: statistics.median(values) for key, values in results.items()}
    print()
    print(header)
    print(f"{'mode':<8} {'measure':<18} " + " ".join(f"{name:>22}" for name in names))
    misses = []
    for mode in modes:
        for measure in measures:
            base = medians.get((mode, measure, "transformers"))
            cells = []
            for name in names:
                value = medians.get((mode, measure, name))
                if value is None:
                    cells.append(f"{'-':>22}")
                elif name == "transformers" or base is None:
                    cells.append(f"{1e3 * value:>19.2f} ms")
                else:
                    ratio, target = value / base, TARGETS.get(name)
                    flag = "" if target is None or ratio <= target else " !"
                    if flag:
                        misses.append(f"{mode} {measure} {name} {ratio:.3f} > {target}")
                    cells.append(f"{f'{1e3 * value:.2f} ms ({ratio:.3f}){flag}':>22}")
            print(f"{mode:<8} {measure:<18} " + " ".join(cells))
    for (mode, name), why in failed.items():
        if mode in modes:
            print(f"{mode} {name}: {why}")
    print("ratios: SO8T / transformers in the same mode; targets: online <= 1.10, folded <= 1.02 "
          "(! marks a miss)")
    print(f"logit parity ({str(dtype).removeprefix('torch.')}), max |SO8T - transformers| / max |transformers| "
          f"over {context} positions: " + ", ".join(f"{name} {value:.2e}" for name, value in parities.items()))
    if float32_parities:
        print("  the same against transformers in float32 (same weights): "
              + ", ".join(f"{name} {value:.2e}" for name, value in float32_parities.items()))
    print("misses: " + ("; ".join(misses) if misses else "none"), flush=True)


if __name__ == "__main__":
    main()
