"""from_pretrained / save_pretrained for SO8TTransformerForCausalLM.

A plain Qwen3 checkpoint is loaded function-preserving: every rotated projection absorbs the inverse
rotation (fold.unfold_weight, in float64, cast once), so the SO8T model computes what the base computes.
An SO8T checkpoint (model_type "so8t") is loaded as stored: rotations, heads and weights, nothing absorbed.
Tensors are built on the meta device and assigned one at a time, so loading holds the model plus at most a
few temporaries the size of the largest tensor, each moved to the target device as it is read. With
fold=True the model is loaded folded (it then runs as plain Qwen3); save_pretrained writes such a model as it
holds it, folded (config so8t_folded_weights), so nothing is rotated and rounded on the way out, and copies
block-FP8 tensors that are unchanged since loading as their source stored them: a plain Qwen3 checkpoint
loaded folded and saved keeps every weight byte for byte.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import triality
from .checkpoint import FLOAT_DTYPES, INDEX_FILE, SCALE_SUFFIX, SINGLE_FILE, CheckpointError, CheckpointReader
from .config import MODEL_TYPE, SO8TConfig
from .fold import fold_weight, role, unfold_weight
from .io import atomic_output, current_umask, fsync_folder
from .model import SO8TTransformerForCausalLM
from .rotation import plan_rotations

ROTATION_BUFFERS = ("model.triality_rotations", "model.cross_head_rotation")
HEADS = ("safety_head", "authority_head")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


def resolve_dtype(torch_dtype, config: SO8TConfig) -> torch.dtype:
    """As transformers >= 5: "auto" (the default) takes the config's dtype; a name or torch.dtype is used as is."""
    if torch_dtype is None or torch_dtype == "auto":
        torch_dtype = config.torch_dtype
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    try:
        return _DTYPES[str(torch_dtype).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"torch_dtype {torch_dtype!r}; expected one of {sorted(_DTYPES)} or 'auto'") from None


def resolve_device(device_map=None, device=None) -> torch.device:
    """Where from_pretrained puts the model, from transformers-style arguments: device_map "auto" (CUDA when
    it is available, else MPS, else the CPU), a device name ("cpu", "cuda", "cuda:1", "mps"), an index, a
    torch.device or {"": device}; or device=. The whole model goes to one device."""
    given = [(name, value, _parse_device(name, value))
             for name, value in (("device_map", device_map), ("device", device)) if value is not None]
    if not given:
        return torch.device("cpu")
    if len(given) == 2 and given[0][2] != given[1][2]:
        raise ValueError(f"device_map = {device_map!r} and device = {device!r} disagree; give one of them")
    return _available(*given[0])


_EXPECTED_DEVICE = ("expected 'auto', 'cpu', 'cuda', 'cuda:N', 'mps', a device index, a torch.device or "
                    "{'': device} (the whole model on one device)")


def _parse_device(name: str, value) -> torch.device:
    if isinstance(value, dict):
        if set(value) != {""}:
            raise ValueError(f"{name} = {value!r:.120}; SO8T places the whole model on one device: "
                             f"{_EXPECTED_DEVICE}")
        value = value[""]
    if isinstance(value, str) and value == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if isinstance(value, bool) or not isinstance(value, (str, int, torch.device)):
        raise ValueError(f"{name} = {value!r:.120}; {_EXPECTED_DEVICE}")
    try:
        return torch.device("cuda", value) if isinstance(value, int) else torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"{name} = {value!r}; {_EXPECTED_DEVICE}") from None


def _available(name: str, value, device: torch.device) -> torch.device:
    """device itself, where this machine has it (CUDA without an index: the current GPU)."""
    if device.type == "cpu":
        return device
    if device.type == "meta":
        raise ValueError(f"{name} = {value!r}: the meta device holds no weights; load on a real device, then "
                         "use .to('meta')")
    backend = getattr(torch, device.type, None)
    if device.type == "mps":
        available, count = torch.backends.mps.is_available(), 1
    elif backend is not None and hasattr(backend, "is_available") and hasattr(backend, "device_count"):
        available = backend.is_available()
        count = backend.device_count() if available else 0
    else:
        raise ValueError(f"{name} = {value!r}: this torch has no {device.type} support; {_EXPECTED_DEVICE}")
    if not available:
        raise ValueError(f"{name} = {value!r}: no {device.type} device is available here (torch "
                         f"{torch.__version__}); use 'cpu' or 'auto'")
    if device.index is not None and device.index >= count:
        raise ValueError(f"{name} = {value!r}: there {'is' if count == 1 else 'are'} {count} {device.type} "
                         f"device{'' if count == 1 else 's'} here (indices 0 to {count - 1})")
    if device.index is None and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def source_name(name: str, is_so8t: bool) -> str:
    """Checkpoint name of a model parameter: Qwen3 calls the task head lm_head."""
    return name if is_so8t or name != "task_head.weight" else "lm_head.weight"


def holds_folded_weights(config: SO8TConfig, is_so8t: bool) -> bool:
    """Whether a checkpoint stores q/k/v/gate/up folded (stock Qwen3 weights): every plain Qwen3 checkpoint,
    and an SO8T one saved from a folded model. Loading unfolds those; the exports write them as stored."""
    return not is_so8t or config.so8t_folded_weights


def is_so8t_extra(name: str) -> bool:
    """The rotation buffers and the two classification heads: what an SO8T checkpoint holds beyond Qwen3's
    tensors (exported as so8t.* metadata, never as GGUF tensors)."""
    return name in ROTATION_BUFFERS or name.split(".")[0] in HEADS


def expected_shapes(config: SO8TConfig, is_so8t: bool) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape of every tensor an SO8T (or Qwen3) checkpoint of this config holds."""
    with torch.device("meta"):
        model = SO8TTransformerForCausalLM(config)
    shapes = {source_name(n, is_so8t): tuple(t.shape) for n, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop(source_name("task_head.weight", is_so8t))
    if not is_so8t:  # a Qwen3 checkpoint has no SO8T extras
        shapes = {n: s for n, s in shapes.items() if not is_so8t_extra(n)}
    return shapes


def check_tensors(reader: CheckpointReader, config: SO8TConfig, is_so8t: bool) -> None:
    """Every tensor present with its expected shape and a float dtype, and none left over; errors name the
    file and tensor."""
    expected = expected_shapes(config, is_so8t)
    for name, shape in expected.items():
        if name not in reader:
            raise CheckpointError(f"{reader.model_dir}: tensor {name} is missing")
        where = f"{reader.location(name)}: tensor {name}"
        if reader.shape(name) != shape:
            raise CheckpointError(f"{where} has shape {list(reader.shape(name))}; expected {list(shape)}")
        dtype = reader.info(name)["dtype"]
        allowed = FLOAT_DTYPES if name not in ROTATION_BUFFERS else ("F32", "F64")  # rotations keep float32
        if dtype not in allowed or (dtype == "F8_E4M3" and is_so8t_extra(name)):
            raise CheckpointError(f"{where} has dtype {dtype}; expected one of {', '.join(allowed)}")
    tied_extra = {"lm_head.weight"} if config.tie_word_embeddings else set()
    leftover = sorted(set(reader.names()) - set(expected) - tied_extra)
    if leftover:
        raise CheckpointError(f"{reader.model_dir}: tensors not used by SO8T/Qwen3: {', '.join(leftover[:8])}"
                              + (" ..." if len(leftover) > 8 else ""))
    for scale in reader.scale_names():
        weight = scale.removesuffix(SCALE_SUFFIX) + ".weight"
        if weight not in reader or reader.info(weight)["dtype"] != "F8_E4M3":
            raise CheckpointError(f"{reader.location(scale)}: tensor {scale} scales {weight}, which is not a "
                                  "float8_e4m3fn weight of this checkpoint")


def init_head(config: SO8TConfig, name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Deterministic init of a head a Qwen3 checkpoint lacks: weight ~ N(0, initializer_range^2) drawn
    from a generator seeded by so8t_rotation_seed and the head's index, bias zero."""
    gen = torch.Generator().manual_seed(config.so8t_rotation_seed * 1_000_003 + 7 + HEADS.index(name))
    weight = torch.randn(2, config.hidden_size, generator=gen) * config.initializer_range
    return {f"{name}.weight": weight.to(dtype), f"{name}.bias": torch.zeros(2, dtype=dtype)}


def rotations_and_heads(reader: CheckpointReader, config: SO8TConfig, is_so8t: bool,
                        dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The float32 rotation buffers (validated) and the head tensors of a checkpoint.

    An SO8T checkpoint stores them; for a plain Qwen3 checkpoint they are generated from the config's seed.
    """
    if is_so8t:
        rotations, cross_head = (reader.read(name, torch.float32) for name in ROTATION_BUFFERS)
        heads = {f"{head}.{part}": reader.read(f"{head}.{part}", dtype) for head in HEADS
                 for part in ("weight", "bias")}
        source = f"{reader.location(ROTATION_BUFFERS[0])}: {ROTATION_BUFFERS[0]} / {ROTATION_BUFFERS[1]}"
        for name, tensor in heads.items():
            if not torch.isfinite(tensor).all():
                raise CheckpointError(f"{reader.location(name)}: tensor {name} has NaN or Inf values; expected "
                                      "finite head weights (they become so8t.* metadata)")
    else:
        rotations = triality.triality_rotations(config.so8t_rotation_seed).float()
        cross_head = triality.cross_head_rotation(config.so8t_rotation_seed).float()
        heads = {name: t for head in HEADS for name, t in init_head(config, head, dtype).items()}
        source = f"{reader.model_dir}: rotations generated from so8t_rotation_seed"
    triality.validate_rotations(rotations, cross_head, source=source)
    return rotations, cross_head, heads


def load_pretrained(model_dir: str | Path, torch_dtype=None, *, device_map=None, device=None, fold: bool = False,
                    **config_overrides) -> SO8TTransformerForCausalLM:
    """The model of an SO8T or plain Qwen3 checkpoint on one device (resolve_device), folded when fold is
    true: an SO8T checkpoint's q/k/v/gate/up are folded as they are read (float64, cast once); a plain Qwen3
    checkpoint already holds the folded weights, so they are taken as they are, with nothing absorbed."""
    target = resolve_device(device_map, device)
    with CheckpointReader(model_dir) as reader:
        return _load(reader, model_dir, torch_dtype, config_overrides, target, fold)


def _load(reader: CheckpointReader, model_dir: str | Path, torch_dtype, config_overrides: dict,
          device: torch.device = torch.device("cpu"), fold: bool = False):
    is_so8t = reader.raw_config.get("model_type") == MODEL_TYPE
    config = SO8TConfig.from_dict(reader.raw_config, source=str(Path(model_dir) / "config.json"),
                                  **config_overrides)
    config.check_token_ids(str(Path(model_dir) / "config.json"))
    dtype = resolve_dtype(torch_dtype, config)
    with torch.device("meta"):
        model = SO8TTransformerForCausalLM(config)

    check_tensors(reader, config, is_so8t)
    rotations, cross_head, heads = rotations_and_heads(reader, config, is_so8t, dtype)
    state: dict[str, torch.Tensor] = {ROTATION_BUFFERS[0]: rotations, ROTATION_BUFFERS[1]: cross_head, **heads}
    state = {name: tensor.to(device) for name, tensor in state.items()}
    # Absorb (or fold) in float64 with exactly the float32 rotations the model holds and applies, cast once;
    # on a CUDA target the GPU does it.
    work = device if device.type == "cuda" else torch.device("cpu")
    plan = plan_rotations(config, rotations.double().to(work), cross_head.double().to(work))
    stored_folded = holds_folded_weights(config, is_so8t)
    transform = (None if stored_folded else fold_weight) if fold else (unfold_weight if stored_folded else None)

    for name in model.state_dict():
        src = source_name(name, is_so8t)
        if name in state or (config.tie_word_embeddings and name == "task_head.weight"):
            continue  # generated extras, or the tied head (check_tensors has vouched for everything else)
        if transform is None or role(src).side == "none":
            state[name] = reader.read(src, dtype).to(device)
        else:
            # float32 holds bf16/f16/f32 values exactly and moves half the bytes to the GPU; FP8 scaled by a
            # float32 scale needs float64 to be exact
            exact = torch.float32 if reader.info(src)["dtype"] in ("BF16", "F16", "F32") else torch.float64
            weight = reader.read(src, exact if work.type == "cuda" else torch.float64).to(work).double()
            state[name] = transform(src, weight, plan).to(device=device, dtype=dtype).contiguous()
            del weight
    model.load_state_dict(state, strict=False, assign=True)
    model.model.folded = fold
    if config.tie_word_embeddings:
        model.task_head.weight = model.model.embed_tokens.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(f"{model_dir}: no weights for {', '.join(missing)}")
    model.name_or_path = str(model_dir)
    return model.eval()


def _shard(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _is_so8t_checkpoint(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def check_save_target(model_dir: Path) -> bool:
    """Whether save_pretrained would write into an existing SO8T checkpoint (True) or a new or empty folder
    (False); CheckpointError for anything it refuses. Long jobs call it before they start."""
    model_dir = Path(model_dir)
    if model_dir.exists() and not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: exists and is not a folder; expected a folder to save into")
    existing = model_dir.is_dir() and any(model_dir.iterdir())
    if existing and not _is_so8t_checkpoint(model_dir):
        raise CheckpointError(f"{model_dir}: folder is not empty and holds no SO8T checkpoint; refusing to write "
                              "into it (its files could be lost): save to a new folder")
    return existing


def save_pretrained(model: SO8TTransformerForCausalLM, model_dir: str | Path,
                    max_shard_bytes: int = 4 << 30) -> None:
    """Write config.json (model_type so8t) and safetensors weights, buffers and heads; copy tokenizer files
    from the folder the model was loaded from.

    Nothing of anyone else's is ever lost: a new (or empty) folder appears complete or not at all; an existing
    SO8T checkpoint has only our files replaced, each atomically; any other non-empty folder (a Qwen3
    checkpoint, the working directory) is refused, as mlx-lm's convert refuses an existing output.
    """
    model_dir = Path(model_dir)
    existing = check_save_target(model_dir)
    state = {n: t.detach() for n, t in model.state_dict().items()
             if not (model.config.tie_word_embeddings and n == "task_head.weight")}
    shards = _shard(state, max_shard_bytes)
    files = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    source = Path(model.name_or_path) if getattr(model, "name_or_path", None) else None
    # The weights are written in the layout the model holds them in (a folded model folded), never rotated
    # on the way out: fold(unfold(W)) rounds, so only that keeps a Qwen3 source's weights bit for bit.
    config = dataclasses.replace(model.config, so8t_folded_weights=model.is_folded)

    def write_into(folder: Path) -> None:
        with _StoredFP8(model, source, folder) as fp8:
            for file, shard in zip(files, shards):
                with atomic_output(folder / file) as tmp:
                    tensors = {}
                    for name, tensor in shard.items():
                        tensors.update(fp8.as_stored(name, tensor))
                    save_file(tensors, tmp, metadata={"format": "pt"})
            raw = {**config.to_dict(), **({"quantization_config": fp8.quantization_config} if fp8.used else {})}
        with atomic_output(folder / "config.json") as tmp:
            tmp.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        if len(shards) > 1:
            weight_map = {name: file for file, shard in zip(files, shards) for name in shard}
            with atomic_output(folder / INDEX_FILE) as tmp:
                tmp.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        for file in TOKENIZER_FILES:
            if source and (source / file).is_file() and not _same_file(source / file, folder / file):
                with atomic_output(folder / file) as tmp:
                    shutil.copyfile(source / file, tmp)

    if existing:
        write_into(model_dir)
        # weights of an earlier save with another shard layout would be read instead of, or beside, ours
        stale = {p.name for p in model_dir.glob("model*.safetensors")} - set(files)
        if len(shards) == 1:
            stale.add(INDEX_FILE)
        for name in sorted(stale):
            (model_dir / name).unlink(missing_ok=True)
        fsync_folder(model_dir)
        return
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.", suffix=".tmp", dir=model_dir.parent))
    try:
        write_into(tmp_dir)
        os.chmod(tmp_dir, 0o777 & ~current_umask())  # mkdtemp makes 0700; a checkpoint is an ordinary folder
        os.replace(tmp_dir, model_dir)  # onto a missing or empty folder
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    fsync_folder(model_dir.parent)


class _StoredFP8:
    """Block-FP8 tensors of the checkpoint a model was loaded from, written back as that checkpoint stored them
    (e4m3 bytes and scales) when the model still holds exactly what loading made of them.

    Loading dequantises FP8 into the model's dtype, and quantising again would not give the same bytes (scales
    are not recoverable from the values in general), so an FP8 checkpoint saved from its model would otherwise
    grow to bf16 and lose the FP8 values' precision. A tensor qualifies when the source stores it in the
    layout it is written in (any tensor but q/k/v/gate/up, and those when the model is folded as the source is)
    and the source's values, read as loading reads them, equal the model's bit for bit: anything trained or
    edited since is written as the model holds it."""

    def __init__(self, model: SO8TTransformerForCausalLM, source: Path | None, destination: Path):
        self.model, self.used, self.quantization_config = model, False, None
        self.reader = None
        if source is None or not (source / "config.json").is_file() or _same_file(source, destination):
            return  # saving into the folder read from: its files are being replaced
        try:
            reader = CheckpointReader(source)
            config = SO8TConfig.from_dict(reader.raw_config, source=str(source / "config.json"))
        except ValueError:
            return  # the source has changed or gone since loading: write what the model holds
        if reader.fp8_block is None:
            reader.close()
            return
        self.reader, self.is_so8t = reader, reader.raw_config.get("model_type") == MODEL_TYPE
        self.source_folded = holds_folded_weights(config, self.is_so8t)
        self.quantization_config = reader.raw_config["quantization_config"]

    def __enter__(self) -> _StoredFP8:
        return self

    def __exit__(self, *exc) -> None:
        if self.reader is not None:
            self.reader.close()

    def as_stored(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: tensor} as written: the source's FP8 weight and scale where they qualify, else the tensor."""
        tensor = tensor.contiguous()
        if self.reader is None:
            return {name: tensor}
        stored = source_name(name, self.is_so8t)
        same_layout = role(name).side == "none" or self.model.is_folded == self.source_folded
        if (not same_layout or stored not in self.reader or self.reader.info(stored)["dtype"] != "F8_E4M3"
                or tuple(self.reader.shape(stored)) != tuple(tensor.shape)):
            return {name: tensor}
        if not torch.equal(self.reader.read(stored, tensor.dtype), tensor.cpu()):
            return {name: tensor}
        self.used = True
        scale = stored.removesuffix(".weight") + SCALE_SUFFIX
        return {name: self.reader.read_raw(stored), name.removesuffix(".weight") + SCALE_SUFFIX:
                self.reader.read_raw(scale)}


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
