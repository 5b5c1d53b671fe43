"""Heads benchmark on the full-size checkpoint: train-heads' memory and speed, set-heads' time.

    python bench/heads.py                   # bench/.cache checkpoint (bf16 twin) and its q8_0 export
    python bench/heads.py --checkpoint /tmp/bench-cache/qwen3-4b-bf16 --gguf /tmp/bench-cache/so8t-q8_0.gguf

Measured in one run, each command a subprocess (peak RSS from os.wait4's rusage):

- anchor: loading the reference model alone (``SO8TTransformerForCausalLM.from_pretrained``), the memory any
  use of it pays;
- ``so8t-export train-heads`` on --examples examples of the demo's labelled set (reference features, batches
  of --batch-size): its peak RSS against the anchor's shows what the features add (one batch of activations),
  and seconds per example;
- ``so8t-export train-heads --gguf`` on the q8_0 export: seconds per example through llama.cpp;
- ``so8t-export set-heads`` of the trained heads into a copy of the q8_0 export, against the anchor of copying
  that file with ``shutil.copyfile`` and fsyncing it (what any rewrite of the file through a temporary name
  costs at least): set-heads' seconds and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
from export import run_measured, so8t_export_cmd  # noqa: E402 - bench/export.py: wait4's peak RSS of a child
DEMO_DATA = REPO / "so8t_export" / "demo_data"


def measured(argv: list[str]) -> dict:
    result = run_measured(argv)
    if result["rc"]:
        sys.exit(f"{' '.join(argv)} failed ({result['rc']}):\n{result['output'][-3000:]}")
    return result


def spread_sample(source: Path, n: int, target: Path) -> Path:
    """n lines taken evenly across source (the demo's files are grouped by label)."""
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    target.write_text("".join(lines[i * len(lines) // n] for i in range(min(n, len(lines)))), encoding="utf-8")
    return target


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=HERE / ".cache" / "qwen3-4b-bf16")
    ap.add_argument("--gguf", type=Path, default=HERE / ".cache" / "out" / "ours-q8_0.gguf")
    ap.add_argument("--examples", type=int, default=24, help="training examples (the eval set is a third)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder [default: beside --gguf]")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="heads-bench-", dir=args.work or args.gguf.parent))
    try:
        train = spread_sample(DEMO_DATA / "heads-train.jsonl", args.examples, work / "train.jsonl")
        held = spread_sample(DEMO_DATA / "heads-eval.jsonl", max(2, args.examples // 3), work / "eval.jsonl")
        n = args.examples + max(2, args.examples // 3)
        load = ("from so8t_export.model import SO8TTransformerForCausalLM as M; "
                f"M.from_pretrained({str(args.checkpoint)!r})")
        anchor_load = measured([sys.executable, "-c", load])
        reference = measured(so8t_export_cmd("train-heads", str(args.checkpoint), "--data", str(train), "--eval",
                                         str(held), "-o", str(work / "trained"), "--batch-size",
                                         str(args.batch_size), "--target-fpr", "0.1"))
        from_gguf = measured(so8t_export_cmd("train-heads", str(args.checkpoint), "--data", str(train), "--eval",
                                         str(held), "-o", str(work / "trained-gguf"), "--gguf", str(args.gguf)))
        copy = work / "copy.gguf"
        start = time.perf_counter()
        shutil.copyfile(args.gguf, copy)
        with open(copy, "rb+") as f:
            os.fsync(f.fileno())
        anchor_copy = time.perf_counter() - start
        set_heads = measured(so8t_export_cmd("set-heads", str(copy), "--from", str(work / "trained")))
        size = args.gguf.stat().st_size / 1e9

        load_s, load_rss = anchor_load["wall"], anchor_load["rss_mb"] / 1024
        ref_s, ref_rss = reference["wall"], reference["rss_mb"] / 1024
        gguf_s, gguf_rss = from_gguf["wall"], from_gguf["rss_mb"] / 1024
        report = json.loads((work / "trained" / "heads_report.json").read_text())
        print(f"heads bench: {args.checkpoint} (reference), {args.gguf} ({size:.2f} GB), {n} examples, "
              f"batch {args.batch_size}")
        print(f"  anchor: load the reference          {load_s:7.1f} s   peak RSS {load_rss:6.2f} GiB")
        print(f"  train-heads (reference features)    {ref_s:7.1f} s   peak RSS {ref_rss:6.2f} GiB   "
              f"RSS / anchor {ref_rss / load_rss:.3f}   ({(ref_s - load_s) / n:.2f} s per example after load)")
        print(f"  train-heads --gguf (llama.cpp q8_0) {gguf_s:7.1f} s   peak RSS {gguf_rss:6.2f} GiB")
        print(f"  anchor: copy + fsync the GGUF       {anchor_copy:7.2f} s")
        print(f"  set-heads (in place, on the copy)   {set_heads['wall']:7.2f} s   ratio to the copy "
              f"{set_heads['wall'] / anchor_copy:.3f}")
        print(f"  {set_heads['output'].strip().splitlines()[-1]}")
        for head, entry in report["heads"].items():
            m = entry["metrics"]
            if m:
                print(f"  {head}: accuracy {m['accuracy']:.3f} on {m['examples']} held-out examples "
                      "(random-weight model: the number means nothing, the plumbing does)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
