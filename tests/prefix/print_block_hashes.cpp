// Prints the prefix-cache block hashes of fixed token blocks, one per line. CTest runs it in two
// processes and compares both outputs with tests/prefix/block_hashes.golden: block identity must
// not depend on the process, the run or the machine.
#include <kvcache/prefix/block_hash.hpp>
#include <kvcache/dtype/float.hpp>

#include <array>
#include <cinttypes>
#include <cstdio>

int main() {
  using namespace kvcache;
  const ModelShape llama3_8b{32, 32, 8, 128};
  const BlockHash root = prefix_root<f16>(llama3_8b, 16, 0);
  const BlockHash tenant = prefix_root<f16>(llama3_8b, 16, 42);
  std::array<std::int32_t, 16> first{}, second{};
  for (int i = 0; i < 16; ++i) first[i] = i + 1, second[i] = 100000 + 7 * i;
  const BlockHash chain1 = hash_block(root, first);
  std::printf("root %016" PRIx64 "\n", root);
  std::printf("root_salt42 %016" PRIx64 "\n", tenant);
  std::printf("root_bf16 %016" PRIx64 "\n", prefix_root<bf16>(llama3_8b, 16, 0));
  std::printf("block1 %016" PRIx64 "\n", chain1);
  std::printf("block2 %016" PRIx64 "\n", hash_block(chain1, second));
  std::printf("block1_salt42 %016" PRIx64 "\n", hash_block(tenant, first));
  const std::array<std::int32_t, 3> odd{-1, 0, 2147483647};
  std::printf("odd_block %016" PRIx64 "\n", hash_block(0, odd));
}
