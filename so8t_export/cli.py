"""Command line: a thin click layer over the library. Each command calls one library function."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import shutil
import signal
from pathlib import Path

import click

from .config import AUTO_QUANT, LLAMA_QUANT_TYPE_NAMES
from .config import OUTPUT_TYPE_NAMES as OUTPUT_TYPES

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


@contextlib.contextmanager
def quiet_warnings(verbose: bool | None = None):
    """transformers also warns through the warnings module (FutureWarning, ...): hidden unless verbose (None:
    the group's --verbose)."""
    import warnings

    if verbose is None:
        verbose = bool(click.get_current_context().find_root().params.get("verbose"))
    with warnings.catch_warnings():
        if not verbose:
            warnings.filterwarnings("ignore", module=r"(transformers|huggingface_hub)(\.|$)")
        yield


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
@click.option("--quant", default="q8_0", show_default=True,
              type=click.Choice([*OUTPUT_TYPES, *LLAMA_QUANT_TYPE_NAMES, AUTO_QUANT], case_sensitive=False),
              help="Tensor type of the matrices (norms always stay f32). f32, f16, bf16 and q8_0 are written "
                   "directly; the k- and i-quants by llama.cpp's own quantiser from a bf16 export, with "
                   "llama.cpp's per-tensor mix; iq1_*, iq2_* and iq3_xxs need --imatrix or --calibration. "
                   "auto: the smallest of llama.cpp's types whose mean KLD stays under --max-kld.")
@click.option("--imatrix", "imatrix", type=click.Path(dir_okay=False, path_type=Path),
              help="A llama.cpp GGUF imatrix for the quantiser (so8t-export imatrix, or llama.cpp's "
                   "llama-imatrix).")
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path),
              help="A text to compute the imatrix from on the fly (as so8t-export imatrix does); with --quant "
                   "auto, also the text the KLD is measured on (default: the shipped calibration text).")
@click.option("--max-kld", type=click.FloatRange(min=0, min_open=True),  # nan, inf: refused by choose_quant
              help="With --quant auto: the largest mean KLD against the f32 reference allowed, e.g. 0.05.")
@click.option("--name", help="general.name of the model. Default: the folder name.")
@user_errors
def gguf_command(model_dir: Path, output: Path | None, quant: str, imatrix: Path | None, calibration: Path | None,
                 max_kld: float | None, name: str | None) -> None:
    """Fold MODEL_DIR (an SO8T or plain Qwen3 checkpoint) into a stock qwen3 GGUF.

    The rotations are folded into the q/k/v and gate/up weights, so llama.cpp and Ollama run the file as
    plain Qwen3; the triality data and the safety/authority heads are stored as so8t.* metadata.
    """
    from .export import export_gguf, frozen_gc

    quant = quant.lower()
    if (quant == AUTO_QUANT) != (max_kld is not None):
        raise click.UsageError("--quant auto needs --max-kld X, and --max-kld applies only to --quant auto")
    if quant in OUTPUT_TYPES and (imatrix or calibration):
        raise click.UsageError(f"--imatrix and --calibration apply to llama.cpp's quantiser types, not to "
                               f"--quant {quant}")
    if quant not in (*OUTPUT_TYPES, AUTO_QUANT) and imatrix and calibration:
        raise click.UsageError("give --imatrix FILE or --calibration TEXT, not both")
    with quiet_warnings(), frozen_gc(), click.progressbar(length=1, label="exporting", show_eta=True,
                                                          show_percent=True, item_show_func=lambda item: item) as bar:
        state = {"tensor": None, "count": 0}

        def progress(done: int, total: int, tensor: str) -> None:
            bar.length = total
            if tensor != state["tensor"]:
                state["tensor"], state["count"] = tensor, state["count"] + 1
            bar.update(done - bar.pos, f"{state['count']} tensors, {done / 2**20:.0f}/{total / 2**20:.0f} MiB, "
                                       f"{tensor}")

        if quant == AUTO_QUANT:
            from .llama_quantize import choose_quant

            auto = choose_quant(model_dir, output, max_kld=max_kld, calibration=calibration, imatrix=imatrix,
                                name=name, progress=progress)
        else:
            report = export_gguf(model_dir, output, quant=quant, name=name, progress=progress, imatrix=imatrix,
                                 calibration=calibration)
    if quant == AUTO_QUANT:
        click.echo(auto.table())
        if auto.chosen is None:
            raise click.ClickException(f"no llama.cpp type keeps the mean KLD under {max_kld:g}; nothing written "
                                       "(raise --max-kld, or use --quant q8_0, f16 or bf16)")
        report = auto.export
    click.echo(report.summary())


@main.command("hf")
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--output", "output_dir", required=True, type=click.Path(path_type=Path),
              help="New folder for the Hugging Face checkpoint (an existing one is refused).")
@click.option("--fp8", is_flag=True, help="Qwen's block FP8: e4m3 q/k/v/o/gate/up/down with weight_scale_inv "
                                          "per 128x128 block; norms, embeddings and LM head bf16.")
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="Largest shard before the next weight starts a new one, as transformers' max_shard_size "
                   "(5GB = 5*10^9 bytes, 4GiB = 4*2^30).")
@user_errors
def hf_command(model_dir: Path, output_dir: Path, fp8: bool, max_shard_size: str) -> None:
    """Fold MODEL_DIR (an SO8T or plain Qwen3 checkpoint) into a stock Qwen3 Hugging Face checkpoint.

    vLLM, SGLang and transformers load it as plain Qwen3; the safety/authority heads go to
    so8t_heads.safetensors beside it, described by the `so8t` block of config.json.
    """
    import sys

    from .export import frozen_gc
    from .hf_export import export_hf, parse_size

    try:
        max_shard_bytes = parse_size(max_shard_size)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--max-shard-size") from None
    with quiet_warnings(), frozen_gc(), click.progressbar(length=1, label="exporting", file=sys.stderr,
                                                          show_eta=True, show_percent=True,
                                                          item_show_func=lambda item: item) as bar:
        def progress(done: int, total: int, tensor: str) -> None:
            bar.length = total
            bar.update(done - bar.pos, f"{done / 2**20:.0f}/{total / 2**20:.0f} MiB, {tensor}")

        report = export_hf(model_dir, output_dir, fp8=fp8, max_shard_bytes=max_shard_bytes, progress=progress)
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
@click.option("--dtype", default="f32", show_default=True,
              type=click.Choice(["f32", "bf16"]),  # parity.REFERENCE_DTYPES' keys (parity imports torch)
              help="The reference's dtype; bf16 halves its memory (a 4B reference fits in 24 GB) and holds "
                   "the file to the looser of its own and bf16's thresholds.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's and transformers' log lines and warnings.")
@user_errors
def parity_command(model_dir: Path, gguf_file: Path, prompts: Path | None, greedy_tokens: int, dtype: str,
                   as_json: bool, verbose: bool) -> None:
    """Compare the PyTorch reference (MODEL_DIR) with llama.cpp running GGUF_FILE.

    Reports tokenisation equality, max abs logit difference, mean and p99 KLD, top-1 and greedy agreement
    and the safety/authority probability differences; exits 1 when the file type's thresholds fail (with
    --dtype bf16, the looser of those and bf16's). A stock qwen3 GGUF (no so8t.* heads) is compared on its
    logits; the head columns are skipped.
    """
    from .logs import configure_logging, quiet_llama_cpp
    from .runtime import LlamaError

    # --verbose here, or a global one on the group (so8t-export --verbose parity ...) if it has one.
    verbose = verbose or bool(click.get_current_context().find_root().params.get("verbose"))
    configure_logging(verbose)
    quiet_llama_cpp(verbose)
    with quiet_warnings(verbose):
        from .parity import read_prompts, run_parity

        try:
            report = run_parity(model_dir, gguf_file, prompts=read_prompts(prompts),
                                greedy_tokens=greedy_tokens, dtype=dtype)
        except LlamaError as err:
            raise click.ClickException(str(err)) from None
    click.echo(report.to_json() if as_json else report.table())
    if not report.passed:
        raise SystemExit(1)


@main.command("imatrix")
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--text", "text_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Calibration text (UTF-8). Default: the project's own mixed text "
                   "(so8t_export/calibration/calibration.txt).")
@click.option("-o", "--output", default="imatrix.gguf", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="Output file (llama.cpp's GGUF imatrix format).")
@click.option("--chunk-size", default=512, show_default=True, type=click.IntRange(min=1),  # imatrix.DEFAULT_CHUNK_SIZE
              help="Tokens per chunk, each run from an empty cache (llama-imatrix's -c).")
@click.option("--parse-special/--no-parse-special", default=True, show_default=True,
              help="Read special-token text (<|im_start|>) in the text as the special token (llama-imatrix "
                   "--parse-special), or as plain text (its default).")
@click.option("--process-output", is_flag=True,
              help="Also record output.weight, for an untied LM head (llama-imatrix --process-output).")
@click.option("--dtype", default="f32", show_default=True,
              type=click.Choice(["f32", "bf16"]),  # parity.REFERENCE_DTYPES' keys (parity imports torch)
              help="The reference's dtype; bf16 halves its memory.")
@user_errors
def imatrix_command(model_dir: Path, text_file: Path | None, output: Path, chunk_size: int, parse_special: bool,
                    process_output: bool, dtype: str) -> None:
    """Measure an importance matrix of MODEL_DIR's folded weights with the PyTorch reference.

    Per input column of every weight llama-imatrix records, the sum of squared activations over the text,
    tokenised and chunked as llama-imatrix does, in its GGUF format: pass it to `gguf --imatrix` or to
    llama.cpp's llama-quantize --imatrix.
    """
    from .imatrix import CALIBRATION_TEXT, read_calibration_text, write_imatrix

    text_file = text_file or CALIBRATION_TEXT
    text = read_calibration_text(text_file)
    bar, progress = _progress("chunks")
    with quiet_warnings(), bar:
        report = write_imatrix(model_dir, text, output, chunk_size=chunk_size, parse_special=parse_special,
                               process_output=process_output, dtype=dtype, dataset=str(text_file),
                               inputs=(text_file,), progress=progress)
    click.echo(report.summary())


@main.command("demo")
@click.option("-o", "--output-dir", default="demo-out", show_default=True, type=click.Path(path_type=Path),
              help="Where the demo checkpoint, GGUF and Modelfile go.")
@click.option("--quant", default="f16", show_default=True, type=click.Choice(list(OUTPUT_TYPES)),
              help="Tensor type of the demo's GGUF (f16: see so8t_export.demo.DEMO_QUANT for why).")
@user_errors
def demo_command(output_dir: Path, quant: str) -> None:
    """Run the whole pipeline on the built-in tiny demo model: build, train its language model and heads,
    export, parity, and the gated runtime refusing an unsafe prompt and answering a safe one."""
    from .demo import run_demo
    from .logs import quiet_llama_cpp

    quiet_llama_cpp(bool(click.get_current_context().find_root().params.get("verbose")))
    if not run_demo(output_dir, quant=quant, echo=click.echo):
        raise SystemExit(1)


# ----------------------------------------------------------------------------------------------- so8t (runtime)
# `so8t run`, `so8t chat` and `so8t serve`: the engine and gate of so8t_export/serve, from a terminal.

def runtime_errors(command):
    """user_errors, plus llama.cpp's refusals (LlamaError is a RuntimeError) and a prompt that does not fit."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from .runtime import LlamaError

        try:
            return command(*args, **kwargs)
        except (*USER_ERRORS, LlamaError) as err:
            raise click.ClickException(str(err)) from None
    return wrapper


class _Threshold(click.ParamType):
    """A probability in [0, 1], off (that stage of the gate off) or file (the GGUF's calibrated threshold)."""

    name = "P|off|file"

    def convert(self, value, param, ctx):
        from .serve.gate import FROM_FILE

        if value is None or isinstance(value, float) or value == FROM_FILE:
            return value
        from .terminal import parse_threshold

        try:
            return parse_threshold(str(value))
        except ValueError as err:
            self.fail(str(err), param, ctx)


_BYTE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
               "g": 1024**3, "gb": 1000**3, "gib": 1024**3}


class _ByteSize(click.ParamType):
    """A number of bytes: 8388608, 8MiB, 512KiB, 1MB."""

    name = "BYTES"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        import re

        match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(value))
        unit = match and match.group(2).lower()
        if not match or unit not in _BYTE_UNITS or int(match.group(1)) * _BYTE_UNITS[unit] < 1:
            self.fail(f"{value!r} is not a positive number of bytes (e.g. 8388608, 8MiB, 512KiB)", param, ctx)
        return int(match.group(1)) * _BYTE_UNITS[unit]


def _finite(name: str):
    def check(ctx, param, value):
        import math

        if value is not None and not math.isfinite(value):  # FloatRange lets nan and inf through
            raise click.BadParameter(f"{value} is not a finite number", ctx=ctx, param=param)
        return value
    return check


def _options(*options):
    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command
    return decorate


def _sampling_options():
    from .serve.engine import SamplingParams

    d = SamplingParams()
    return _options(
        click.option("--max-tokens", default=d.max_tokens, show_default=True, type=click.IntRange(min=0),
                     help="Most tokens to generate, reasoning included."),
        click.option("--temperature", default=d.temperature, show_default=True, type=click.FloatRange(min=0),
                     callback=_finite("--temperature"), help="0: greedy."),
        click.option("--top-p", default=d.top_p, show_default=True, type=click.FloatRange(0, 1)),
        click.option("--top-k", default=d.top_k, show_default=True, type=click.IntRange(min=0), help="0: off."),
        click.option("--min-p", default=d.min_p, show_default=True, type=click.FloatRange(0, 1)),
        click.option("--repeat-penalty", default=d.repeat_penalty, show_default=True,
                     type=click.FloatRange(min=0, min_open=True), callback=_finite("--repeat-penalty"),
                     help="1: off."),
        click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**31 - 1),
                     help="Sampling seed (the same seed and prompt give the same answer)."),
        click.option("--stop", "stops", multiple=True, metavar="TEXT",
                     help="End the answer before TEXT. Repeat for several."),
    )


def _sampling(options: dict):
    from .serve.engine import SamplingParams

    return SamplingParams(max_tokens=options["max_tokens"], temperature=options["temperature"],
                          top_p=options["top_p"], top_k=options["top_k"], min_p=options["min_p"],
                          repeat_penalty=options["repeat_penalty"], seed=options["seed"],
                          stop=tuple(options["stops"]))


def _engine_options():
    return _options(
        click.option("--ctx-size", type=click.IntRange(min=1), default=None,
                     help="Context size in tokens (prompt + generation). [default: min(4096, the model's "
                          "qwen3.context_length)]"),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="CPU threads for llama.cpp. [default: llama-cpp-python's, half the CPUs]"),
    )


_GATE_STAGES = ("refuse_above", "escalate_above", "stop_above", "score_every")


def _gate_options():
    from .serve.gate import GatePolicy

    d = GatePolicy()
    return _options(
        click.option("--refuse-above", default=d.refuse_above, show_default=True, type=_Threshold(),
                     help="Input gate: refuse a prompt whose P(unsafe) at its last token is at least this "
                          "('off': never; 'file': the GGUF's so8t.safety_head.threshold, 0.5 without one)."),
        click.option("--escalate-above", default=d.escalate_above, show_default=True, type=_Threshold(),
                     help="Flag a prompt whose P(escalate) is at least this ('off': never; 'file': the "
                          "GGUF's so8t.authority_head.threshold)."),
        click.option("--stop-above", default=d.stop_above, show_default=True, type=_Threshold(),
                     help="Output gate: stop the stream at the first generated token (reasoning included) "
                          "whose P(unsafe) is at least this ('off': never; 'file': the GGUF's "
                          "so8t.safety_head.threshold)."),
        click.option("--score-every", default=d.score_every, show_default=True, type=click.IntRange(min=1),
                     help="Score every N-th generated token (text waits until the next scored token)."),
        click.option("--no-gate", is_flag=True, help="Every stage off (head scores are still reported)."),
        click.option("--refusal", default=d.refusal, show_default=True, help="The answer to a refused prompt."),
    )


def _gate_policy(options: dict):
    from click.core import ParameterSource

    from .serve.gate import GatePolicy

    if options["no_gate"]:
        ctx = click.get_current_context()
        given = [f"--{name.replace('_', '-')}" for name in _GATE_STAGES
                 if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"--no-gate turns every stage off; {', '.join(given)} would do nothing")
        return dataclasses.replace(GatePolicy.off(), refusal=options["refusal"])
    return GatePolicy(refuse_above=options["refuse_above"], escalate_above=options["escalate_above"],
                      stop_above=options["stop_above"], score_every=options["score_every"],
                      refusal=options["refusal"])


def _verbose_option():
    return click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's log lines.")


def _setup_logging(verbose: bool) -> bool:
    """--verbose on the command or on the group (so8t -v run ...)."""
    from .logs import configure_logging, quiet_llama_cpp

    verbose = verbose or bool(click.get_current_context().find_root().params.get("verbose"))
    configure_logging(verbose)
    quiet_llama_cpp(verbose)
    return verbose


def _load_engine(gguf_file: Path, options: dict):
    """The engine, and the policy to run it with: a stock qwen3 GGUF runs with a note and the gate off."""
    from .serve.engine import Engine
    from .serve.gate import GatePolicy

    policy = _gate_policy(options)  # a usage error before the model loads
    engine = Engine(gguf_file, n_ctx=options["ctx_size"], n_threads=options["threads"], require_heads=False)
    if not engine.has_heads:
        click.echo(f"note: {gguf_file} has no so8t.* metadata (no SO8T heads): generating without the "
                   "safety gate and scores", err=True)
        policy = dataclasses.replace(GatePolicy.off(), refusal=policy.refusal)
    return engine, policy.resolved(engine.runtime.metadata)


class _RuntimeGroup(click.Group):
    """`so8t FILE.gguf PROMPT [OPTIONS]`, the first release's only form, still means `so8t run`: a first
    argument that is no command but a path (or an option of `run`) gets `run` put in front of it."""

    def parse_args(self, ctx, args):
        group_options = {"-v", "--verbose", *ctx.help_option_names}
        at = 0
        while at < len(args) and args[at] in ("-v", "--verbose"):
            at += 1
        if at < len(args) and args[at] not in self.commands and args[at] not in group_options:
            first = args[at]
            if first.startswith("-") or first.lower().endswith(".gguf") or "/" in first or Path(first).exists():
                args = [*args[:at], "run", *args[at:]]
        return super().parse_args(ctx, args)


@click.group(cls=_RuntimeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's log lines (hidden by default; errors "
                                                    "always show).")
def runtime_main(verbose: bool) -> None:
    """Run an exported SO8T GGUF through llama.cpp with its safety gate: the safety and authority heads (read
    from the file's so8t.* metadata) score the prompt and every generated token.

    \b
    so8t run FILE.gguf "Is it safe to mix bleach and ammonia?"    # stream the answer, then the gate's line
    so8t chat FILE.gguf                                           # multi-turn, with slash commands
    so8t serve FILE.gguf --port 8080                              # OpenAI and Ollama APIs over HTTP

    `so8t FILE.gguf PROMPT` is `so8t run FILE.gguf PROMPT`. A stock qwen3 GGUF runs without the gate.
    """
    _setup_logging(verbose)
    exit_cleanly_on_termination()


@runtime_main.command("run")
@click.argument("gguf_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("prompt")
@click.option("--system", help="System prompt.")
@click.option("--raw", is_flag=True, help="Send PROMPT as is, without the chat template.")
@_sampling_options()
@_engine_options()
@_gate_options()
@click.option("--show-thinking", is_flag=True, help="Also stream the reasoning, dimmed, to stderr.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object at the end (text, reasoning, finish_reason, tokens, the so8t object) "
                   "instead of streaming.")
@_verbose_option()
@runtime_errors
def run_command(gguf_file: Path, prompt: str, system: str | None, raw: bool, show_thinking: bool, as_json: bool,
                verbose: bool, **options) -> None:
    """Answer PROMPT once through the gate: the answer streams to stdout as it is generated, and the gate's
    decision and scores follow on stderr in one line (so8t: allow (output), unsafe 0.12, ...).

    The input gate may refuse the prompt (the --refusal text is the answer), the output gate stops the stream
    before the first token whose P(unsafe) crosses --stop-above; nothing past it is printed.
    """
    from .serve.engine import ContextExceededError
    from .terminal import StreamPrinter, context_hint, generate, result_json, summary_line

    _setup_logging(verbose)
    engine, policy = _load_engine(gguf_file, options)
    if raw and system is not None:
        click.echo("note: --raw sends PROMPT as is; --system is not used", err=True)
    text = prompt if raw else engine.render(([{"role": "system", "content": system}] if system else [])
                                             + [{"role": "user", "content": prompt}])
    params = _sampling(options)
    printer = None if as_json else StreamPrinter(show_thinking=show_thinking, thinking_err=True)
    try:
        run = generate(engine, policy, text, params, None if printer is None else printer.write)
    except ContextExceededError as err:
        raise click.ClickException(context_hint(err, engine)) from None
    except BrokenPipeError:  # `so8t run ... | head -1`: stop quietly, as other tools do
        _quiet_stdout()
        raise SystemExit(141) from None
    finally:
        if printer is not None:
            with contextlib.suppress(BrokenPipeError):
                printer.finish()
    result = run.result
    if result.finish_reason == "context":
        click.echo(f"note: generation stopped at the end of the context ({engine.n_ctx} tokens) after "
                   f"{result.completion_tokens} tokens; --ctx-size sets it", err=True)
    if as_json:
        click.echo(json.dumps(result_json(run, engine), indent=2, ensure_ascii=False))
        return
    if not result.content and result.reasoning.strip() and not show_thinking and result.finish_reason != "stop":
        click.echo(f"note: generation ended ({result.finish_reason}) while the model was still reasoning; "
                   "--show-thinking shows the reasoning, --max-tokens allows more tokens", err=True)
    click.echo(summary_line(result, gate_on=policy.enabled, has_heads=engine.has_heads), err=True)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush of a closed pipe prints nothing."""
    import os
    import sys

    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


@runtime_main.command("chat")
@click.argument("gguf_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--system", help="System prompt (/system changes it during the chat).")
@click.option("--hide-thinking", is_flag=True, help="Do not print the reasoning (it is generated all the same).")
@_sampling_options()
@_engine_options()
@_gate_options()
@_verbose_option()
@runtime_errors
def chat_command(gguf_file: Path, system: str | None, hide_thinking: bool, verbose: bool, **options) -> None:
    """Talk with GGUF_FILE turn by turn through the gate. Lines come from stdin (a terminal or a pipe); each
    answer streams with its reasoning dimmed, and the gate's line follows. /help lists the commands:

    \b
    /system TEXT, /thresholds, /refuse P, /stop P, /escalate P, /clear, /save FILE, /help, /exit

    Earlier reasoning is kept in the history as reasoning_content (Qwen3's template leaves it out of the
    prompt); a prompt the input gate refuses is not kept. Ctrl-C ends the current answer, Ctrl-D the chat.
    With stdin not a terminal, the exit status is 1 when any line failed.
    """
    from .terminal import ChatSession, read_lines, stdin_is_terminal

    _setup_logging(verbose)
    engine, policy = _load_engine(gguf_file, options)
    session = ChatSession(engine, policy, _sampling(options), system=system, show_thinking=not hide_thinking)
    interactive = stdin_is_terminal()
    if interactive:
        click.echo(click.style(f"so8t chat: {engine.model_name}, {engine.n_ctx} tokens of context. /help for "
                               "commands, /exit or Ctrl-D to leave.", dim=True), err=True)
    session.run(read_lines())
    if session.errors and not interactive:
        raise SystemExit(1)


def _read_key_file(path: Path) -> list[str]:
    from .io import require_regular_file

    require_regular_file(path, "--api-key-file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise click.ClickException(f"{path}: --api-key-file is not UTF-8 text") from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if any(c.isspace() for c in key):
            raise click.ClickException(f"{path}:{number}: a key holds white space; write one key per line")
        keys.append(key)
    if not keys:
        raise click.ClickException(f"{path}: --api-key-file holds no keys (one per line, # starts a comment)")
    return keys


@runtime_main.command("serve")
@click.argument("gguf_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", "api_keys", multiple=True, envvar="SO8T_API_KEY", metavar="KEY",
              help="Accept requests with this key (Authorization: Bearer KEY, or X-Api-Key). Repeat for several; "
                   "SO8T_API_KEY may hold them, space-separated. [default: no key needed]")
@click.option("--api-key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Keys, one per line (# starts a comment), added to --api-key.")
@_engine_options()
@click.option("--queue-size", default=8, show_default=True, type=click.IntRange(min=0),
              help="Requests that may wait while one generates; more are answered 429 with retry-after.")
@click.option("--max-body-bytes", default=8 * 2**20, show_default="8MiB", type=_ByteSize(),
              help="Largest request body (413 above it).")
@_gate_options()
@click.option("--gate-errors", is_flag=True,
              help="Answer a prompt the input gate refuses with HTTP 400 (content_filter), not a 200 refusal.")
@click.option("--reasoning-field", default="reasoning_content", show_default=True,
              type=click.Choice(["reasoning_content", "reasoning", "both"]),
              help="Where the OpenAI API puts the reasoning (clients differ: llama-server and DeepSeek use "
                   "reasoning_content, vLLM and Ollama's /v1 reasoning).")
@_verbose_option()
@runtime_errors
def serve_command(gguf_file: Path, host: str, port: int, api_keys: tuple[str, ...], api_key_file: Path | None,
                  queue_size: int, max_body_bytes: int, gate_errors: bool, reasoning_field: str, verbose: bool,
                  **options) -> None:
    """Serve GGUF_FILE over HTTP with the gate: OpenAI's /v1/chat/completions, /v1/completions, /v1/models and
    /v1/moderations, Ollama's /api/chat, /api/generate, /api/tags, /api/show, and /health, /metrics.

    One request generates at a time; the others wait in a bounded queue. A GGUF without so8t.* heads needs
    --no-gate.
    """
    verbose = _setup_logging(verbose)
    policy = _gate_policy(options)
    keys = [*api_keys, *(_read_key_file(api_key_file) if api_key_file is not None else [])]
    for key in keys:
        if not key or any(c.isspace() for c in key):
            raise click.BadParameter("an API key is empty or holds white space", param_hint="'--api-key'")
    if not keys and host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"note: serving on {host} without --api-key: anyone who reaches port {port} can use the "
                   "model", err=True)
    try:
        from .serve.app import run_server
    except ImportError as err:
        raise click.ClickException(f"the server cannot start: {err} (pip install -e . installs fastapi and "
                                   "uvicorn)") from None
    run_server(gguf_file, host=host, port=port, n_ctx=options["ctx_size"], n_threads=options["threads"],
               policy=policy, api_keys=keys, max_queue=queue_size, max_body_bytes=max_body_bytes,
               reasoning_field=reasoning_field, gate_errors=gate_errors, verbose=verbose)



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


# ----------------------------------------------------------------------------------------------- heads
# train-heads, eval-heads and set-heads: so8t_export/heads.

def _progress(label: str):
    """A progress bar on stderr for a library function's progress(done, total) callback."""
    import sys

    bar = click.progressbar(length=1, label=label, file=sys.stderr, show_eta=True, show_pos=True)

    def update(done: int, total: int) -> None:
        bar.length = total
        bar.update(done - bar.pos)
    return bar, update




_PLOT_FORMATS = ("png", "svg", "pdf")


@main.command("train-heads")
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--data", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Training examples, JSONL (README: 'Training the heads').")
@click.option("--eval", "eval_data", type=click.Path(dir_okay=False, path_type=Path),
              help="Evaluation examples. Default: a held-out split of --data.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the SO8T checkpoint with the new heads (new, or an SO8T checkpoint).")
@click.option("--gguf", type=click.Path(dir_okay=False, path_type=Path),
              help="Take the features from llama.cpp running this export of MODEL_DIR instead of the "
                   "PyTorch reference: the heads then fit what the deployed (quantised) file computes.")
@click.option("--target-fpr", type=click.FloatRange(0, 1), default=None,
              help="Save, as each head's default threshold, the lowest one whose false-positive rate on the "
                   "evaluation set is at most this. Default: 0.5.")
@click.option("--l2", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="L2 regularisation strength on standardised features (scikit-learn's C = 1 / l2).")
@click.option("--balanced", is_flag=True, help="Weight the classes inversely to their frequency.")
@click.option("--holdout", default=0.2, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Fraction of --data held out for the metrics when --eval is not given.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the held-out split.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Examples per forward pass of the PyTorch reference.")
@click.option("--ctx-size", type=click.IntRange(min=1), default=None, help="llama.cpp context (--gguf).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="llama.cpp threads (--gguf).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@user_errors
def train_heads_command(model_dir: Path, data: Path, eval_data: Path | None, output: Path, gguf: Path | None,
                        target_fpr: float | None, l2: float, balanced: bool, holdout: float, seed: int,
                        batch_size: int, ctx_size: int | None, threads: int | None, as_json: bool) -> None:
    """Fit the safety and authority heads of MODEL_DIR on labelled examples; write the model with the new
    heads (base weights untouched) and the metrics on the evaluation set."""
    from .heads.train import train_heads
    from .runtime import LlamaError

    bar, progress = _progress("features")
    with quiet_warnings(), bar:
        try:
            report = train_heads(model_dir, data, output, eval_data=eval_data, gguf=gguf, l2=l2,
                                 balanced=balanced, target_fpr=target_fpr, holdout=holdout, seed=seed,
                                 batch_size=batch_size, n_ctx=ctx_size, n_threads=threads, progress=progress)
        except LlamaError as err:
            raise click.ClickException(str(err)) from None
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.table())


@main.command("eval-heads")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Labelled examples, JSONL.")
@click.option("--threshold", "thresholds", multiple=True, metavar="HEAD=P",
              help="Measure at this threshold instead of the stored one (e.g. safety=0.3); repeatable.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a ROC curve and a reliability diagram per head (.png, .svg or .pdf).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--ctx-size", type=click.IntRange(min=1), default=None, help="llama.cpp context (a GGUF).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="llama.cpp threads (a GGUF).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@user_errors
def eval_heads_command(source: Path, data: Path, thresholds: tuple[str, ...], plot: Path | None,
                       batch_size: int, ctx_size: int | None, threads: int | None, as_json: bool) -> None:
    """Measure the heads of SOURCE (an SO8T checkpoint folder, or a GGUF through llama.cpp with the heads
    from its so8t.* metadata) on labelled examples: accuracy, AUROC, precision, recall, false-positive rate
    and expected calibration error at each head's threshold."""
    from .config import HEAD_LABELS
    from .heads.train import evaluate_heads
    from .io import check_output_path
    from .runtime import LlamaError

    if not source.exists():
        raise click.BadParameter(f"{source} does not exist", param_hint="SOURCE")
    overrides = {}
    for item in thresholds:
        head, _, value = item.partition("=")
        try:
            overrides[head] = float(value)
        except ValueError:
            overrides[head] = -1.0
        if head not in HEAD_LABELS or not 0 <= overrides[head] <= 1:
            raise click.BadParameter(f"{item!r}; expected HEAD=P with HEAD one of {', '.join(HEAD_LABELS)} "
                                     "and P in [0, 1]", param_hint="--threshold")
    if plot is not None:
        if plot.suffix.lstrip(".").lower() not in _PLOT_FORMATS:
            raise click.BadParameter(f"{plot}: expected a .png, .svg or .pdf file", param_hint="--plot")
        check_output_path(plot, [data, source])
    bar, progress = _progress("features")
    with quiet_warnings(), bar:
        try:
            report = evaluate_heads(source, data, thresholds=overrides, batch_size=batch_size, n_ctx=ctx_size,
                                    n_threads=threads, progress=progress)
        except LlamaError as err:
            raise click.ClickException(str(err)) from None
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.table())
    if plot is not None:
        from .heads.plot import plot_heads

        click.echo(f"wrote {plot_heads(report, plot)}", err=as_json)


@main.command("set-heads")
@click.argument("gguf_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--from", "heads_dir", required=True, type=click.Path(path_type=Path),
              help="SO8T checkpoint whose heads and thresholds go into the file (train-heads' output).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the result here instead of replacing GGUF_FILE.")
@user_errors
def set_heads_command(gguf_file: Path, heads_dir: Path, output: Path | None) -> None:
    """Replace the so8t.* safety and authority heads and thresholds of GGUF_FILE with those of a checkpoint.
    Every tensor byte stays the same; the new file is written beside the old one and renamed over it."""
    from .heads.set_heads import set_heads

    click.echo(set_heads(gguf_file, heads_dir, output=output).summary())


if __name__ == "__main__":
    main()
