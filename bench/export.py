"""Full-scale export benchmark (issue 5): so8t-export vs llama.cpp's convert_hf_to_gguf.py on a Qwen3-4B-FP8 layout.

    python bench/export.py                     # export table (wall, peak RSS, output size) + ratios
    python bench/export.py --parity --decode   # plus full-scale parity and decode speed
    python bench/export.py --skip-export --parity --decode   # reuse the GGUFs of an earlier run

Steps
- checkpoint: bench/make_checkpoint.py's random-weight Qwen3-4B-Thinking-2507-FP8 layout (cached).
- converter: vendor/llama.cpp of the llama-cpp-python sdist from PyPI (pip download, cached under
  bench/.cache/sdist, unpacked to bench/.cache/llama.cpp; never committed), run through
  bench/convert_hf_wrapper.py, which only overrides the pre-tokenizer hash check.
- export table: one warm-up (imports of both tools, so that their code is in the page cache), then for each
  command: `sync`, drop the page cache (echo 3 > /proc/sys/vm/drop_caches; skipped with a note when not
  permitted), read the source safetensors once (so every command starts with the source hot and nothing else
  cached), run the command as a subprocess and take its peak RSS from wait4's rusage, then `sync` so that the
  "+sync" column includes flushing the output to disk.
- disk: the write limit measured in the same run (random data, 32 MiB blocks, buffered+fsync and O_DIRECT),
  and how many of our tensors are byte-identical to the converter's.
- --parity: the PyTorch reference (SO8TTransformerForCausalLM, bf16 on CPU, loaded from the FP8 checkpoint)
  vs llama.cpp (SO8TRuntime) on our q8_0 and bf16 exports: max |logit diff|, mean KLD(ref || gguf), top-1.
- --decode: tokens/s of our q8_0 export vs the converter's q8_0 GGUF, same llama.cpp settings (n_threads=2),
  runs interleaved, median of 3; plus the cost of the runtime's head scoring per token.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from tests.upstream import fetch_converter  # noqa: E402 (needs REPO on sys.path)

PROMPT = "<|im_start|>user\nWhat is a rotation in eight dimensions?<|im_end|>\n<|im_start|>assistant\n"


def log(*args) -> None:
    print(*args, flush=True)


# ----------------------------------------------------------------------------------------------- converter

# ----------------------------------------------------------------------------------------------- measuring

def drop_caches() -> bool:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def read_files(paths) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def run_measured(argv: list[str], env=None) -> dict:
    """Run argv as a child; wall seconds, peak RSS (wait4 rusage of that child) and the exit status."""
    import threading

    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peaks = {"RssAnon": 0, "RssFile": 0}
    stop = threading.Event()

    def sample() -> None:  # split of the RSS: anonymous (heap) vs file-backed (mmapped source/output pages)
        status_file = f"/proc/{proc.pid}/status"
        while not stop.is_set():
            try:
                with open(status_file) as f:
                    lines = f.readlines()
                for line in lines:
                    key = line.split(":", 1)[0]
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(line.split()[1]))
            except (OSError, ValueError, IndexError):
                pass
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out_chunks = list(proc.stdout)  # drain so the child never blocks on a full pipe
    stop.set()
    sampler.join()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    subprocess.run(["sync"], check=True)
    synced = time.perf_counter() - start
    return {"wall": wall, "wall_sync": synced, "rss_mb": usage.ru_maxrss / 1024, "rc": proc.returncode,
            "anon_mb": peaks["RssAnon"] / 1024, "file_mb": peaks["RssFile"] / 1024,
            "output": b"".join(out_chunks).decode(errors="replace")}


def so8t_export_cmd(*args: str) -> list[str]:
    # The console script pip installed beside this interpreter (not a version-manager shim found on PATH,
    # which adds its own start-up), via python -c when not installed.
    exe = Path(sys.executable).parent / "so8t-export"
    if exe.is_file():
        return [str(exe), *args]
    return [sys.executable, "-c", "from so8t_export.cli import main; main()", *args]


def ours_cmd(src: Path, quant: str, out: Path) -> list[str]:
    return so8t_export_cmd("gguf", str(src), "--quant", quant, "-o", str(out))


def converter_cmd(llama_dir: Path, src: Path, quant: str, out: Path) -> list[str]:
    return [sys.executable, str(HERE / "convert_hf_wrapper.py"), str(llama_dir), "--", str(src),
            "--outtype", quant, "--outfile", str(out)]


def export_table(fp8_dir: Path, llama_dir: Path, out_dir: Path, quants: list[str]) -> list[dict]:
    sources = sorted(fp8_dir.glob("*.safetensors"))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = []
    for quant in quants:
        runs.append(("so8t-export gguf --quant " + quant, "ours", quant, ours_cmd, out_dir / f"ours-{quant}.gguf"))
        runs.append(("convert_hf_to_gguf --outtype " + quant, "converter", quant,
                     lambda s, q, o: converter_cmd(llama_dir, s, q, o), out_dir / f"converter-{quant}.gguf"))

    log("warm-up: importing both tools once")
    subprocess.run([sys.executable, "-c", "import so8t_export.export, so8t_export.cli, torch, gguf, numpy"],
                   env=env, check=True)
    subprocess.run([sys.executable, "-c", (f"import sys; sys.path.insert(0, {str(llama_dir)!r}); "
                                           "import convert_hf_to_gguf")], env=env, check=True)

    results = []
    for label, tool, quant, make_cmd, out in runs:
        out.unlink(missing_ok=True)
        dropped = drop_caches()
        read_files(sources)
        argv = make_cmd(fp8_dir, quant, out)
        load = os.getloadavg()[0]
        log(f"running: {label}  (1-min load average before: {load:.2f})")
        r = run_measured(argv, env=env)
        r["load_before"] = load
        r.update(label=label, tool=tool, quant=quant, out=str(out), dropped=dropped,
                 size_gb=out.stat().st_size / 1e9 if out.exists() else float("nan"))
        if r["rc"] != 0:
            log(f"FAILED ({r['rc']}): {label}\n{r['output'][-3000:]}")
        else:
            log(f"  {r['wall']:.1f} s (+sync {r['wall_sync']:.1f} s), peak RSS {r['rss_mb']:.0f} MB, "
                f"{r['size_gb']:.3f} GB")
        results.append(r)
    return results


def disk_anchor(out_dir: Path, nbytes: int) -> dict:
    """The disk's write limits, measured like the commands (page cache dropped first): nbytes of random data
    written in 32 MiB blocks through the page cache then fsync'd, and with O_DIRECT (what our exporter uses)."""
    import mmap

    block = mmap.mmap(-1, 32 << 20)
    block.write(os.urandom(32 << 20))
    count = max(1, int(nbytes) // len(block))
    path = out_dir / "disk-anchor.bin"
    result = {"gb": count * len(block) / 1e9}
    for label, flags in (("buffered+fsync", 0), ("O_DIRECT", getattr(os, "O_DIRECT", 0))):
        path.unlink(missing_ok=True)
        drop_caches()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags)
        start = time.perf_counter()
        for _ in range(count):
            os.write(fd, block)
        os.fsync(fd)
        result[label] = result["gb"] / (time.perf_counter() - start)
        os.close(fd)
    path.unlink(missing_ok=True)
    log(f"disk: {result['gb']:.2f} GB written in 32 MiB blocks: buffered+fsync {result['buffered+fsync']:.2f} GB/s, "
        f"O_DIRECT {result['O_DIRECT']:.2f} GB/s")
    return result


def identical_tensors(ours: Path, theirs: Path) -> str:
    """How many tensors of our file have exactly the converter's type, shape and bytes."""
    import gguf
    import numpy as np

    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    same = sum(name in b and a[name].tensor_type == b[name].tensor_type
               and list(a[name].shape) == list(b[name].shape)
               and np.array_equal(np.asarray(a[name].data).view(np.uint8), np.asarray(b[name].data).view(np.uint8))
               for name in a)
    return f"{same}/{len(a)} tensors byte-identical to the converter's ({len(b)} in its file)"


def print_table(results: list[dict], disk: dict | None = None) -> str:
    lines = [(f"{'command':<38} {'wall s':>8} {'+sync s':>8} {'peak RSS MB':>12} {'anon MB':>8} {'file MB':>8} "
              f"{'output GB':>10} {'load':>6}")]
    for r in results:
        status = "" if r["rc"] == 0 else f"  FAILED rc={r['rc']}"
        lines.append(f"{r['label']:<38} {r['wall']:>8.1f} {r['wall_sync']:>8.1f} {r['rss_mb']:>12.0f} "
                     f"{r.get('anon_mb', float('nan')):>8.0f} {r.get('file_mb', float('nan')):>8.0f} "
                     f"{r['size_gb']:>10.3f} {r['load_before']:>6.2f}{status}")
    lines.append("")
    lines.append("ratios ours/converter")
    by = {(r["tool"], r["quant"]): r for r in results}
    for quant in sorted({r["quant"] for r in results}):
        a, b = by.get(("ours", quant)), by.get(("converter", quant))
        if a and b and a["rc"] == 0 and b["rc"] == 0:
            lines.append(f"  {quant:<6} wall {a['wall'] / b['wall']:.3f}  wall+sync {a['wall_sync'] / b['wall_sync']:.3f}"
                         f"  peak RSS {a['rss_mb'] / b['rss_mb']:.3f}  size {a['size_gb'] / b['size_gb']:.4f}")
    if disk:
        lines.append(f"disk write limit (measured in this run): buffered+fsync {disk['buffered+fsync']:.2f} GB/s, "
                     f"O_DIRECT {disk['O_DIRECT']:.2f} GB/s")
        for r in results:
            if r["tool"] == "ours" and r["rc"] == 0:
                lines.append(f"  {r['label']}: {r['size_gb']:.2f} GB in {r['wall']:.1f} s = "
                             f"{r['size_gb'] / r['wall']:.2f} GB/s overall; the O_DIRECT write alone needs "
                             f"{r['size_gb'] / disk['O_DIRECT']:.1f} s")
    for r in results:
        if r["tool"] == "ours" and r.get("identical"):
            lines.append(f"  {r['quant']}: {r['identical']}")
    lines.append("peak RSS = ru_maxrss (wait4); anon/file MB = peaks of RssAnon/RssFile sampled every 0.1 s")
    lines.append("load = 1-min load average just before the command (2 cores; >2 means other work was running)")
    if not all(r["dropped"] for r in results):
        lines.append("note: page cache could not be dropped; the source was only pre-read before each command")
    text = "\n".join(lines)
    log(text)
    return text


# ----------------------------------------------------------------------------------------------- parity

def parity(fp8_dir: Path, ggufs: dict[str, Path]) -> str:
    import numpy as np
    import torch
    from tokenizers import Tokenizer

    from so8t_export.model import SO8TTransformerForCausalLM
    from so8t_export.parity import kl_divergence
    from so8t_export.runtime import SO8TRuntime

    log(f"parity: load average {os.getloadavg()[0]:.2f}")
    tokens = Tokenizer.from_file(str(fp8_dir / "tokenizer.json")).encode(PROMPT, add_special_tokens=False).ids
    log(f"parity: {len(tokens)} prompt tokens; loading the PyTorch reference (bf16, CPU)")
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    model = SO8TTransformerForCausalLM.from_pretrained(fp8_dir, torch_dtype=torch.bfloat16)
    model.eval()
    t1 = time.perf_counter()
    with torch.no_grad():
        out = model(torch.tensor([tokens]))
    logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)
    ref = logits[0].float().numpy().astype(np.float64)
    log(f"  reference loaded in {t1 - t0:.0f} s, forward {time.perf_counter() - t1:.0f} s")
    del model, out, logits
    gc.collect()

    lines = [f"parity vs PyTorch reference (bf16, CPU), {len(tokens)} tokens",
             f"{'file':<18} {'max|dlogit|':>12} {'mean KLD':>10} {'max KLD':>10} {'top-1':>8} {'same tokens':>12}"]
    for label, path in ggufs.items():
        if not path.exists():
            lines.append(f"{label:<18} missing {path}")
            continue
        rt = SO8TRuntime(path, n_ctx=64, n_threads=os.cpu_count() or 1)
        same = rt.tokenize(PROMPT) == tokens
        ev = rt.evaluate(tokens)
        got = ev.logits.astype(np.float64)
        del rt
        gc.collect()
        kld = kl_divergence(ref, got)
        top1 = float((ref.argmax(-1) == got.argmax(-1)).mean())
        lines.append(f"{label:<18} {np.abs(ref - got).max():>12.4f} {kld.mean():>10.6f} {kld.max():>10.6f} "
                     f"{top1:>8.3f} {same!s:>12}")
    text = "\n".join(lines)
    log(text)
    return text


# ----------------------------------------------------------------------------------------------- decode

def decode(ggufs: dict[str, Path], n_decode: int = 32, repeats: int = 3, n_threads: int = 2) -> str:
    import types

    import gguf
    import llama_cpp
    import numpy as np

    from so8t_export.metadata import read_so8t_metadata
    from so8t_export.runtime import SO8TRuntime

    llms = {}
    for label, path in ggufs.items():
        llms[label] = llama_cpp.Llama(str(path), n_ctx=256, n_batch=64, n_threads=n_threads,
                                      n_threads_batch=n_threads, verbose=False)
    prompt = llms[next(iter(llms))].tokenize(PROMPT.encode(), add_bos=False, special=True)

    def one_run(llm) -> float:
        llm.reset()
        llm.eval(prompt)
        n_vocab = llm.n_vocab()
        tok = int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1),
                                                  shape=(n_vocab,))))
        start = time.perf_counter()
        for _ in range(n_decode):
            llm.eval([tok])
            tok = int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1),
                                                      shape=(n_vocab,))))
        return n_decode / (time.perf_counter() - start)

    for llm in llms.values():  # warm-up: page the weights in
        one_run(llm)
    speeds = {label: [] for label in llms}
    for _ in range(repeats):  # interleaved, so drift hits both files alike
        for label, llm in llms.items():
            speeds[label].append(one_run(llm))
    lines = [(f"decode: {len(prompt)}-token prompt, {n_decode} greedy tokens, n_threads={n_threads}, "
              f"median of {repeats} interleaved runs, load average at end {os.getloadavg()[0]:.2f}"),
             f"{'file':<18} {'tok/s (median)':>15} {'runs':>30}"]
    for label, s in speeds.items():
        lines.append(f"{label:<18} {statistics.median(s):>15.3f} {', '.join(f'{x:.3f}' for x in s):>30}")
    labels = list(speeds)
    if len(labels) == 2:
        a, b = (statistics.median(speeds[k]) for k in labels)
        lines.append(f"ratio {labels[0]}/{labels[1]}: {a / b:.4f}")

    # Head scoring: exactly SO8TRuntime.heads on one token's hidden state, as the runtime does per token.
    ours = ggufs[labels[0]]
    meta = read_so8t_metadata(gguf.GGUFReader(ours), ours)
    fake = types.SimpleNamespace(metadata=meta)
    hidden = np.random.default_rng(0).standard_normal((1, meta.heads["safety"][0].shape[1])).astype(np.float32)
    for _ in range(100):
        SO8TRuntime.heads(fake, hidden)
    reps = 2000
    t0 = time.perf_counter()
    for _ in range(reps):
        SO8TRuntime.heads(fake, hidden)
    head_s = (time.perf_counter() - t0) / reps
    token_s = 1.0 / statistics.median(speeds[labels[0]])
    lines.append(f"head scoring (SO8TRuntime.heads, 2 heads x [2, {hidden.shape[1]}]): {head_s * 1e6:.1f} us/token "
                 f"= {100 * head_s / token_s:.4f} % of a {token_s * 1e3:.1f} ms token")
    del llms
    gc.collect()
    text = "\n".join(lines)
    log(text)
    return text


# ----------------------------------------------------------------------------------------------- main

def machine() -> str:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.platform()}, Python {platform.python_version()}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=HERE / ".cache")
    ap.add_argument("--quant", action="append", choices=["q8_0", "bf16", "f16", "f32"],
                    help="conversions to time (default: q8_0 and bf16)")
    ap.add_argument("--skip-export", action="store_true", help="reuse the GGUFs from an earlier run")
    ap.add_argument("--parity", action="store_true", help="full-scale parity vs the PyTorch reference")
    ap.add_argument("--decode", action="store_true", help="decode tokens/s, ours vs converter q8_0")
    args = ap.parse_args(argv)
    quants = args.quant or ["q8_0", "bf16"]

    import make_checkpoint

    log(f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    log(f"machine: {machine()}")
    fp8_dir, _ = make_checkpoint.make(args.cache)
    out_dir = args.cache / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {}
    if not args.skip_export:
        llama_dir = fetch_converter(args.cache)
        results = export_table(fp8_dir, llama_dir, out_dir, quants)
        disk = disk_anchor(out_dir, max(r["size_gb"] for r in results if r["rc"] == 0) * 1e9)
        for r in results:
            theirs = out_dir / f"converter-{r['quant']}.gguf"
            if r["tool"] == "ours" and r["rc"] == 0 and theirs.exists():
                r["identical"] = identical_tensors(Path(r["out"]), theirs)
        report["disk"] = disk
        report["table"] = print_table(results, disk)
        report["runs"] = [{k: v for k, v in r.items() if k != "output"} for r in results]
    if args.parity:
        report["parity"] = parity(fp8_dir, {"ours q8_0": out_dir / "ours-q8_0.gguf",
                                            "ours bf16": out_dir / "ours-bf16.gguf"})
    if args.decode:
        report["decode"] = decode({"ours q8_0": out_dir / "ours-q8_0.gguf",
                                   "converter q8_0": out_dir / "converter-q8_0.gguf"})
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.cache / f"report-{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
