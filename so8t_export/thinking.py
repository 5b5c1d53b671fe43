"""Reasoning and answer of a Qwen3-Thinking completion, split as it streams.

Qwen3-4B-Thinking-2507's generation prompt already ends in ``<think>``, so a completion reads
``reasoning</think>answer``; without ``</think>`` the model is still thinking and the answer is empty. The
split works on text as it arrives in pieces of any size (a tag may span pieces), and ``split_thinking`` is the
same split on a whole text. No torch: the runtime and the server use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["THINK_END", "THINK_START", "Delta", "ThinkingSplitter", "split_thinking"]

THINK_START, THINK_END = "<think>", "</think>"


@dataclass
class Delta:
    kind: str  # "reasoning" or "content"
    text: str


class ThinkingSplitter:
    """Reasoning until ``</think>``, answer after it. The output opens inside the reasoning when the prompt
    ends in ``<think>`` (Qwen3-Thinking-2507's generation prompt); otherwise a leading ``<think>`` opens it.
    prompt None: no split, everything is content."""

    def __init__(self, prompt: str | None):
        self.enabled = prompt is not None
        opened = prompt is not None and prompt.rstrip().endswith(THINK_START)
        self.state = "reasoning-start" if opened else "start"
        self.buffer = ""

    def feed(self, text: str) -> Iterator[Delta]:
        if not self.enabled:
            if text:
                yield Delta("content", text)
            return
        self.buffer += text
        while self.buffer:
            if self.state in ("start", "reasoning-start"):
                # "start": a leading <think> opens the reasoning; "reasoning-start": a model may open its
                # reasoning again, and that <think> is dropped
                opening = _opening(self.buffer)
                if opening == "wait":
                    return
                if opening == "tag":
                    self.buffer = self.buffer.lstrip()[len(THINK_START):]
                    self.state = "reasoning-start" if self.state == "start" else "reasoning"
                else:
                    self.state = "content" if self.state == "start" else "reasoning"
            elif self.state == "reasoning":
                at = self.buffer.find(THINK_END)
                if at >= 0:
                    if at:
                        yield Delta("reasoning", self.buffer[:at])
                    self.buffer, self.state = self.buffer[at + len(THINK_END):], "answer-start"
                    continue
                keep = _partial_suffix(self.buffer, THINK_END)
                if len(self.buffer) > keep:
                    yield Delta("reasoning", self.buffer[:len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep:]
                return
            elif self.state == "answer-start":
                stripped = self.buffer.lstrip("\n")
                if not stripped:
                    self.buffer = ""
                    return
                self.buffer, self.state = stripped, "content"
            else:
                yield Delta("content", self.buffer)
                self.buffer = ""

    def flush(self) -> Iterator[Delta]:
        if self.buffer:
            kind = "reasoning" if self.state.startswith("reasoning") else "content"
            if self.state != "answer-start":
                yield Delta(kind, self.buffer)
        self.buffer = ""


OPENING_WHITESPACE = 16  # how much leading whitespace may stand before a <think> that opens the text


def _opening(text: str) -> str:
    """Whether text opens with <think> ("tag"), cannot ("none"), or may still ("wait"). Decided on the first
    OPENING_WHITESPACE + 7 characters alone, so the answer does not depend on how the text is cut, and a
    model that writes only newlines is not held back for long."""
    stripped = text.lstrip()
    if len(text) - len(stripped) > OPENING_WHITESPACE:
        return "none"
    if stripped.startswith(THINK_START):
        return "tag"
    return "wait" if THINK_START.startswith(stripped) else "none"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of text that is a proper beginning of tag."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def split_thinking(text: str, prompt_opens_thinking: bool = True) -> tuple[str, str]:
    """(reasoning, answer) of a whole completion, both stripped."""
    splitter = ThinkingSplitter(THINK_START if prompt_opens_thinking else "")
    parts = {"reasoning": "", "content": ""}
    for delta in [*splitter.feed(text), *splitter.flush()]:
        parts[delta.kind] += delta.text
    return parts["reasoning"].strip(), parts["content"].strip()
