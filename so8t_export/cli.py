"""Command line: a thin click layer over the library. Each command calls one library function."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Export SO8T (Qwen3 + SO(8) triality rotations + safety/authority heads) to GGUF for llama.cpp and Ollama."""


def runtime_main() -> None:
    """Entry point of `so8t`, the small runtime that uses the extra heads (filled in with the runtime)."""
    raise SystemExit("so8t runtime: not built yet")
