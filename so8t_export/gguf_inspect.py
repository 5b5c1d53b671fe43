"""`so8t-export inspect`: a dump of a GGUF's general.*, qwen3.* and so8t.* metadata, and its checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGUFValueType

from .gguf_file import MetadataError, read_gguf_header, read_qwen3_hparams, type_name
from .metadata import has_so8t_metadata, read_so8t_metadata
from .triality import RotationError, validate_rotations

SHOWN_PREFIXES = ("general.", "qwen3.", "so8t.")
ARRAY_PREVIEW = 6


def _format(field) -> str:
    value = field.contents()
    if value is None:  # a long string array or nested arrays: checked by read_gguf_header, not kept
        return f"[{field.count} x {type_name(field.types[1:])}] (not shown)"
    if isinstance(value, list):
        if len(value) <= ARRAY_PREVIEW:
            return repr(value)
        kind = type(value[0]).__name__
        return f"[{len(value)} x {kind}] {value[:ARRAY_PREVIEW]!r}..."
    return repr(value)


def inspect_gguf(path: str | Path) -> tuple[str, str | None]:
    """(text, error): metadata grouped by prefix, tensor counts by type and the checks' results; error is
    None when every check passed, else the one-line reason (qwen3.* hyperparameters llama.cpp would abort
    on, inconsistent so8t.* metadata, rotations that fail the triality check).

    A file that is no readable GGUF raises MetadataError instead (there is nothing to show).
    """
    path = Path(path)
    reader = read_gguf_header(path)  # the metadata without GGUFReader's parse of the vocabulary
    lines = [f"{path}: GGUF v{reader.version}, {len(reader.tensor_types)} tensors"]
    types: dict[str, int] = {}
    for tensor_type in reader.tensor_types:
        types[tensor_type.name] = types.get(tensor_type.name, 0) + 1
    lines.append("  tensor types: " + ", ".join(f"{n} x {t}" for t, n in sorted(types.items())))
    for prefix in SHOWN_PREFIXES:
        lines.append(f"[{prefix.rstrip('.')}]")
        for key, field in reader.fields.items():
            if key.startswith(prefix):
                lines.append(f"  {key} = {_format(field)}")
    arch = reader.get_field("general.architecture")
    is_qwen3 = arch is not None and arch.types == [GGUFValueType.STRING] and _format(arch) == repr("qwen3")
    if not is_qwen3 and not has_so8t_metadata(reader):
        lines.append("no so8t.* metadata and not a qwen3 model: a plain GGUF, not written by so8t-export")
        return "\n".join(lines), None
    try:
        hparams = read_qwen3_hparams(reader, path)
        if not has_so8t_metadata(reader):
            lines.append("no so8t.* metadata: a plain qwen3 GGUF, not written by so8t-export")
            return "\n".join(lines), None
        meta = read_so8t_metadata(reader, path, hparams)
    except MetadataError as err:
        return "\n".join(lines), str(err)
    rotations = torch.from_numpy(np.ascontiguousarray(meta.rotations))
    cross = torch.from_numpy(np.ascontiguousarray(meta.cross_head)) if meta.cross_head is not None else None
    lines.append("[triality check]")
    try:
        errors = validate_rotations(rotations, cross, source=f"{path}: so8t.triality.rotations")
    except RotationError as err:
        lines.append(f"  FAILED: {err}")
        return "\n".join(lines), f"{err} (the triality check of the stored rotations)"
    for name, value in errors.items():
        lines.append(f"  {name}: {value:.2e}")
    lines.append("  OK: orthogonal, det +1, R_v(xy) = (R_+x)(R_-y) within float32 rounding")
    return "\n".join(lines), None
