"""generate(): greedy equals transformers, sampling is seeded, thinking splits."""

import json
import shutil

import pytest
import torch
from transformers import AutoTokenizer, Qwen3ForCausalLM

from so8t_export.config import ConfigError
from so8t_export.generation import chat_prompt, split_thinking
from so8t_export.model import SO8TTransformerForCausalLM


def test_greedy_equals_transformers_for_32_tokens(qwen3_dir):
    tokenizer = AutoTokenizer.from_pretrained(qwen3_dir)
    prompt = chat_prompt(tokenizer, [{"role": "user", "content": "What is 2 + 2?"}])
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    reference = Qwen3ForCausalLM.from_pretrained(qwen3_dir, dtype=torch.float32).eval()
    expected = reference.generate(input_ids, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
    model = SO8TTransformerForCausalLM.from_pretrained(qwen3_dir)
    got = model.generate(input_ids, max_new_tokens=32, eos_token_id=[])
    assert got.shape == (1, input_ids.shape[1] + 32)
    assert torch.equal(got, expected)


def test_sampling_is_seeded_and_stops(qwen3_dir):
    model = SO8TTransformerForCausalLM.from_pretrained(qwen3_dir)
    prompt = torch.tensor([[5, 6, 7, 8]])
    kwargs = {"max_new_tokens": 16, "do_sample": True, "temperature": 0.8, "top_p": 0.9, "top_k": 20,
              "eos_token_id": []}
    a = model.generate(prompt, seed=1, **kwargs)
    assert torch.equal(a, model.generate(prompt, seed=1, **kwargs))
    greedy = model.generate(prompt, max_new_tokens=16, eos_token_id=[])
    assert torch.equal(model.generate(prompt, do_sample=True, top_k=1, seed=3, max_new_tokens=16, eos_token_id=[]),
                       greedy)
    stop = int(greedy[0, 6])
    stopped = model.generate(prompt, max_new_tokens=16, eos_token_id=[], stop_token_ids=[stop])
    assert stopped[0, -1] == stop and stopped.shape[1] <= 7


def test_split_thinking():
    assert split_thinking("Let me add.\n</think>\n\n4") == ("Let me add.", "4")
    assert split_thinking("<think>\nhmm</think>ok") == ("hmm", "ok")
    assert split_thinking("still thinking") == ("still thinking", "")


def left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return input_ids, mask


def prompts_of_many_lengths(count: int = 12) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 700, (3 + k,), generator=generator).tolist() for k in range(count)]


def first_steps(run: list[int]) -> dict[int, int]:
    """token -> the step at which run first emits it."""
    steps: dict[int, int] = {}
    for step, token in enumerate(run):
        steps.setdefault(token, step)
    return steps


def test_left_padded_batch_equals_transformers_generate(qwen3_dir):
    """Greedy, twelve prompts of 3 to 14 tokens, left padded; rows end at different steps.

    transformers writes pad_token_id into a row after it ends, and so do we (generation_config.json's pad,
    <|endoftext|>), so the whole token tensors compare, padding included; both stop once every row has ended
    or max_new_tokens are out.
    """
    reference = Qwen3ForCausalLM.from_pretrained(qwen3_dir, dtype=torch.float32).eval()
    model = SO8TTransformerForCausalLM.from_pretrained(qwen3_dir)
    pad = model.generation_config.pad_token_id
    prompts = prompts_of_many_lengths()
    input_ids, mask = left_padded(prompts, pad)
    width, new = input_ids.shape[1], 20
    free = model.generate(input_ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[])[:, width:]
    # The random model repeats itself, switching tokens now and then: stop on the token that some row first
    # emits latest, so that row ends in a decode step and rows that never emit it run to the end.
    step, stop = max((step, token) for run in free.tolist() for token, step in first_steps(run).items())
    assert 1 <= step < new - 1, f"no row of this checkpoint switches tokens in its first {new - 1} steps"
    expected = reference.generate(input_ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                  eos_token_id=stop, pad_token_id=pad)
    got = model.generate(input_ids, attention_mask=mask, max_new_tokens=new, eos_token_id=stop)
    assert torch.equal(got, expected)
    ended = [first_steps(run).get(stop) for run in got[:, width:].tolist()]
    assert any(e is not None and (got[i, width + e + 1:] == pad).all() and e + 1 < got.shape[1] - width
               for i, e in enumerate(ended))  # a row ended, then was padded
    assert len(set(ended)) > 1  # and the rows did not all end together
    # padding changes nothing: each row continues as its prompt alone does
    for prompt, row in zip(prompts, got):
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=new, eos_token_id=stop)[0, len(prompt):]
        assert torch.equal(row[width:width + len(alone)], alone)


def test_generation_config_eos_list_is_the_default_and_every_id_stops(qwen3_dir, tmp_path):
    # The tiny checkpoint ships Qwen3-4B-Thinking-2507's layout: config.json names <|im_end|> alone,
    # generation_config.json [<|im_end|>, <|endoftext|>].
    config = json.loads((qwen3_dir / "config.json").read_text())
    listed = json.loads((qwen3_dir / "generation_config.json").read_text())["eos_token_id"]
    assert isinstance(config["eos_token_id"], int)
    assert listed == [config["eos_token_id"], config["pad_token_id"]]
    assert SO8TTransformerForCausalLM.from_pretrained(qwen3_dir).generation_config.eos_token_id == listed

    # A random model emits neither, so the same layout with two ids it does emit, each in a decode step:
    # row A first emits `first` at step a, row B first emits `second` at step b, and neither row emits the
    # other's id before then.
    model = SO8TTransformerForCausalLM.from_pretrained(qwen3_dir)
    prompts = prompts_of_many_lengths()
    runs = [model.generate(torch.tensor([p]), max_new_tokens=16, eos_token_id=[])[0, len(p):].tolist()
            for p in prompts]
    switches = [(k, token, step) for k, run in enumerate(runs) for token, step in first_steps(run).items()
                if step >= 1]
    a, first, step_a, b, second, step_b = next(
        (a, first, step_a, b, second, step_b)
        for a, first, step_a in switches for b, second, step_b in switches
        if first != second and second not in runs[a][:step_a] and first not in runs[b][:step_b])
    folder = tmp_path / "two-eos"
    shutil.copytree(qwen3_dir, folder)
    generation_config = json.loads((folder / "generation_config.json").read_text())
    generation_config["eos_token_id"] = [first, second]
    (folder / "generation_config.json").write_text(json.dumps(generation_config))

    model = SO8TTransformerForCausalLM.from_pretrained(folder)
    assert model.generation_config.eos_token_id == [first, second]
    pad = model.generation_config.pad_token_id
    input_ids, mask = left_padded([prompts[a], prompts[b]], pad)
    # no eos_token_id: generation_config.json's list
    got = model.generate(input_ids, attention_mask=mask, max_new_tokens=16)[:, input_ids.shape[1]:]
    assert got.shape[1] == max(step_a, step_b) + 1  # both rows ended
    assert got[0].tolist() == runs[a][:step_a + 1] + [pad] * (got.shape[1] - step_a - 1)  # on the first id
    assert got[1].tolist() == runs[b][:step_b + 1] + [pad] * (got.shape[1] - step_b - 1)  # on the second


def test_without_generation_config_the_default_is_config_json(qwen3_dir, tmp_path):
    folder = tmp_path / "no-generation-config"
    shutil.copytree(qwen3_dir, folder)
    (folder / "generation_config.json").unlink()
    model = SO8TTransformerForCausalLM.from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert model.generation_config.eos_token_id == [config["eos_token_id"]]
    assert model.generation_config.pad_token_id == config["pad_token_id"]


def test_bad_generation_config_names_file_and_key(qwen3_dir, tmp_path):
    folder = tmp_path / "bad-generation-config"
    shutil.copytree(qwen3_dir, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, "<|im_end|>"]}))
    with pytest.raises(ConfigError, match=r"generation_config.json: eos_token_id = \[1, '<\|im_end\|>'\]; "
                                          "expected token ids below vocab_size"):
        SO8TTransformerForCausalLM.from_pretrained(folder)
