"""The so8t.* GGUF metadata schema, version 1: written by the exporter, read by inspect/parity/runtime.

Stock llama.cpp refuses a GGUF with tensors it does not know but ignores unknown keys, so everything SO8T
adds (rotations, head types, the two classification heads) travels as metadata. README, "GGUF metadata",
documents each key for other tools.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .config import HEAD_LABELS, SO8TConfig, triality_types
from .gguf_file import MetadataError, Qwen3Hparams, array_value, finite, read_qwen3_hparams, scalar_value

# Version 2 adds so8t.<head>_head.threshold (train-heads calibrates them; the runtime's default gate).
# Version 1 files (no thresholds) still read, with DEFAULT_THRESHOLD for both heads.
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
DEFAULT_THRESHOLD = 0.5
PREFIX = "so8t."
FOLD_ERROR_KEY = "so8t.fold.max_abs_error"
SOURCE_HASH_KEY = "so8t.source.sha256"
_V = gguf.GGUFValueType


def _floats(t) -> list[float]:
    """A torch tensor or numpy array as the float32 values GGUF stores."""
    if hasattr(t, "detach"):
        t = t.detach().float().numpy()
    return np.asarray(t, dtype=np.float32).ravel().tolist()


def so8t_entries(config: SO8TConfig, rotations, cross_head, heads: dict, fold_error: float,
                 source_sha256: str) -> list[tuple]:
    """(key, value, GGUFValueType, sub_type) for every so8t.* key, in schema order.

    heads maps 'safety_head.weight' / '.bias' and 'authority_head.weight' / '.bias' to tensors.
    """
    entries: list[tuple] = [
        ("so8t.version", SCHEMA_VERSION, _V.UINT32, None),
        ("so8t.rotation_dim", config.so8t_rotation_dim, _V.UINT32, None),
        ("so8t.rotations_folded", True, _V.BOOL, None),
    ]
    entries += [(f"so8t.flags.{flag}", value, _V.BOOL, None) for flag, value in config.so8t_flags().items()]
    entries += [
        ("so8t.triality.rotations", _floats(rotations), _V.ARRAY, _V.FLOAT32),
        ("so8t.triality.q_head_types",
         triality_types(config.num_attention_heads, config.so8t_triality_symmetry), _V.ARRAY, _V.INT32),
        ("so8t.triality.kv_head_types",
         triality_types(config.num_key_value_heads, config.so8t_triality_symmetry), _V.ARRAY, _V.INT32),
    ]
    if config.so8t_cross_head_interaction:
        entries.append(("so8t.cross_head.rotation", _floats(cross_head), _V.ARRAY, _V.FLOAT32))
    entries.append(("so8t.mlp.rotation_types",
                    triality_types(config.num_hidden_layers, config.so8t_triality_symmetry), _V.ARRAY,
                    _V.INT32))
    for head in HEAD_LABELS:
        entries += head_entries(head, heads[f"{head}_head.weight"], heads[f"{head}_head.bias"],
                                config.head_threshold(head))
    entries += [
        (FOLD_ERROR_KEY, float(fold_error), _V.FLOAT32, None),
        (SOURCE_HASH_KEY, source_sha256, _V.STRING, None),
    ]
    return entries


def head_entries(head: str, weight, bias, threshold: float) -> list[tuple]:
    """The entries of one head (head_keys order): weight [2, hidden] and bias [2] as float32 arrays."""
    return [
        (f"so8t.{head}_head.weight", _floats(weight), _V.ARRAY, _V.FLOAT32),
        (f"so8t.{head}_head.bias", _floats(bias), _V.ARRAY, _V.FLOAT32),
        (f"so8t.{head}_head.labels", list(HEAD_LABELS[head]), _V.ARRAY, _V.STRING),
        (threshold_key(head), float(threshold), _V.FLOAT32, None),
    ]


def add_so8t_metadata(writer: gguf.GGUFWriter, entries: list[tuple]) -> None:
    for key, value, vtype, sub_type in entries:
        writer.add_key_value(key, value, vtype, sub_type=sub_type)


def field_value(reader: gguf.GGUFReader, key: str, path: str | Path = "GGUF"):
    """The value of any key, untyped; MetadataError when it is missing (see gguf_file for typed reads)."""
    field = reader.get_field(key)
    if field is None:
        raise MetadataError(f"{path}: metadata key {key} is missing")
    try:
        return field.contents()
    except UnicodeDecodeError as err:
        raise MetadataError(f"{path}: {key} holds a string that is not UTF-8 ({err.reason})") from None


@dataclass
class SO8TMetadata:
    """so8t.* keys read back from a GGUF, as arrays shaped for use."""

    version: int
    rotation_dim: int
    flags: dict[str, bool]
    rotations: np.ndarray  # [3, 8, 8]
    cross_head: np.ndarray | None  # [8, 8]
    q_head_types: np.ndarray
    kv_head_types: np.ndarray
    mlp_rotation_types: np.ndarray
    heads: dict[str, tuple[np.ndarray, np.ndarray, list[str]]]  # name -> (weight [2, hidden], bias [2], labels)
    thresholds: dict[str, float]  # name -> P(class 1) at which the runtime's gate acts by default
    fold_max_abs_error: float
    source_sha256: str


def threshold_key(head: str) -> str:
    return f"so8t.{head}_head.threshold"


def head_keys(head: str, version: int = SCHEMA_VERSION) -> list[str]:
    """The keys that hold one head, in schema order (what set-heads replaces)."""
    return [f"so8t.{head}_head.{part}" for part in ("weight", "bias", "labels")] + (
        [threshold_key(head)] if version >= 2 else [])


# The schema, as so8t_entries writes it. so8t.cross_head.rotation is there exactly when
# so8t.flags.cross_head_interaction is true.
FLAG_NAMES = tuple(SO8TConfig().so8t_flags())
CROSS_HEAD_KEY = "so8t.cross_head.rotation"


def schema_keys(version: int = SCHEMA_VERSION) -> list[str]:
    return (["so8t.version", "so8t.rotation_dim", "so8t.rotations_folded"]
            + [f"so8t.flags.{flag}" for flag in FLAG_NAMES]
            + ["so8t.triality.rotations", "so8t.triality.q_head_types", "so8t.triality.kv_head_types",
               CROSS_HEAD_KEY, "so8t.mlp.rotation_types"]
            + [key for head in HEAD_LABELS for key in head_keys(head, version)]
            + [FOLD_ERROR_KEY, SOURCE_HASH_KEY])

# Largest plausible so8t.fold.max_abs_error. Exports write ~1e-15 from an SO8T checkpoint (float64 fold) and
# ~1e-7 from a plain Qwen3 checkpoint (bounded by the float32 rotation buffers; 2.1e-7 on the tiny demo model,
# 1.7e-7 on the 4B layout); the exporter refuses anything above 1e-6 relative to the projection's size. The
# check applies the documented map by sparse matrices, independently of the einsum code that folds, so a
# transposed rotation or a swapped mixing order is off by O(1). 1e-3 leaves a margin of ~5000x over what real
# exports write and stays 1000x below such a fold.
FOLD_ERROR_LIMIT = 1e-3
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_V_U32, _V_I32, _V_F32 = (_V.UINT32,), (_V.INT32,), (_V.FLOAT32,)


def has_so8t_metadata(reader: gguf.GGUFReader) -> bool:
    """Whether any so8t.* key is present (a stock qwen3 GGUF has none)."""
    return any(key.startswith(PREFIX) for key in reader.fields)


def read_so8t_metadata(reader: gguf.GGUFReader, path: str | Path = "GGUF",
                       hparams: Qwen3Hparams | None = None, *, check_rotations: bool = True) -> SO8TMetadata:
    """Parse and check the so8t.* keys against the schema and the qwen3.* shape.

    Raises MetadataError naming the file and the key on anything missing (a file with some so8t.* keys
    must have all of them), unknown, of the wrong type or length, non-finite, or inconsistent: head types
    other than the flags imply, labels other than the schema's, rotations that fail the triality check
    (triality.validate_rotations), a fold error that is NaN, negative or above FOLD_ERROR_LIMIT, a sha256 that
    is not 64 hex digits. hparams (read_qwen3_hparams) is read if not given. check_rotations=False skips the
    triality check (the runtime: the rotations are folded already, and the check needs torch, which the
    runtime never imports).
    """
    if hparams is None:
        hparams = read_qwen3_hparams(reader, path)
    present = {key for key in reader.fields if key.startswith(PREFIX)}
    version = scalar_value(reader, "so8t.version", path, _V_U32)
    if version not in READABLE_VERSIONS:
        raise MetadataError(f"{path}: so8t.version = {version}; expected "
                            f"{' or '.join(map(str, READABLE_VERSIONS))} (the schemas this so8t-export reads)")
    keys = schema_keys(version)
    unknown = sorted(present - set(keys))
    if unknown:
        raise MetadataError(f"{path}: {unknown[0]} is not a key of so8t.* schema version {version}")
    flags = {}
    def missing(key: str) -> MetadataError:
        return MetadataError(f"{path}: metadata key {key} is missing (the file has so8t.* metadata, but "
                             f"not all of schema version {version})")

    for flag in FLAG_NAMES:
        key = f"so8t.flags.{flag}"
        if key not in present:
            raise missing(key)
        flags[flag] = bool(scalar_value(reader, key, path, (_V.BOOL,)))
    for key in keys:
        if key not in present and key != CROSS_HEAD_KEY:
            raise missing(key)

    rotation_dim = scalar_value(reader, "so8t.rotation_dim", path, _V_U32)
    if rotation_dim != 8:
        raise MetadataError(f"{path}: so8t.rotation_dim = {rotation_dim}; expected 8 (triality exists "
                            "only in dimension 8)")
    if not scalar_value(reader, "so8t.rotations_folded", path, (_V.BOOL,)):
        raise MetadataError(f"{path}: so8t.rotations_folded = false; expected true (llama.cpp runs the "
                            "tensors as stock Qwen3, so the rotations must be folded into them)")

    def floats(key: str, shape: tuple[int, ...], what: str = "") -> np.ndarray:
        values = array_value(reader, key, path, _V_F32, length=math.prod(shape),
                             length_of=what or f"shape {list(shape)}")
        return finite(values, key, path).reshape(shape)

    def types(key: str, count: int, count_key: str, symmetry: bool) -> np.ndarray:
        values = array_value(reader, key, path, _V_I32, length=count, length_of=f"{count_key} = {count}")
        values = np.asarray(values, dtype=np.int32)
        outside = values[(values < 0) | (values > 2)]
        if outside.size:
            raise MetadataError(f"{path}: {key} holds {int(outside[0])}; expected triality types 0, 1 or 2")
        expected = np.asarray(triality_types(count, symmetry), dtype=np.int32)
        if not np.array_equal(values, expected):
            i = int(np.flatnonzero(values != expected)[0])
            rule = "index % 3" if symmetry else "0 everywhere"
            raise MetadataError(f"{path}: {key}[{i}] = {int(values[i])}; expected {int(expected[i])} "
                                f"({rule}, as so8t.flags.triality_symmetry = {str(symmetry).lower()} "
                                "implies)")
        return values

    symmetry = flags["triality_symmetry"]
    rotations = floats("so8t.triality.rotations", (3, 8, 8), "3 x 8 x 8: R_v, R_+, R_-")
    # validated below, with the cross-head rotation (orthogonal, det +1, the triality identity)
    if flags["cross_head_interaction"]:
        if CROSS_HEAD_KEY not in present:
            raise MetadataError(f"{path}: metadata key {CROSS_HEAD_KEY} is missing; "
                                "so8t.flags.cross_head_interaction = true needs it")
        cross = floats(CROSS_HEAD_KEY, (8, 8))
    elif CROSS_HEAD_KEY in present:
        raise MetadataError(f"{path}: {CROSS_HEAD_KEY} is present, but so8t.flags.cross_head_interaction "
                            "= false; expected no cross-head rotation")
    else:
        cross = None
    if check_rotations:
        import torch

        from .triality import RotationError, validate_rotations

        try:
            validate_rotations(torch.from_numpy(np.ascontiguousarray(rotations)),
                               None if cross is None else torch.from_numpy(np.ascontiguousarray(cross)),
                               source=f"{path}: so8t.triality.rotations")
        except RotationError as err:
            message = str(err).replace("so8t.triality.rotations: cross_head", CROSS_HEAD_KEY + ":")
            raise MetadataError(message) from None
    q_types = types("so8t.triality.q_head_types", hparams.head_count, "qwen3.attention.head_count", symmetry)
    kv_types = types("so8t.triality.kv_head_types", hparams.head_count_kv, "qwen3.attention.head_count_kv",
                     symmetry)
    mlp_types = types("so8t.mlp.rotation_types", hparams.block_count, "qwen3.block_count", symmetry)

    heads, thresholds = {}, {}
    hidden = hparams.embedding_length
    for head, labels in HEAD_LABELS.items():
        weight = floats(f"so8t.{head}_head.weight", (2, hidden), f"2 x qwen3.embedding_length = 2 x {hidden}")
        bias = floats(f"so8t.{head}_head.bias", (2,))
        key = f"so8t.{head}_head.labels"
        found = array_value(reader, key, path, (_V.STRING,))
        if found != list(labels):
            raise MetadataError(f"{path}: {key} = {found!r}; expected {list(labels)!r}")
        heads[head] = (weight, bias, found)
        if version >= 2:
            value = float(scalar_value(reader, threshold_key(head), path, _V_F32))
            if not 0 <= value <= 1:  # NaN fails too
                raise MetadataError(f"{path}: {threshold_key(head)} = {value:.7g}; expected a probability in "
                                    "[0, 1]")
            thresholds[head] = value
        else:
            thresholds[head] = DEFAULT_THRESHOLD

    fold_error = float(scalar_value(reader, FOLD_ERROR_KEY, path, _V_F32))
    if not (math.isfinite(fold_error) and 0 <= fold_error <= FOLD_ERROR_LIMIT):
        raise MetadataError(f"{path}: {FOLD_ERROR_KEY} = {fold_error:.7g}; expected a finite number in "
                            f"[0, {FOLD_ERROR_LIMIT:g}] (a correct fold is off by ~1e-15 to ~1e-7)")
    sha256 = scalar_value(reader, SOURCE_HASH_KEY, path, (_V.STRING,))
    if not _SHA256.fullmatch(sha256):
        shown = sha256 if len(sha256) <= 80 else sha256[:77] + "..."
        raise MetadataError(f"{path}: {SOURCE_HASH_KEY} = {shown!r}; expected 64 hexadecimal digits")
    return SO8TMetadata(
        version=version, rotation_dim=rotation_dim, flags=flags, rotations=rotations, cross_head=cross,
        q_head_types=q_types, kv_head_types=kv_types, mlp_rotation_types=mlp_types, heads=heads,
        thresholds=thresholds, fold_max_abs_error=fold_error, source_sha256=sha256,
    )


def read_optional_so8t_metadata(reader: gguf.GGUFReader, path: str | Path = "GGUF",
                                hparams: Qwen3Hparams | None = None, *,
                                check_rotations: bool = True) -> SO8TMetadata | None:
    """None for a file without any so8t.* key (a stock qwen3 GGUF), else read_so8t_metadata."""
    if not has_so8t_metadata(reader):
        return None
    return read_so8t_metadata(reader, path, hparams, check_rotations=check_rotations)
