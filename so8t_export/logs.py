"""Quiet by default: the libraries we drive (transformers, gguf-py, llama.cpp) keep their log lines out of
a user's terminal unless --verbose is given. Errors still reach the user, as our own one-line messages.

Only the command line calls this: it owns the process, so setting library-wide log levels is its business.
Library functions never touch logging configuration.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

__all__ = ["configure_logging"]


def configure_logging(verbose: bool) -> None:
    """Show the libraries' info and warnings with verbose, and nothing but errors without."""
    level = logging.INFO if verbose else logging.ERROR
    # gguf-py's SpecialVocab warns through the standard logging module ("gguf.vocab", ...).
    logging.getLogger("gguf").setLevel(level)
    # transformers reads its verbosity from the environment when it is first imported; setting the variable
    # instead of importing it keeps commands that never need transformers (the runtime) fast to start.
    os.environ["TRANSFORMERS_VERBOSITY"] = "info" if verbose else "error"
    if not verbose:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not verbose:  # transformers also warns through the warnings module (FutureWarning on rope_scaling, ...)
        warnings.filterwarnings("ignore", module=r"(transformers|huggingface_hub|tokenizers)(\.|$)")
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity(transformers_logging.INFO if verbose else transformers_logging.ERROR)


def quiet_llama_cpp(verbose: bool) -> None:
    """llama.cpp's own log lines: all of them with verbose, only its errors without (so8t_export/llama_log.py
    says why llama-cpp-python's verbose=False is not enough). Records the choice; the runtime installs the
    log callback when it creates a model, so this costs no llama_cpp import."""
    from .llama_log import set_verbose

    set_verbose(verbose)
