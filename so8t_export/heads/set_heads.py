"""Put new heads into an exported GGUF without re-exporting it: only the so8t.* head keys change.

The heads live in the metadata, so the new file is the old one with its key-value section rewritten: the
header's key count, every other key-value pair and every tensor info copied byte for byte, the head entries
encoded by gguf-py's own GGUFWriter, then the tensor data copied unchanged (tensor offsets are relative to
the data section, so they stay valid wherever it starts). The copy is ``os.copy_file_range``: the kernel
moves the bytes (or, on a filesystem with reflinks, shares them) without them passing through Python. The
result goes to a temporary name beside the destination and is renamed over it only once it reads back with
the new heads and the same tensors.
"""

from __future__ import annotations

import errno
import os
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from ..config import HEAD_LABELS
from ..gguf_file import GGUFHeader, MetadataError, read_gguf_header, read_qwen3_hparams
from ..io import PathError, atomic_output, check_output_path
from ..metadata import SCHEMA_VERSION, head_entries, head_keys, read_optional_so8t_metadata

COPY_CHUNK = 1 << 30  # bytes per copy_file_range call (the kernel may move fewer)
KERNEL_COPY_UNSUPPORTED = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM}


@dataclass
class NewHeads:
    """Both heads as they go into a file: weight [2, hidden] and bias [2] in float32, and the threshold."""

    weights: dict[str, np.ndarray]
    biases: dict[str, np.ndarray]
    thresholds: dict[str, float]
    source: str


@dataclass
class SetHeadsReport:
    output: Path
    metadata_bytes: int  # header, key-value pairs and tensor infos of the new file
    data_bytes: int  # tensor data copied
    seconds: float
    old_thresholds: dict[str, float]
    new_thresholds: dict[str, float]

    def summary(self) -> str:
        thresholds = ", ".join(f"{head} {self.old_thresholds[head]:.4g} -> {self.new_thresholds[head]:.4g}"
                               for head in HEAD_LABELS)
        return (f"{self.output}: heads replaced ({self.metadata_bytes / 2**20:.1f} MiB of metadata written, "
                f"{self.data_bytes / 2**20:.0f} MiB of tensor data copied unchanged) in {self.seconds:.2f} s; "
                f"thresholds {thresholds}")


def read_heads(model_dir: str | Path) -> NewHeads:
    """The heads and thresholds of an SO8T checkpoint (what train-heads writes), read from its safetensors
    and config.json only."""
    from ..checkpoint import CheckpointReader
    from ..config import SO8TConfig

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise PathError(f"{model_dir}: heads folder is missing (expected an SO8T checkpoint, as train-heads "
                        "writes it)")
    config = SO8TConfig.from_pretrained(model_dir)
    weights, biases = {}, {}
    with CheckpointReader(model_dir) as reader:
        for head in HEAD_LABELS:
            for part, store in (("weight", weights), ("bias", biases)):
                name = f"{head}_head.{part}"
                if name not in reader:
                    raise MetadataError(f"{model_dir}: tensor {name} is missing (not an SO8T checkpoint with "
                                        "heads; train-heads writes one)")
                values = reader.read(name).numpy()
                if not np.isfinite(values).all():
                    raise MetadataError(f"{model_dir}: tensor {name} holds non-finite values")
                store[head] = values
    return NewHeads(weights, biases, {head: config.head_threshold(head) for head in HEAD_LABELS},
                    str(model_dir))


def set_heads(gguf_path: str | Path, heads: NewHeads | str | Path, *, output: str | Path | None = None) -> SetHeadsReport:
    """Replace the so8t.* heads and thresholds of gguf_path (in place, or into output). Raises before
    writing anything for a file without so8t.* metadata or heads of another width; the original file is
    never modified (a new file is renamed over it)."""
    start = time.perf_counter()
    path = Path(gguf_path)
    if not isinstance(heads, NewHeads):
        heads = read_heads(heads)
    header = read_gguf_header(path)
    hparams = read_qwen3_hparams(header, path)
    metadata = read_optional_so8t_metadata(header, path, hparams, check_rotations=False)
    if metadata is None:
        raise MetadataError(f"{path}: no so8t.* metadata; set-heads replaces the heads of a GGUF written by "
                            "so8t-export (export the checkpoint with so8t-export gguf)")
    hidden = hparams.embedding_length
    for head in HEAD_LABELS:
        for part, values, shape in (("weight", heads.weights[head], (2, hidden)),
                                    ("bias", heads.biases[head], (2,))):
            if tuple(values.shape) != shape:
                raise MetadataError(f"{heads.source}: {head}_head.{part} has shape {list(values.shape)}; "
                                    f"{path} needs {list(shape)} (qwen3.embedding_length = {hidden})")
    destination = Path(output) if output is not None else path
    if output is not None:
        check_output_path(destination, [path])

    entries = {"so8t.version": ("so8t.version", SCHEMA_VERSION, gguf.GGUFValueType.UINT32, None)}
    for head in HEAD_LABELS:
        for entry in head_entries(head, heads.weights[head], heads.biases[head], heads.thresholds[head]):
            entries[entry[0]] = entry
    encoded = _encode(entries.values(), header.byte_order)
    pairs = _new_pairs(header, encoded)
    metadata_bytes, data_bytes = _write(path, header, pairs, destination)
    return SetHeadsReport(destination, metadata_bytes, data_bytes, time.perf_counter() - start,
                          dict(metadata.thresholds), dict(heads.thresholds))


def _encode(entries, byte_order: str) -> dict[str, bytes]:
    """Each key-value pair as GGUF bytes, written by gguf-py's GGUFWriter into a scratch file and cut out of
    it (the writer has no public way to encode a pair on its own)."""
    endian = gguf.GGUFEndian.BIG if byte_order == ">" else gguf.GGUFEndian.LITTLE
    with tempfile.TemporaryDirectory(prefix="so8t-heads-") as scratch:
        scratch_file = Path(scratch) / "pairs.gguf"
        writer = gguf.GGUFWriter(scratch_file, "qwen3", endianess=endian)
        for key, value, vtype, sub_type in entries:
            writer.add_key_value(key, value, vtype, sub_type=sub_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
        written = read_gguf_header(scratch_file)
        data = scratch_file.read_bytes()
    return {key: data[slice(*field.span)] for key, field in written.fields.items() if key != "general.architecture"}


def _new_pairs(header: GGUFHeader, encoded: dict[str, bytes]) -> list[bytes]:
    """The key-value pairs of the new file, in the old order: every pair copied, except so8t.version and the
    head keys, which are replaced where the old head started (a version-1 file gains the threshold keys)."""
    replaced = {key for head in HEAD_LABELS for key in head_keys(head, version=2)} | {"so8t.version"}
    pairs = []
    with open(header.path, "rb") as f:
        for key, field in header.fields.items():
            if key == "so8t.version":
                pairs.append(encoded[key])
            elif key in replaced:
                head = key.removeprefix("so8t.").split("_head.")[0]
                if key == f"so8t.{head}_head.weight":
                    pairs += [encoded[k] for k in head_keys(head)]
            else:
                f.seek(field.span[0])
                pairs.append(f.read(field.span[1] - field.span[0]))
    return pairs


def _write(source: Path, header: GGUFHeader, pairs: list[bytes], destination: Path) -> tuple[int, int]:
    """The new file under a temporary name, checked, then renamed to destination."""
    source_size = source.stat().st_size
    with open(source, "rb") as src, atomic_output(destination) as tmp:
        src.seek(0)
        fixed = src.read(16)  # magic, version, tensor count: unchanged
        src.seek(header.tensor_info_span[0])
        tensor_infos = src.read(header.tensor_info_span[1] - header.tensor_info_span[0])
        head = fixed + struct.pack(header.byte_order + "Q", len(pairs)) + b"".join(pairs) + tensor_infos
        padding = -len(head) % header.alignment
        data_bytes = source_size - header.data_start
        with open(tmp, "wb") as out:
            out.write(head + bytes(padding))
            _copy_range(src, out, header.data_start, len(head) + padding, data_bytes)
        _check(tmp, header, len(head) + padding)
    return len(head), data_bytes


def _copy_range(src, out, offset: int, out_offset: int, length: int) -> None:
    """length bytes of src from offset into out at out_offset: in the kernel where it can, else through Python."""
    out.flush()
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < length:
                n = os.copy_file_range(src.fileno(), out.fileno(), min(COPY_CHUNK, length - done), offset + done,
                                       out_offset + done)
                if n == 0:  # end of src: the check below names it
                    break
                done += n
        except OSError as error:
            # The kernel cannot copy between these files (other filesystems, no support, a seccomp filter):
            # the rest goes through Python. A real IO error (EIO, ENOSPC) would only recur there: raise it.
            if error.errno not in KERNEL_COPY_UNSUPPORTED:
                raise
    src.seek(offset + done)
    out.seek(out_offset + done)
    while done < length:
        chunk = src.read(min(64 << 20, length - done))
        if not chunk:
            raise MetadataError(f"{src.name}: ended {length - done} bytes early while copying the tensor data")
        out.write(chunk)
        done += len(chunk)


def _check(tmp: Path, old: GGUFHeader, data_start: int) -> None:
    """The new file reads back: same tensors (name, type, shape, size), now at data_start."""
    new = read_gguf_header(tmp)
    shifted = [(t.name, t.tensor_type, t.shape, t.data_offset - old.data_start, t.n_bytes) for t in old.tensors]
    moved = [(t.name, t.tensor_type, t.shape, t.data_offset - data_start, t.n_bytes) for t in new.tensors]
    if new.data_start != data_start or shifted != moved:
        raise MetadataError(f"{tmp}: the rewritten file does not hold the same tensors (internal error)")
