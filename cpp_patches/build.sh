#!/usr/bin/env bash
# Builds llama.cpp's own tools from the exact llama.cpp that llama-cpp-python 0.3.36 vendors (commit 0c1e57098):
# stock llama-server, llama-quantize, llama-imatrix, llama-perplexity, and llama-server with this folder's patch
# series applied. CPU only, static libs, only those targets. Results are cached under ~/.cache/so8t-export:
#   llama.cpp-<sdist>/stock/bin/...              the stock tools (keyed by the sdist's hash alone, so editing the
#                                                patches never rebuilds them)
#   llama.cpp-<sdist>-so8t-<patches>/so8t/bin/   the patched llama-server, with stock -> the folder above
# Each output folder is built under a temporary name and renamed when complete, so a failed build leaves no half
# cache. The last line on stdout is the output folder D (D/stock/bin, D/so8t/bin); with --stock-only it is the
# stock folder. Build logs are shown only with --verbose (or on failure, the tail of the log).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
version=0.3.36
cache="${SO8T_CACHE:-$HOME/.cache/so8t-export}"
stock_only=0 verbose=0
for arg in "$@"; do
    case "$arg" in
        --stock-only) stock_only=1 ;;
        --verbose) verbose=1 ;;
        *) echo "build.sh: unknown argument '$arg' (expected --stock-only or --verbose)" >&2; exit 2 ;;
    esac
done

# The same flags as the Makefile's LLAMA_CPP_CFLAGS: ggml's AMX kernels segfault on q8_0 (see the Makefile).
cflags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
jobs="$(nproc)"

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
run() {  # run a build step quietly; on failure show the end of its log and stop
    if [ "$verbose" = 1 ]; then "$@"; return; fi
    if ! "$@" >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "build.sh: failed: $*" >&2
        exit 1
    fi
}

mkdir -p "$cache"
exec 9>"$cache/.llama.cpp-build.lock"
flock 9  # CI and a developer may build at once; the work tree below is shared

# --- the source: the sdist from PyPI, checked against the hash recorded in README.md
want="$(sed -n 's/^| sdist sha256 | `\([0-9a-f]\{64\}\)` |$/\1/p' "$here/README.md")"
[ -n "$want" ] || { echo "build.sh: $here/README.md: no '| sdist sha256 | \`<64 hex>\` |' row" >&2; exit 1; }
sdist_dir="$cache/sdist"
sdist="$sdist_dir/llama_cpp_python-$version.tar.gz"
if [ ! -f "$sdist" ]; then
    mkdir -p "$sdist_dir"
    run python3 -m pip download -q --no-deps --no-binary :all: \
        "llama-cpp-python==$version" -d "$sdist_dir"
fi
got="$(sha256sum "$sdist" | cut -d' ' -f1)"
if [ "$got" != "$want" ]; then
    echo "build.sh: $sdist: sha256 expected $want (cpp_patches/README.md), found $got" >&2
    exit 1
fi

patches=("$here"/*.patch)
[ -e "${patches[0]}" ] || patches=()
patches_hash="$(cat /dev/null "${patches[@]}" | sha256sum | cut -c1-12)"
stock="$cache/llama.cpp-${want:0:12}"
out="$cache/llama.cpp-${want:0:12}-so8t-$patches_hash"
stock_tools=(llama-server llama-quantize llama-imatrix llama-perplexity)

have_all() { local d="$1"; shift; for t in "$@"; do [ -x "$d/$t" ] || return 1; done; }
if [ "$stock_only" = 1 ] && have_all "$stock/stock/bin" "${stock_tools[@]}"; then echo "$stock"; exit 0; fi
if have_all "$out/stock/bin" "${stock_tools[@]}" && have_all "$out/so8t/bin" llama-server; then echo "$out"; exit 0; fi

# --- one work tree per sdist (source + cmake build folder), reused so the patched server only recompiles what the
# series touches. A tree without the .configured marker is from an interrupted first run and is started afresh.
work="$cache/llama.cpp-${want:0:12}-work"
src="$work/src" build="$work/build"
if [ ! -f "$work/.configured" ]; then
    rm -rf "$work"
    mkdir -p "$src"
    tar -xzf "$sdist" -C "$src" --strip-components=3 "llama_cpp_python-$version/vendor/llama.cpp"
    rm -f "$src/.git"  # the sdist's submodule pointer: git apply would look for that repository and fail
    run cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
        -DCMAKE_C_FLAGS="$cflags" -DCMAKE_CXX_FLAGS="$cflags" \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_APP=OFF
    touch "$work/.configured"
fi
applied="$work/applied.patch"  # the series currently applied to $src, so that it can be taken back out
[ -f "$src/.git" ] && rm -f "$src/.git"  # a tree extracted before build.sh removed the submodule pointer
unapply() { if [ -s "$applied" ]; then git apply -R "$applied"; fi; rm -f "$applied"; }  # run in $src

publish() {  # publish FOLDER_NAME TMP: rename a finished temp folder into place
    rm -rf "$1"
    mv "$2" "$1"
}

if ! have_all "$stock/stock/bin" "${stock_tools[@]}"; then
    (cd "$src" && unapply)
    run cmake --build "$build" -j "$jobs" --target "${stock_tools[@]}"
    tmp="$(mktemp -d "$cache/.llama.cpp-stock-XXXXXX")"
    mkdir -p "$tmp/stock/bin"
    for t in "${stock_tools[@]}"; do cp "$build/bin/$t" "$tmp/stock/bin/"; done
    publish "$stock" "$tmp"
fi
if [ "$stock_only" = 1 ]; then echo "$stock"; exit 0; fi

[ "${#patches[@]}" -gt 0 ] || { echo "build.sh: no *.patch in $here" >&2; exit 1; }
(
    cd "$src"
    unapply
    cat "${patches[@]}" >"$applied.new"
    if ! git apply --check "$applied.new"; then
        echo "build.sh: the series in $here does not apply to llama.cpp from llama-cpp-python $version" >&2
        exit 1
    fi
    git apply "$applied.new"
    mv "$applied.new" "$applied"
)
run cmake --build "$build" -j "$jobs" --target llama-server
tmp="$(mktemp -d "$cache/.llama.cpp-so8t-XXXXXX")"
mkdir -p "$tmp/so8t/bin"
cp "$build/bin/llama-server" "$tmp/so8t/bin/"
ln -s "../$(basename "$stock")/stock" "$tmp/stock"
publish "$out" "$tmp"
echo "$out"
