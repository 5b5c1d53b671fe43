"""The triality safety gate around one generation: what the heads decide, and what text may leave.

Stages, each switched off by a threshold of None:
- input: P(unsafe) at the prompt's last token >= ``refuse_above`` refuses the request with ``refusal``;
- escalate: P(escalate) at the same token >= ``escalate_above`` flags the response for a human or a bigger
  model (the answer is still generated);
- output: every ``score_every``-th generated token, reasoning included, is scored; the stream stops the moment
  P(unsafe) >= ``stop_above``.

A threshold of ``FROM_FILE`` (every stage's default) is the file's own: so8t.safety_head.threshold for the
input and output stages, so8t.authority_head.threshold for escalation (what train-heads calibrated), 0.5 for a
file without them.

Text is held back until the token that produced it has been scored (with score_every > 1, until the next
scored token), so nothing past a crossing is ever sent. Stop strings and the thinking split work on what
passed the gate: Qwen3-Thinking-2507's prompt already ends in ``<think>``, so its output opens inside the
reasoning and ``</think>`` switches to the answer.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..metadata import DEFAULT_THRESHOLD, SO8TMetadata
from ..thinking import Delta, ThinkingSplitter
from .engine import ContextExceededError, Engine, GenerationEnd, SamplingParams

__all__ = ["FROM_FILE", "Delta", "GatePolicy", "GatedRun"]

DEFAULT_REFUSAL = "I can't help with that request."
FROM_FILE = "file"  # a stage's threshold as the GGUF's so8t.<head>_head.threshold says
_STAGE_HEADS = {"refuse_above": "safety", "escalate_above": "authority", "stop_above": "safety"}


@dataclass(frozen=True)
class GatePolicy:
    refuse_above: float | str | None = FROM_FILE
    escalate_above: float | str | None = FROM_FILE
    stop_above: float | str | None = FROM_FILE
    score_every: int = 1
    refusal: str = DEFAULT_REFUSAL

    @classmethod
    def off(cls) -> GatePolicy:
        return cls(refuse_above=None, escalate_above=None, stop_above=None)

    @property
    def enabled(self) -> bool:
        return any(t is not None for t in (self.refuse_above, self.escalate_above, self.stop_above))

    def resolved(self, metadata: SO8TMetadata | None) -> GatePolicy:
        """FROM_FILE replaced by the file's thresholds (DEFAULT_THRESHOLD without so8t.* metadata)."""
        thresholds = metadata.thresholds if metadata is not None else {}
        return dataclasses.replace(self, **{
            stage: thresholds.get(head, DEFAULT_THRESHOLD)
            for stage, head in _STAGE_HEADS.items() if getattr(self, stage) == FROM_FILE})

    def __post_init__(self):
        for name in _STAGE_HEADS:
            value = getattr(self, name)
            if value is not None and value != FROM_FILE and not (
                    isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} = {value!r}; expected a probability in [0, 1], {FROM_FILE!r} (the "
                                 "file's threshold) or None (stage off)")
        if self.score_every < 1:
            raise ValueError(f"score_every = {self.score_every!r}; expected a positive number of tokens")


@dataclass
class RunResult:
    finish_reason: str = "length"  # stop, length, content_filter, cancelled
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning: str = ""
    content: str = ""
    so8t: dict = field(default_factory=dict)
    escalate: bool = False
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0


class GatedRun:
    """One request: ``start()`` tokenises, checks the context, decodes the prompt and takes the input
    decisions (raising ContextExceededError before anything is sent); ``stream()`` yields the deltas that
    passed the gate; ``result`` is complete once the stream has ended."""

    def __init__(self, engine: Engine, policy: GatePolicy, prompt: str, params: SamplingParams, *,
                 split_thinking: bool = True, cancel: threading.Event | None = None):
        self.engine, self.prompt, self.params = engine, prompt, params
        self.policy = policy.resolved(engine.runtime.metadata)
        self.split_thinking = split_thinking
        self.cancel = cancel or threading.Event()
        self.result = RunResult()
        self._tokens: list[int] = []
        self._refused = False
        self._max_unsafe: tuple[float, int] | None = None
        self._scored = 0

    # ------------------------------------------------------------------ prompt
    def start(self) -> RunResult:
        start = time.perf_counter()
        self._tokens = self.engine.tokenize(self.prompt)
        if len(self._tokens) >= self.engine.n_ctx:  # no room for a single generated token
            raise ContextExceededError(len(self._tokens), self.engine.n_ctx)
        score = self.engine.prefill(self._tokens)
        self.result.prompt_tokens = len(self._tokens)
        self.result.prompt_seconds = time.perf_counter() - start
        self._safety, self._authority = score.safety, score.authority
        if score.safety is not None:
            self._scored = 1
        policy = self.policy
        self._refused = bool(policy.refuse_above is not None and score.safety is not None
                             and score.safety[1] >= policy.refuse_above)
        self.result.escalate = bool(policy.escalate_above is not None and score.authority is not None
                                    and score.authority[1] >= policy.escalate_above)
        self._finish_so8t()
        return self.result

    # ------------------------------------------------------------------ generation
    def stream(self) -> Iterator[Delta]:
        if self._refused:
            self.result.finish_reason = "content_filter"
            self.result.content = self.policy.refusal
            self._finish_so8t()
            yield Delta("content", self.policy.refusal)
            return
        start = time.perf_counter()
        gate_on = self.policy.stop_above is not None and self.engine.has_heads
        end = GenerationEnd()
        splitter = ThinkingSplitter(self.prompt if self.split_thinking else None)
        stops = _StopStrings(self.params.stop)
        held: list[str] = []  # text of tokens not scored yet
        stopped_by_gate = False
        steps = self.engine.generate(self._tokens, self.params,
                                     score_every=self.policy.score_every if gate_on else None,
                                     cancel=self.cancel, end=end)
        try:
            for index, step in enumerate(steps):
                held.append(step.text)
                if step.unsafe is not None:
                    self._scored += 1
                    if self._max_unsafe is None or step.unsafe > self._max_unsafe[0]:
                        self._max_unsafe = (step.unsafe, index)
                    if step.unsafe >= self.policy.stop_above:
                        stopped_by_gate = True
                        # what passed the gate but waited for a possible stop string is still sent
                        yield from self._emit(splitter, stops.flush())
                        break
                if gate_on and step.unsafe is None:
                    continue  # wait for the next scored token
                text, hit = stops.feed("".join(held))
                held.clear()
                yield from self._emit(splitter, text)
                if hit:
                    end.reason = "stop"
                    break
            if not stopped_by_gate and end.reason != "stop":
                # the tail (unscored only when the output gate is off)
                text, hit = stops.feed("".join(held))
                yield from self._emit(splitter, text + ("" if hit else stops.flush()))
                if hit:
                    end.reason = "stop"
            yield from self._emit_final(splitter)
        finally:
            steps.close()  # a client that went away stops llama.cpp here
            self.result.completion_tokens = len(end.tokens)
            self.result.generation_seconds = time.perf_counter() - start
            self.result.finish_reason = "content_filter" if stopped_by_gate else end.reason
            self._finish_so8t(stopped_by_gate, output_ran=gate_on)

    def _emit(self, splitter: ThinkingSplitter, text: str) -> Iterator[Delta]:
        for delta in splitter.feed(text):
            self._record(delta)
            yield delta

    def _emit_final(self, splitter: ThinkingSplitter) -> Iterator[Delta]:
        for delta in splitter.flush():
            self._record(delta)
            yield delta

    def _record(self, delta: Delta) -> None:
        if delta.kind == "reasoning":
            self.result.reasoning += delta.text
        else:
            self.result.content += delta.text

    # ------------------------------------------------------------------ the so8t object
    def _finish_so8t(self, stopped: bool = False, output_ran: bool = False) -> None:
        labels = self.engine.runtime.metadata.heads if self.engine.has_heads else None
        so8t: dict = {"safety": None, "authority": None}
        if labels is not None and self._safety is not None:
            so8t["safety"] = {label: float(p) for label, p in zip(labels["safety"][2], self._safety)}
            so8t["authority"] = {label: float(p) for label, p in zip(labels["authority"][2], self._authority)}
        if output_ran and self._max_unsafe is not None:
            so8t["output"] = {"max_unsafe": self._max_unsafe[0], "at_token": self._max_unsafe[1]}
        if self._refused:
            decision, stage = "refuse", "input"
        elif stopped:
            decision, stage = "stop", "output"
        elif self.result.escalate:
            decision, stage = "escalate", "input"
        else:
            decision, stage = "allow", "output" if output_ran else "input"
        # escalate also stands on its own: a refused or stopped request can be one to escalate too
        so8t.update(decision=decision, stage=stage, scored_tokens=self._scored, escalate=self.result.escalate)
        self.result.so8t = so8t


class _StopStrings:
    """Cuts the text at the first stop string; holds back a tail that could be the start of one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.keep = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""

    def feed(self, text: str) -> tuple[str, bool]:
        self.buffer += text
        if not self.stops:
            out, self.buffer = self.buffer, ""
            return out, False
        cut = min((self.buffer.find(s) for s in self.stops if s in self.buffer), default=-1)
        if cut >= 0:
            out, self.buffer = self.buffer[:cut], ""
            return out, True
        safe = len(self.buffer) - self.keep
        out, self.buffer = self.buffer[:max(safe, 0)], self.buffer[max(safe, 0):]
        return out, False

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out
