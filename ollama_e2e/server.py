"""A private `ollama serve` for the end-to-end check: its own port, model store, HOME and TMPDIR, so that
nothing it does touches the user's ~/.ollama or a server already running on 11434.

The server runs in a process group of its own (it starts a runner subprocess per loaded model), and `stop()`
ends that whole group: SIGTERM, then SIGKILL after a grace period. `with OllamaServer(...) as server:` stops
it however the block ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

__all__ = ["OllamaServer", "ServerError"]


class ServerError(RuntimeError):
    """The server did not come up, or a CLI command against it failed."""


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OllamaServer:
    def __init__(self, binary: Path, root: Path, *, debug: bool = False):
        self.binary = Path(binary)
        self.root = Path(root)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.log_path = self.root / "serve.log"
        for sub in ("models", "home", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.root / "home"),  # ollama serve writes ~/.ollama/id_ed25519 here
            "TMPDIR": str(self.root / "tmp"),
            "OLLAMA_HOST": self.host,  # the server's address and, for the CLI, the server to talk to
            "OLLAMA_MODELS": str(self.root / "models"),
            "OLLAMA_NUM_PARALLEL": "1",  # one sequence: the KV cache holds exactly num_ctx tokens
            "OLLAMA_NOHISTORY": "1",
            "OLLAMA_DEBUG": "1" if debug else "0",
        }
        self.process: subprocess.Popen | None = None
        self._log = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 60.0) -> None:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - open while the server runs; stop() closes it
        self.process = subprocess.Popen(
            [str(self.binary), "serve"],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(
                    f"ollama serve exited with status {self.process.returncode}: {self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/api/version", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise ServerError(
            f"ollama serve did not answer on {self.url} within {timeout:.0f} s: {self.log_tail()}"
        )

    def stop(self, grace: float = 10.0) -> None:
        """End the server's process group (the server and its runners); safe to call twice."""
        if self.process is None:
            return
        pgid = self.process.pid  # start_new_session: the server leads its own group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError):  # runners left behind, or a server ignoring SIGTERM
            os.killpg(pgid, signal.SIGKILL)
        self.process.wait()
        if self._log is not None:
            self._log.close()

    def group_alive(self) -> bool:
        """Whether any process of the server's group is still there."""
        if self.process is None:
            return False
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def __enter__(self) -> OllamaServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers
    def log_tail(self, n: int = 1500) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return "(no log)"

    def cli(self, *args: str, timeout: float = 300.0, check: bool = True) -> subprocess.CompletedProcess:
        """`ollama ARGS` against this server, stdin not a terminal, stdout and stderr captured."""
        result = subprocess.run(
            [str(self.binary), *args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise ServerError(
                f"ollama {' '.join(args)} exited with status {result.returncode}: "
                f"{result.stderr.decode('utf-8', 'replace').strip()[-800:]}"
            )
        return result
