// nvcc parses the umbrella header, and the math shared by host and device (element conversions,
// online softmax) gives the same results on both. Skips (exit 77) without a CUDA device.
#include <kvcache/kvcache.hpp>

#include <cmath>
#include <cstdio>

namespace {

constexpr int score_count = 6;

// out: [max, sum, f16 round trip of scores[0], bf16 round trip of scores[0]]
KVCACHE_HOST_DEVICE void shared_math(const float* scores, float* out) {
  kvcache::attention::OnlineSoftmax softmax;
  for (int i = 0; i < score_count; ++i) {
    softmax.raise_max(scores[i]);
    softmax.sum += expf(scores[i] - softmax.max);
  }
  out[0] = softmax.max;
  out[1] = softmax.sum;
  out[2] = kvcache::f16::to_float(kvcache::f16::from_float(scores[0]));
  out[3] = kvcache::bf16::to_float(kvcache::bf16::from_float(scores[0]));
}

__global__ void shared_math_kernel(const float* scores, float* out) { shared_math(scores, out); }

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: skipped (this binary compiled, which is the build check)\n");
    return 77;
  }
  const float scores[score_count] = {0.3f, 80.0f, -2.0f, 79.5f, 1e-3f, 81.25f};
  float host[4], device[4];
  shared_math(scores, host);
  float *scores_device = nullptr, *out_device = nullptr;
  cudaMalloc(&scores_device, sizeof(scores));
  cudaMalloc(&out_device, sizeof(device));
  cudaMemcpy(scores_device, scores, sizeof(scores), cudaMemcpyHostToDevice);
  shared_math_kernel<<<1, 1>>>(scores_device, out_device);
  const cudaError_t status = cudaMemcpy(device, out_device, sizeof(device), cudaMemcpyDeviceToHost);
  cudaFree(scores_device);
  cudaFree(out_device);
  if (status != cudaSuccess) {
    std::printf("CUDA error: %s\n", cudaGetErrorString(status));
    return 1;
  }
  int failures = 0;
  for (int i = 0; i < 4; ++i)
    if (std::fabs(host[i] - device[i]) > 1e-6f * std::fabs(host[i])) {
      std::printf("value %d: host %.9g device %.9g\n", i, host[i], device[i]);
      ++failures;
    }
  std::printf("%d passed, %d failed\n", 4 - failures, failures);
  return failures == 0 ? 0 : 1;
}
