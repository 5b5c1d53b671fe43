"""Command line: a thin click layer over the library. Each command calls one library function."""

from __future__ import annotations

import functools
import json
import shutil
import signal
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


def exit_cleanly_on_termination() -> None:
    """SIGTERM and SIGHUP end the command the way Ctrl-C does: as an exception in the main thread, so that
    every `finally` runs and no multi-GB temporary file is left behind. The CLI owns the process; library
    functions never install handlers."""
    def terminate(signum, frame):
        raise SystemExit(128 + signum)
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), terminate)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Show the log lines and warnings of llama.cpp, transformers "
                                                    "and gguf-py (hidden by default; errors always show).")
def main(verbose: bool) -> None:
    """Export SO8T (Qwen3 + SO(8) triality rotations + safety/authority heads) to GGUF for llama.cpp and Ollama."""
    from .logs import configure_logging, quiet_llama_cpp

    configure_logging(verbose)
    quiet_llama_cpp(verbose)
    exit_cleanly_on_termination()


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
    from .export import export_gguf, frozen_gc

    with frozen_gc(), click.progressbar(length=1, label="exporting", show_eta=True, show_percent=True,
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
    """Print the general.*, qwen3.* and so8t.* metadata of GGUF_FILE and check it: the qwen3.* hyperparameters
    llama.cpp needs, the so8t.* schema and the stored rotations. A stock qwen3 GGUF (no so8t.* keys) passes."""
    from .gguf_inspect import inspect_gguf

    text, error = inspect_gguf(gguf_file)
    click.echo(text)
    if error:
        raise click.ClickException(error)


@main.command("parity")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("gguf_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Prompts: a .json list of strings, or a text file with one prompt per line.")
@click.option("--greedy-tokens", default=64, show_default=True, type=click.IntRange(min=0),
              help="Greedy tokens compared per prompt.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's and transformers' log lines and warnings.")
@user_errors
def parity_command(model_dir: Path, gguf_file: Path, prompts: Path | None, greedy_tokens: int, as_json: bool,
                   verbose: bool) -> None:
    """Compare the PyTorch reference (MODEL_DIR) with llama.cpp running GGUF_FILE.

    Reports tokenisation equality, max abs logit difference, mean and p99 KLD, top-1 and greedy agreement
    and the safety/authority probability differences; exits 1 when the file type's thresholds fail. A stock
    qwen3 GGUF (no so8t.* heads) is compared on its logits; the head columns are skipped.
    """
    import warnings

    from .logs import configure_logging, quiet_llama_cpp
    from .runtime import LlamaError

    # --verbose here, or a global one on the group (so8t-export --verbose parity ...) if it has one.
    verbose = verbose or bool(click.get_current_context().find_root().params.get("verbose"))
    configure_logging(verbose)
    quiet_llama_cpp(verbose)
    with warnings.catch_warnings():
        if not verbose:  # transformers also warns through the warnings module (FutureWarning, ...)
            warnings.filterwarnings("ignore", module=r"(transformers|huggingface_hub)(\.|$)")
        from .parity import read_prompts, run_parity

        try:
            report = run_parity(model_dir, gguf_file, prompts=read_prompts(prompts), greedy_tokens=greedy_tokens)
        except LlamaError as err:
            raise click.ClickException(str(err)) from None
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
    from .logs import quiet_llama_cpp

    quiet_llama_cpp(bool(click.get_current_context().find_root().params.get("verbose")))
    if not run_demo(output_dir, quant=quant, echo=click.echo):
        raise SystemExit(1)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("gguf_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("prompt")
@click.option("--system", help="System prompt.")
@click.option("--raw", is_flag=True, help="Send PROMPT as is, without the chat template.")
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(min=0))
@click.option("--temperature", default=0.6, show_default=True, type=click.FloatRange(min=0))
@click.option("--seed", default=0, show_default=True)
@click.option("--ctx-size", type=click.IntRange(min=1), default=None,
              help="Context size in tokens (prompt + generation). [default: min(4096, the model's "
                   "qwen3.context_length)]")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's log lines.")
@user_errors
def runtime_main(gguf_file: Path, prompt: str, system: str | None, raw: bool, max_tokens: int, temperature: float,
                 seed: int, ctx_size: int | None, as_json: bool, verbose: bool) -> None:
    """Chat with an exported SO8T GGUF through llama.cpp and score the prompt with its safety and
    authority heads (read from the file's so8t.* metadata). A stock qwen3 GGUF runs without scores."""
    import math

    from .logs import configure_logging, quiet_llama_cpp
    from .runtime import LlamaError, SO8TRuntime, chat

    if not math.isfinite(temperature):  # FloatRange lets nan and inf through
        raise click.BadParameter(f"{temperature} is not a finite number", param_hint="'--temperature'")
    configure_logging(verbose)
    quiet_llama_cpp(verbose)
    try:
        runtime = SO8TRuntime(gguf_file, n_ctx=ctx_size)
        if not runtime.has_heads:
            click.echo(f"note: {gguf_file} has no so8t.* metadata (no SO8T heads): generating without "
                       "safety/authority scores", err=True)
        result = chat(runtime, prompt, system=system, raw=raw, max_tokens=max_tokens, temperature=temperature,
                      seed=seed)
    except LlamaError as err:
        raise click.ClickException(str(err)) from None
    if result["finish_reason"] == "context":
        click.echo(f"note: generation stopped at the end of the context ({runtime.n_ctx} tokens) after "
                   f"{result['tokens']} tokens; --ctx-size sets it", err=True)
    click.echo(json.dumps(result, indent=2, ensure_ascii=False) if as_json else
               "\n".join(f"{key}: {value}" for key, value in result.items() if value is not None))



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
    pairs = _parse_params(params)
    for key, value in pairs:  # name the parameter: Ollama's own text is just "invalid float value [abc]"
        try:
            _modelfile.format_parameter(key, value)
        except _modelfile.ModelfileError as e:
            raise click.ClickException(f"--param {key}={value}: {e}") from None
    stock = False
    if gguf.exists():  # a file that is there must be a qwen3 GGUF llama.cpp loads (not there yet: a note below)
        from .gguf_file import read_gguf_header, read_qwen3_hparams
        from .metadata import read_optional_so8t_metadata

        try:  # the header only, no GGUFReader: Qwen3's 151936-token vocabulary costs ~0.04 s, not seconds
            header = read_gguf_header(gguf)
            stock = read_optional_so8t_metadata(header, gguf, read_qwen3_hparams(header, gguf)) is None
        except ValueError as e:
            raise click.ClickException(str(e)) from None
    try:
        written = _modelfile.write_modelfile(gguf, output, system=system, num_ctx=num_ctx, parameters=pairs)
    except _modelfile.ModelfileError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot write {output}: {e}") from None
    click.echo(f"wrote {written}")
    if stock:
        click.echo(f"note: {gguf} has no so8t.* metadata (a stock qwen3 GGUF); Ollama runs it all the same", err=True)
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
    from .export import export_gguf, frozen_gc

    gguf_path = output_dir / _modelfile.gguf_filename(name, quant)
    modelfile_path = output_dir / _modelfile.modelfile_filename(name)
    # Everything that can be refused without the export is refused before it: the Modelfile is rendered
    # (and checked against Ollama's grammar) first, so a bad --system costs no multi-GB write.
    _modelfile.render_modelfile(gguf_path, modelfile_path, system=system, num_ctx=num_ctx)
    created = not output_dir.exists()
    keep_gguf = gguf_path.exists()  # an earlier export that this run replaces; a failure leaves it be
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        with frozen_gc():
            report = export_gguf(model_dir, gguf_path, quant=quant, name=name)
        click.echo(report.summary())
        modelfile = _modelfile.write_modelfile(report.output, modelfile_path, system=system, num_ctx=num_ctx)
    except BaseException:
        if not keep_gguf:
            gguf_path.unlink(missing_ok=True)
        if created:
            shutil.rmtree(output_dir, ignore_errors=True)
        raise
    click.echo(f"wrote {modelfile}")
    click.echo(_modelfile.ollama_create_command(modelfile, name))


if __name__ == "__main__":
    main()
