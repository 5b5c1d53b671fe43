"""Run llama.cpp's convert_hf_to_gguf.py as a library, with its BPE pre-tokenizer hash check bypassed.

    python bench/convert_hf_wrapper.py LLAMA_CPP_DIR -- MODEL_DIR --outtype q8_0 --outfile OUT.gguf

LLAMA_CPP_DIR is the vendor/llama.cpp folder unpacked from the llama-cpp-python sdist (bench/export.py fetches
it). The bench checkpoint carries a small Qwen-style tokenizer whose hash the converter does not know, so
`get_vocab_base_pre` is overridden to return "qwen2", the value the converter maps real Qwen tokenizers to.
Everything else (FP8 dequantisation, lazy tensors, quantisation, writing) is the converter's own code.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> None:
    llama_dir = Path(sys.argv[1]).resolve()
    argv = sys.argv[2:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    # The converter puts its own gguf-py first on sys.path itself (unless NO_LOCAL_GGUF is set).
    sys.path.insert(0, str(llama_dir))
    sys.argv = [str(llama_dir / "convert_hf_to_gguf.py"), *argv]
    import convert_hf_to_gguf as conv

    patched = []
    # TextModel (or Model in older versions) defines get_vocab_base_pre; patch it where it is defined so that
    # the Qwen2/Qwen3 classes, which inherit it, see the override.
    for modname in ("conversion.base", "convert_hf_to_gguf"):
        mod = sys.modules.get(modname)
        if mod is None:
            try:
                mod = __import__(modname, fromlist=["*"])
            except ImportError:
                continue
        for attr in ("TextModel", "Model"):
            cls = getattr(mod, attr, None)
            if cls is not None and hasattr(cls, "get_vocab_base_pre"):
                cls.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
                patched.append(f"{modname}.{attr}")
    if not patched:
        raise SystemExit("convert_hf_wrapper: found no get_vocab_base_pre to override")
    print(f"convert_hf_wrapper: get_vocab_base_pre -> 'qwen2' on {', '.join(patched)}", file=sys.stderr)
    conv.main()


if __name__ == "__main__":
    main()
