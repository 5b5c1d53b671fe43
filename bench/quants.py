"""Quality table of llama.cpp's quant types on tiny models (issue 16, "Quality table").

    python bench/quants.py                 # both models, every type, with and without the imatrix
    python bench/quants.py --types q4_k_m q2_k --models flat-256

For each model and type: file size, bits per weight, mean and p99 KLD(f32 reference || file) and top-1
agreement on a held-out text (the demo's heads-eval prompts, which neither the calibration text nor the demo
training saw), the file made without and with an imatrix of the shipped calibration text (types that need
one: with only). The reference is the f32 PyTorch model (llama_quantize.ReferenceLogits, parity's KLD).

Cross-check: llama.cpp's own llama-perplexity (stock, from cpp_patches/build.sh) gives its --kl-divergence of
each file against our f32 GGUF, on the same text.

--full: the Bench of issue 16, one run. bench/make_checkpoint.py's random-weight Qwen3-4B-FP8 twin to q4_k_m:
`so8t-export gguf --quant q4_k_m` against llama.cpp's converter to bf16 followed by stock llama-quantize
(cpp_patches/build.sh), each leg timed with its peak RSS as bench/export.py measures them (page cache dropped and the
source read once before each leg).

Models:
- demo: the demo model (write_tiny_qwen3 + train_tiny_lm, as `so8t-export demo` builds it), 64 wide: its rows
  are narrower than the k/i-quants' 256-column blocks, so llama.cpp falls most tensors back to 32-column types
  (the "mix" column says which);
- flat-256: the tiny Qwen3 at width 256 with the HF-default N(0, 0.02) weights, whose next-token distributions
  are flat, and every tensor gets the type llama.cpp's mix asks for.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from so8t_export.config import LLAMA_QUANT_TYPE_NAMES  # noqa: E402
from so8t_export.demo import HEADS_EVAL, read_jsonl, train_tiny_lm, write_tiny_qwen3  # noqa: E402
from so8t_export.export import export_gguf  # noqa: E402
from so8t_export.imatrix import CALIBRATION_TEXT, compute_imatrix, read_calibration_text  # noqa: E402
from so8t_export.llama_quantize import (FLOAT_STAGE, IMATRIX_REQUIRED, ReferenceLogits,  # noqa: E402
                                        quantize_file, quantized_types)
from so8t_export.model import SO8TTransformerForCausalLM  # noqa: E402

CHUNK = 256


def build(name: str, root: Path) -> Path:
    if name == "demo":
        qwen3 = write_tiny_qwen3(root / "demo-qwen3")
        train_tiny_lm(qwen3)
    else:
        qwen3 = write_tiny_qwen3(root / "flat-qwen3", sharp=False, hidden_size=256, intermediate_size=512)
    out = root / f"{name}-so8t"
    SO8TTransformerForCausalLM.from_pretrained(qwen3).save_pretrained(out)
    return out


def llama_kld(tool: Path, base_gguf: Path, path: Path, text: Path, base: Path) -> float:
    """llama-perplexity's mean KLD of path against base_gguf's logits (saved once in base)."""
    common = ["-f", str(text), "-c", str(CHUNK), "-t", "2", "--kl-divergence-base", str(base)]
    if not base.exists():
        subprocess.run([str(tool), "-m", str(base_gguf), *common], capture_output=True, check=True)
    run = subprocess.run([str(tool), "-m", str(path), *common, "--kl-divergence"], capture_output=True,
                         text=True, check=True)
    match = re.search(r"Mean\s+KLD:\s+(-?[\d.]+)", run.stdout + run.stderr)
    return float(match.group(1)) if match else float("nan")


# llama-quantize's library call with its default parameters (ftype 15 = Q4_K_M, every hardware thread).
def full_bench(cache: Path, ours_only: bool = False) -> None:
    sys.path.insert(0, str(HERE))
    from export import converter_cmd, drop_caches, read_files, run_measured, so8t_export_cmd
    from make_checkpoint import main as make_checkpoint

    from tests.upstream import fetch_converter, llama_tool

    make_checkpoint(["--out", str(cache)])
    fp8 = cache / "qwen3-4b-fp8"
    sources = sorted(fp8.glob("*.safetensors"))
    out = cache / "quants-bench"
    out.mkdir(exist_ok=True)
    llama_dir = fetch_converter()
    bf16, ours, theirs = out / "converter-bf16.gguf", out / "ours-q4_k_m.gguf", out / "stock-q4_k_m.gguf"
    quantize = [str(llama_tool("llama-quantize")), str(bf16), str(theirs), "Q4_K_M"]
    legs = [("so8t-export gguf --quant q4_k_m", so8t_export_cmd("gguf", str(fp8), "--quant", "q4_k_m", "-o", str(ours)), True),
            ("convert_hf_to_gguf --outtype bf16", converter_cmd(llama_dir, fp8, "bf16", bf16), True),
            ("llama-quantize Q4_K_M", quantize, False)]
    legs = legs[:1] if ours_only else legs
    env = dict(os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results = []
    for label, argv, fresh in legs:
        if fresh:  # the quantiser step follows the converter's output as it is, as a user would run it
            drop_caches()
            read_files(sources)
        print(f"running: {label} (load {os.getloadavg()[0]:.2f})", flush=True)
        r = run_measured(argv, env=env)
        r["label"] = label
        print(f"  rc {r['rc']}, {r['wall']:.1f} s (+sync {r['wall_sync']:.1f} s), peak RSS {r['rss_mb']:.0f} MB "
              f"(anon {r['anon_mb']:.0f}, file {r['file_mb']:.0f})", flush=True)
        if r["rc"]:
            print(r["output"][-3000:])
        results.append(r)
    if ours_only:
        return
    ours_r, conv, quant = results
    theirs_wall = conv["wall_sync"] + quant["wall_sync"]
    print(f"\nours {ours_r['wall_sync']:.1f} s, peak RSS {ours_r['rss_mb']:.0f} MB; llama.cpp {theirs_wall:.1f} s "
          f"({conv['wall_sync']:.1f} + {quant['wall_sync']:.1f}), peak RSS {max(conv['rss_mb'], quant['rss_mb']):.0f} MB; "
          f"speed-up {theirs_wall / ours_r['wall_sync']:.2f}x")
    if ours.exists() and theirs.exists():
        import gguf

        a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
        b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
        same = sum(a[n].tensor_type == b[n].tensor_type and bytes(a[n].data) == bytes(b[n].data) for n in b)
        print(f"sizes {ours.stat().st_size / 1e9:.3f} GB vs {theirs.stat().st_size / 1e9:.3f} GB; "
              f"{same} of {len(b)} tensors byte-identical")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="The full-size q4_k_m bench instead of the table.")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--ours-only", action="store_true", help="With --full: only so8t-export's leg.")
    parser.add_argument("--models", nargs="+", default=["demo", "flat-256"], choices=["demo", "flat-256"])
    parser.add_argument("--types", nargs="+", default=list(LLAMA_QUANT_TYPE_NAMES), choices=LLAMA_QUANT_TYPE_NAMES)
    parser.add_argument("--json", type=Path, help="Also write the rows here.")
    args = parser.parse_args()
    if args.full:
        full_bench(args.cache, args.ours_only)
        return
    held_out = "\n".join(m["content"] for row in read_jsonl(HEADS_EVAL) for m in row["messages"])
    from tests.upstream import llama_tool

    tool = llama_tool("llama-perplexity")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        text_file = root / "held-out.txt"
        text_file.write_text(held_out, encoding="utf-8")
        for model in args.models:
            model_dir = build(model, root)
            reference = ReferenceLogits(model_dir, held_out, chunk_size=CHUNK, max_chunks=8)
            imatrix = compute_imatrix(model_dir, read_calibration_text(CALIBRATION_TEXT), chunk_size=128)
            f32 = export_gguf(model_dir, root / f"{model}-f32.gguf", quant="f32").output
            float_file = export_gguf(model_dir, root / f"{model}-{FLOAT_STAGE}.gguf", quant=FLOAT_STAGE).output
            direct = [("f32", f32), (FLOAT_STAGE, float_file),
                      ("q8_0", export_gguf(model_dir, root / f"{model}-q8_0.gguf", quant="q8_0").output)]
            for quant, path in direct:
                rows.append(row(model, quant, "-", reference.measure(path, quant), path, "so8t-export",
                                llama_kld(tool, f32, path, text_file, root / f"{model}.kld")))
            for quant in args.types:
                for weighted in (False, True):
                    if quant in IMATRIX_REQUIRED and not weighted:
                        continue
                    path = root / f"{model}-{quant}-{int(weighted)}.gguf"
                    quantize_file(float_file, path, quant, imatrix=imatrix if weighted else None)
                    mix = ", ".join(f"{n} {t}" for t, n in quantized_types(path, quant).items() if t != "F32")
                    rows.append(row(model, quant, "calib" if weighted else "-", reference.measure(path, quant), path,
                                    mix, llama_kld(tool, f32, path, text_file, root / f"{model}.kld")))
                    path.unlink()
            print_table([r for r in rows if r["model"] == model], reference.tokens)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def row(model, quant, imatrix, quality, path, mix, llama) -> dict:
    return {"model": model, "quant": quant, "imatrix": imatrix, "MiB": path.stat().st_size / 2**20,
            "bpw": quality.bits_per_weight, "mean_kld": quality.mean_kld, "p99_kld": quality.p99_kld,
            "top1": quality.top1, "llama_kld": llama if llama else None, "mix": mix}


def print_table(rows: list[dict], tokens: int) -> None:
    print(f"\n### {rows[0]['model']} ({tokens} held-out tokens; KLD against the f32 PyTorch reference)\n")
    print("| quant | imatrix | MiB | bpw | mean KLD | p99 KLD | top-1 | llama-perplexity KLD | tensor types |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        llama = f"{r['llama_kld']:.3e}" if r["llama_kld"] is not None else "n/a"
        print(f"| {r['quant']} | {r['imatrix']} | {r['MiB']:.3f} | {r['bpw']:.2f} | {r['mean_kld']:.3e} | "
              f"{r['p99_kld']:.3e} | {r['top1']:.1%} | {llama} | {r['mix']} |")


if __name__ == "__main__":
    main()
