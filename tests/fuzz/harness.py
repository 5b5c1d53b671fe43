"""Harness of the bad-input suite (tests/test_bad_inputs.py): run one CLI invocation, classify what happened,
check it against the case's expectation, and record it for the summary table (conftest's
``pytest_terminal_summary`` prints ``summary_table``).

Outcome kinds, in order of precedence:

* ``hang``      -- still running at the timeout (killed);
* ``crash``     -- killed by a signal (negative return code: a native abort or segfault);
* ``traceback`` -- a Python traceback in the output, or an exception that is not click's in CliRunner;
* ``success``   -- exit status 0;
* ``error``     -- a non-zero exit. It is *clean* when stderr holds exactly one line, ``Error: ...`` (click's
  usage preamble, ``Usage:``/``Try '...``, aside), and that line names what the case says is wrong (a file,
  tensor or key).

Independently of the kind: ``leftover`` (a path under the case folder that was not there before the run, hidden
``.tmp`` files included; on success the case's declared outputs are allowed) and ``modified`` (a path that was
there before and was changed, replaced or removed; on success the declared outputs may be replaced).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

INPROC_TIMEOUT = int(os.environ.get("FUZZ_INPROC_TIMEOUT", "30"))
SUBPROC_TIMEOUT = int(os.environ.get("FUZZ_TIMEOUT", "60"))
MEMORY_HEADROOM = 8 << 30  # address space a subprocess case may add to the warm server's
PROPERTY_KEY = "fuzz_case"
USAGE_PREFIXES = ("Usage:", "Try '")


# ---------------------------------------------------------------------------------------------- cases
@dataclass
class Invocation:
    """One command line and what it may touch."""

    prog: str  # "so8t-export" (cli.main) or "so8t" (cli.runtime_main)
    args: list[str]
    cwd: Path
    outputs: list[Path] = field(default_factory=list)  # may appear, or be replaced, when the run succeeds
    check: Callable[[Outcome], str | None] | None = None  # extra check of a successful run: a problem or None
    uid: int | None = None  # subprocess only: run as this user (a read-only folder that root cannot write)
    gid: int | None = None


@dataclass(frozen=True)
class Case:
    """A bad (or, for controls, a valid) input and what the issue demands of it.

    expect: "error" (a clean one-line error), "ok" (success) or "either" (success, or a clean error).
    names: what the error line must mention, case-insensitively; an entry that is a tuple is satisfied by any
    one of its strings.
    """

    cls: str
    name: str
    build: Callable[[Ctx], Invocation] = field(compare=False, repr=False)
    expect: str = "error"
    names: tuple = ()
    mode: str = "inproc"  # "inproc" (CliRunner) or "subproc" (forked child with a timeout)
    llama: bool = False  # needs llama-cpp-python (fails instead of skipping under CI=true)
    public: bool = False  # build under a world-readable folder (for uid-dropping cases)

    @property
    def id(self) -> str:
        return f"{self.cls}-{self.name}"


class Ctx:
    """A case's private folder (everything in it counts as input) and the session's base artefacts."""

    def __init__(self, root: Path, bases: dict[str, Path]):
        self.dir = root
        self.bases = bases
        root.mkdir(parents=True, exist_ok=True)

    def path(self, *parts: str, mkdir: bool = True) -> Path:
        p = self.dir.joinpath(*parts)
        if mkdir:
            p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def cwd(self) -> Path:
        return self.path("cwd")

    def out(self, name: str = "out.gguf") -> Path:
        return self.path("out") / name

    def copy(self, base: str, name: str | None = None) -> Path:
        src = self.bases[base]
        dst = self.dir / (name or src.name)
        if src.is_dir():
            shutil.copytree(src, dst, symlinks=True)
        else:
            shutil.copy2(src, dst)
        return dst


# ---------------------------------------------------------------------------------------------- snapshots
def _entry(path: Path) -> tuple:
    st = os.lstat(path)
    mode = st.st_mode
    if stat.S_ISREG(mode):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return ("file", digest.hexdigest())
    if stat.S_ISDIR(mode):
        return ("dir",)
    if stat.S_ISLNK(mode):
        return ("link", os.readlink(path))
    if stat.S_ISFIFO(mode):
        return ("fifo", st.st_ino)
    return ("special", stat.S_IFMT(mode), st.st_rdev, st.st_ino)  # never opened


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root (hidden ones included) with its type and content hash; FIFOs are never opened."""
    state: dict[str, tuple] = {}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            path = folder / name
            try:
                entry = _entry(path)
            except OSError as err:
                entry = ("unreadable", err.errno)
            state[str(path.relative_to(root))] = entry
            if entry[0] == "dir":
                stack.append(path)
    return state


# ---------------------------------------------------------------------------------------------- outcomes
@dataclass
class Outcome:
    rc: int | None
    stdout: str
    stderr: str
    timed_out: bool = False
    exception: str | None = None  # in-process: formatted traceback of a non-click exception
    leftovers: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    wall: float = 0.0

    @property
    def kind(self) -> str:
        if self.timed_out:
            return "hang"
        if self.rc is not None and self.rc < 0:
            return "crash"
        if self.exception or "Traceback (most recent call last)" in self.stdout + self.stderr:
            return "traceback"
        return "success" if self.rc == 0 else "error"

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip() and not line.startswith(USAGE_PREFIXES)]

    def headline(self) -> str:
        """One line saying what happened, for failure messages and the report."""
        kind = self.kind
        if kind == "hang":
            return f"hang (killed after {self.wall:.0f} s)"
        if kind == "crash":
            sig = -self.rc
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = str(sig)
            return f"native crash ({name}); stderr tail: {_trim(self.stderr.strip().splitlines()[-1:] or [''])}"
        if kind == "traceback":
            return "traceback: " + traceback_summary(self.exception or (self.stderr + "\n" + self.stdout))
        if kind == "success":
            err = [line for line in self.stderr.splitlines() if line.strip()]
            return "exit 0: " + _trim((self.stdout.strip().splitlines() or [""])[-1]) + (
                f" | stderr: {_trim(err[0], 300)}" + (f" (+{len(err) - 1} lines)" if len(err) > 1 else "")
                if err else "")
        lines = self.error_lines
        if not lines:
            return f"exit {self.rc} with nothing on stderr; stdout tail: " + _trim(
                (self.stdout.strip().splitlines() or [""])[-1])
        text = " | ".join(lines[:3]) + (f" | ... ({len(lines)} lines)" if len(lines) > 3 else "")
        return f"exit {self.rc}: " + _trim(text, 400)


def _trim(text, limit: int = 300) -> str:
    if isinstance(text, list):
        text = " ".join(text)
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def traceback_summary(text: str) -> str:
    """'ExcType: message (file.py:line in func)' from a formatted traceback."""
    lines = [line for line in text.splitlines() if line.strip()]
    start = max((i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")),
                default=0)
    frames = [line.strip() for line in lines[start:] if line.strip().startswith('File "')]
    last = next((line for line in reversed(lines) if re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit|Warning)?"
                                                              r"(: |$)", line) and not line.startswith(" ")),
                lines[-1] if lines else "")
    where = ""
    if frames:
        m = re.match(r'File "([^"]+)", line (\d+), in (.+)', frames[-1])
        if m:
            where = f" ({Path(m.group(1)).name}:{m.group(2)} in {m.group(3)})"
    return _trim(last, 250) + where


def _name_pattern(name: str) -> re.Pattern:
    # A name must not be part of a longer identifier: config.json is not tokenizer_config.json, and
    # model.safetensors is not model.safetensors.index.json.
    return re.compile(r"(?<![\w-])" + re.escape(name) + r"(?![\w-]|\.index\.json)", re.IGNORECASE)


def error_problems(outcome: Outcome, names: Iterable) -> list[str]:
    """Why a non-zero exit is not a clean one-line error naming what is wrong (empty: it is clean)."""
    problems = []
    lines = outcome.error_lines
    if not lines:
        problems.append("no error line on stderr")
    elif len(lines) > 1:
        problems.append(f"{len(lines)} lines on stderr, expected one 'Error: ...' line")
    if lines and not any(line.startswith("Error: ") for line in lines):
        problems.append("no 'Error: ...' line")
    message = "\n".join(lines)
    for name in names:
        alternatives = name if isinstance(name, tuple) else (name,)
        if not any(_name_pattern(alt).search(message) for alt in alternatives):
            problems.append("the message does not name " + " or ".join(repr(a) for a in alternatives))
    return problems


def evaluate(case: Case, inv: Invocation, outcome: Outcome) -> list[str]:
    """Every way the outcome misses the case's expectation (empty: as expected)."""
    problems = []
    kind = outcome.kind
    if kind in ("hang", "crash", "traceback"):
        problems.append(outcome.headline())
    elif kind == "success":
        if case.expect == "error":
            problems.append("succeeded; expected a clean error")
        elif inv.check is not None:
            extra = inv.check(outcome)
            if extra:
                problems.append(extra)
    elif kind == "error":
        if case.expect == "ok":
            problems.append("failed; expected success")
        else:
            problems.extend(error_problems(outcome, case.names))
    if outcome.leftovers:
        problems.append(f"left files behind: {', '.join(sorted(outcome.leftovers)[:6])}")
    if outcome.modified:
        problems.append(f"modified inputs: {', '.join(sorted(outcome.modified)[:6])}")
    return problems


def compare(root: Path, before: dict[str, tuple], after: dict[str, tuple], inv: Invocation,
            success: bool) -> tuple[list[str], list[str]]:
    """(leftovers, modified) between two snapshots of a case folder."""
    allowed = set()
    if success:
        for out in inv.outputs:
            try:
                allowed.add(str(Path(out).relative_to(root)))
            except ValueError:
                pass
    leftovers = [p for p in after if p not in before and p not in allowed]
    modified = [p for p, entry in before.items() if after.get(p) != entry and p not in allowed]
    return leftovers, modified


# ---------------------------------------------------------------------------------------------- in-process
class _Watchdog(BaseException):
    """Raised by SIGALRM in the main thread; BaseException, so CliRunner does not catch it."""


def run_inproc(case: Case, ctx: Ctx, inv: Invocation, timeout: int = INPROC_TIMEOUT) -> Outcome:
    from click.testing import CliRunner

    from so8t_export import cli

    command = cli.main if inv.prog == "so8t-export" else cli.runtime_main
    before = snapshot(ctx.dir)
    old_cwd = os.getcwd()

    def on_alarm(signum, frame):
        raise _Watchdog()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    start = time.monotonic()
    result, timed_out = None, False
    try:
        os.chdir(inv.cwd)
        signal.alarm(timeout)
        result = CliRunner().invoke(command, inv.args, prog_name=inv.prog, catch_exceptions=True)
    except _Watchdog:
        timed_out = True
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        os.chdir(old_cwd)
    wall = time.monotonic() - start
    if result is None:
        outcome = Outcome(None, "", "", timed_out=timed_out, wall=wall)
    else:
        exception = None
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            exception = "".join(traceback.format_exception(*result.exc_info))
        outcome = Outcome(result.exit_code, result.stdout, result.stderr, exception=exception, wall=wall)
    outcome.leftovers, outcome.modified = compare(ctx.dir, before, snapshot(ctx.dir), inv,
                                                  outcome.kind == "success")
    return outcome


# ---------------------------------------------------------------------------------------------- subprocess
class ForkServer:
    """Client of tests/fuzz/forkserver.py: one warm process that forks a child per invocation."""

    def __init__(self, workdir: Path, jobs: int = 8):
        self.workdir = workdir
        self._log = open(workdir / "forkserver.log", "wb")  # noqa: SIM115 - the server's stderr, closed in close()
        env = dict(os.environ)
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("forkserver.py")),
                                      "--jobs", str(jobs)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, env=env, cwd=workdir)
        self._futures: dict[str, Future] = {}
        self._lock = threading.Lock()
        self.ready = Future()
        self._reader = threading.Thread(target=self._read, name="fuzz-forkserver", daemon=True)
        self._reader.start()
        self._count = 0

    def _read(self) -> None:
        for line in self.proc.stdout:
            message = json.loads(line)
            if message.get("ready"):
                self.ready.set_result(message)
                continue
            with self._lock:
                future = self._futures.pop(message["id"], None)
            if future is not None:
                future.set_result(message)
        error = RuntimeError(f"fork server exited (rc {self.proc.poll()}); see {self.workdir / 'forkserver.log'}")
        if not self.ready.done():
            self.ready.set_exception(error)
        with self._lock:
            for future in self._futures.values():
                future.set_exception(error)
            self._futures.clear()

    def submit(self, inv: Invocation, stdout: Path, stderr: Path, timeout: int = SUBPROC_TIMEOUT,
               idle: bool = False) -> Future:
        with self._lock:
            self._count += 1
            key = str(self._count)
            future = Future()
            self._futures[key] = future
        request = {"id": key, "prog": inv.prog, "args": inv.args, "cwd": str(inv.cwd), "stdout": str(stdout),
                   "stderr": str(stderr), "timeout": timeout, "uid": inv.uid, "gid": inv.gid,
                   "memory_headroom": MEMORY_HEADROOM, "idle": idle,
                   # ggml's abort handler attaches gdb for a backtrace (~20 s a crash); the crash is the same
                   "env": {"GGML_NO_BACKTRACE": "1"}}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        return future

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=SUBPROC_TIMEOUT + 10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


@dataclass
class Pending:
    """A subprocess case submitted to the fork server; the test collects it."""

    case: Case
    ctx: Ctx
    inv: Invocation | None
    before: dict
    future: Future | None
    stdout: Path | None = None
    stderr: Path | None = None
    build_error: str | None = None

    def outcome(self) -> Outcome:
        message = self.future.result(timeout=SUBPROC_TIMEOUT * 4)
        outcome = Outcome(message["rc"], self.stdout.read_text(errors="replace"),
                          self.stderr.read_text(errors="replace"), timed_out=message["timed_out"],
                          wall=message["wall"])
        after = snapshot(self.ctx.dir)
        outcome.leftovers, outcome.modified = compare(self.ctx.dir, self.before, after, self.inv,
                                                      outcome.kind == "success")
        return outcome


# ---------------------------------------------------------------------------------------------- recording
def record(request, case: Case, outcome: Outcome | None, problems: list[str], *, kind: str | None = None,
           line: str | None = None) -> None:
    kind = kind or outcome.kind
    clean = kind == "error" and not error_problems(outcome, case.names) if outcome is not None else False
    request.node.user_properties.append((PROPERTY_KEY, {
        "id": case.id, "cls": case.cls, "mode": case.mode, "expect": case.expect, "kind": kind, "clean": clean,
        "leftover": bool(outcome and outcome.leftovers), "modified": bool(outcome and outcome.modified),
        "ok": not problems, "problems": problems, "line": line or (outcome.headline() if outcome else ""),
        "rc": outcome.rc if outcome else None, "wall": round(outcome.wall, 3) if outcome else 0.0,
    }))


COLUMNS = ("cases", "clean err", "unclean err", "success", "traceback", "crash", "hang", "leftover",
           "input mod", "as expected", "failing")


def summary_table(records: list[dict]) -> list[str]:
    by_class: dict[str, dict[str, int]] = {}
    for r in records:
        row = by_class.setdefault(r["cls"], dict.fromkeys(COLUMNS, 0))
        row["cases"] += 1
        row["clean err"] += r["kind"] == "error" and r["clean"]
        row["unclean err"] += r["kind"] == "error" and not r["clean"]
        row["success"] += r["kind"] == "success"
        row["traceback"] += r["kind"] == "traceback"
        row["crash"] += r["kind"] == "crash"
        row["hang"] += r["kind"] == "hang"
        row["leftover"] += r["leftover"]
        row["input mod"] += r["modified"]
        row["as expected"] += r["ok"]
        row["failing"] += not r["ok"]
    total = dict.fromkeys(COLUMNS, 0)
    for row in by_class.values():
        for key in COLUMNS:
            total[key] += row[key]
    width = max([len("class"), len("total")] + [len(c) for c in by_class])
    header = f"{'class':<{width}} " + " ".join(f"{c:>{max(len(c), 5)}}" for c in COLUMNS)
    lines = [header, "-" * len(header)]
    for name in sorted(by_class):
        lines.append(f"{name:<{width}} " + " ".join(f"{by_class[name][c]:>{max(len(c), 5)}}" for c in COLUMNS))
    lines.append("-" * len(header))
    lines.append(f"{'total':<{width}} " + " ".join(f"{total[c]:>{max(len(c), 5)}}" for c in COLUMNS))
    return lines


def collect_records(stats: dict) -> list[dict]:
    records, seen = [], set()
    for reports in stats.values():
        for report in reports:
            if getattr(report, "when", None) != "call":
                continue
            for key, value in getattr(report, "user_properties", ()):
                if key == PROPERTY_KEY and value["id"] not in seen:
                    seen.add(value["id"])
                    records.append(value)
    return records
