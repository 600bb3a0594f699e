#!/usr/bin/env bash
# llama.cpp as a benchmark peer, built from source here, never committed (everything under .peers/).
#
#   bash benchmarks/build_llama_cpp.sh build [--no-amx] # sdist -> .peers/llama.cpp, llama-bench built
#   bash benchmarks/build_llama_cpp.sh build --avx2     # the same source for an AVX2 + FMA host, in build-avx2
#   bash benchmarks/build_llama_cpp.sh convert [PRESET] [LAYERS]
#                                                       # the bench's random weights -> .peers/gguf/*.gguf
#   flock /tmp/jax-gpt2-bench.lock uv run jax-gpt2 bench \
#       --llama-bench .peers/llama.cpp/build/bin/llama-bench --gguf-dir .peers/gguf
#
# build: the llama-cpp-python sdist on PyPI carries llama.cpp's full source in vendor/llama.cpp;
# `pip download --no-binary :all:` fetches that source (no wheel, no compiled code), and cmake
# builds only the llama-bench tool for this CPU (GGML_NATIVE: -march=native), ~10 min on 2 cores.
#
# convert: writes the very weights `jax-gpt2 bench` draws (jax_gpt2.tools.bench.write_bench_model: same
# preset, layers, std and seed) as a transformers folder, adds what llama.cpp's converter needs
# (config.json "n_ctx", which transformers 5 omits; GPT-2's real vocab.json + merges.txt, whose
# hash tells the converter which pre-tokenizer this is) and converts it three times: f32 (our fp32),
# f16 (nearest to our bf16: llama.cpp's CPU path has no bf16 matmul as fast as f16) and q8_0 (our
# int8). The converter runs in this project's environment with llama.cpp's own gguf-py installed
# into .peers/gguf-py-site (on PYTHONPATH), so the locked environment is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PEERS="$ROOT/.peers"
SOURCE="$PEERS/llama.cpp"

build() {
  mkdir -p "$PEERS/sdist"
  if ! ls "$PEERS"/sdist/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
    python3 -m pip download --no-deps --no-binary :all: llama-cpp-python -d "$PEERS/sdist"
  fi
  local sdist
  sdist="$(ls "$PEERS"/sdist/llama_cpp_python-*.tar.gz | sort -V | tail -1)"
  local unpacked="$PEERS/$(basename "$sdist" .tar.gz)"
  [ -d "$unpacked" ] || tar xzf "$sdist" -C "$PEERS"
  ln -sfn "$unpacked/vendor/llama.cpp" "$SOURCE"
  # --no-amx: some VMs report AMX in /proc/cpuinfo but do not let a process use it; -march=native
  # then builds ggml's AMX matmul, and q8_0 dies of SIGILL in it (measured on the 2-core Xeon here).
  # --avx2: ggml's x86 code for an AVX2 + FMA CPU (Zen 3, Haswell to Alder Lake) and nothing newer,
  # whatever this host has: the peer of our x86-64-v3 build when an AVX-512 host stands in for one.
  local flags=(-DGGML_NATIVE=ON) build="$SOURCE/build"
  [ "${1:-}" = "--no-amx" ] && flags+=("-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
                                       "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")
  [ "${1:-}" = "--avx2" ] && flags=(-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON
                                    -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF) build="$SOURCE/build-avx2"
  cmake -S "$SOURCE" -B "$build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_SERVER=OFF "${flags[@]}"
  nice cmake --build "$build" -j"$(nproc)" --target llama-bench
  "$build/bin/llama-bench" --help >/dev/null
  echo "built $build/bin/llama-bench"
}

gpt2_vocab() {
  # GPT-2's vocab.json and merges.txt from the npm package the test suite uses (tests/gpt2_vocab.py).
  uv run python -c "import sys; sys.path.insert(0, 'tests'); from gpt2_vocab import fetch_gpt2_vocab; \
folder = fetch_gpt2_vocab(); assert folder, 'npm is needed for GPT-2 vocab'; print(folder)"
}

convert() {
  local preset="${1:-gpt2}" layers="${2:-}"
  [ -f "$SOURCE/convert_hf_to_gguf.py" ] || { echo "run '$0 build' first" >&2; exit 1; }
  local site="$PEERS/gguf-py-site"
  if [ ! -d "$site/gguf" ]; then
    uv pip install --quiet --no-deps --target "$site" "$SOURCE/gguf-py"
  fi
  local vocab folder
  vocab="$(gpt2_vocab)"
  folder="$PEERS/hf-$preset${layers:+-L$layers}"
  mkdir -p "$PEERS/gguf"
  # Prints the GGUF stem the bench looks for, after writing the transformers folder.
  local stem
  stem="$(uv run python -c "import sys; from pathlib import Path; from jax_gpt2.tools.bench import write_bench_model; \
print(write_bench_model(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]) if sys.argv[3] else None, Path(sys.argv[4])))" \
    "$folder" "$preset" "$layers" "$vocab")"
  for outtype in f32 f16 q8_0; do
    local out="$PEERS/gguf/$stem-$outtype.gguf"
    [ -f "$out" ] && continue
    PYTHONPATH="$site" uv run python "$SOURCE/convert_hf_to_gguf.py" "$folder" --outtype "$outtype" --outfile "$out"
  done
  ls -la "$PEERS/gguf"
}

case "${1:-}" in
  build) shift; build "$@" ;;
  convert) shift; convert "$@" ;;
  *) echo "usage: $0 build [--no-amx] | convert [PRESET] [LAYERS]" >&2; exit 2 ;;
esac
