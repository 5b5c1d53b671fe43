"""A fork server for the fuzz suite: runs CLI invocations in forked children of one warm process.

The cases that may hang or abort natively (FIFO inputs, anything that makes llama.cpp load a file) must not run
inside pytest. A fresh ``python -m`` per case would pay ~3 s of imports (torch, transformers, llama.cpp) each;
this server imports everything once and forks one child per request, so each case is a real separate process
(its own exit status, signals, file descriptors) that starts in milliseconds.

Protocol (JSON lines): stdin gets ``{"id", "prog", "args", "cwd", "stdout", "stderr", "timeout", "uid"?,
"gid"?, "env"?, "memory_headroom"?, "idle"?}``; stdout answers ``{"id", "rc", "timed_out", "wall"}``. ``rc`` is the child's exit status, or
``-signal`` when a signal killed it (a native crash). A child still running at its timeout is killed with
SIGKILL and answered with ``timed_out: true``. Requests run concurrently (up to ``--jobs``; requests marked
``idle``, the ones expected to block on a FIFO, do not count). ``memory_headroom`` caps the child's address
space at the server's plus that many bytes. The server exits on EOF of stdin, killing what is still running.
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import signal
import sys
import time
import traceback

PRELOAD = ("torch", "numpy", "gguf", "numba", "safetensors", "click", "click._termui_impl", "jinja2",
           "transformers", "llama_cpp", "llama_cpp.llama_chat_format")


def _preload() -> None:
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the child hits the same import and reports it as a user sees it
            traceback.print_exc()
    import pkgutil

    import so8t_export

    for module in pkgutil.iter_modules(so8t_export.__path__):  # every module, so a child that drops its
        try:  # privileges never needs to read a source file
            importlib.import_module(f"so8t_export.{module.name}")
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    try:  # AutoTokenizer's lazy module: import its backend now rather than in every child
        from transformers import AutoTokenizer  # noqa: F401
    except Exception:  # noqa: BLE001
        traceback.print_exc()


def _child(req: dict) -> None:
    """Runs in the forked child: never returns."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(err, 2)
        for fd in (null, out, err):
            os.close(fd)
        for key, value in (req.get("env") or {}).items():
            os.environ[key] = value
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a native crash is reported, not dumped (slow)
        extra = req.get("memory_headroom")
        if extra:  # a runaway allocation fails in the child instead of exhausting the machine
            with open("/proc/self/statm") as statm:
                size = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            resource.setrlimit(resource.RLIMIT_AS, (size + extra, size + extra))
        if req.get("gid") is not None:
            os.setgroups([])
            os.setgid(req["gid"])
        if req.get("uid") is not None:
            os.setuid(req["uid"])
        os.chdir(req["cwd"])
        from so8t_export import cli

        command = cli.main if req["prog"] == "so8t-export" else cli.runtime_main
        sys.argv = [req["prog"], *req["args"]]
        try:
            command.main(args=list(req["args"]), prog_name=req["prog"])
            code = 0
        except SystemExit as exit_:
            if exit_.code is None:
                code = 0
            elif isinstance(exit_.code, int):
                code = exit_.code
            else:
                print(exit_.code, file=sys.stderr)
                code = 1
    except BaseException:  # noqa: BLE001 - what the interpreter prints for an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF if code >= 0 else 1)


def main() -> None:
    jobs = int(sys.argv[sys.argv.index("--jobs") + 1]) if "--jobs" in sys.argv else 8
    _preload()
    queue: list[dict] = []
    running: dict[int, tuple[dict, float]] = {}
    selector = selectors.DefaultSelector()
    stdin = sys.stdin.buffer
    os.set_blocking(stdin.fileno(), False)
    selector.register(stdin.fileno(), selectors.EVENT_READ)
    pending = b""
    eof = False

    def answer(message: dict) -> None:
        try:
            sys.stdout.write(json.dumps(message) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:  # the suite went away; keep reaping children
            pass

    answer({"ready": True, "pid": os.getpid()})
    while not (eof and not queue and not running):
        while queue and (queue[0].get("idle") or sum(not r.get("idle") for r, _ in running.values()) < jobs):
            req = queue.pop(0)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(req)
            running[pid] = (req, time.monotonic())
        for _key, _mask in selector.select(timeout=0.05):
            try:
                chunk = os.read(stdin.fileno(), 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                eof = True
                selector.unregister(stdin.fileno())
                for pid in running:
                    os.kill(pid, signal.SIGKILL)
                queue.clear()
                continue
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if line.strip():
                    queue.append(json.loads(line))
        now = time.monotonic()
        for pid, (req, start) in list(running.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                del running[pid]
                answer({"id": req["id"], "rc": os.waitstatus_to_exitcode(status), "timed_out": False,
                        "wall": now - start})
            elif now - start > req["timeout"]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                del running[pid]
                answer({"id": req["id"], "rc": -signal.SIGKILL, "timed_out": True, "wall": now - start})


if __name__ == "__main__":
    main()
