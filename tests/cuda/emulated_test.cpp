// The CUDA backend tests with the kernels run on the CPU (emulator.hpp): on every machine, with
// or without a GPU, the kernels' logic is checked against the CPU backend. On a GPU,
// kvcache_cuda_backend_tests runs the same tests on the device.
#include "emulator.hpp"

#include "cuda_attention_test.cu"
