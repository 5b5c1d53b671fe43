"""The features a head reads: the final normed hidden state at an example's last token.

Two sources, one contract (``[n, hidden]`` float64 in the examples' order):

* ``ReferenceFeatures``: the PyTorch reference model (folded, so it runs as plain Qwen3), batched with left
  padding (every row's last token is then the batch's last position), longest examples first so that a
  batch pads little. Only the hidden state of the last position leaves a batch, and the vocabulary logits
  are never computed, so memory is one batch of activations whatever the data size.
* ``GGUFFeatures``: llama.cpp running an exported file, through the serving engine's prefill (the body of the
  prompt without outputs, its last token with embeddings on): the hidden state that the runtime's gate
  reads, quantisation and KV cache type included (the runtime's: f16 as llama.cpp serves, f32 for an f32
  file).

A ``text`` example is tokenised as it is (special tokens parsed, no BOS, as Qwen3's tokenizer does); a
``messages`` example is rendered with the model's chat template and its generation prompt, then its
``response`` if it has one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from .data import DataError, Example

Progress = Callable[[int, int], None]  # (examples done, examples in all)


class ReferenceFeatures:
    def __init__(self, model, tokenizer, *, batch_size: int = 8, source: str = "model"):
        if batch_size < 1:
            raise ValueError(f"batch size {batch_size!r}; expected a positive number of examples")
        self.model, self.tokenizer, self.batch_size, self.source = model, tokenizer, batch_size, source

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *, batch_size: int = 8, dtype=None, fold: bool = True,
                        device=None) -> ReferenceFeatures:
        """The model of model_dir, folded by default (plain Qwen3 arithmetic, the same hidden states)."""
        from transformers import AutoTokenizer

        from ..model import SO8TTransformerForCausalLM

        model = SO8TTransformerForCausalLM.from_pretrained(model_dir, torch_dtype=dtype, fold=fold,
                                                           device=device).eval()
        return cls(model, AutoTokenizer.from_pretrained(model_dir), batch_size=batch_size, source=str(model_dir))

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def tokens(self, example: Example, path) -> list[int]:
        def render(messages):
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

        try:
            text = example.scored_text(render)
        except Exception as err:  # noqa: BLE001 - jinja2's TemplateError, raise_exception() in the template
            raise DataError(f"{path}:{example.line}: the chat template does not render these messages: "
                            f"{type(err).__name__}: {err}") from None
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        limit = self.model.config.max_position_embeddings
        if not ids or len(ids) > limit:
            raise DataError(f"{path}:{example.line}: {len(ids)} tokens; expected 1 to "
                            f"max_position_embeddings = {limit}")
        return ids

    def __call__(self, examples: list[Example], path, progress: Progress | None = None) -> np.ndarray:
        import torch

        sequences = [self.tokens(example, path) for example in examples]
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        device = next(self.model.parameters()).device
        out = np.empty((len(sequences), self.hidden_size), dtype=np.float64)
        done = 0
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                width = len(sequences[rows[0]])
                ids = torch.zeros(len(rows), width, dtype=torch.long)
                mask = torch.zeros(len(rows), width, dtype=torch.long)
                for r, i in enumerate(rows):  # left padding: the last position is every row's last token
                    ids[r, width - len(sequences[i]):] = torch.tensor(sequences[i])
                    mask[r, width - len(sequences[i]):] = 1
                # An unpadded batch needs no mask (SDPA's causal path, as an unbatched forward takes).
                attention = None if bool(mask.all()) else mask.to(device)
                hidden, _, _ = self.model.model(ids.to(device), attention)
                out[rows] = hidden[:, -1].double().cpu().numpy()
                done += len(rows)
                if progress:
                    progress(done, len(order))
        return out


class GGUFFeatures:
    def __init__(self, gguf_path: str | Path, *, n_ctx: int | None = None, n_threads: int | None = None,
                 f32_kv_cache: bool | None = None, verbose: bool | None = None):
        from ..serve.engine import Engine

        self.engine = Engine(gguf_path, n_ctx=n_ctx, n_threads=n_threads, require_heads=False, verbose=verbose,
                             f32_kv_cache=f32_kv_cache)
        self.source = str(gguf_path)

    @property
    def hidden_size(self) -> int:
        return self.engine.runtime.hparams.embedding_length

    def tokens(self, example: Example, path) -> list[int]:
        text = example.scored_text(self.engine.render)
        ids = self.engine.tokenize(text)
        if not ids or len(ids) > self.engine.n_ctx:
            raise DataError(f"{path}:{example.line}: {len(ids)} tokens; expected 1 to the context's "
                            f"n_ctx = {self.engine.n_ctx} (raise it with --ctx-size)")
        return ids

    def __call__(self, examples: list[Example], path, progress: Progress | None = None) -> np.ndarray:
        out = np.empty((len(examples), self.hidden_size), dtype=np.float64)
        for i, example in enumerate(examples):
            out[i] = self.engine.prefill_hidden(self.tokens(example, path))
            if progress:
                progress(i + 1, len(examples))
        return out
