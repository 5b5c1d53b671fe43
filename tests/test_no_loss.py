"""Nothing is ever lost: outputs never replace inputs, folders are never emptied, writes are atomic, durable and
private until done, failed exports stop their threads, and library calls leave process-wide state alone."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from so8t_export import io
from so8t_export.checkpoint import CheckpointError, CheckpointReader
from so8t_export.cli import main
from so8t_export.export import ExportError, export_gguf
from so8t_export.model import SO8TTransformerForCausalLM


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _open_files_under(folder: Path) -> list[str]:
    root = str(folder.resolve())
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the fd listdir itself used, now closed
            continue
        if target.startswith(root + os.sep):
            targets.append(target)
    return targets


@pytest.fixture
def source(qwen3_dir, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(qwen3_dir, folder)
    return folder


@pytest.mark.parametrize("target", ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"])
def test_an_output_onto_an_input_is_refused(source, target):
    before = _digest(source)
    result = CliRunner().invoke(main, ["gguf", str(source), "-o", str(source / target)])
    assert result.exit_code != 0
    assert "is an input of this command" in result.output and target in result.output
    assert _digest(source) == before  # every input byte as it was, and nothing added


def test_an_output_through_a_link_to_an_input_is_refused(source, tmp_path):
    link = tmp_path / "weights.gguf"
    link.symlink_to(source / "model.safetensors")
    before = _digest(source)
    with pytest.raises(ValueError, match="is an input of this command"):
        export_gguf(source, link, quant="f32")
    assert _digest(source) == before


def test_an_existing_output_is_replaced_whole_or_kept(source, tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"old output")
    export_gguf(source, out, quant="f32")
    assert out.read_bytes()[:4] == b"GGUF"
    good = out.read_bytes()
    state = load_file(str(source / "model.safetensors"))
    state["model.norm.weight"][0] = float("nan")
    save_file(state, str(source / "model.safetensors"))
    with pytest.raises(ExportError, match="NaN or Inf"):
        export_gguf(source, out, quant="f32")
    assert out.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out.gguf"]  # no temporary left


def test_save_pretrained_never_empties_a_foreign_folder(qwen3_dir, tmp_path, monkeypatch):
    folder = tmp_path / "Qwen3-4B"
    shutil.copytree(qwen3_dir, folder)
    (folder / "README.md").write_text("model card")
    (folder / "LICENSE").write_text("licence")
    before = _digest(folder)
    model = SO8TTransformerForCausalLM.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="not empty and holds no SO8T checkpoint"):
        model.save_pretrained(folder)
    assert _digest(folder) == before
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine")
    monkeypatch.chdir(workdir)
    with pytest.raises(CheckpointError, match="not empty"):
        model.save_pretrained(".")
    assert (workdir / "notes.txt").read_text() == "mine"


def test_save_pretrained_over_an_so8t_checkpoint_replaces_only_its_files(so8t_dir, tmp_path):
    folder = tmp_path / "so8t"
    shutil.copytree(so8t_dir, folder)
    (folder / "README.md").write_text("kept")
    model = SO8TTransformerForCausalLM.from_pretrained(folder)
    model.save_pretrained(folder)  # onto the folder it was loaded from
    assert (folder / "README.md").read_text() == "kept"
    reloaded = SO8TTransformerForCausalLM.from_pretrained(folder)
    assert torch.equal(reloaded.safety_head.weight, model.safety_head.weight)
    model.save_pretrained(folder, max_shard_bytes=20_000)  # another layout: the old single file goes
    assert not (folder / "model.safetensors").exists() and (folder / "model.safetensors.index.json").exists()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_a_new_checkpoint_gets_the_umask_mode(so8t_dir, tmp_path):
    model = SO8TTransformerForCausalLM.from_pretrained(so8t_dir)
    previous = os.umask(0o027)  # the test owns this process; the library only reads the umask
    try:
        model.save_pretrained(tmp_path / "saved")
        export_gguf(so8t_dir, tmp_path / "out.gguf", quant="f32")
    finally:
        os.umask(previous)
    assert (tmp_path / "saved").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "saved" / "model.safetensors").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "out.gguf").stat().st_mode & 0o777 == 0o640


def test_atomic_output_names_are_unique_per_call(tmp_path):
    names = []
    with io.atomic_output(tmp_path / "a.bin") as first, io.atomic_output(tmp_path / "a.bin") as second:
        names = [first, second]
        first.write_bytes(b"1")
        second.write_bytes(b"2")
    assert names[0] != names[1]
    assert (tmp_path / "a.bin").read_bytes() == b"1"  # the outer block renamed last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_two_exports_in_two_threads_leave_torch_threads_alone(so8t_dir, tmp_path):
    before = torch.get_num_threads()
    errors, reports = [], []

    def run(i):
        try:
            reports.append(export_gguf(so8t_dir, tmp_path / f"out{i}.gguf", quant="q8_0"))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(reports) == 2
    assert (tmp_path / "out0.gguf").read_bytes() == (tmp_path / "out1.gguf").read_bytes()
    assert torch.get_num_threads() == before
    fresh = []
    t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert fresh == [before]  # what a new thread inherits is unchanged too


def test_a_failed_export_stops_its_threads_and_closes_its_files(source, tmp_path):
    state = load_file(str(source / "model.safetensors"))
    state["model.layers.1.mlp.down_proj.weight"][0, 0] = float("inf")
    save_file(state, str(source / "model.safetensors"))
    with pytest.raises(ExportError, match="model.layers.1.mlp.down_proj.weight has 1 NaN or Inf"):
        export_gguf(source, tmp_path / "out.gguf", quant="q8_0")
    deadline = time.monotonic() + 5
    while any(t.name.startswith(("so8t-hash", "so8t-encode", "so8t-write")) for t in threading.enumerate()):
        assert time.monotonic() < deadline, [t.name for t in threading.enumerate()]
        time.sleep(0.05)
    # Only files under tmp_path count: in a full run other tests' servers and pipes open and close fds
    # in this process at any moment, so a plain count of /proc/self/fd is not a measure of the export.
    assert _open_files_under(tmp_path) == []
    assert not (tmp_path / "out.gguf").exists()


def test_checkpoint_reader_is_a_context_manager(qwen3_dir):
    with CheckpointReader(qwen3_dir) as reader:
        reader.read("model.norm.weight")
        assert reader._fds
    assert not reader._fds


def test_concurrent_first_reads_open_each_file_once(qwen3_dir, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor
    real_open = os.open

    def slow_open(*args, **kwargs):  # widens the window in which a second thread finds the file not yet open
        time.sleep(0.05)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(os, "open", slow_open)
    with CheckpointReader(qwen3_dir) as reader:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: reader.read("model.norm.weight"), range(64)))
        assert len(_open_files_under(qwen3_dir)) == 1
    assert _open_files_under(qwen3_dir) == []


def test_a_fifo_input_is_refused_without_blocking(source):
    (source / "model.safetensors").unlink()
    os.mkfifo(source / "model.safetensors")
    with pytest.raises(CheckpointError, match="must be a regular file, found a FIFO"):
        CheckpointReader(source)


def test_a_value_beyond_f16_is_refused(source, tmp_path):
    state = load_file(str(source / "model.safetensors"))
    state["model.layers.0.mlp.down_proj.weight"][3, 5] = 1e5  # finite in f32, Inf in f16
    save_file(state, str(source / "model.safetensors"))
    with pytest.raises(ExportError, match=r"down_proj.weight: 1 values overflow F16"):
        export_gguf(source, tmp_path / "out.gguf", quant="f16")
    export_gguf(source, tmp_path / "out.gguf", quant="bf16")  # bf16 has float32's range


def test_ollama_leaves_nothing_when_a_step_fails(source, tmp_path):
    out = tmp_path / "ollama-out"
    result = CliRunner().invoke(main, ["ollama", str(source), "-o", str(out), "--system", 'a """ b'])
    assert result.exit_code != 0 and not out.exists()  # refused before the export
    (source / "model.safetensors").write_bytes(b"\x00" * 16)
    result = CliRunner().invoke(main, ["ollama", str(source), "-o", str(out)])
    assert result.exit_code != 0 and "model.safetensors" in result.output
    assert not out.exists()


def test_sigterm_mid_export_leaves_no_temporary_file(tmp_path):
    """A checkpoint big enough that the export is still running when the signal comes."""
    from so8t_export.demo import write_tiny_qwen3

    model = write_tiny_qwen3(tmp_path / "big", hidden_size=512, intermediate_size=8192, num_hidden_layers=8,
                             head_dim=64)
    out = tmp_path / "out" / "big.gguf"
    out.parent.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "so8t_export.cli", "gguf", str(model), "-o", str(out),
                             "--quant", "f32"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not list(out.parent.glob("*.tmp")) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.fail("the export finished before SIGTERM arrived; make the checkpoint bigger")
    assert proc.returncode == 128 + signal.SIGTERM
    assert list(out.parent.iterdir()) == []
