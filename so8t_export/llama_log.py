"""llama.cpp's log lines: none by default, all with --verbose, and its error lines folded into our messages.

Why ``Llama(..., verbose=False)`` alone is not quiet: llama-cpp-python 0.3.36's ``_logger.py`` maps ggml's
log levels with the *old* enum (NONE 0, INFO 1, WARN 2, ERROR 3, DEBUG 4), but the llama.cpp it vendors
renumbered them (``ggml.h``: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5). Its callback prints when
``logger.level <= mapped level`` with the logger at ERROR, so every WARN line (3, read as ERROR) is printed,
e.g. ``llama_init_from_model: model default pooling_type is [-1], but [0] was specified`` (we ask for pooling
NONE on purpose), while real ERROR lines (4, read as DEBUG) are dropped: a file llama.cpp refuses shows up as
a bare ``Failed to load model from file`` with the reason thrown away.

``install()`` replaces that callback with one that reads the levels correctly: with ``set_verbose(True)``
(the command line's ``--verbose``) it prints every line to stderr; otherwise only ERROR lines (and their CONT
continuations) are printed, and inside ``collect_errors()`` they are kept instead, so that the caller can put
the reason into its one-line message. ``SO8TRuntime`` calls ``install()`` before it creates a ``Llama``;
``set_verbose`` only records the choice, so calling it costs no llama_cpp import.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
from typing import ClassVar

__all__ = ["collect_errors", "install", "is_verbose", "set_verbose", "summary", "watch"]

GGML_LOG_LEVEL_NONE, GGML_LOG_LEVEL_DEBUG, GGML_LOG_LEVEL_INFO = 0, 1, 2
GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR, GGML_LOG_LEVEL_CONT = 3, 4, 5


class _State:
    verbose = False
    last_level = GGML_LOG_LEVEL_NONE
    collecting: ClassVar[list[list[str]]] = []  # a stack: nested collect_errors() blocks
    watchers: ClassVar[list] = []  # watch() callbacks: every line, printed or not
    lock = threading.Lock()
    callback = None  # the ctypes callback object; must stay referenced while llama.cpp holds it


def _on_log(level: int, text: bytes, _user_data) -> None:
    try:
        if level == GGML_LOG_LEVEL_CONT:
            level = _State.last_level
        else:
            _State.last_level = level
        message = text.decode("utf-8", errors="replace") if text else ""
        for watcher in list(_State.watchers):
            watcher(level, message)
        if _State.verbose:
            sys.stderr.write(message)
            sys.stderr.flush()
        if level != GGML_LOG_LEVEL_ERROR:
            return
        with _State.lock:
            if _State.collecting:
                _State.collecting[-1].append(message)
                return
        if not _State.verbose:
            sys.stderr.write(message)
            sys.stderr.flush()
    except Exception:  # noqa: BLE001, S110 - an exception must never unwind into C; a lost log line is harmless
        pass


def set_verbose(verbose: bool) -> None:
    """Show all of llama.cpp's log lines (True) or only its errors (False, the default)."""
    _State.verbose = bool(verbose)


def install() -> None:
    """Route llama.cpp's (and ggml's) log lines through our callback (idempotent)."""
    import llama_cpp  # importing it installs llama-cpp-python's own callback, which this one replaces

    if _State.callback is None:
        _State.callback = llama_cpp.llama_log_callback(_on_log)
    llama_cpp.llama_log_set(_State.callback, ctypes.c_void_p(0))


def is_verbose() -> bool:
    return _State.verbose


@contextlib.contextmanager
def collect_errors():
    """Collect llama.cpp's ERROR lines logged inside the block (they are not printed unless verbose);
    yields the list they are appended to."""
    lines: list[str] = []
    with _State.lock:
        _State.collecting.append(lines)
    try:
        yield lines
    finally:
        with _State.lock:
            _State.collecting.remove(lines)


@contextlib.contextmanager
def watch(callback):
    """Pass every line logged inside the block, of any level and whether printed or not, to
    callback(level, text): llama_model_quantize reports its progress only as log lines."""
    with _State.lock:
        _State.watchers.append(callback)
    try:
        yield
    finally:
        with _State.lock:
            _State.watchers.remove(callback)


def summary(lines: list[str], limit: int = 300) -> str:
    """The collected error lines as one line: 'a; b' without the function prefixes' newlines."""
    text = "; ".join(" ".join(line.split()) for line in lines if line.strip())
    return text if len(text) <= limit else text[:limit - 3] + "..."
