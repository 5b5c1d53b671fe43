"""The so8t.* GGUF metadata schema, version 1: written by the exporter, read by inspect/parity/runtime.

Stock llama.cpp refuses a GGUF with tensors it does not know but ignores unknown keys, so everything SO8T
adds (rotations, head types, the two classification heads) travels as metadata. README, "GGUF metadata",
documents each key for other tools.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from .config import SO8TConfig
from .model import HEAD_LABELS
from .rotation import head_types, layer_types

SCHEMA_VERSION = 1
PREFIX = "so8t."
FOLD_ERROR_KEY = "so8t.fold.max_abs_error"
SOURCE_HASH_KEY = "so8t.source.sha256"
_V = gguf.GGUFValueType


class MetadataError(ValueError):
    """A GGUF whose so8t.* metadata is missing, mistyped or inconsistent; names the file and key."""


def _floats(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.detach().to(torch.float32).flatten()]


def so8t_entries(config: SO8TConfig, rotations: torch.Tensor, cross_head: torch.Tensor,
                 heads: dict[str, torch.Tensor], fold_error: float, source_sha256: str) -> list[tuple]:
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
         head_types(config.num_attention_heads, config.so8t_triality_symmetry).tolist(), _V.ARRAY, _V.INT32),
        ("so8t.triality.kv_head_types",
         head_types(config.num_key_value_heads, config.so8t_triality_symmetry).tolist(), _V.ARRAY, _V.INT32),
    ]
    if config.so8t_cross_head_interaction:
        entries.append(("so8t.cross_head.rotation", _floats(cross_head), _V.ARRAY, _V.FLOAT32))
    entries.append(("so8t.mlp.rotation_types",
                    layer_types(config.num_hidden_layers, config.so8t_triality_symmetry).tolist(), _V.ARRAY,
                    _V.INT32))
    for head, labels in HEAD_LABELS.items():
        entries += [
            (f"so8t.{head}_head.weight", _floats(heads[f"{head}_head.weight"]), _V.ARRAY, _V.FLOAT32),
            (f"so8t.{head}_head.bias", _floats(heads[f"{head}_head.bias"]), _V.ARRAY, _V.FLOAT32),
            (f"so8t.{head}_head.labels", list(labels), _V.ARRAY, _V.STRING),
        ]
    entries += [
        (FOLD_ERROR_KEY, float(fold_error), _V.FLOAT32, None),
        (SOURCE_HASH_KEY, source_sha256, _V.STRING, None),
    ]
    return entries


def add_so8t_metadata(writer: gguf.GGUFWriter, entries: list[tuple]) -> None:
    for key, value, vtype, sub_type in entries:
        writer.add_key_value(key, value, vtype, sub_type=sub_type)


def field_value(reader: gguf.GGUFReader, key: str, path: str | Path = "GGUF"):
    field = reader.get_field(key)
    if field is None:
        raise MetadataError(f"{path}: metadata key {key} is missing")
    return field.contents()


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
    fold_max_abs_error: float
    source_sha256: str


def read_so8t_metadata(reader: gguf.GGUFReader, path: str | Path = "GGUF") -> SO8TMetadata:
    """Parse and shape-check the so8t.* keys; raises MetadataError naming the key on any mismatch."""

    def get(key):
        return field_value(reader, key, path)

    version = get("so8t.version")
    if version != SCHEMA_VERSION:
        raise MetadataError(f"{path}: so8t.version = {version}; expected {SCHEMA_VERSION}")
    hidden = field_value(reader, "qwen3.embedding_length", path)

    def array(key, shape):
        values = np.asarray(get(key), dtype=np.float32)
        if values.size != int(np.prod(shape)):
            raise MetadataError(f"{path}: {key} has {values.size} values; expected {int(np.prod(shape))} "
                                f"(shape {list(shape)})")
        return values.reshape(shape)

    flags = {key.removeprefix("so8t.flags."): bool(reader.get_field(key).contents())
             for key in reader.fields if key.startswith("so8t.flags.")}
    heads = {}
    for head in HEAD_LABELS:
        heads[head] = (array(f"so8t.{head}_head.weight", (2, hidden)), array(f"so8t.{head}_head.bias", (2,)),
                       list(get(f"so8t.{head}_head.labels")))
    cross = array("so8t.cross_head.rotation", (8, 8)) if reader.get_field("so8t.cross_head.rotation") else None
    return SO8TMetadata(
        version=version, rotation_dim=get("so8t.rotation_dim"), flags=flags,
        rotations=array("so8t.triality.rotations", (3, 8, 8)), cross_head=cross,
        q_head_types=np.asarray(get("so8t.triality.q_head_types"), dtype=np.int32),
        kv_head_types=np.asarray(get("so8t.triality.kv_head_types"), dtype=np.int32),
        mlp_rotation_types=np.asarray(get("so8t.mlp.rotation_types"), dtype=np.int32),
        heads=heads, fold_max_abs_error=float(get(FOLD_ERROR_KEY)), source_sha256=get(SOURCE_HASH_KEY),
    )
