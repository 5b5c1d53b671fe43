"""Command line: a thin click layer over the library. Each command calls one library function."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import click

from .quants import OUTPUT_TYPES

# Problems with the user's input arrive as ValueError subclasses (CheckpointError, ExportError, ...) or
# OSError; the CLI turns them into one clear line and a non-zero exit instead of a traceback.
USER_ERRORS = (ValueError, OSError)


def user_errors(command):
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as err:
            raise click.ClickException(str(err)) from None
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Export SO8T (Qwen3 + SO(8) triality rotations + safety/authority heads) to GGUF for llama.cpp and Ollama."""


@main.command("gguf")
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Output file. Default: ./<MODEL_DIR name>-<quant>.gguf")
@click.option("--quant", default="q8_0", show_default=True, type=click.Choice(list(OUTPUT_TYPES), case_sensitive=False),
              help="Tensor type of the matrices (norms always stay f32).")
@click.option("--name", help="general.name of the model. Default: the folder name.")
@user_errors
def gguf_command(model_dir: Path, output: Path | None, quant: str, name: str | None) -> None:
    """Fold MODEL_DIR (an SO8T or plain Qwen3 checkpoint) into a stock qwen3 GGUF.

    The rotations are folded into the q/k/v and gate/up weights, so llama.cpp and Ollama run the file as
    plain Qwen3; the triality data and the safety/authority heads are stored as so8t.* metadata.
    """
    from .export import export_gguf

    with click.progressbar(length=1, label="exporting", show_eta=True, show_percent=True,
                           item_show_func=lambda item: item) as bar:
        state = {"tensor": None, "count": 0}

        def progress(done: int, total: int, tensor: str) -> None:
            bar.length = total
            if tensor != state["tensor"]:
                state["tensor"], state["count"] = tensor, state["count"] + 1
            bar.update(done - bar.pos, f"{state['count']} tensors, {done / 2**20:.0f}/{total / 2**20:.0f} MiB, "
                                       f"{tensor}")

        report = export_gguf(model_dir, output, quant=quant, name=name, progress=progress)
    click.echo(report.summary())


@main.command("inspect")
@click.argument("gguf_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@user_errors
def inspect_command(gguf_file: Path) -> None:
    """Print the general.*, qwen3.* and so8t.* metadata of GGUF_FILE and check its stored rotations."""
    from .gguf_inspect import inspect_gguf

    text, ok = inspect_gguf(gguf_file)
    click.echo(text)
    if not ok:
        raise click.ClickException(f"{gguf_file}: stored rotations failed the triality check")


@main.command("parity")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("gguf_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Prompts: a .json list of strings, or a text file with one prompt per line.")
@click.option("--greedy-tokens", default=64, show_default=True, help="Greedy tokens compared per prompt.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@user_errors
def parity_command(model_dir: Path, gguf_file: Path, prompts: Path | None, greedy_tokens: int, as_json: bool) -> None:
    """Compare the PyTorch reference (MODEL_DIR) with llama.cpp running GGUF_FILE.

    Reports tokenisation equality, max abs logit difference, mean and p99 KLD, top-1 and greedy agreement
    and the safety/authority probability differences; exits 1 when the file type's thresholds fail.
    """
    from .parity import read_prompts, run_parity

    report = run_parity(model_dir, gguf_file, prompts=read_prompts(prompts), greedy_tokens=greedy_tokens)
    click.echo(report.to_json() if as_json else report.table())
    if not report.passed:
        raise SystemExit(1)


@main.command("demo")
@click.option("-o", "--output-dir", default="demo-out", show_default=True, type=click.Path(path_type=Path),
              help="Where the demo checkpoint, GGUF and Modelfile go.")
@click.option("--quant", default="q8_0", show_default=True, type=click.Choice(list(OUTPUT_TYPES)))
@user_errors
def demo_command(output_dir: Path, quant: str) -> None:
    """Run the whole pipeline on the built-in tiny demo model: build, export, parity, generate."""
    from .demo import run_demo

    if not run_demo(output_dir, quant=quant, echo=click.echo):
        raise SystemExit(1)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("gguf_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("prompt")
@click.option("--system", help="System prompt.")
@click.option("--raw", is_flag=True, help="Send PROMPT as is, without the chat template.")
@click.option("--max-tokens", default=256, show_default=True)
@click.option("--temperature", default=0.6, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@user_errors
def runtime_main(gguf_file: Path, prompt: str, system: str | None, raw: bool, max_tokens: int, temperature: float,
                 seed: int, as_json: bool) -> None:
    """Chat with an exported SO8T GGUF through llama.cpp and score the prompt with its safety and
    authority heads (read from the file's so8t.* metadata)."""
    from .runtime import SO8TRuntime, chat

    result = chat(SO8TRuntime(gguf_file), prompt, system=system, raw=raw, max_tokens=max_tokens,
                  temperature=temperature, seed=seed)
    click.echo(json.dumps(result, indent=2, ensure_ascii=False) if as_json else
               "\n".join(f"{key}: {value}" for key, value in result.items()))



# ----------------------------------------------------------------------------------------------- modelfile
from . import modelfile as _modelfile


def _parse_params(values: tuple[str, ...]) -> list[tuple[str, str]]:
    pairs = []
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--param")
        pairs.append((key, value))
    return pairs


@main.command("modelfile")
@click.argument("gguf", required=False, metavar="[FILE.gguf]", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Modelfile to write. [default: Modelfile next to the GGUF]")
@click.option("--system", default=None, help="SYSTEM prompt to bake in (used when a request brings none).")
@click.option("--num-ctx", type=click.IntRange(min=1), default=_modelfile.DEFAULT_NUM_CTX, show_default=True,
              help="Context length in tokens (PARAMETER num_ctx). Thinking traces are long.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Add or override a PARAMETER, e.g. --param temperature=0.7. Repeat for several; repeated stop "
                   "values replace the default stops together.")
@click.option("--name", default=_modelfile.MODEL_NAME, show_default=True,
              help="Model name used in the printed `ollama create` line.")
@click.option("--check", "check_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              metavar="FILE", help="Validate an existing Modelfile instead of writing one.")
@click.option("--grammar-only", is_flag=True,
              help="With --check: skip checking that the FROM/ADAPTER/DRAFT files exist.")
def modelfile_cmd(gguf: Path | None, output: Path | None, system: str | None, num_ctx: int, params: tuple[str, ...],
                  name: str, check_path: Path | None, grammar_only: bool) -> None:
    """Write an Ollama Modelfile for FILE.gguf, or check one with --check FILE.

    \b
    so8t-export modelfile out/so8t-qwen3-4b-q8_0.gguf            # writes out/Modelfile
    so8t-export modelfile model.gguf -o Modelfile --system "You are SO8T." --num-ctx 16384
    so8t-export modelfile --check modelfiles/so8t-qwen3-4b.Modelfile

    The Modelfile has FROM (the GGUF's path relative to the Modelfile), the Qwen3-4B-Thinking-2507 chat
    TEMPLATE in Go template syntax, the recommended sampling PARAMETERs and, if given, SYSTEM. It is checked
    against the Modelfile grammar and parameter types of the pinned Ollama version before it is written.
    --check runs the same checks on any Modelfile, with Ollama's error messages and line numbers.
    """
    if check_path is not None:
        if gguf is not None or output is not None or system is not None or params:
            raise click.UsageError("--check FILE takes no FILE.gguf, -o, --system or --param")
        try:
            result = _modelfile.check_modelfile(check_path, require_files=not grammar_only)
        except _modelfile.ModelfileError as e:
            raise click.ClickException(f"{check_path}: {e}") from None
        for warning in result.warnings:
            click.echo(f"warning: {check_path}: {warning}", err=True)
        click.echo(f"{check_path}: OK for Ollama {_modelfile.OLLAMA_VERSION} ({len(result.commands)} commands)")
        return

    if grammar_only:
        raise click.UsageError("--grammar-only only applies to --check")
    if gguf is None:
        raise click.UsageError("missing FILE.gguf (or use --check FILE)")
    output = output if output is not None else gguf.parent / "Modelfile"
    try:
        written = _modelfile.write_modelfile(gguf, output, system=system, num_ctx=num_ctx,
                                             parameters=_parse_params(params))
    except _modelfile.ModelfileError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot write {output}: {e}") from None
    click.echo(f"wrote {written}")
    if not gguf.exists():
        click.echo(f"note: {gguf} does not exist yet; `ollama create` needs it there", err=True)
    click.echo(_modelfile.ollama_create_command(written, name))


@main.command("ollama")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--quant", default="q8_0", show_default=True, type=click.Choice(list(OUTPUT_TYPES), case_sensitive=False))
@click.option("--name", default=_modelfile.MODEL_NAME, show_default=True, help="Ollama model name.")
@click.option("-o", "--output-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the GGUF and the Modelfile (created if missing).")
@click.option("--system", default=None, help="SYSTEM prompt to bake into the Modelfile.")
@click.option("--num-ctx", type=click.IntRange(min=1), default=_modelfile.DEFAULT_NUM_CTX, show_default=True)
@user_errors
def ollama_command(model_dir: Path, quant: str, name: str, output_dir: Path, system: str | None,
                   num_ctx: int) -> None:
    """Export MODEL_DIR to a GGUF plus an Ollama Modelfile in OUTPUT_DIR and print the `ollama create` line."""
    from .export import export_gguf

    output_dir.mkdir(parents=True, exist_ok=True)
    report = export_gguf(model_dir, output_dir / _modelfile.gguf_filename(name, quant), quant=quant, name=name)
    click.echo(report.summary())
    modelfile = _modelfile.write_modelfile(report.output, output_dir / _modelfile.modelfile_filename(name),
                                           system=system, num_ctx=num_ctx)
    click.echo(f"wrote {modelfile}")
    click.echo(_modelfile.ollama_create_command(modelfile, name))
