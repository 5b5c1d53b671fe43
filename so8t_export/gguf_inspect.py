"""`so8t-export inspect`: a readable dump of a GGUF's general.*, qwen3.* and so8t.* metadata."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from .metadata import read_so8t_metadata
from .triality import RotationError, validate_rotations

SHOWN_PREFIXES = ("general.", "qwen3.", "so8t.")
ARRAY_PREVIEW = 6


def _format(value) -> str:
    if isinstance(value, list):
        if len(value) <= ARRAY_PREVIEW:
            return repr(value)
        kind = type(value[0]).__name__
        return f"[{len(value)} x {kind}] {value[:ARRAY_PREVIEW]!r}..."
    return repr(value)


def inspect_gguf(path: str | Path) -> tuple[str, bool]:
    """(text, rotations_ok): metadata grouped by prefix, tensor counts by type, and the triality check."""
    path = Path(path)
    reader = gguf.GGUFReader(path)
    lines = [f"{path}: GGUF v{reader.fields['GGUF.version'].contents()}, {len(reader.tensors)} tensors"]
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    lines.append("  tensor types: " + ", ".join(f"{n} x {t}" for t, n in sorted(types.items())))
    for prefix in SHOWN_PREFIXES:
        lines.append(f"[{prefix.rstrip('.')}]")
        for key, field in reader.fields.items():
            if key.startswith(prefix):
                lines.append(f"  {key} = {_format(field.contents())}")
    if reader.get_field("so8t.version") is None:
        lines.append("no so8t.* metadata: a plain GGUF, not written by so8t-export")
        return "\n".join(lines), True
    meta = read_so8t_metadata(reader, path)
    rotations = torch.from_numpy(np.ascontiguousarray(meta.rotations))
    cross = torch.from_numpy(np.ascontiguousarray(meta.cross_head)) if meta.cross_head is not None else None
    lines.append("[triality check]")
    try:
        errors = validate_rotations(rotations, cross, source=f"{path}: so8t.triality.rotations")
    except RotationError as err:
        lines.append(f"  FAILED: {err}")
        return "\n".join(lines), False
    for name, value in errors.items():
        lines.append(f"  {name}: {value:.2e}")
    lines.append("  OK: orthogonal, det +1, R_v(xy) = (R_+x)(R_-y) within float32 rounding")
    return "\n".join(lines), True
