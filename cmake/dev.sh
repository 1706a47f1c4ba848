#!/usr/bin/env bash
# The project's two commands, and the CI's sanitizer pass:
#   cmake/dev.sh demo    build the stories260K engine and tell a story (extra arguments go to it)
#   cmake/dev.sh test    build everything and run every test (ctest)
#   cmake/dev.sh asan    the same tests under AddressSanitizer + UndefinedBehaviorSanitizer
#                        (built without -march=native: the portable kernels)
#   cmake/dev.sh avx2    the kernels' tests built for AVX2 without AVX-512 (the other SIMD kernels)
#   cmake/dev.sh bench   build and run the benchmarks (extra arguments go to Google Benchmark)
# Missing Debian packages are installed when run as root; otherwise the apt-get line is printed.
set -euo pipefail
cd "$(dirname "$0")/.."

command=${1:-}
[ $# -gt 0 ] && shift
packages=(cmake g++ make libeigen3-dev libgtest-dev libgmock-dev libbenchmark-dev)

missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" ||
    missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    echo "kvcache needs these Debian packages; run as root:" >&2
    echo "  apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

jobs=$(nproc)
build() {  # build PRESET [TARGET...]
  local preset=$1
  shift
  cmake --preset "$preset" >/dev/null
  if [ $# -gt 0 ]; then
    cmake --build --preset "$preset" -j "$jobs" --target "$@"
  else
    cmake --build --preset "$preset" -j "$jobs"
  fi
}

case "$command" in
  demo)
    build default llama2
    model=examples/llama2/models/stories260K
    [ $# -gt 0 ] || set -- -t 0.8 -p 0.9 -s 42 -n 256 -i "Once upon a time"
    ./build/default/examples/llama2/llama2 "$model/stories260K.bin" -z "$model/tok512.bin" "$@"
    ;;
  test)
    build default
    ctest --preset default -j "$jobs"
    ;;
  asan)
    # Only what ctest runs: the example programs (compiled by `test`) take minutes under the
    # sanitizers and no test runs them.
    build asan kvcache_test_programs
    ctest --preset asan -j "$jobs"
    ;;
  avx2)
    build avx2 kvcache_kernel_tests
    ctest --preset avx2 -j "$jobs"
    ;;
  bench)
    build default kvcache_bench
    ./build/default/benchmarks/kvcache_bench "$@"
    ;;
  *)
    echo "usage: cmake/dev.sh demo | test | asan | avx2 | bench [benchmark arguments]" >&2
    exit 2
    ;;
esac
