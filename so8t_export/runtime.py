"""The SO8T runtime on stock llama.cpp: generation plus safety and authority scores from the GGUF alone.

llama.cpp runs the exported file as a plain qwen3 model. With embeddings on and pooling NONE, one decode
returns both the logits and the final normed hidden state of every token; the two classification heads
are read back from the file's so8t.* metadata and applied to that hidden state here, in numpy.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .metadata import SO8TMetadata, read_so8t_metadata


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as err:  # a dependency, but a broken build should read clearly
        raise RuntimeError("llama-cpp-python is not importable; install so8t-export's dependencies "
                           f"(pip install -e .): {err}") from None
    return llama_cpp


def softmax(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64) - x.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


@dataclass
class Evaluation:
    tokens: list[int]
    logits: np.ndarray  # [n, vocab] float32
    hidden: np.ndarray  # [n, hidden] float32, after output_norm
    safety: np.ndarray  # [n, 2] probabilities (safe, unsafe)
    authority: np.ndarray  # [n, 2] probabilities (handle, escalate)


@dataclass
class Completion:
    prompt_tokens: int
    tokens: list[int]
    text: str
    safety: np.ndarray  # [2] probabilities at the last prompt token
    authority: np.ndarray  # [2]

    @property
    def unsafe(self) -> float:
        return float(self.safety[1])

    @property
    def escalate(self) -> float:
        return float(self.authority[1])


class SO8TRuntime:
    """A GGUF written by so8t-export, run by llama.cpp, with the heads applied to its hidden states."""

    def __init__(self, gguf_path: str | Path, *, n_ctx: int = 2048, f32_kv_cache: bool = False,
                 n_threads: int | None = None, seed: int = 0):
        self.path = Path(gguf_path)
        self.metadata: SO8TMetadata = read_so8t_metadata(gguf.GGUFReader(self.path), self.path)
        llama_cpp = _llama_cpp()
        kv_type = llama_cpp.GGML_TYPE_F32 if f32_kv_cache else llama_cpp.GGML_TYPE_F16
        # n_batch = n_ctx so that a whole prompt is one decode and its embeddings are all still readable.
        self.llm = llama_cpp.Llama(str(self.path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, embedding=True,
                                   logits_all=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE,
                                   type_k=kv_type, type_v=kv_type, n_threads=n_threads, seed=seed, verbose=False)
        self._llama_cpp = llama_cpp

    def tokenize(self, text: str) -> list[int]:
        """Special tokens (<|im_start|>, ...) are parsed, and no BOS is added: Qwen3's tokenizer does the same."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def detokenize(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", errors="replace")

    def heads(self, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(safety, authority) probabilities of hidden states [n, hidden]."""
        out = []
        for head in ("safety", "authority"):
            weight, bias, _ = self.metadata.heads[head]
            out.append(softmax(hidden.astype(np.float64) @ weight.T.astype(np.float64) + bias))
        return out[0], out[1]

    def evaluate(self, tokens: list[int]) -> Evaluation:
        """Logits and hidden states of every position of one sequence, from a single decode."""
        if not tokens:
            raise ValueError("evaluate: empty token list")
        if len(tokens) > self.llm.n_ctx():
            raise ValueError(f"evaluate: {len(tokens)} tokens exceed n_ctx={self.llm.n_ctx()}")
        self.llm.reset()
        self.llm.eval(tokens)
        n = len(tokens)
        logits = np.array(self.llm.scores[:n], dtype=np.float32)
        pointer = self._llama_cpp.llama_get_embeddings(self.llm._ctx.ctx)
        hidden = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)),
                                       shape=(n, self.llm.n_embd())).copy()
        safety, authority = self.heads(hidden)
        return Evaluation(list(tokens), logits, hidden, safety, authority)

    def greedy(self, tokens: list[int], max_new_tokens: int, stop: set[int] = frozenset()) -> list[int]:
        """Greedy continuation: argmax of llama.cpp's logits, one token per decode against its KV cache."""
        self.llm.reset()
        self.llm.eval(tokens)
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(nxt)
            if nxt in stop:
                break
            self.llm.eval([nxt])
        return out

    def complete(self, prompt: str, *, max_tokens: int = 128, temperature: float = 0.6, top_p: float = 0.95,
                 top_k: int = 20, seed: int = 0) -> Completion:
        """Sampled completion (Qwen3 thinking defaults) plus head scores of the prompt's last token."""
        tokens = self.tokenize(prompt)
        scored = self.evaluate(tokens)
        eos = {self.llm.token_eos()} | ({self.llm.token_eot()} if hasattr(self.llm, "token_eot") else set())
        self.llm.set_seed(seed)
        generated: list[int] = []
        for token in self.llm.generate(tokens, temp=temperature, top_p=top_p, top_k=top_k, reset=True):
            if token in eos or len(generated) >= max_tokens:
                break
            generated.append(token)
        return Completion(len(tokens), generated, self.detokenize(generated), scored.safety[-1],
                          scored.authority[-1])


def chat(runtime: SO8TRuntime, prompt: str, *, system: str | None = None, raw: bool = False,
         max_tokens: int = 256, temperature: float = 0.6, seed: int = 0) -> dict:
    """One chat turn through the GGUF's own chat template; returns reasoning, answer and head scores."""
    from .generation import split_thinking

    if not raw:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = gguf.GGUFReader(runtime.path).get_field("tokenizer.chat_template")
        if template is None:
            raise ValueError(f"{runtime.path}: no tokenizer.chat_template; use --raw to send the prompt as is")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        formatter = Jinja2ChatFormatter(template.contents(), eos_token="<|im_end|>", bos_token="")
        prompt = formatter(messages=messages).prompt
    completion = runtime.complete(prompt, max_tokens=max_tokens, temperature=temperature, seed=seed)
    reasoning, answer = split_thinking(completion.text)
    safety_labels = runtime.metadata.heads["safety"][2]
    authority_labels = runtime.metadata.heads["authority"][2]
    return {
        "completion": completion.text,
        "reasoning": reasoning,
        "answer": answer,
        "safety": {label: round(float(p), 4) for label, p in zip(safety_labels, completion.safety)},
        "authority": {label: round(float(p), 4) for label, p in zip(authority_labels, completion.authority)},
        "tokens": len(completion.tokens),
    }
