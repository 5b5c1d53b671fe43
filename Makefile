# The README's two commands: `make demo` (main job on the built-in demo model) and `make test`.
PYTHON ?= python3

# llama-cpp-python is built from source, once, into a folder keyed by its version and build flags (pip's own
# wheel cache is keyed by the sdist alone, so it would hand back a build made with other flags). The flags keep
# ggml's AMX kernels out: built with -march=native on a CPU that has AMX (Sapphire Rapids and later), ggml
# 0c1e57098 picks its AMX buffer for q8_0 weights and segfaults in ggml_backend_amx_mul_mat's ldtilecfg on the
# first decode (upstream llama.cpp issue 20824, fix proposed in pull request 26954); every other native
# kernel (AVX-512, VNNI, BF16) stays.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_CFLAGS := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CPP_WHEELS := $(HOME)/.cache/so8t-export/wheels/llama-cpp-python-$(LLAMA_CPP_VERSION)-no-amx

# Ollama v0.24.0 for `make ollama-e2e`: the newest release that compiles its engine (ggml, llama.cpp) into the Go
# binary (v0.30+ needs a llama-server built from a llama.cpp fetched at configure time). Built by package name;
# the module zip leaves out llama/llama.cpp/vendor/, so its headers come from Debian (nlohmann-json3-dev,
# libstb-dev: the code includes <nlohmann/json.hpp> and "stb/stb_image.h") and from our miniaudio stub
# (ollama_e2e/include), which disables audio input only. The folder is keyed by the version and the stub's
# hash: the stub lives in the folder too, so a changed stub is a new include path, which Go's build cache
# (keyed by the cgo flags) does not confuse with the old objects. ldflags as Ollama's release builds set them.
OLLAMA_VERSION := 0.24.0
OLLAMA_STUB := ollama_e2e/include/miniaudio/miniaudio.h
OLLAMA_DIR := $(HOME)/.cache/so8t-export/ollama-$(OLLAMA_VERSION)-$(shell sha256sum $(OLLAMA_STUB) | cut -c1-12)
OLLAMA := $(OLLAMA_DIR)/bin/ollama
OLLAMA_LDFLAGS := -w -s -X=github.com/ollama/ollama/version.Version=$(OLLAMA_VERSION) -X=github.com/ollama/ollama/server.mode=release

.PHONY: install demo test mutants ollama-e2e

# torch first, pinned: pip then takes the CPU build on this machine's disk, and no dependency can pull a CUDA
# torch. The llama-cpp-python build takes ~8 min on 2 cores the first time; the folder above keeps it.
install:
	$(PYTHON) -m pip install -q torch==2.13.0
	@ls $(LLAMA_CPP_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS='-DCMAKE_C_FLAGS="$(LLAMA_CPP_CFLAGS)" -DCMAKE_CXX_FLAGS="$(LLAMA_CPP_CFLAGS)"' \
		$(PYTHON) -m pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python \
			llama-cpp-python==$(LLAMA_CPP_VERSION) -w $(LLAMA_CPP_WHEELS)
	$(PYTHON) -m pip install -q --no-deps --force-reinstall $(LLAMA_CPP_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	$(PYTHON) -m pip install -q -e .
	@command -v go >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq golang-go >/dev/null; }
	@cd ollama_template && go mod download github.com/ollama/ollama || { echo "ollama_template/go.mod needs \
	Go >= 1.26 (a Go >= 1.21 fetches that toolchain itself unless GOTOOLCHAIN=local)" >&2; exit 1; }

demo: install
	so8t-export demo --output-dir demo-out

# llama.cpp's own tools (stock llama-server, llama-quantize, llama-imatrix, llama-perplexity, and llama-server with
# cpp_patches/'s series), built by cpp_patches/build.sh from the same sdist into a folder keyed by the sdist's and
# the patches' hashes: about 8 min on 2 cores the first time, 0.2 s after. The tests that use them find that
# folder in SO8T_LLAMA_TOOLS.
test: install
	D="$$(bash cpp_patches/build.sh)" && SO8T_LLAMA_TOOLS="$$D" $(PYTHON) -m pytest -q

# Deliberate breakages of the rotation code, each of which the fast tests must catch (tests/mutants.py).
mutants: install
	$(PYTHON) tests/mutants.py

# The demo model through a real Ollama, end to end (ollama_e2e/run.py). The first build compiles ~175 C/C++ files
# (about 6 min on 2 cores); after that the binary is reused, and Go's build cache keeps the objects for a relink.
ollama-e2e: install
	@test -f /usr/include/nlohmann/json.hpp && test -f /usr/include/stb/stb_image.h || \
		{ apt-get update -qq && apt-get install -y -qq nlohmann-json3-dev libstb-dev >/dev/null; }
	@test -x $(OLLAMA) || { \
		echo "building ollama $(OLLAMA_VERSION) into $(OLLAMA_DIR) (first time: several minutes)"; \
		mkdir -p $(OLLAMA_DIR)/include/miniaudio && cp $(OLLAMA_STUB) $(OLLAMA_DIR)/include/miniaudio/ && \
		GOBIN=$(OLLAMA_DIR)/bin CGO_ENABLED=1 CGO_CPPFLAGS=-I$(OLLAMA_DIR)/include \
			go install -ldflags='$(OLLAMA_LDFLAGS)' github.com/ollama/ollama@v$(OLLAMA_VERSION); }
	$(PYTHON) -m ollama_e2e.run --ollama $(OLLAMA)
