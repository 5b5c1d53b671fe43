"""The decode cost of cpp_patches/'s series: stock against patched llama-server, back to back, many pairs.

    python bench/patch_cost.py --gguf bench/.cache/out/ours-q8_0-visible-padding.gguf --pairs 16

bench/serve.py measures both servers once per repeat among three other paths; on a shared 2-core VM single
runs scatter by about 10 %, more than the 1 % the patch may cost. Here the two servers (both loaded, -np 1)
answer the same /completion request (greedy, n_predict tokens, cache_prompt false) in turn, the order
alternating, and each pair gives one ratio of the servers' own predicted_per_second; the median of the
ratios is the verdict, since a slow spell of the machine slows both members of a pair alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

PROMPT = "Here is a description of our warehouse inventory system. " * 3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, required=True, help="an SO8T GGUF with heads (bench/serve.py's copy)")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-score-tokens", action="store_true", help="patched server without --so8t-score-tokens")
    args = ap.parse_args(argv)

    import httpx
    from serve import LlamaServer

    from tests.upstream import llama_tool

    patched_flags = [] if args.no_score_tokens else ["--so8t-score-tokens"]
    servers = {"stock": LlamaServer(llama_tool("llama-server"), args.gguf, n_ctx=512, n_threads=args.threads,
                                    extra=[]),
               "patched": LlamaServer(llama_tool("llama-server", patched=True), args.gguf, n_ctx=512,
                                      n_threads=args.threads, extra=patched_flags)}
    client = httpx.Client(trust_env=False)
    body = {"prompt": PROMPT, "n_predict": args.tokens, "temperature": 0, "top_k": 1, "cache_prompt": False}
    speeds: dict[str, list[float]] = {name: [] for name in servers}
    try:
        urls = {name: server.wait(client) for name, server in servers.items()}
        for url in urls.values():  # page the weights in for each
            client.post(f"{url}/completion", json=dict(body, n_predict=4), timeout=600)
        for pair in range(args.pairs):
            for name in (("stock", "patched") if pair % 2 == 0 else ("patched", "stock")):
                timings = client.post(f"{urls[name]}/completion", json=body, timeout=600).json()["timings"]
                speeds[name].append(timings["predicted_per_second"])
            print(f"pair {pair + 1}: stock {speeds['stock'][-1]:.3f}, patched {speeds['patched'][-1]:.3f} "
                  f"tokens/s", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    ratios = sorted(p / s for s, p in zip(speeds["stock"], speeds["patched"]))
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    print(f"patched {' '.join(patched_flags) or '(no flags)'} / stock, {args.pairs} pairs of {args.tokens} tokens: "
          f"median ratio {statistics.median(ratios):.3f} (quartiles {q1:.3f}..{q3:.3f}; >= 0.99 is the target); "
          f"median speeds stock {statistics.median(speeds['stock']):.3f}, patched "
          f"{statistics.median(speeds['patched']):.3f} tokens/s")


if __name__ == "__main__":
    main()
