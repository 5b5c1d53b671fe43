"""Mutation check: each deliberate breakage of the rotation code must make the fast tests fail.

    python tests/mutants.py        (make mutants; .ci/run runs it after the tests)

Each mutant edits a copy of the package (so8t_export/ and tests/, in a temporary folder placed first on
PYTHONPATH) and runs the tests that guard the rotations, stopping at the first failure. A mutant whose edit
no longer matches the source is an error, not a kill: the list must follow the code. Exit status 0 only when
every mutant is killed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_spec.py", "tests/test_fold.py", "tests/test_model.py", "tests/test_export.py"]


@dataclass(frozen=True)
class Mutant:
    name: str
    edits: tuple[tuple[str, str, str], ...]  # (file, text, replacement): each text must occur exactly once


MUTANTS = [
    Mutant("MLP rotation before post_attention_layernorm", (
        ("so8t_export/model.py",
         "            x = rotated_blocks(x, rotations.mlp[self.layer_idx])\n",
         "            pass\n"),
        ("so8t_export/model.py",
         "return x + self.mlp(self.post_attention_layernorm(x), rotations)",
         "return x + self.mlp(self.post_attention_layernorm(x if rotations is None else "
         "rotated_blocks(x, rotations.mlp[self.mlp.layer_idx])), rotations)"),
    )),
    Mutant("within-head rotations transposed (R^T x, in model and fold alike)", (
        ("so8t_export/rotation.py",
         'pattern = "...hnj,hji->...hni" if transpose else "...hnj,hij->...hni"',
         'pattern = "...hnj,hij->...hni" if transpose else "...hnj,hji->...hni"'),
    )),
    Mutant("cross-head rotation transposed", (
        ("so8t_export/rotation.py",
         'pattern = "...gjd,ji->...gid" if transpose else "...gjd,ij->...gid"',
         'pattern = "...gjd,ij->...gid" if transpose else "...gjd,ji->...gid"'),
    )),
    Mutant("MLP block rotation transposed (the eager and the compiled form)", (
        ("so8t_export/rotation.py",
         "return (blocks @ rotation.to(x.dtype).T).reshape(x.shape)",
         "return (blocks @ rotation.to(x.dtype)).reshape(x.shape)"),
        ("so8t_export/rotation.py",
         "return (blocks * rotation.to(x.dtype)).sum(-1).reshape(x.shape)",
         "return (blocks * rotation.to(x.dtype).T).sum(-1).reshape(x.shape)"),
    )),
    Mutant("mixing order swapped (in the map and its inverse)", (
        ("so8t_export/rotation.py",
         "    if within_head_first:\n        return mix_across_heads(rotate_within_heads(x, heads), heads.shape[0], cross_head)",
         "    if not within_head_first:\n        return mix_across_heads(rotate_within_heads(x, heads), heads.shape[0], cross_head)"),
        ("so8t_export/rotation.py",
         "    if within_head_first:\n        return rotate_within_heads(mix_across_heads(x, num_heads, cross_head, transpose=True)",
         "    if not within_head_first:\n        return rotate_within_heads(mix_across_heads(x, num_heads, cross_head, transpose=True)"),
    )),
    Mutant("head types shifted by one", (
        ("so8t_export/config.py",
         "return [i % 3 if triality_symmetry else 0 for i in range(count)]",
         "return [(i + 1) % 3 if triality_symmetry else 0 for i in range(count)]"),
    )),
    Mutant("cross-head mixing applied to K but not Q", (
        ("so8t_export/rotation.py",
         "q = head_blocks(q_heads, cross, plan.within_head_first, group)",
         "q = head_blocks(q_heads, None, plan.within_head_first, group)"),
    )),
    Mutant("a fold that forgets layer 1", (
        ("so8t_export/fold.py",
         'def fold_weight(name: str, weight: torch.Tensor, plan: RotationPlan) -> torch.Tensor:\n',
         'def fold_weight(name: str, weight: torch.Tensor, plan: RotationPlan) -> torch.Tensor:\n'
         '    if role(name).layer == 1:\n        return weight\n'),
    )),
]


def apply(mutant: Mutant, copy: Path) -> str | None:
    """Edit the copy; returns what went wrong, or None."""
    for file, text, replacement in mutant.edits:
        path = copy / file
        source = path.read_text()
        if source.count(text) != 1:
            return f"{file}: the text to mutate occurs {source.count(text)} times; expected once: {text[:60]!r}"
        path.write_text(source.replace(text, replacement))
    return None


def run_tests(copy: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(copy), str(copy / "tests")]),
           "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-rf", "--no-header", "-p", "no:cacheprovider",
                           *TESTS], cwd=copy, env=env, capture_output=True, text=True)


def first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" ", 2)[1]
    return "?"


def judge(mutant: Mutant, pristine: Path, copy: Path) -> tuple[str, str]:
    """("killed", by which test) | ("SURVIVED", ...) | ("ERROR", what went wrong)."""
    shutil.copytree(pristine, copy)
    try:
        problem = apply(mutant, copy)
        if problem:
            return "ERROR", problem
        result = run_tests(copy)
        if result.returncode == 1:  # pytest: the tests ran and one failed
            return "killed", f"by {first_failure(result.stdout)}"
        if result.returncode == 0:
            return "SURVIVED", "every test passed"
        return "ERROR", f"pytest exited {result.returncode}: {result.stdout[-1500:]}{result.stderr[-500:]}"
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def make_copy(folder: Path) -> Path:
    copy = folder / "tree"
    shutil.copytree(ROOT / "so8t_export", copy / "so8t_export", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tests", copy / "tests", ignore=shutil.ignore_patterns("__pycache__", "mutants.py"))
    for file in ("pyproject.toml", "bench"):
        source = ROOT / file
        (shutil.copytree if source.is_dir() else shutil.copy)(source, copy / file)
    return copy


def main() -> int:
    start = time.perf_counter()
    killed = 0
    with tempfile.TemporaryDirectory(prefix="so8t-mutants-") as folder:
        pristine = make_copy(Path(folder))
        # The copy must be what the tests import, not the installed package.
        probe = subprocess.run([sys.executable, "-c", "import so8t_export; print(so8t_export.__file__)"],
                               cwd=pristine, env={**os.environ, "PYTHONPATH": str(pristine)}, capture_output=True,
                               text=True)
        if not probe.stdout.strip().startswith(str(pristine)):
            print(f"mutants: the copy is not what Python imports ({probe.stdout.strip() or probe.stderr.strip()})")
            return 2
        # One pytest per mutant, as many at once as there are cores, each on one thread. The unmutated copy
        # runs too: a kill means something only if the same tests pass without the mutation.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            control = pool.submit(run_tests, pristine)
            outcomes = pool.map(lambda item: judge(item[1], pristine, Path(folder) / f"mutant-{item[0]}"),
                                enumerate(MUTANTS))
            for mutant, (verdict, detail) in zip(MUTANTS, outcomes):
                print(f"  {verdict:<9} {mutant.name}  ({detail})")
                killed += verdict == "killed"
            if control.result().returncode != 0:
                print(f"mutants: the tests fail without any mutation, so no kill counts:\n{control.result().stdout[-3000:]}")
                return 2
    print(f"mutants: {killed}/{len(MUTANTS)} killed in {time.perf_counter() - start:.0f} s")
    return 0 if killed == len(MUTANTS) else 1


if __name__ == "__main__":
    sys.exit(main())
