"""The terminal side of ``so8t run`` and ``so8t chat``: a gated generation printed as it streams (the
reasoning dimmed, between Ollama's "Thinking..." and "...done thinking." marks), the gate's decision in one
line, and the interactive chat with its history and slash commands.

Nothing here decides anything: ``serve.gate.GatedRun`` does the gating, ``serve.engine.Engine`` the model.
Output goes through click, which drops the dim styling when the stream is not a terminal.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import click

from .io import check_output_path, write_bytes_atomic
from .serve.engine import ContextExceededError, Engine, SamplingParams
from .serve.gate import GatedRun, GatePolicy

__all__ = ["ChatSession", "StreamPrinter", "context_hint", "generate", "result_json", "summary_line"]

THINKING, DONE_THINKING = "Thinking...", "...done thinking."


# ---------------------------------------------------------------------------------------------- one run
class StreamPrinter:
    """Writes deltas as they arrive: the answer to ``answer_err`` (False: stdout), the reasoning, when shown,
    dimmed to ``thinking_err``'s stream between the two marks."""

    def __init__(self, *, show_thinking: bool, thinking_err: bool, answer_err: bool = False):
        self.show_thinking, self.thinking_err, self.answer_err = show_thinking, thinking_err, answer_err
        self.in_thinking = False
        self.reasoning_tail = "\n"  # the last character of the reasoning shown
        self.wrote_answer = False
        self.answer_tail = ""

    def write(self, kind: str, text: str) -> None:
        if not text:
            return
        if kind == "reasoning":
            if not self.show_thinking:
                return
            if not self.in_thinking:
                text = text.lstrip("\n")  # Qwen3 opens its reasoning with a newline
                if not text:
                    return  # no mark for reasoning that is only newlines (so far)
                click.echo(click.style(THINKING, dim=True), err=self.thinking_err)
                self.in_thinking = True
            click.echo(click.style(text, dim=True), nl=False, err=self.thinking_err)
            self.reasoning_tail = text[-1]
            return
        self._close_thinking()
        if not self.wrote_answer:
            text = text.lstrip("\n")  # and its answer with two, after </think>
            if not text:
                return
        click.echo(text, nl=False, err=self.answer_err)
        self.wrote_answer = True
        self.answer_tail = text[-1]

    def _close_thinking(self) -> None:
        if self.in_thinking:
            newline = "" if self.reasoning_tail == "\n" else "\n"
            click.echo(newline + click.style(DONE_THINKING, dim=True) + "\n", err=self.thinking_err)
            self.in_thinking = False

    def finish(self) -> None:
        """Close an open reasoning block and end the answer's last line."""
        self._close_thinking()
        if self.wrote_answer and self.answer_tail != "\n":
            click.echo("", err=self.answer_err)


def generate(engine: Engine, policy: GatePolicy, prompt: str, params: SamplingParams,
             on_delta: Callable[[str, str], None] | None = None) -> GatedRun:
    """One gated generation; every delta that passes the gate goes to ``on_delta(kind, text)`` as it comes.
    The run's ``result`` is complete on return, also when the caller's Ctrl-C ended it early (re-raised)."""
    run = GatedRun(engine, policy, prompt, params, split_thinking=True)
    run.start()
    stream = run.stream()
    try:
        for delta in stream:
            if on_delta is not None:
                on_delta(delta.kind, delta.text)
    finally:
        stream.close()  # a KeyboardInterrupt or a closed pipe stops llama.cpp here
    return run


def context_hint(err: ContextExceededError, engine: Engine, what: str = "the prompt", then: str = "") -> str:
    """The runtime's message for a prompt that does not fit, with what to do about it."""
    return (f"{what} has {err.n_prompt_tokens} tokens, more than the context holds (n_ctx = {err.n_ctx} "
            f"tokens){then}; raise it with --ctx-size (the model was trained on qwen3.context_length = "
            f"{engine.runtime.hparams.context_length})")


def _second(scores: dict | None) -> tuple[str, float] | None:
    """The positive label of a head (unsafe, escalate) and its probability."""
    if not scores:
        return None
    label, p = list(scores.items())[-1]
    return label, p


def summary_line(result, *, gate_on: bool, has_heads: bool) -> str:
    """The gate's decision and the head scores in one line: ``so8t: allow (output), unsafe 0.449, ...``."""
    so8t = result.so8t or {}
    parts = []
    if not has_heads:
        head = "no so8t.* heads, gate off"
    else:
        head = f"{so8t.get('decision')} ({so8t.get('stage')})" if gate_on else "gate off"
        for key in ("safety", "authority"):
            scored = _second(so8t.get(key))
            if scored is not None:
                parts.append(f"{scored[0]} {scored[1]:.3f}")
        output = so8t.get("output")
        if output:
            parts.append(f"max output unsafe {output['max_unsafe']:.3f} at token {output['at_token']}")
        parts.append(f"{so8t.get('scored_tokens', 0)} scored")
    tokens = f"{result.completion_tokens} tokens"
    if result.completion_tokens and result.generation_seconds > 0:
        tokens += (f" in {result.generation_seconds:.2f} s "
                   f"({result.completion_tokens / result.generation_seconds:.1f} tok/s)")
    return f"so8t: {', '.join([head, *parts])}; {tokens}, finish {result.finish_reason}"


def result_json(run: GatedRun, engine: Engine) -> dict:
    """Everything a script wants from one run: the text, the reasoning, why it ended, the so8t object."""
    result = run.result
    seconds = result.generation_seconds
    return {
        "model": engine.model_name,
        "text": result.content,
        "reasoning": result.reasoning,
        "finish_reason": result.finish_reason,
        "tokens": result.completion_tokens,
        "prompt_tokens": result.prompt_tokens,
        "escalate": result.escalate,
        "so8t": result.so8t,
        "timings": {
            "prompt_seconds": round(result.prompt_seconds, 6),
            "generation_seconds": round(seconds, 6),
            "tokens_per_second": round(result.completion_tokens / seconds, 3) if seconds > 0 else None,
        },
    }


# ---------------------------------------------------------------------------------------------- chat
HELP = """\
/system TEXT     set the system prompt (/system alone shows it, /system none removes it)
/thresholds      show the gate's thresholds
/refuse P        refuse a prompt whose P(unsafe) >= P (a probability in [0, 1], or off)
/stop P          stop the answer when a generated token's P(unsafe) >= P
/escalate P      flag a prompt whose P(escalate) >= P
/clear           forget the conversation (the system prompt stays)
/save FILE       write the conversation as JSON (messages as the OpenAI API takes them, plus each turn's gate)
/help            this list
/exit            leave (also /quit, /bye or Ctrl-D)
Lines are sent as they are; a line of three quotes (\"\"\") starts and ends a message of several lines."""

_STAGES = {"/refuse": "refuse_above", "/stop": "stop_above", "/escalate": "escalate_above"}


def parse_threshold(text: str) -> float | None:
    """A probability in [0, 1], or off/none (the stage off). ValueError otherwise."""
    value = text.strip().lower()
    if value in ("off", "none"):
        return None
    try:
        p = float(value)
    except ValueError:
        raise ValueError(f"{text!r} is not a probability in [0, 1] or 'off'") from None
    if not 0.0 <= p <= 1.0:  # NaN fails both comparisons
        raise ValueError(f"{text!r} is not a probability in [0, 1] or 'off'")
    return p


def _threshold_text(value: float | None) -> str:
    return "off" if value is None else f"{value:g}"


class ChatSession:
    """A multi-turn conversation with one engine. The history holds the turns the model saw: user messages and
    assistant messages with their reasoning as ``reasoning_content`` (Qwen3's template drops earlier thinking
    from the prompt). A prompt refused by the input gate never reached the model and is not kept; an answer
    stopped by the output gate is kept as far as it was shown."""

    def __init__(self, engine: Engine, policy: GatePolicy, params: SamplingParams, *, system: str | None = None,
                 show_thinking: bool = True):
        self.engine, self.policy, self.params = engine, policy, params
        self.system = system or None
        self.show_thinking = show_thinking
        self.history: list[dict] = []
        self.turns: list[dict] = []
        self.errors = 0

    # ------------------------------------------------------------------ input
    @staticmethod
    def messages_from(lines: Iterable[str]) -> Iterator[str]:
        """Input lines to messages: a line of three quotes opens and closes a multi-line message."""
        block: list[str] | None = None
        for raw in lines:
            line = raw.rstrip("\r\n")
            if block is not None:
                if line.strip() == '"""':
                    yield "\n".join(block)
                    block = None
                else:
                    block.append(line)
            elif line.strip() == '"""':
                block = []
            else:
                yield line
        if block:
            yield "\n".join(block)

    def run(self, lines: Iterable[str]) -> None:
        for message in self.messages_from(lines):
            if not self.handle(message):
                return

    def error(self, message: str) -> None:
        self.errors += 1
        click.echo(f"Error: {message}", err=True)

    def info(self, message: str) -> None:
        click.echo(click.style(message, dim=True), err=True)

    # ------------------------------------------------------------------ commands
    def handle(self, line: str) -> bool:
        """One line: a slash command or a message. False when the session should end."""
        text = line.strip()
        if not text:
            return True
        if not text.startswith("/"):
            self.turn(line)
            return True
        command, _, arg = text.partition(" ")
        arg = arg.strip()
        command = command.lower()
        if command in ("/exit", "/quit", "/bye"):
            return False
        if command == "/help":
            click.echo(HELP)
        elif command == "/system":
            self._system(arg)
        elif command == "/thresholds":
            self._show_thresholds()
        elif command in _STAGES:
            self._set_threshold(command, arg)
        elif command == "/clear":
            self.history.clear()
            self.info("conversation cleared")
        elif command == "/save":
            self._save(arg)
        else:
            self.error(f"unknown command {command}; /help lists the commands")
        return True

    def _system(self, arg: str) -> None:
        if not arg:
            self.info(f"system prompt: {self.system!r}" if self.system else "no system prompt")
        elif arg.lower() == "none":
            self.system = None
            self.info("system prompt removed")
        else:
            self.system = arg
            self.info("system prompt set")

    def _show_thresholds(self) -> None:
        if not self.engine.has_heads:
            self.info("gate off: the GGUF has no so8t.* heads")
            return
        p = self.policy
        state = "" if p.enabled else " (gate off)"
        self.info(f"refuse_above {_threshold_text(p.refuse_above)}, escalate_above "
                  f"{_threshold_text(p.escalate_above)}, stop_above {_threshold_text(p.stop_above)}, "
                  f"score_every {p.score_every}{state}")

    def _set_threshold(self, command: str, arg: str) -> None:
        if not self.engine.has_heads:
            self.error(f"{command}: the GGUF has no so8t.* heads, so there is no gate to set")
            return
        if not arg:
            self.error(f"{command} needs a probability in [0, 1] or 'off', e.g. {command} 0.8")
            return
        try:
            value = parse_threshold(arg)
        except ValueError as err:
            self.error(f"{command}: {err}")
            return
        self.policy = dataclasses.replace(self.policy, **{_STAGES[command]: value})
        self._show_thresholds()

    def transcript(self) -> dict:
        return {"model": self.engine.model_name, "file": str(self.engine.path), "messages": self._messages(),
                "turns": self.turns}

    def _save(self, arg: str) -> None:
        if not arg:
            self.error("/save needs a file name, e.g. /save chat.json")
            return
        path = Path(arg).expanduser()
        try:
            check_output_path(path, [self.engine.path])
            data = json.dumps(self.transcript(), indent=2, ensure_ascii=False) + "\n"
            write_bytes_atomic(path, data.encode("utf-8"))
        except (OSError, ValueError) as err:
            self.error(f"/save: {err}" if str(path) in str(err) else f"/save {path}: {err}")
            return
        self.info(f"saved {len(self.history)} messages to {path}")

    # ------------------------------------------------------------------ turns
    def _messages(self, extra: list[dict] | None = None) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history + (extra or [])

    def turn(self, text: str) -> None:
        user = {"role": "user", "content": text}
        engine, policy = self.engine, self.policy
        try:
            prompt = engine.render(self._messages([user]))
        except ValueError as err:
            self.error(str(err))
            return
        printer = StreamPrinter(show_thinking=self.show_thinking, thinking_err=False)
        run = GatedRun(engine, policy, prompt, self.params, split_thinking=True)
        try:
            run.start()
        except KeyboardInterrupt:  # during a long prompt's decode
            self.info("(interrupted)")
            return
        except ContextExceededError as err:
            self.error(context_hint(err, engine, "the conversation", "; /clear starts over"))
            return
        except (ValueError, RuntimeError) as err:  # LlamaError is a RuntimeError
            self.error(str(err))
            return
        interrupted = False
        stream = run.stream()
        try:
            for delta in stream:
                printer.write(delta.kind, delta.text)
        except KeyboardInterrupt:  # Ctrl-C ends this answer, not the session
            interrupted = True
        except RuntimeError as err:
            stream.close()
            printer.finish()
            self.error(str(err))
            return
        finally:
            stream.close()
        printer.finish()
        result = run.result
        refused = result.so8t.get("decision") == "refuse"
        if not refused:
            self.history += [user, {"role": "assistant", "content": result.content,
                                    "reasoning_content": result.reasoning}]
        self.turns.append({"user": text, "kept": not refused, "finish_reason": result.finish_reason,
                           "prompt_tokens": result.prompt_tokens, "tokens": result.completion_tokens,
                           "escalate": result.escalate, "so8t": result.so8t,
                           "policy": {k: v for k, v in dataclasses.asdict(policy).items() if k != "refusal"}})
        line = summary_line(result, gate_on=policy.enabled and engine.has_heads, has_heads=engine.has_heads)
        if interrupted:
            line += " (interrupted)"
        if refused:
            line += "; not kept in the history"
        if result.finish_reason == "context":
            line += f"; the context ({engine.n_ctx} tokens) is full: /clear starts over"
        self.info(line)


def read_lines(prompt: str = ">>> ") -> Iterator[str]:
    """Lines from stdin: with line editing and a prompt on a terminal, plain lines from a pipe."""
    stdin = sys.stdin
    if stdin is None:
        return
    if not stdin.isatty():
        yield from stdin
        return
    try:
        import readline  # noqa: F401 - input() gets line editing and history
    except ImportError:
        pass
    while True:
        try:
            yield input(prompt)
        except EOFError:
            click.echo("", err=True)
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt leaves, as Ctrl-D does
            click.echo("", err=True)
            return


def stdin_is_terminal() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()
