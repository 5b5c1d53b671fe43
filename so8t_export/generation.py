"""Decoding for the reference model: greedy or sampled, with a KV cache, stop tokens and chat helpers."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, SO8TConfig
from .model import KVCache, SO8TTransformerForCausalLM
from .thinking import split_thinking  # noqa: F401 - part of this module's API since the first release

GENERATION_CONFIG_FILE = "generation_config.json"


@dataclass
class GenerationConfig:
    """The token ids generate() takes from a checkpoint, as transformers' model.generation_config holds them.

    Qwen3-4B-Thinking-2507's generation_config.json stops on [151645, 151643] (<|im_end|>, <|endoftext|>)
    where its config.json names only 151645, so the file's list wins, as in transformers. Its sampling
    defaults (do_sample, temperature, top_k, top_p) are not taken: generate() samples only when asked.
    """

    eos_token_id: list[int]
    pad_token_id: int | None = None

    @classmethod
    def from_model_config(cls, config: SO8TConfig) -> GenerationConfig:
        return cls(eos_token_id=config.eos_token_ids, pad_token_id=config.pad_token_id)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, config: SO8TConfig) -> GenerationConfig:
        """generation_config.json's ids where the folder has the file and names them, else config.json's."""
        defaults = cls.from_model_config(config)
        path = Path(model_dir) / GENERATION_CONFIG_FILE
        if not path.is_file():
            return defaults
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a JSON {type(raw).__name__}; expected an object")

        def token_id(key: str, value) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < config.vocab_size:
                raise ConfigError(f"{path}: {key} = {raw[key]!r}; expected token ids below vocab_size "
                                  f"{config.vocab_size}")
            return value

        eos, pad = defaults.eos_token_id, defaults.pad_token_id
        if raw.get("eos_token_id") is not None:
            value = raw["eos_token_id"]
            eos = [token_id("eos_token_id", i) for i in (value if isinstance(value, list) else [value])]
        if raw.get("pad_token_id") is not None:
            pad = token_id("pad_token_id", raw["pad_token_id"])
        return cls(eos_token_id=eos, pad_token_id=pad)


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
             stop_token_ids: Iterable[int] = (), attention_mask: torch.Tensor | None = None,
             pad_token_id: int | None = None) -> torch.Tensor:
    """Prompt plus continuation, [B, S + new], like transformers' generate: a row ends at any stop id and
    then repeats pad_token_id until every row has ended or max_new_tokens are out.

    eos_token_id and pad_token_id default to model.generation_config's (generation_config.json's list when
    loaded with from_pretrained, else config.json's); without a pad id, the first stop id pads, as in
    transformers. stop_token_ids end a row as well. A left-padded batch takes its attention_mask. The prompt
    is prefilled in one forward, then each step decodes one token against a KV cache sized for the whole run.
    """
    defaults = getattr(model, "generation_config", None) or GenerationConfig.from_model_config(model.config)
    if eos_token_id is None:
        eos_token_id = defaults.eos_token_id
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    stops = list(dict.fromkeys([*eos, *stop_token_ids]))  # in order: the first one may be the pad
    if pad_token_id is None:
        pad_token_id = defaults.pad_token_id if defaults.pad_token_id is not None else next(iter(stops), 0)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    batch, prompt_length = input_ids.shape
    total = prompt_length + max_new_tokens
    cache = KVCache(model.config.num_hidden_layers, max_length=total)
    # Preallocated, like the cache: the whole output and mask are written in place, never concatenated.
    tokens = input_ids.new_full((batch, total), pad_token_id)
    tokens[:, :prompt_length] = input_ids
    if attention_mask is not None:
        full_mask = attention_mask.new_ones((batch, total))
        full_mask[:, :prompt_length] = attention_mask
    stop_ids = torch.tensor(stops, dtype=input_ids.dtype, device=input_ids.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    length, step_input = prompt_length, input_ids
    while length < total:
        mask = full_mask[:, :length] if attention_mask is not None else None
        out = model(step_input, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt = sample_next(out.task_logits[:, -1], do_sample=do_sample, temperature=temperature, top_k=top_k,
                          top_p=top_p, generator=generator)
        nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
        tokens[:, length] = nxt
        length += 1
        finished |= torch.isin(nxt, stop_ids)
        if finished.all():
            break
        step_input = nxt[:, None]
    return tokens[:, :length].contiguous()  # a run that ended early leaves unused columns


def chat_prompt(tokenizer, messages: Sequence[dict], **template_kwargs) -> str:
    """The tokenizer's own chat template with the generation prompt (Thinking-2507 ends it in '<think>\\n')."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True,
                                         **template_kwargs)
