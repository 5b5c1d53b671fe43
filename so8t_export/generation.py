"""Decoding for the reference model: greedy or sampled, with a KV cache, stop tokens and chat helpers."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .model import KVCache, SO8TTransformerForCausalLM
from .thinking import split_thinking  # noqa: F401 - part of this module's API since the first release


def sample_next(logits: torch.Tensor, *, do_sample: bool, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]; filters in transformers' order: temperature, top-k, top-p."""
    if not do_sample or temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - top_p
        remove[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@torch.inference_mode()
def generate(model: SO8TTransformerForCausalLM, input_ids: torch.Tensor, *, max_new_tokens: int = 32,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int | None = None, eos_token_id: int | Iterable[int] | None = None,
             stop_token_ids: Iterable[int] = (), attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Prompt plus continuation, [B, S + new], like transformers' generate (finished rows pad with eos).

    eos_token_id defaults to the config's; stop_token_ids end a row as well. The prompt is prefilled in one
    forward, then each step decodes one token against the KV cache.
    """
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_ids
    stops = set([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)) | set(stop_token_ids)
    pad = next(iter(stops), 0)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = KVCache(model.config.num_hidden_layers)
    tokens, step_input = input_ids, input_ids
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        out = model(step_input, attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        nxt = sample_next(out.task_logits[:, -1], do_sample=do_sample, temperature=temperature, top_k=top_k,
                          top_p=top_p, generator=generator)
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        finished |= torch.isin(nxt, torch.tensor(sorted(stops), dtype=nxt.dtype))
        if finished.all():
            break
        step_input = nxt[:, None]
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
    return tokens


def chat_prompt(tokenizer, messages: Sequence[dict], **template_kwargs) -> str:
    """The tokenizer's own chat template with the generation prompt (Thinking-2507 ends it in '<think>\\n')."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True,
                                         **template_kwargs)
