#!/usr/bin/env bash
# Everything the CUDA backend needs a GPU for, as one command for a lent GPU machine (the
# device tool: nothing can be fetched there, and it has nvcc, compute-sanitizer, python3 with
# PyTorch, but not Eigen, GoogleTest or Google Benchmark).
#
#   tests/cuda/gpu_check.sh pack   here: copy Eigen, GoogleTest and Google Benchmark (headers
#                                  and libraries from the Debian packages) into .gpu_deps/
#   tests/cuda/gpu_check.sh build test sanitize bench
#                                  on the GPU machine (stages in any order, default all four):
#                                  build the CUDA test and benchmark with nvcc into build/gpu, run
#                                  the tests, compute-sanitizer memcheck and racecheck, the decode
#                                  benchmark with the PyTorch SDPA peer; logs and a summary.txt go
#                                  to $OUT (or build/gpu)
#
# The device call carries .gpu_deps (ignored by git): carry [".gpu_deps"]. A call runs at most
# 10 minutes; build/ stays on a warm machine, so the stages may take one call each.
set -euo pipefail
cd "$(dirname "$0")/../.."
deps=.gpu_deps
out=${OUT:-build/gpu}
mkdir -p build/gpu "$out"

if [ "${1:-}" = pack ]; then
  rm -rf "$deps" && mkdir -p "$deps/include" "$deps/lib"
  cp -r /usr/include/eigen3 /usr/include/gtest /usr/include/benchmark "$deps/include/"
  cp /usr/lib/x86_64-linux-gnu/libgtest.a "$deps/lib/"
  cp -L /usr/lib/x86_64-linux-gnu/libbenchmark.so.1debian "$deps/lib/"
  ln -sf libbenchmark.so.1debian "$deps/lib/libbenchmark.so"
  du -sh "$deps"
  exit 0
fi

nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
flags=(-O3 -std=c++20 --expt-relaxed-constexpr -diag-suppress=20012,20013,20015,177 -lineinfo
       -gencode=arch=compute_90,code=sm_90 -Iinclude -I"$deps/include" -I"$deps/include/eigen3")
log() { echo "== $*" | tee -a "$out/summary.txt"; }

build() {
  log "build ($("$nvcc" --version | tail -n 1))"
  # The CPU side on its portable path, as tests/cuda/CMakeLists.txt builds it.
  "$nvcc" "${flags[@]}" -DKVCACHE_FAST_HEAD_DIMS= tests/cuda/cuda_attention_test.cu "$deps/lib/libgtest.a" -lpthread \
    -o build/gpu/kvcache_cuda_backend_tests &
  local tests=$!
  "$nvcc" "${flags[@]}" benchmarks/cuda/decode_bench.cu -L"$deps/lib" -lbenchmark -lpthread \
    -Xlinker -rpath -Xlinker "$PWD/$deps/lib" -o build/gpu/kvcache_cuda_bench &
  local bench=$!
  wait "$tests"
  wait "$bench"
  echo "built build/gpu/kvcache_cuda_backend_tests and build/gpu/kvcache_cuda_bench" | tee -a "$out/summary.txt"
}

run_tests() {
  log "tests"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$out/summary.txt"
  local status=0
  build/gpu/kvcache_cuda_backend_tests > "$out/tests.txt" 2>&1 || status=$?
  grep -E '^\[  (PASSED|FAILED) |^\[==========\].*ran' "$out/tests.txt" | tee -a "$out/summary.txt"
  [ "$status" -eq 0 ] || { grep -B2 -A8 'Failure' "$out/tests.txt" | head -n 60; return "$status"; }
}

# The sanitizers slow kernels 10-100x: one float, one quantized configuration and the plain tests.
sanitize() {
  local subset='CudaBackendTest/paged_bf16.*:CudaBackendTest/paged_int8.*:CudaBackend.*'
  for tool in memcheck racecheck; do
    log "compute-sanitizer --tool $tool, tests $subset"
    if compute-sanitizer --tool "$tool" --error-exitcode 1 build/gpu/kvcache_cuda_backend_tests \
        --gtest_filter="$subset" > "$out/$tool.txt" 2>&1; then
      echo "$tool: exit 0" | tee -a "$out/summary.txt"
    else
      echo "$tool: FAILED" | tee -a "$out/summary.txt"
      tail -n 30 "$out/$tool.txt"
    fi
    grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|PASSED|FAILED' "$out/$tool.txt" | tee -a "$out/summary.txt" || true
  done
}

bench() {
  log "decode benchmark and PyTorch SDPA on the same shapes"
  PYTHONUNBUFFERED=1 python3 benchmarks/cuda/sdpa_peer.py build/gpu/kvcache_cuda_bench --json "$out/decode.json" \
    2>&1 | tee -a "$out/summary.txt"
}

[ $# -gt 0 ] || set -- build test sanitize bench
for stage in "$@"; do
  case "$stage" in
    build) build ;;
    test) run_tests ;;
    sanitize) sanitize ;;
    bench) bench ;;
    *) echo "unknown stage $stage: pack | build | test | sanitize | bench" >&2; exit 2 ;;
  esac
done
