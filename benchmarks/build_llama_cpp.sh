#!/usr/bin/env bash
# Build llama.cpp's llama-bench, llama-batched-bench and llama-quantize the way a user gets llama.cpp from Python: the
# llama-cpp-python source distribution (which vendors llama.cpp), pinned by version and sha256.
#
#   benchmarks/build_llama_cpp.sh            # into build/llama.cpp (gitignored)
#   LLAMA_CPP_DIR=/opt/llama.cpp JOBS=8 benchmarks/build_llama_cpp.sh
#   LLAMA_CPP_CPU=avx2 LLAMA_CPP_DIR=build/llama.cpp-avx2 benchmarks/build_llama_cpp.sh   # AVX2 code only
#
# Needs pip, cmake and a C++ compiler (Debian/Ubuntu: apt-get install build-essential cmake).
# The benchmark (python -m benchmarks.cpu_decode --llama-cpp) finds the binaries in build/llama.cpp/bin,
# or wherever LLAMA_CPP_BIN points. Nothing in `make test` needs them.
set -euo pipefail

VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${LLAMA_CPP_DIR:-$ROOT/build/llama.cpp}"
JOBS="${JOBS:-2}"
SDIST="llama_cpp_python-$VERSION.tar.gz"

for tool in cmake c++ pip; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found; install it (apt-get install build-essential cmake)" >&2; exit 1; }
done

mkdir -p "$DEST/src"
cd "$DEST/src"
if [ ! -f "$SDIST" ]; then
    pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d .
fi
echo "$SHA256  $SDIST" | sha256sum -c - || { echo "error: $SDIST does not match the pinned sha256; delete it and rerun" >&2; exit 1; }
[ -d "llama_cpp_python-$VERSION" ] || tar xzf "$SDIST"
SRC="$DEST/src/llama_cpp_python-$VERSION/vendor/llama.cpp"

# Native CPU flags (AVX2 / AVX-512 / AMX as the machine has them), or with LLAMA_CPP_CPU=avx2 what an AVX2 CPU has
# (to time both engines on AVX2 code on a bigger CPU, beside ATEN_CPU_CAPABILITY=avx2); static, no network code, only
# the three tools.
case "${LLAMA_CPP_CPU:-native}" in
    native) CPU_FLAGS="-DGGML_NATIVE=ON" ;;
    avx2) CPU_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF" ;;
    *) echo "error: LLAMA_CPP_CPU=$LLAMA_CPP_CPU: use native (the default) or avx2" >&2; exit 1 ;;
esac
FLAGS="-DCMAKE_BUILD_TYPE=Release $CPU_FLAGS -DBUILD_SHARED_LIBS=OFF"
# shellcheck disable=SC2086  # FLAGS holds several arguments
cmake -S "$SRC" -B "$DEST/cmake" $FLAGS \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF
cmake --build "$DEST/cmake" --target llama-bench llama-quantize llama-batched-bench -j "$JOBS"
mkdir -p "$DEST/bin"
cp "$DEST/cmake/bin/llama-bench" "$DEST/cmake/bin/llama-quantize" "$DEST/cmake/bin/llama-batched-bench" "$DEST/bin/"

cat > "$DEST/VERSION.json" <<EOF
{"source": "llama-cpp-python sdist", "version": "$VERSION", "sdist_sha256": "$SHA256",
 "cmake_flags": "$FLAGS"}
EOF
echo "built: $DEST/bin/llama-bench $DEST/bin/llama-quantize"
