"""The SO8T runtime on stock llama.cpp: generation plus safety and authority scores from the GGUF alone.

llama.cpp runs the exported file as a plain qwen3 model. With embeddings on and pooling NONE, one decode
returns both the logits and the final normed hidden state of every token; the two classification heads
are read back from the file's so8t.* metadata and applied to that hidden state here, in numpy.

A stock qwen3 GGUF (no so8t.* keys) runs too, without head scores (``SO8TRuntime.metadata`` is None).

The file's metadata is read once (``gguf_file.read_gguf_header``: structure, the qwen3.* hyperparameters
llama.cpp would abort on, the so8t.* schema, the chat templates) before llama.cpp sees it, without gguf-py's
slow GGUFReader. The context holds ``n_ctx`` tokens (default ``default_ctx_size``): a longer prompt is
refused with both numbers, and generation stops at the context's end instead of failing in ``llama_decode``.
llama.cpp's log lines go through ``llama_log`` (quiet unless verbose; its errors end up in our messages).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from . import llama_log
from .gguf_file import (
    GGUFHeader,
    MetadataError,
    Qwen3Hparams,
    read_gguf_header,
    read_qwen3_hparams,
    scalar_value,
)
from .metadata import SO8TMetadata, read_optional_so8t_metadata

DEFAULT_MAX_CTX = 4096  # the default context: min(this, qwen3.context_length)
MAX_BATCH = 512  # tokens per decode; llama.cpp's logits buffer is n_batch x n_vocab floats (311 MB at 512)


class PromptTooLongError(ValueError):
    """A prompt with more tokens than the context holds."""


class LlamaError(RuntimeError):
    """llama.cpp refused the file or failed to decode; the message carries llama.cpp's own error lines."""


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as err:  # a dependency, but a broken build should read clearly
        raise LlamaError("llama-cpp-python is not importable; install so8t-export's dependencies "
                         f"(pip install -e .): {err}") from None
    return llama_cpp


def softmax(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64) - x.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def default_ctx_size(hparams: Qwen3Hparams) -> int:
    """min(DEFAULT_MAX_CTX, qwen3.context_length): the KV cache of Qwen3-4B is 144 KiB per token in f16."""
    return min(DEFAULT_MAX_CTX, hparams.context_length)


@dataclass
class Evaluation:
    tokens: list[int]
    logits: np.ndarray  # [n, vocab] float32
    hidden: np.ndarray  # [n, hidden] float32, after output_norm
    safety: np.ndarray | None  # [n, 2] probabilities (safe, unsafe); None without so8t.* heads
    authority: np.ndarray | None  # [n, 2] probabilities (handle, escalate)


@dataclass
class Completion:
    prompt_tokens: int
    tokens: list[int]
    text: str
    safety: np.ndarray | None  # [2] probabilities at the last prompt token; None without so8t.* heads
    authority: np.ndarray | None  # [2]
    finish_reason: str = "stop"  # "stop" (end-of-generation token), "length" (max_tokens), "context" (n_ctx)

    @property
    def unsafe(self) -> float | None:
        return None if self.safety is None else float(self.safety[1])

    @property
    def escalate(self) -> float | None:
        return None if self.authority is None else float(self.authority[1])


class SO8TRuntime:
    """A GGUF written by so8t-export (or a stock qwen3 GGUF), run by llama.cpp, with the heads applied to its
    hidden states.

    reader: gguf_path's metadata if the caller has read it already (``gguf_file.read_gguf_header``, or a
    ``gguf.GGUFReader`` from ``gguf_file.open_gguf``), so that it is not read twice. verbose: show
    llama.cpp's log lines (None keeps the process's current choice, see ``llama_log``; quiet by default).
    n_batch: tokens per decode (default min(n_ctx, MAX_BATCH)). all_logits: keep every position's logits in
    ``llm.scores`` (parity needs them; serving reads only the last output of each decode).
    """

    def __init__(self, gguf_path: str | Path, *, n_ctx: int | None = None, f32_kv_cache: bool | None = None,
                 n_threads: int | None = None, seed: int = 0,
                 reader: GGUFHeader | gguf.GGUFReader | None = None, verbose: bool | None = None,
                 n_batch: int | None = None, all_logits: bool = True):
        self.path = Path(gguf_path)
        self._heads: tuple[np.ndarray, np.ndarray] | None = None
        if reader is None:
            reader = read_gguf_header(self.path)
        self.hparams: Qwen3Hparams = read_qwen3_hparams(reader, self.path)
        # The rotations are folded into the tensors already and play no part at run time; their triality
        # check needs torch, which the runtime never imports (so8t-export inspect checks them).
        self.metadata: SO8TMetadata | None = read_optional_so8t_metadata(reader, self.path, self.hparams,
                                                                         check_rotations=False)
        self.chat_template: str | None = scalar_value(reader, "tokenizer.chat_template", self.path,
                                                      (gguf.GGUFValueType.STRING,), required=False)
        templates = {key: scalar_value(reader, key, self.path, (gguf.GGUFValueType.STRING,))
                     for key in reader.fields if key.startswith("tokenizer.chat_template")}
        if f32_kv_cache is None:
            # llama.cpp's default cache is f16; an f32 file is chosen for exactness, and f16 keys and values
            # alone move its hidden states by ~2e-4 relative (head probabilities by up to ~1e-3).
            file_type = scalar_value(reader, "general.file_type", self.path, (gguf.GGUFValueType.UINT32,),
                                     required=False)
            f32_kv_cache = file_type == gguf.LlamaFileType.ALL_F32
        self.f32_kv_cache = f32_kv_cache
        del reader  # not kept: llama.cpp reads the file itself
        n_ctx = default_ctx_size(self.hparams) if n_ctx is None else n_ctx
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
            raise ValueError(f"n_ctx = {n_ctx!r}; expected a positive number of tokens")
        n_batch = min(n_ctx, MAX_BATCH) if n_batch is None else n_batch
        if isinstance(n_batch, bool) or not isinstance(n_batch, int) or not 1 <= n_batch <= n_ctx:
            raise ValueError(f"n_batch = {n_batch!r}; expected 1..n_ctx = {n_ctx}")
        self.n_ctx, self.n_batch = n_ctx, n_batch
        llama_cpp = _llama_cpp()
        _check_templates(self.path, templates)
        if verbose is not None:
            llama_log.set_verbose(verbose)
        llama_log.install()
        kv_type = llama_cpp.GGML_TYPE_F32 if f32_kv_cache else llama_cpp.GGML_TYPE_F16
        with llama_log.collect_errors() as errors:
            try:
                # Every position's logits (parity needs them) and hidden state (embeddings, pooling NONE).
                self.llm = llama_cpp.Llama(str(self.path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                                           embedding=True, logits_all=all_logits,
                                           pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE, type_k=kv_type,
                                           type_v=kv_type, n_threads=n_threads, seed=seed,
                                           verbose=llama_log.is_verbose())
            except Exception as err:  # noqa: BLE001 - llama-cpp-python raises ValueError, RuntimeError, ...
                reason = llama_log.summary(errors) or f"{type(err).__name__}: {err}"
                raise LlamaError(f"{self.path}: llama.cpp could not load the file: {reason}") from None
        self._llama_cpp = llama_cpp

    @property
    def has_heads(self) -> bool:
        return self.metadata is not None

    def tokenize(self, text: str) -> list[int]:
        """Special tokens (<|im_start|>, ...) are parsed, and no BOS is added: Qwen3's tokenizer does the same."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def detokenize(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", errors="replace")

    def heads(self, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
        """(safety, authority) probabilities of hidden states [n, hidden]; (None, None) without so8t.* heads."""
        if self.metadata is None:
            return None, None
        if self._heads is None:  # both heads as one (4, hidden) matrix, in float64, made once
            weights, biases, _ = zip(*(self.metadata.heads[head] for head in ("safety", "authority")))
            self._heads = (np.concatenate(weights).astype(np.float64), np.concatenate(biases).astype(np.float64))
        weight, bias = self._heads
        logits = (np.asarray(hidden, dtype=np.float64) @ weight.T + bias).reshape(-1, 2, 2)
        probabilities = softmax(logits)
        return probabilities[:, 0], probabilities[:, 1]

    def _check_fits(self, n: int) -> None:
        if n == 0:
            raise ValueError("the prompt is empty (0 tokens)")
        if n > self.n_ctx:
            raise PromptTooLongError(
                f"the prompt has {n} tokens, more than the context holds (n_ctx = {self.n_ctx} tokens); "
                f"raise it with --ctx-size (the model was trained on qwen3.context_length = "
                f"{self.hparams.context_length})")

    def decode(self, tokens: list[int]) -> None:
        """Decode tokens after the cache's contents (n_batch at a time); llama.cpp's errors as LlamaError."""
        with self.decode_errors():
            self.llm.eval(tokens)

    @contextlib.contextmanager
    def decode_errors(self):
        """llama_decode's non-zero return (a RuntimeError from llama-cpp-python) as one LlamaError line,
        with the reason llama.cpp logged."""
        with llama_log.collect_errors() as errors:
            try:
                yield
            except RuntimeError as err:
                reason = llama_log.summary(errors)
                detail = f" ({reason})" if reason else ""
                raise LlamaError(f"{self.path}: llama.cpp failed to decode: {err}{detail}") from None

    def _prefill(self, tokens: list[int], *, all_hidden: bool) -> np.ndarray:
        """Decode tokens from an empty cache, n_batch at a time; the hidden states of every position
        (all_hidden) or of the last one, [n or 1, hidden]."""
        self._check_fits(len(tokens))
        self.llm.reset()
        n_embd = self.llm.n_embd()
        hidden = []
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            self.decode(chunk)  # one decode: chunk fits n_batch
            if all_hidden or start + self.n_batch >= len(tokens):
                pointer = self._llama_cpp.llama_get_embeddings(self.llm._ctx.ctx)
                rows = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)),
                                             shape=(len(chunk), n_embd))
                hidden.append(rows.copy() if all_hidden else rows[-1:].copy())
        return np.concatenate(hidden) if all_hidden else hidden[-1]

    def evaluate(self, tokens: list[int]) -> Evaluation:
        """Logits and hidden states of every position of one sequence (n_batch tokens per decode)."""
        if not tokens:
            raise ValueError("evaluate: empty token list")
        hidden = self._prefill(list(tokens), all_hidden=True)
        logits = np.array(self.llm.scores[:len(tokens)], dtype=np.float32)
        safety, authority = self.heads(hidden)
        return Evaluation(list(tokens), logits, hidden, safety, authority)

    def greedy(self, tokens: list[int], max_new_tokens: int, stop: set[int] = frozenset()) -> list[int]:
        """Greedy continuation: argmax of llama.cpp's logits, one token per decode against its KV cache;
        stops at a stop token, after max_new_tokens, or when the context is full."""
        self._check_fits(len(tokens))
        self.llm.reset()
        self.decode(list(tokens))
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(nxt)
            if nxt in stop or self.llm.n_tokens >= self.n_ctx:
                break
            self.decode([nxt])
        return out

    def complete(self, prompt: str, *, max_tokens: int = 128, temperature: float = 0.6, top_p: float = 0.95,
                 top_k: int = 20, seed: int = 0) -> Completion:
        """Sampled completion (Qwen3 thinking defaults) plus head scores of the prompt's last token.

        At most max_tokens tokens, and at most as many as the context has room for: the prompt's n tokens
        and every generated token but the last must fit in n_ctx, so up to n_ctx - n + 1 tokens."""
        tokens = self.tokenize(prompt)
        last_hidden = self._prefill(tokens, all_hidden=False)  # the prompt stays in the cache for generate
        safety, authority = self.heads(last_hidden)
        eos = {self.llm.token_eos()} | ({self.llm.token_eot()} if hasattr(self.llm, "token_eot") else set())
        room = self.n_ctx - len(tokens) + 1
        limit = min(max_tokens, room)
        self.llm.set_seed(seed)
        generated: list[int] = []
        reason = "length"
        if limit > 0:
            # generate() finds the whole prompt cached with live logits and samples without decoding it again.
            stream = self.llm.generate(tokens, temp=temperature, top_p=top_p, top_k=top_k, reset=True)
            with self.decode_errors():
                try:
                    for token in stream:
                        if token in eos:
                            reason = "stop"
                            break
                        generated.append(token)
                        if len(generated) >= limit:  # stop before generate() decodes this token
                            reason = "length" if len(generated) >= max_tokens else "context"
                            break
                finally:
                    stream.close()
        return Completion(len(tokens), generated, self.detokenize(generated),
                          None if safety is None else safety[-1],
                          None if authority is None else authority[-1], finish_reason=reason)


def _check_templates(path: Path, templates: dict[str, str]) -> None:
    """Compile every tokenizer.chat_template* the way llama-cpp-python does: Llama() compiles them all when
    it loads a model (chat API used or not), and a syntax error would escape as a jinja2 traceback."""
    import jinja2
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    for key, template in templates.items():
        try:
            Jinja2ChatFormatter(template, eos_token="", bos_token="")
        except jinja2.TemplateError as err:
            where = f" (line {err.lineno})" if getattr(err, "lineno", None) else ""
            raise MetadataError(f"{path}: {key} is not a valid Jinja template: {err}{where}") from None


def render_chat_prompt(runtime: SO8TRuntime, prompt: str, system: str | None = None) -> str:
    """The GGUF's own tokenizer.chat_template applied to one user turn (and a system prompt)."""
    messages = [{"role": "system", "content": system}] if system else []
    return render_messages(runtime, messages + [{"role": "user", "content": prompt}])


@functools.lru_cache(maxsize=8)
def _chat_formatter(template: str, add_generation_prompt: bool):
    """Compiled once per template: a server renders every request with the same one."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    return Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="",
                               add_generation_prompt=add_generation_prompt)


def render_messages(runtime: SO8TRuntime, messages: list[dict], *, tools: list | None = None,
                    add_generation_prompt: bool = True, **template_kwargs) -> str:
    """The GGUF's own tokenizer.chat_template on a conversation, rendered as llama-cpp-python renders it
    (jinja2 sandbox, raise_exception, strftime_now): Qwen3's template takes system, user, assistant (with
    reasoning_content for earlier thinking) and tool messages, and tools."""
    import jinja2

    if runtime.chat_template is None:
        raise MetadataError(f"{runtime.path}: metadata key tokenizer.chat_template is missing; use --raw to "
                            "send the prompt as is")
    try:
        formatter = _chat_formatter(runtime.chat_template, add_generation_prompt)
        return formatter(messages=messages, tools=tools, **template_kwargs).prompt
    except (jinja2.TemplateError, TypeError, ValueError) as err:  # raise_exception(), a bad filter argument
        raise MetadataError(f"{runtime.path}: tokenizer.chat_template does not render: "
                            f"{type(err).__name__}: {err}") from None


def chat(runtime: SO8TRuntime, prompt: str, *, system: str | None = None, raw: bool = False,
         max_tokens: int = 256, temperature: float = 0.6, seed: int = 0) -> dict:
    """One chat turn through the GGUF's own chat template; returns reasoning, answer and head scores
    (safety and authority are None for a GGUF without so8t.* heads)."""
    from .thinking import split_thinking

    if not raw:
        prompt = render_chat_prompt(runtime, prompt, system)
    completion = runtime.complete(prompt, max_tokens=max_tokens, temperature=temperature, seed=seed)
    reasoning, answer = split_thinking(completion.text)
    scores = {}
    for head, probabilities in (("safety", completion.safety), ("authority", completion.authority)):
        if probabilities is None:
            scores[head] = None
        else:
            labels = runtime.metadata.heads[head][2]
            scores[head] = {label: round(float(p), 4) for label, p in zip(labels, probabilities)}
    return {
        "completion": completion.text,
        "reasoning": reasoning,
        "answer": answer,
        "safety": scores["safety"],
        "authority": scores["authority"],
        "tokens": len(completion.tokens),
        "finish_reason": completion.finish_reason,
    }
