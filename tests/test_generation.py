"""generate(): greedy equals transformers, sampling is seeded, thinking splits."""

import torch
from transformers import AutoTokenizer, Qwen3ForCausalLM

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
