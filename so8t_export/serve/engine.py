"""One llama.cpp context serving an SO8T GGUF: chat template, prompt scoring and streamed generation, with
the safety/authority heads applied to the final normed hidden state that llama.cpp computes anyway.

Cost of scoring. In embeddings mode llama.cpp makes every token of a batch an output (full-vocabulary logits
and a hidden state each), so a long prompt would pay for logits nobody reads. Embeddings are therefore
switched off (``llama_set_embeddings``) for the body of the prompt, which then has one output per batch, and on
for its last token and for each generated token, which are decoded one at a time anyway: a score costs one
(2 x hidden) matrix-vector product.

Generation uses llama-cpp-python's own ``Llama.generate`` (its sampler chain: temperature, top_k, top_p,
min_p, repeat penalty, seed). It finds the prompt cached with live logits and samples at once; each token it
yields was sampled from the previous decode, so the hidden state read when token k arrives is the one after
token k-1, and the last token is decoded once more when its score is wanted.

Nothing here imports torch, so the server starts fast.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..gguf_file import read_gguf_header
from ..runtime import LlamaError, PromptTooLongError, SO8TRuntime, render_messages, softmax

__all__ = ["ContextExceededError", "Engine", "SamplingParams", "Step"]

class ContextExceededError(PromptTooLongError):
    """A prompt that does not fit the context (llama-server's exceed_context_size_error)."""

    def __init__(self, n_prompt_tokens: int, n_ctx: int):
        super().__init__(f"the request has {n_prompt_tokens} prompt tokens, more than the context holds "
                         f"(n_ctx = {n_ctx})")
        self.n_prompt_tokens, self.n_ctx = n_prompt_tokens, n_ctx


@dataclass(frozen=True)
class SamplingParams:
    """Qwen3-4B-Thinking-2507's recommended defaults (generation_config.json)."""

    max_tokens: int = 1024
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Step:
    """One generated token: its id, its text (possibly empty while a UTF-8 character is incomplete), and
    P(unsafe) of the hidden state after it when it was scored (None when not scored)."""

    token: int
    text: str
    unsafe: float | None = None


@dataclass
class PromptScore:
    """Head probabilities at the prompt's last token; None for a GGUF without so8t.* heads."""

    n_tokens: int
    safety: np.ndarray | None  # [2] safe, unsafe
    authority: np.ndarray | None  # [2] handle, escalate


@dataclass
class GenerationEnd:
    """Why generation ended: 'stop' (end-of-turn token), 'length' (max_tokens) or 'context' (n_ctx full)."""

    reason: str = "length"
    tokens: list[int] = field(default_factory=list)


class Engine:
    """A GGUF written by so8t-export (or a stock qwen3 GGUF when the gate is off) in one llama.cpp context.

    Not thread-safe: one request at a time, which the server's queue guarantees.
    """

    def __init__(self, gguf_path: str | Path, *, n_ctx: int | None = None, n_threads: int | None = None,
                 n_batch: int | None = None, require_heads: bool = True, verbose: bool | None = None,
                 f32_kv_cache: bool | None = None):
        self.path = Path(gguf_path)
        header = read_gguf_header(self.path)
        # SO8TRuntime validates the file (qwen3.*, so8t.*, templates) and loads it; serving needs only the
        # last output of each decode, so its logits are not kept for every position.
        self.runtime = SO8TRuntime(self.path, n_ctx=n_ctx, n_threads=n_threads, n_batch=n_batch, reader=header,
                                   verbose=verbose, all_logits=False, f32_kv_cache=f32_kv_cache)
        if require_heads and not self.runtime.has_heads:
            raise LlamaError(f"{self.path}: no so8t.* metadata, so no safety/authority heads to gate with; "
                             "serve it with the gate off (--no-gate) or export it with so8t-export")
        self.llm = self.runtime.llm
        self.n_ctx = self.runtime.n_ctx
        self.chat_template = self.runtime.chat_template
        self.model_name = self.path.stem
        self._llama_cpp = self.runtime._llama_cpp
        self._embd = self.llm.n_embd()
        self._vocab = self._llama_cpp.llama_model_get_vocab(self.llm._model.model)

    # ------------------------------------------------------------------ text
    @property
    def has_heads(self) -> bool:
        return self.runtime.has_heads

    def tokenize(self, text: str) -> list[int]:
        return self.runtime.tokenize(text)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.runtime.detokenize(list(tokens))

    def render(self, messages: list[dict], *, tools: list | None = None, add_generation_prompt: bool = True,
               **template_kwargs) -> str:
        """The GGUF's chat template on messages (system, user, assistant with earlier reasoning, tool)."""
        return render_messages(self.runtime, messages, tools=tools, add_generation_prompt=add_generation_prompt,
                               **template_kwargs)

    def is_end_of_turn(self, token: int) -> bool:
        """llama.cpp's end-of-generation set (EOS, EOT and the tokens its vocab marks so: <|im_end|> and
        <|endoftext|> for Qwen3), as llama-server stops on."""
        return bool(self._llama_cpp.llama_vocab_is_eog(self._vocab, token))

    # ------------------------------------------------------------------ scoring
    def heads(self, hidden: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(safety, authority) probabilities of hidden states [n, hidden]."""
        return self.runtime.heads(hidden)

    def _last_hidden(self) -> np.ndarray:
        pointer = self._llama_cpp.llama_get_embeddings_ith(self.llm._ctx.ctx, -1)
        if not pointer:
            raise LlamaError(f"{self.path}: llama.cpp returned no hidden state for the last token")
        return np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)),
                                     shape=(self._embd,)).copy()

    def _set_embeddings(self, on: bool) -> None:
        self._llama_cpp.llama_set_embeddings(self.llm._ctx.ctx, on)

    def prefill(self, tokens: list[int]) -> PromptScore:
        """Decode the prompt from an empty cache and score its last token."""
        hidden = self.prefill_hidden(tokens)
        safety, authority = self.heads(hidden[None]) if self.has_heads else (None, None)
        return PromptScore(len(tokens), None if safety is None else safety[0],
                           None if authority is None else authority[0])

    def prefill_hidden(self, tokens: list[int]) -> np.ndarray:
        """Decode the prompt from an empty cache; the final normed hidden state of its last token [hidden]."""
        if not tokens:
            raise ValueError("the prompt is empty (0 tokens)")
        if len(tokens) > self.n_ctx:
            raise ContextExceededError(len(tokens), self.n_ctx)
        self.llm.reset()
        if len(tokens) > 1:
            self._set_embeddings(False)  # one output per batch: no logits or hidden states for the body
            try:
                self.runtime.decode(tokens[:-1])
            finally:
                self._set_embeddings(True)
        self.runtime.decode(tokens[-1:])
        return self._last_hidden()

    def score_texts(self, texts: Sequence[str]) -> list[PromptScore]:
        """Head probabilities of each text at its last token, with no generation (/v1/moderations)."""
        return [self.prefill(self.tokenize(text) or [self.llm.token_eos()]) for text in texts]

    # ------------------------------------------------------------------ generation
    def generate(self, tokens: list[int], params: SamplingParams, *, score_every: int | None = 1,
                 cancel: threading.Event | None = None, end: GenerationEnd | None = None) -> Iterator[Step]:
        """Steps after the prompt that ``prefill(tokens)`` has just decoded. score_every: apply the safety
        head to every n-th generated token's hidden state (None: never). Ends at an end-of-turn token,
        max_tokens, a full context or cancel; ``end`` (if given) receives why. Stop strings are the caller's
        (they span tokens)."""
        end = end if end is not None else GenerationEnd()
        room = self.n_ctx - len(tokens) + 1  # every generated token but the last is decoded into the cache
        limit = min(params.max_tokens, room)
        end.reason = "length" if limit == params.max_tokens else "context"
        if limit <= 0:
            return
        self.llm.set_seed(params.seed if params.seed is not None else np.random.randint(0, 2**31 - 1))
        stream = self.llm.generate(tokens, temp=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                   min_p=params.min_p, repeat_penalty=params.repeat_penalty, reset=True)
        decoder = _Utf8Decoder(self.llm)
        previous: Step | None = None
        with self.runtime.decode_errors():
            try:
                for index, token in enumerate(stream):
                    last = self.is_end_of_turn(token) or (cancel is not None and cancel.is_set())
                    if previous is not None:  # the hidden state after the previous token is live now
                        # the last text token is scored whatever the stride: nothing leaves unscored
                        yield self._scored(previous, index - 1, score_every, force=last)
                        previous = None
                    if cancel is not None and cancel.is_set():
                        end.reason = "cancelled"
                        return
                    if self.is_end_of_turn(token):
                        end.reason = "stop"
                        return
                    end.tokens.append(token)
                    step = Step(token, decoder.add(token))
                    if len(end.tokens) >= limit:
                        # generate() would decode it only when asked for the next token: decode it here
                        # when its score is wanted, then stop.
                        if score_every is not None and self.llm.n_tokens < self.n_ctx:
                            self.runtime.decode([token])
                            step = self._scored(step, len(end.tokens) - 1, score_every, force=True)
                        yield step
                        return
                    previous = step
            finally:
                stream.close()
        if previous is not None:
            yield previous

    def _scored(self, step: Step, index: int, score_every: int | None, force: bool = False) -> Step:
        if self.has_heads and score_every is not None and (force or _wanted(score_every, index)):
            safety, _ = self.heads(self._last_hidden()[None])
            step.unsafe = float(safety[0, 1])
        return step


def _wanted(score_every: int | None, index: int) -> bool:
    return score_every is not None and score_every > 0 and index % score_every == score_every - 1


class _Utf8Decoder:
    """Token bytes to text for a stream: a character split across tokens is emitted whole, with the token that
    completes it."""

    def __init__(self, llm):
        self.llm, self.pending = llm, b""

    def add(self, token: int) -> str:
        data = self.pending + self.llm.detokenize([token], special=True)
        for cut in range(len(data), max(len(data) - 4, -1), -1):
            try:
                text = data[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            self.pending = data[cut:]
            return text
        self.pending = b""
        return data.decode("utf-8", errors="replace")


__all__ += ["GenerationEnd", "PromptScore", "softmax"]
