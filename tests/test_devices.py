"""The reference model off the CPU's defaults: devices, dtypes, the folded fast path, attention backends and
torch.compile, all checked on the CPU (CI has no GPU; bench/reference.py --device cuda measures the GPU).

Device placement is checked on the meta device: a tensor that the forward makes on the CPU cannot meet a
meta tensor, and a dispatch mode records the device and dtype of every tensor each op returns.
"""

from __future__ import annotations

import contextlib
import json
import time

import gguf
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import so8t_export.model as model_module
from so8t_export.config import ConfigError, SO8TConfig
from so8t_export.export import export_gguf
from so8t_export.fold import role
from so8t_export.loading import resolve_device
from so8t_export.model import AttentionBackendError, KVCache, SO8TTransformerForCausalLM

FLAGS = ("so8t_triality_symmetry", "so8t_cross_head_interaction", "so8t_non_commutative_gates",
         "so8t_vector_representation", "so8t_spinor_plus_representation", "so8t_spinor_minus_representation")


class Recorder(TorchDispatchMode):
    """(op, device, dtype) of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.outputs: list[tuple[str, torch.device, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.outputs += [(str(func), t.device, t.dtype) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def tiny(**overrides) -> SO8TConfig:
    sizes = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=16, max_position_embeddings=128)
    return SO8TConfig(**{**sizes, **overrides})


def fresh(seed: int = 0, **overrides) -> SO8TTransformerForCausalLM:
    """Every parameter random (norm gains far from 1), so that a misplaced or skipped rotation shows."""
    torch.manual_seed(seed)
    model = SO8TTransformerForCausalLM(tiny(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.5 + torch.rand_like(p) if name.endswith("norm.weight") else 0.2 * torch.randn_like(p))
    return model


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-6) -> bool:
    """Equal to float32 rounding: 1e-6 of the logit scale (1e-5 for logits of ~10; the tiny Qwen3's reach ~60)."""
    return (a - b).abs().max() <= rel * max(b.abs().max().item(), 10.0)


def ids(length, batch=1, seed=0, vocab=64, device="cpu"):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed)).to(device)


def left_padded(batch_lengths, width, device="cpu"):
    mask = torch.zeros(len(batch_lengths), width, dtype=torch.long)
    for row, n in enumerate(batch_lengths):
        mask[row, width - n:] = 1
    return mask.to(device)


def exercise(model, device, recorder: Recorder | None = None) -> None:
    """Every forward path: plain, left-padded, explicit attention, growing and static caches, decoding (the
    inputs are made first, outside the recorder)."""
    tokens = ids(9, batch=2, device=device)
    mask = left_padded([9, 6], 9, device)
    longer = torch.cat([mask, mask[:, -1:]], 1)
    position = torch.tensor([10], device=device)
    layers = model.config.num_hidden_layers
    with recorder or contextlib.nullcontext(), torch.no_grad():
        model(tokens)
        model(tokens, attention_mask=mask, output_attentions=True, output_hidden_states=True)
        cache = KVCache(layers)
        model(tokens, attention_mask=mask, past_key_values=cache)
        model(tokens[:, :1], attention_mask=longer, past_key_values=cache)
        model(tokens[:, :3], past_key_values=KVCache(layers, max_length=12))
        static = KVCache(layers, max_length=16, static=True)
        model(tokens, attention_mask=mask, past_key_values=static)
        model(tokens[:, :1], attention_mask=longer, past_key_values=static)
        model(tokens[:, :1], past_key_values=static, cache_position=position)


# ---------------------------------------------------------------------------------------------- devices
@pytest.mark.parametrize("folded", [False, True], ids=["online", "folded"])
def test_every_tensor_the_forward_makes_is_on_the_input_device(folded):
    model = fresh().to("meta")
    if folded:
        model.fold_()
    assert model.model.triality_rotations.is_meta and model.model.fused_rotations().qkv.is_meta
    recorder = Recorder()
    exercise(model, "meta", recorder)
    assert recorder.outputs  # the mode saw the forward
    elsewhere = sorted({op for op, device, _ in recorder.outputs if device.type != "meta"})
    assert not elsewhere, elsewhere


def test_bf16_forward_makes_bf16_activations_and_float32_rotations():
    model = fresh().to(torch.bfloat16)
    recorder = Recorder()
    exercise(model, "cpu", recorder)
    floats = {(op, dtype) for op, _, dtype in recorder.outputs if dtype.is_floating_point}
    assert {dtype for _, dtype in floats} <= {torch.bfloat16, torch.float32}, floats
    # the rotations' matmuls run in float32, every other matmul in bf16
    matmuls = {(op.split(".")[1], dtype) for op, dtype in floats if op.split(".")[1] in ("bmm", "mm")}
    assert ("bmm", torch.float32) in matmuls and ("mm", torch.bfloat16) in matmuls
    with torch.no_grad():
        out = model(ids(5), use_cache=True)
    assert out.logits.dtype == out.safety_logits.dtype == torch.bfloat16
    assert out.past_key_values.keys[0].dtype == torch.bfloat16


def test_autocast_leaves_the_rotations_in_float32():
    model, tokens = fresh(), ids(7)
    with Recorder() as recorder, torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        model(tokens)
    bmm = {dtype for op, _, dtype in recorder.outputs if op.startswith("aten.bmm")}
    linear = {dtype for op, _, dtype in recorder.outputs if op.startswith(("aten.mm", "aten.addmm"))}
    assert bmm == {torch.float32} and torch.bfloat16 in linear


@pytest.mark.parametrize("cast", ["half", "bfloat16", "meta-f16", "double"])
def test_casts_keep_the_rotation_buffers_float32(cast):
    model = fresh()
    before = model.model.triality_rotations.clone()
    if cast == "half":
        model.half()
    elif cast == "bfloat16":
        model.to(torch.bfloat16)
    elif cast == "meta-f16":
        model.to("meta", torch.float16)
    else:
        model.double()
    buffers = (model.model.triality_rotations, model.model.cross_head_rotation)
    assert all(b.dtype == torch.float32 for b in buffers)
    assert model.model.embed_tokens.weight.dtype != torch.float32
    rotations = model.model.fused_rotations(model_module.rotation_dtype(model.model.embed_tokens.weight.dtype))
    assert rotations.qkv.dtype == (torch.float64 if cast == "double" else torch.float32)
    if cast != "meta-f16":
        assert torch.equal(model.model.triality_rotations, before)


def test_device_map_and_device():
    assert resolve_device() == torch.device("cpu")
    for value in ("auto", "cpu", torch.device("cpu"), {"": "cpu"}, {"": torch.device("cpu")}):
        assert resolve_device(device_map=value) == torch.device("cpu"), value
    assert resolve_device(device="cpu") == resolve_device(device_map="cpu", device=torch.device("cpu"))
    cases = [
        ({"device_map": "gpu"}, "device_map = 'gpu'; expected 'auto', 'cpu', 'cuda', 'cuda:N'"),
        ({"device_map": {"model.layers.0": "cpu", "lm_head": "cpu"}}, "whole model on one device"),
        ({"device_map": "meta"}, "the meta device holds no weights"),
        ({"device": 2.5}, "device = 2.5; expected 'auto'"),
        ({"device_map": "cpu", "device": "cuda:0"}, "disagree; give one of them"),
    ]
    if not torch.cuda.is_available():
        cases += [({"device_map": "cuda"}, "device_map = 'cuda': no cuda device is available here"),
                  ({"device": 0}, "device = 0: no cuda device is available here")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
            resolve_device(**kwargs)
        assert "\n" not in str(err.value)


def test_from_pretrained_places_the_model(so8t_dir):
    model = SO8TTransformerForCausalLM.from_pretrained(so8t_dir, device_map="auto")
    expected = resolve_device(device_map="auto")
    assert {p.device for p in model.parameters()} == {expected}
    assert model.model.triality_rotations.device == expected
    with pytest.raises(ValueError, match="device_map = 'tpu:0'"):
        SO8TTransformerForCausalLM.from_pretrained(so8t_dir, device_map="tpu:0")


# ---------------------------------------------------------------------------------------------- folded
@pytest.mark.parametrize("flags", [dict(zip(FLAGS, values)) for values in
                                   [(True,) * 6, (False,) * 6, (True, False, True, False, True, True),
                                    (True, True, False, True, True, False)]],
                         ids=lambda f: "".join("1" if f[k] else "0" for k in FLAGS))
def test_folded_equals_online(flags, monkeypatch):
    model = fresh(seed=1, **flags)
    original = {n: p.clone() for n, p in model.named_parameters()}
    tokens, mask = ids(11, batch=2, seed=2), left_padded([11, 7], 11)
    with torch.no_grad():
        online = model(tokens, attention_mask=mask)
        model.fold_()
        assert model.is_folded

        def no_rotation(*args, **kwargs):
            raise AssertionError("a folded model rotated")

        monkeypatch.setattr(model_module, "rotated_qkv", no_rotation)
        monkeypatch.setattr(model_module, "rotated_blocks", no_rotation)
        folded = model(tokens, attention_mask=mask)
        monkeypatch.undo()
    assert online.logits.abs().max() > 1.0
    for field in ("logits", "safety_logits", "authority_logits", "last_hidden_state"):
        assert (getattr(folded, field) - getattr(online, field)).abs().max() <= 1e-5, field
    model.unfold_()
    assert not model.is_folded and model.fold_().unfold_() is model
    for name, p in model.named_parameters():  # back to the SO8T weights, to float32 rounding
        assert (p - original[name]).abs().max() <= 1e-6, name
    with torch.no_grad():  # weights rounded to float32 by two folds and two unfolds
        assert (model(tokens, attention_mask=mask).logits - online.logits).abs().max() <= 3e-5


def test_from_pretrained_fold(qwen3_dir, so8t_dir):
    from safetensors.torch import load_file

    online = SO8TTransformerForCausalLM.from_pretrained(so8t_dir)
    folded = SO8TTransformerForCausalLM.from_pretrained(so8t_dir, fold=True)
    from_qwen3 = SO8TTransformerForCausalLM.from_pretrained(qwen3_dir, fold=True)
    assert folded.is_folded and from_qwen3.is_folded and not online.is_folded
    tokens = ids(13, batch=2, seed=3, vocab=500)
    with torch.no_grad():
        expected = online(tokens)
        for model in (folded, from_qwen3):
            out = model(tokens)
            for field in ("logits", "safety_logits", "authority_logits"):
                assert close(getattr(out, field), getattr(expected, field)), field
    # a plain Qwen3 checkpoint already holds the folded weights: they are taken as stored
    source = load_file(str(qwen3_dir / "model.safetensors"))
    state = from_qwen3.state_dict()
    assert all(torch.equal(state[n], source[n]) for n in source if n in state)


def test_save_pretrained_of_a_folded_model_round_trips(so8t_dir, tmp_path):
    """The folder holds the folded weights as the model holds them (so8t_folded_weights): reload and export
    equal the original's."""
    from safetensors.torch import load_file

    folded = SO8TTransformerForCausalLM.from_pretrained(so8t_dir, fold=True)
    folded.save_pretrained(tmp_path / "saved")
    assert folded.is_folded  # saving does not change the model
    assert json.loads((tmp_path / "saved/config.json").read_text())["so8t_folded_weights"] is True
    original = load_file(str(so8t_dir / "model.safetensors"))
    saved = load_file(str(tmp_path / "saved/model.safetensors"))
    held = folded.state_dict()
    assert original.keys() == saved.keys()
    for name in original:
        assert torch.equal(saved[name], held[name]), name  # written as held: nothing rotated on the way out
        if role(name).side == "none":
            assert torch.equal(saved[name], original[name]), name
    reloaded = SO8TTransformerForCausalLM.from_pretrained(tmp_path / "saved")
    assert not reloaded.is_folded
    tokens = ids(10, seed=4, vocab=500)
    with torch.no_grad():
        assert close(reloaded(tokens).logits, folded(tokens).logits)
    export_gguf(so8t_dir, tmp_path / "original.gguf", quant="f32")
    export_gguf(tmp_path / "saved", tmp_path / "saved.gguf", quant="f32")
    theirs = {t.name: t for t in gguf.GGUFReader(tmp_path / "original.gguf").tensors}
    ours = {t.name: t for t in gguf.GGUFReader(tmp_path / "saved.gguf").tensors}
    assert theirs.keys() == ours.keys()
    for name, tensor in theirs.items():
        a, b = torch.from_numpy(tensor.data.copy()), torch.from_numpy(ours[name].data.copy())
        assert (a - b).abs().max() <= 1e-6 * max(a.abs().max().item(), 1.0), name


# ---------------------------------------------------------------------------------------------- attention
def test_attention_backends_agree(so8t_dir):
    tokens, mask = ids(12, batch=2, seed=5, vocab=500), left_padded([12, 8], 12)
    outputs = {}
    for backend in ("eager", "sdpa", "flash_attention_2"):
        model = SO8TTransformerForCausalLM.from_pretrained(so8t_dir, attn_implementation=backend)
        assert model.config.attn_implementation == backend
        with torch.no_grad():
            # the CPU's flash kernel takes float32 and masks, so every path runs here
            cache = KVCache(model.config.num_hidden_layers)
            prefill = model(tokens, attention_mask=mask, past_key_values=cache).logits
            step = model(tokens[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), past_key_values=cache)
            outputs[backend] = torch.cat([prefill, step.logits], 1)
    for backend in ("sdpa", "flash_attention_2"):
        assert close(outputs[backend], outputs["eager"]), backend
    seed_style = SO8TTransformerForCausalLM.from_pretrained(so8t_dir, use_flash_attention=True)
    assert model_module.attention_backend(seed_style.config) == "flash_attention_2"


def test_attention_backend_settings_are_checked():
    with pytest.raises(ConfigError, match="attn_implementation = 'flash'; expected null or one of 'eager'"):
        tiny(attn_implementation="flash")
    with pytest.raises(ConfigError, match="attn_implementation = 'eager'; expected null or 'flash_attention_2' "
                                          "while use_flash_attention is true"):
        tiny(attn_implementation="eager", use_flash_attention=True)
    with pytest.raises(ConfigError, match="use_flash_attention = 'yes'; expected true or false"):
        SO8TConfig.from_dict({**tiny().to_dict(), "use_flash_attention": "yes"})


def test_an_unavailable_flash_kernel_fails_in_one_line(monkeypatch):
    """Where SDPA has no flash kernel for the inputs it raises after a page of warnings; the model says in
    one line which setting, device and dtype (on CUDA it checks before calling: float32, masks)."""
    model = fresh(attn_implementation="flash_attention_2").to(torch.float16)
    real = torch.nn.functional.scaled_dot_product_attention

    def unavailable(*args, **kwargs):
        if torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.math_sdp_enabled():
            raise RuntimeError("No available kernel. Aborting execution.\nmore lines")
        return real(*args, **kwargs)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", unavailable)
    with pytest.raises(AttentionBackendError) as err, torch.no_grad():
        model(ids(4))
    assert str(err.value) == ("attn_implementation = 'flash_attention_2' (SDPA's FLASH_ATTENTION backend) cannot "
                              "run on cpu with float16 inputs: No available kernel. Aborting execution.; use "
                              "attn_implementation='sdpa'")
    model.config.attn_implementation = "sdpa"
    model.config.use_flash_attention = False
    with torch.no_grad():
        model(ids(4))


# ---------------------------------------------------------------------------------------------- compile
@pytest.fixture
def fresh_dynamo():
    """Dynamo caches compiled code per code object across model instances (at most 8 versions): start empty."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("folded", [False, True], ids=["online", "folded"])
def test_the_forward_compiles_without_graph_breaks(folded, fresh_dynamo):
    """fullgraph=True fails on any graph break: prefill, left-padded prefill and static-cache decoding, with
    dynamo's own eager backend (the tracing is what can break; inductor is the next test)."""
    model = fresh()
    if folded:
        model.fold_()
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    tokens, mask = ids(8, batch=2), left_padded([8, 5], 8)
    with torch.no_grad():
        assert (compiled(tokens).logits - model(tokens).logits).abs().max() <= 1e-5
        longer = ids(20, batch=2, seed=1)  # 40 tokens: past FUSIBLE_MAX_TOKENS, the batched-matmul form
        assert (compiled(longer).logits - model(longer).logits).abs().max() <= 1e-5
        compiled(tokens, attention_mask=mask)
        cache = KVCache(model.config.num_hidden_layers, max_length=12, static=True)
        compiled(tokens, past_key_values=cache)
        for position in (8, 9):
            compiled(tokens[:, :1], past_key_values=cache, cache_position=torch.tensor([position]))
    assert cache.length == 10
    # a prefill with a dynamic sequence length (the bench compiles prefill so, one graph for every length)
    dynamic = torch.compile(model, fullgraph=True, backend="eager", dynamic=True)
    with torch.no_grad():
        for length in (8, 5):
            assert (dynamic(tokens[:, :length]).logits - model(tokens[:, :length]).logits).abs().max() <= 1e-5


def test_a_model_loaded_under_inference_mode_compiles_with_its_cached_rotations(so8t_dir, monkeypatch,
                                                                              fresh_dynamo):
    """Loaded under inference_mode (as bench/reference.py loads), the rotation buffers would have no version
    counter and no plan would be cached: the compiled forward then built it in its graph, which CUDA graphs
    could not replay on an H200 ("storage data ptrs are not allocated in pool"). Now the buffers are normal
    copies, the plan is cached at load, and a compiled forward must not build one."""
    with torch.inference_mode():
        model = SO8TTransformerForCausalLM.from_pretrained(so8t_dir)
    inner = model.model
    assert not inner.triality_rotations.is_inference() and not inner.cross_head_rotation.is_inference()
    assert inner._plan_cache is not None
    tokens = ids(6)
    with torch.inference_mode():
        expected = model(tokens).logits

    def no_plan_in_the_graph(*args, **kwargs):
        raise AssertionError("the compiled forward built a rotation plan")

    monkeypatch.setattr(model_module, "plan_rotations", no_plan_in_the_graph)
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    with torch.inference_mode():
        assert close(compiled(tokens).logits, expected, rel=1e-6)


def test_inductor_compiled_model_equals_eager(fresh_dynamo):
    """What the bench runs on the GPU, on the CPU: inductor, static shapes, a prefill and static decode
    steps (the fusible forms of the rotations run here). About 45 s on 2 cores, most of it inductor's first
    compile."""
    start = time.perf_counter()
    model = fresh(num_hidden_layers=2)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    tokens = ids(7)
    with torch.no_grad():
        assert (compiled(tokens).logits - model(tokens).logits).abs().max() <= 1e-5
        caches = [KVCache(2, max_length=10, static=True) for _ in range(2)]
        for cache in caches:
            model(tokens, past_key_values=cache)
        for i in range(3):
            step = tokens[:, i:i + 1]
            ours, theirs = compiled(step, past_key_values=caches[0]), model(step, past_key_values=caches[1])
            assert (ours.logits - theirs.logits).abs().max() <= 1e-5
    assert caches[0].length == caches[1].length == 10
    print(f"inductor compile and run: {time.perf_counter() - start:.0f} s")
