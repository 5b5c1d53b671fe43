# The README's two commands: `make demo` (main job on the built-in demo model) and `make test`.
PYTHON ?= python3

.PHONY: install demo test

# torch first, pinned: pip then takes the CPU build on this machine's disk, and no dependency can pull a CUDA
# torch. llama-cpp-python builds from source once (~10 min on 2 cores); pip's wheel cache keeps the build.
install:
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e .
	@command -v go >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq golang-go >/dev/null; }

demo: install
	so8t-export demo --output-dir demo-out

test: install
	$(PYTHON) -m pytest -q
