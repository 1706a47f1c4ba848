// kv_accuracy: what storing K/V in a narrower element type costs in model accuracy.
//
//   kv_accuracy [--model-dir DIR] [--json FILE]
//
// Runs the stories260K model (DIR holds stories260K.bin, tok512.bin and expected.jsonl, the 32
// greedy outputs of llama2.c) with a cache of each element type, f32, f16, bf16, int8,
// fp8_e4m3, fp8_e5m2, the Hadamard-rotated int8 and fp8_e4m3, int4 and int4_hadamard,
// int8_residual and fp8_e4m3_residual, and compares it with the same model on an f32 cache.
// The weights and all arithmetic stay f32; only the cached K/V are rounded (int8, fp8: one float
// scale per row, that is per token and kv-head; int4: keys per channel over groups of 32
// tokens, values per row; int4 and the residual types keep the newest tokens of each sequence
// in full precision until 32 of them are quantized together). The f32 row checks the harness
// itself: it must show KLD 0, agreement 100% and every greedy case exact. The rows named
// "+offset" measure bf16, int8, fp8, int4 and the residual types again on caches built with key
// offsets (KVCache's constructor): each key channel's mean over a calibration text, the story
// of sampled.jsonl, which is none of the reference texts.
//
// Columns, per element type:
//   KLD       mean KL(P_f32 || P_dtype) of the next-token distributions, in nats. Teacher
//             forced: each reference text (prompt + llama2.c's generation) is fed one token at
//             a time into a fresh sequence, so every position's logits attend to the cached
//             K/V of all earlier positions. Every position with a next token counts once; the
//             texts of one prompt at -n 64..512 share their beginnings, which thus count more.
//   KLD K, KLD V   the same KLD with only the keys (only the values) rounded as this type
//             stores them and the other half exact (an f32 cache fed rounded rows): which half
//             of the cache the loss comes from. "-" for int4, whose keys are rounded a group
//             of tokens at a time, not row by row, for the residual types, and for +offset
//   KLD W32, W32 (top1%)   KLD and agreement with the newest 32 tokens of each sequence in full
//             precision and only older ones rounded (a full-precision window, as int4's
//             residual rows are): how much of the loss the newest keys carry. "-" where KLD K is
//   top1%     positions where both distributions have the same most likely token
//   NLL       mean -log P_dtype(the text's next token), nats     dNLL   NLL - NLL of f32
//   greedy    reference cases whose greedy (temperature 0) generation with this cache equals
//             llama2.c's f32 tokens exactly, of 32
//   div mean, div min   among the other cases, the first generated token that differs (0: the
//             first token after the prompt); "-" when no case differs. A divergence starts at a
//             near tie of two tokens, so these counts move a little with the compiler's float
//             code (-march=native, say) even where KLD does not
//   attn rand  attention-output error, max |out - out_f32| / max |out_f32| of a decode call,
//             against an f32 cache holding the same rows: random N(0, 1) K/V and queries for a
//             Llama-3-8B layer (32 query heads, 8 kv-heads of 128) at 2048 positions; mean of
//             16 calls
//   attn model  the same error on the model's own K/V: the f32 cache's rows after the longest
//             reference text, appended again position by position, with one decode call per
//             layer at every length. The queries are random N(0, 1), not the model's: the
//             Transformer does not expose its queries. Mean over all calls (the JSON also
//             gives the maximum).
//   B/token   bytes of K/V per token for stories260K (5 layers, 4 kv-heads of 8), scales
//             included                                  vs f16  that as a fraction of f16's
//   8B vs f16  the same fraction for Llama-3-8B: with head_dim 8 the per-row scale weighs 16
//             times more than with head_dim 128
//
// --json FILE writes one object per element type with these numbers (and a few more).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <limits>
#include <map>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "attention_error.hpp"
#include "llama2/checkpoint.hpp"
#include "llama2/generator.hpp"
#include "llama2/jsonl.hpp"
#include "llama2/tokenizer.hpp"
#include "llama2/transformer.hpp"
#include "reference_cases.hpp"

namespace {

using namespace kv_accuracy;

#ifdef KVCACHE_STORIES260K_DIR
constexpr const char* default_model_dir = KVCACHE_STORIES260K_DIR;
#else
constexpr const char* default_model_dir = "examples/llama2/models/stories260K";
#endif

const kvcache::ModelShape llama3_8b{.layers = 32, .q_heads = 32, .kv_heads = 8, .head_dim = 128};
// Random K/V fill one layer of it: every layer of random data would behave alike.
const kvcache::ModelShape llama3_8b_layer{.layers = 1, .q_heads = 32, .kv_heads = 8, .head_dim = 128};
constexpr int random_tokens = 2048;
constexpr int random_queries = 16;
constexpr std::uint64_t seed = 1;
constexpr int exact_window = 32;  // newest tokens kept in full precision for the "W32" columns

struct Options {
  std::string model_dir = default_model_dir;
  std::string json_path;
};

constexpr const char* usage_text = "usage: kv_accuracy [--model-dir DIR] [--json FILE]\n";

[[noreturn]] void usage(const std::string& message) {
  std::fprintf(stderr, "error: %s\n%s", message.c_str(), usage_text);
  std::exit(2);
}

Options parse_options(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::printf("%s", usage_text);
      std::exit(0);
    }
    if (i + 1 >= argc) usage("no value after " + flag);
    if (flag == "--model-dir") options.model_dir = argv[i + 1];
    else if (flag == "--json") options.json_path = argv[i + 1];
    else usage("unknown option " + flag);
  }
  return options;
}

// ---- teacher forcing ----

// The texts to feed: each reference case's tokens but the last, whose logits predict nothing
// (and which, in a text of the whole context plus one, would not fit).
std::vector<std::vector<int>> forced_inputs(const std::vector<ReferenceCase>& cases) {
  std::vector<std::vector<int>> inputs;
  for (const ReferenceCase& reference : cases) {
    std::vector<int> tokens = reference.tokens();
    tokens.pop_back();
    inputs.push_back(std::move(tokens));
  }
  return inputs;
}

using Logits = std::vector<float>;  // [positions][vocab]

// An f32 cache whose appends round the keys, or the values, as a DType cache stores them and
// keep the other half exact. The model appends through it and attends to it as to any cache.
enum class Half { keys, values };

template <class DType, Half rounded>
class HalfRoundedCache : public kvcache::KVCache<kvcache::Contiguous, kvcache::f32> {
 public:
  using KVCache::KVCache;

  void append(int layer, kvcache::SeqId seq, std::span<const float> k, std::span<const float> v) {
    const std::span<const float> rows = rounded == Half::keys ? k : v;
    rounded_.assign(rows.begin(), rows.end());
    kvcache::round_trip_rows<DType>(rounded_, shape().head_dim);
    if constexpr (rounded == Half::keys) KVCache::append(layer, seq, rounded_, v);
    else KVCache::append(layer, seq, k, rounded_);
  }

 private:
  std::vector<float> rounded_;
};

// An f32 cache whose rows are rounded as a DType cache stores them only once `exact_tokens`
// newer positions follow: a cache that keeps a window of the newest tokens in full precision
// (as int4's residual rows do, whatever the type). Each step, at the first layer's append of
// one token, the position leaving the window is rounded in every layer: the sequence is
// truncated to before it and the rows appended again.
template <class DType, int exact_tokens>
class RecentExactCache : public kvcache::KVCache<kvcache::Contiguous, kvcache::f32> {
 public:
  using KVCache::KVCache;

  void append(int layer, kvcache::SeqId seq, std::span<const float> k, std::span<const float> v) {
    const int leaving = length(seq) - exact_tokens;
    if (layer == 0 && leaving >= 0) round_position(seq, leaving);
    KVCache::append(layer, seq, k, v);
  }

 private:
  void round_position(kvcache::SeqId seq, int position) {
    KVRows rows = read_rows(*this, seq);
    const std::size_t first = static_cast<std::size_t>(position) * rows.row_floats();
    for (auto* kind : {&rows.k, &rows.v})
      for (std::vector<float>& layer_rows : *kind) {
        layer_rows.erase(layer_rows.begin(), layer_rows.begin() + static_cast<std::ptrdiff_t>(first));
        kvcache::round_trip_rows<DType>(std::span(layer_rows).first(rows.row_floats()), rows.shape.head_dim);
      }
    truncate(seq, position);
    reserve(seq, exact_tokens + 1);
    for (int layer = 0; layer < rows.shape.layers; ++layer)
      KVCache::append(layer, seq, rows.k[static_cast<std::size_t>(layer)], rows.v[static_cast<std::size_t>(layer)]);
  }
};

// The logits at every position of every input, fed one token per forward call (the decode
// path) into a fresh sequence of a Cache (a KVCache<Contiguous, ...>, HalfRoundedCache or
// RecentExactCache). All inputs advance together, one batched
// forward call per position, as a server decodes; f32 is computed the same way, so batching
// cannot show up as a difference.
template <class Cache>
std::vector<Logits> forced_logits(llama2::Transformer& model, const std::vector<std::vector<int>>& inputs,
                                  std::span<const float> key_offsets = {}) {
  const llama2::Config& config = model.config();
  Cache cache(
      config.kv_shape(),
      kvcache::Contiguous{.max_sequences = static_cast<int>(inputs.size()), .max_tokens = config.seq_len},
      key_offsets);
  const std::size_t vocab = static_cast<std::size_t>(config.vocab_size);
  std::vector<Logits> all;
  std::vector<kvcache::SeqId> seqs;
  std::size_t longest = 0;
  for (const std::vector<int>& tokens : inputs) {
    all.emplace_back(tokens.size() * vocab);
    seqs.push_back(cache.open());
    longest = std::max(longest, tokens.size());
  }
  std::vector<llama2::Feed> feeds;
  std::vector<std::size_t> fed;  // the input of each feed
  std::vector<float> batch_logits;
  for (std::size_t t = 0; t < longest; ++t) {
    feeds.clear();
    fed.clear();
    for (std::size_t i = 0; i < inputs.size(); ++i) {
      if (t >= inputs[i].size()) continue;
      cache.reserve(seqs[i], 1);
      feeds.push_back({seqs[i], std::span<const int>(&inputs[i][t], 1)});
      fed.push_back(i);
    }
    batch_logits.resize(feeds.size() * vocab);
    model.forward(cache, feeds, batch_logits);
    for (std::size_t f = 0; f < fed.size(); ++f)
      std::copy_n(batch_logits.begin() + static_cast<std::ptrdiff_t>(f * vocab), vocab,
                  all[fed[f]].begin() + static_cast<std::ptrdiff_t>(t * vocab));
  }
  return all;
}

// log softmax of one position's logits, in double.
void log_probabilities(std::span<const float> logits, std::vector<double>& out) {
  const double max = *std::max_element(logits.begin(), logits.end());
  double sum = 0;
  for (const float logit : logits) sum += std::exp(logit - max);
  const double log_sum = max + std::log(sum);
  out.resize(logits.size());
  for (std::size_t i = 0; i < logits.size(); ++i) out[i] = logits[i] - log_sum;
}

// The most likely token; the lowest id on a tie, as the greedy sampler picks.
std::size_t top_token(std::span<const float> logits) {
  return static_cast<std::size_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

struct ForcedMetrics {
  double kld = 0;             // mean KL(P_f32 || P_dtype), nats
  double top1_agreement = 0;  // fraction of positions
  double nll = 0;             // mean -log P_dtype(next token)
  double nll_delta = 0;       // nll - the f32 cache's
  long positions = 0;
};

ForcedMetrics compare_forced(const std::vector<Logits>& reference, const std::vector<Logits>& logits,
                             const std::vector<ReferenceCase>& cases, std::size_t vocab) {
  double kld = 0, nll = 0, reference_nll = 0;
  long agreements = 0, positions = 0;
  std::vector<double> p, q;  // log probabilities: f32, dtype
  for (std::size_t text = 0; text < cases.size(); ++text) {
    const std::vector<int> tokens = cases[text].tokens();
    for (std::size_t t = 0; t < reference[text].size() / vocab; ++t) {
      const std::span<const float> reference_logits = std::span(reference[text]).subspan(t * vocab, vocab);
      const std::span<const float> dtype_logits = std::span(logits[text]).subspan(t * vocab, vocab);
      log_probabilities(reference_logits, p);
      log_probabilities(dtype_logits, q);
      for (std::size_t i = 0; i < vocab; ++i) kld += std::exp(p[i]) * (p[i] - q[i]);
      const auto next = static_cast<std::size_t>(tokens[t + 1]);
      nll -= q[next];
      reference_nll -= p[next];
      agreements += top_token(reference_logits) == top_token(dtype_logits);
      ++positions;
    }
  }
  const double n = static_cast<double>(positions);
  return {kld / n, static_cast<double>(agreements) / n, nll / n, (nll - reference_nll) / n, positions};
}

// ---- greedy generation ----

struct GreedyMetrics {
  int cases = 0;
  int exact = 0;                  // cases whose generated tokens equal the reference's
  std::vector<int> divergences;   // the others: index of the first generated token that differs

  double divergence_mean() const {
    double sum = 0;
    for (const int at : divergences) sum += at;
    return divergences.empty() ? std::numeric_limits<double>::quiet_NaN() : sum / static_cast<double>(divergences.size());
  }
  int divergence_min() const {
    return divergences.empty() ? -1 : *std::min_element(divergences.begin(), divergences.end());
  }
};

// The first index where the two differ (one ending early counts as differing there); -1 if equal.
int first_difference(const std::vector<int>& a, const std::vector<int>& b) {
  const auto [at_a, at_b] = std::mismatch(a.begin(), a.end(), b.begin(), b.end());
  return at_a == a.end() && at_b == b.end() ? -1 : static_cast<int>(at_a - a.begin());
}

// Each reference case generated greedily with a DType cache: the cases of one -n value run as
// one batch (a sequence's tokens do not depend on its batch; llama2_test checks that).
template <class DType>
GreedyMetrics greedy_agreement(llama2::Transformer& model, const llama2::Tokenizer& tokenizer,
                               const std::vector<ReferenceCase>& cases, std::span<const float> key_offsets) {
  std::map<int, std::vector<std::size_t>> cases_by_steps;
  for (std::size_t i = 0; i < cases.size(); ++i) cases_by_steps[cases[i].steps].push_back(i);
  GreedyMetrics metrics;
  for (const auto& [steps, indices] : cases_by_steps) {
    llama2::GenerationOptions options;
    options.steps = steps;
    options.temperature = 0.0f;
    options.max_batch = static_cast<int>(indices.size());
    kvcache::KVCache<kvcache::Contiguous, DType> cache(
        model.config().kv_shape(),
        kvcache::Contiguous{.max_sequences = options.max_batch, .max_tokens = model.config().seq_len}, key_offsets);
    std::vector<std::string> prompts;
    for (const std::size_t i : indices) prompts.push_back(cases[i].prompt);
    llama2::Generator generator(model, tokenizer, cache, options);
    const std::vector<llama2::Generation> results = generator.run(prompts);
    for (std::size_t r = 0; r < results.size(); ++r) {
      const ReferenceCase& reference = cases[indices[r]];
      if (results[r].prompt_ids != reference.prompt_ids)
        throw std::runtime_error("case " + reference.name + ": the tokenizer's prompt ids differ from expected.jsonl's");
      const int divergence = first_difference(results[r].generated_ids, reference.generated_ids);
      ++metrics.cases;
      if (divergence < 0) ++metrics.exact;
      else metrics.divergences.push_back(divergence);
    }
  }
  return metrics;
}

// ---- the report ----

// The f32 results every other element type is measured against, and the K/V rows compared.
struct Baseline {
  std::vector<std::vector<int>> inputs;  // teacher-forced tokens of each case
  std::vector<Logits> logits;            // f32 cache's logits at each of their positions
  KVRows random_rows;                    // Gaussian K/V, Llama-3-8B layer
  KVRows model_rows;                     // stories260K's K/V after the longest reference text
  std::string model_rows_case;
};

// The f32 model run over the case with the most tokens, in one prefill; its cached rows.
KVRows capture_model_rows(llama2::Transformer& model, const std::vector<int>& tokens) {
  const llama2::Config& config = model.config();
  kvcache::KVCache<kvcache::Contiguous, kvcache::f32> cache(
      config.kv_shape(), kvcache::Contiguous{.max_sequences = 1, .max_tokens = config.seq_len});
  const kvcache::SeqId seq = cache.open();
  cache.reserve(seq, static_cast<int>(tokens.size()));
  std::vector<float> logits(static_cast<std::size_t>(config.vocab_size));
  const llama2::Feed feed{seq, tokens};
  model.forward(cache, std::span<const llama2::Feed>(&feed, 1), logits);
  return read_rows(cache, seq);
}

Baseline make_baseline(llama2::Transformer& model, const std::vector<ReferenceCase>& cases) {
  Baseline baseline;
  baseline.inputs = forced_inputs(cases);
  baseline.logits = forced_logits<kvcache::KVCache<kvcache::Contiguous, kvcache::f32>>(model, baseline.inputs);
  baseline.random_rows = random_rows(llama3_8b_layer, random_tokens, seed);
  const auto longest = std::max_element(baseline.inputs.begin(), baseline.inputs.end(),
                                        [](const auto& a, const auto& b) { return a.size() < b.size(); });
  baseline.model_rows = capture_model_rows(model, *longest);
  baseline.model_rows_case = cases[static_cast<std::size_t>(longest - baseline.inputs.begin())].name;
  return baseline;
}

// Key offsets for KVCache's constructor, [layers][kv_heads][head_dim]: the mean of each key
// channel of the f32 model over a calibration text, the story in sampled.jsonl (llama2.c's
// sampled output, none of the reference texts measured here).
std::vector<float> calibrated_key_offsets(llama2::Transformer& model, const llama2::Tokenizer& tokenizer,
                                          const std::string& model_dir) {
  const std::vector<llama2::Json> lines = llama2::read_jsonl(model_dir + "/sampled.jsonl");
  if (lines.empty()) kvcache::detail::fail(kvcache::errc::corrupt_data, "'", model_dir, "/sampled.jsonl' holds no text");
  const KVRows rows = capture_model_rows(model, tokenizer.encode(lines.front()["text"].str()));
  const std::size_t row = rows.row_floats();
  std::vector<float> offsets(rows.k.size() * row, 0.0f);
  for (std::size_t layer = 0; layer < rows.k.size(); ++layer) {
    std::vector<double> sums(row, 0.0);
    for (std::size_t i = 0; i < rows.k[layer].size(); ++i) sums[i % row] += rows.k[layer][i];
    for (std::size_t i = 0; i < row; ++i) offsets[layer * row + i] = static_cast<float>(sums[i] / rows.tokens);
  }
  return offsets;
}

struct Row {
  std::string dtype;
  bool key_offsets = false;  // the cache stored keys minus the calibrated offsets
  ForcedMetrics forced;
  double kld_keys_only = std::numeric_limits<double>::quiet_NaN();    // NaN: not measured (int4)
  double kld_values_only = std::numeric_limits<double>::quiet_NaN();
  ForcedMetrics recent_exact;  // the newest exact_window tokens exact (when kld_keys_only is measured)
  GreedyMetrics greedy;
  ErrorSummary attention_random, attention_model;
  std::size_t bytes_per_token = 0;
  double bytes_vs_f16 = 0, llama3_bytes_vs_f16 = 0;
};

// Teacher-forced metrics of the model on a Cache, against the f32 cache's.
template <class Cache>
ForcedMetrics forced_metrics(llama2::Transformer& model, const std::vector<ReferenceCase>& cases, const Baseline& baseline,
                             std::span<const float> key_offsets = {}) {
  const auto vocab = static_cast<std::size_t>(model.config().vocab_size);
  return compare_forced(baseline.logits, forced_logits<Cache>(model, baseline.inputs, key_offsets), cases, vocab);
}

// key_offsets: the cache's (KVCache's constructor); the K-only, V-only and newest-32-exact
// columns are measured without them.
template <class DType>
Row evaluate(llama2::Transformer& model, const llama2::Tokenizer& tokenizer,
             const std::vector<ReferenceCase>& cases, const Baseline& baseline, std::span<const float> key_offsets = {}) {
  const kvcache::ModelShape shape = model.config().kv_shape();
  const int random_lengths[] = {random_tokens};
  std::vector<int> every_length(static_cast<std::size_t>(baseline.model_rows.tokens));
  for (std::size_t i = 0; i < every_length.size(); ++i) every_length[i] = static_cast<int>(i) + 1;
  auto fraction_of_f16 = [](const kvcache::ModelShape& s) {
    return static_cast<double>(kvcache::bytes_per_token<DType>(s)) / static_cast<double>(kvcache::bytes_per_token<kvcache::f16>(s));
  };
  Row row;
  row.dtype = std::string(std::string_view(DType::name));
  row.key_offsets = !key_offsets.empty();
  row.forced = forced_metrics<kvcache::KVCache<kvcache::Contiguous, DType>>(model, cases, baseline, key_offsets);
  if constexpr ((kvcache::FloatElement<DType> || kvcache::QuantizedElement<DType>) && kvcache::residual_tokens<DType> == 0)
    if (!row.key_offsets) {
      row.kld_keys_only = forced_metrics<HalfRoundedCache<DType, Half::keys>>(model, cases, baseline).kld;
      row.kld_values_only = forced_metrics<HalfRoundedCache<DType, Half::values>>(model, cases, baseline).kld;
      row.recent_exact = forced_metrics<RecentExactCache<DType, exact_window>>(model, cases, baseline);
    }
  row.greedy = greedy_agreement<DType>(model, tokenizer, cases, key_offsets);
  // Random rows have no channel means (and another shape): no offsets there.
  row.attention_random = decode_error<DType>(baseline.random_rows, random_lengths, random_queries, seed);
  row.attention_model = decode_error<DType>(baseline.model_rows, every_length, 1, seed, key_offsets);
  row.bytes_per_token = kvcache::bytes_per_token<DType>(shape);
  row.bytes_vs_f16 = fraction_of_f16(shape);
  row.llama3_bytes_vs_f16 = fraction_of_f16(llama3_8b);
  return row;
}

void print_summary(const llama2::Config& config, const std::vector<ReferenceCase>& cases, const Baseline& baseline,
                   long positions) {
  std::printf("stories260K: %d layers, %d heads, %d kv-heads of %d, vocab %d, context %d\n", config.layers,
              config.heads, config.kv_heads, config.head_size(), config.vocab_size, config.seq_len);
  std::printf("teacher forced: %zu texts, %ld positions; greedy: %zu cases\n", cases.size(), positions, cases.size());
  std::printf("attn rand: %d positions x %d decode calls; attn model: case %s, %d positions x %d layers\n\n",
              random_tokens, random_queries, baseline.model_rows_case.c_str(), baseline.model_rows.tokens,
              baseline.model_rows.shape.layers);
}

std::string format(const char* pattern, double value) {
  if (std::isnan(value)) return "-";
  char text[32];
  std::snprintf(text, sizeof text, pattern, value);
  return text;
}

void print_table(const std::vector<Row>& rows) {
  std::printf("%-24s %10s %10s %10s %10s %7s %7s %7s %10s %7s %8s %7s %10s %10s %7s %6s %9s\n", "dtype", "KLD", "KLD K",
              "KLD V", "KLD W32", "top1%", "W32", "NLL", "dNLL",
              "greedy", "div mean", "div min", "attn rand", "attn model", "B/token", "vs f16", "8B vs f16");
  for (const Row& row : rows) {
    const GreedyMetrics& greedy = row.greedy;
    const std::string exact = std::to_string(greedy.exact) + "/" + std::to_string(greedy.cases);
    const int minimum = greedy.divergence_min();
    const bool windowed = !std::isnan(row.kld_keys_only);
    const std::string name = row.dtype + (row.key_offsets ? "+offset" : "");
    std::printf("%-24s %10.3e %10s %10s %10s %7.2f %7s %7.4f %10.2e %7s %8s %7s %10.3e %10.3e %7zu %6.3f %9.3f\n",
                name.c_str(), row.forced.kld, format("%.3e", row.kld_keys_only).c_str(),
                format("%.3e", row.kld_values_only).c_str(), windowed ? format("%.3e", row.recent_exact.kld).c_str() : "-",
                100 * row.forced.top1_agreement, windowed ? format("%.2f", 100 * row.recent_exact.top1_agreement).c_str() : "-", row.forced.nll, row.forced.nll_delta, exact.c_str(),
                format("%.1f", greedy.divergence_mean()).c_str(), minimum < 0 ? "-" : std::to_string(minimum).c_str(),
                row.attention_random.mean, row.attention_model.mean, row.bytes_per_token, row.bytes_vs_f16,
                row.llama3_bytes_vs_f16);
  }
}

// JSON has no NaN: an undefined number is null.
std::string json_number(double value) {
  if (std::isnan(value)) return "null";
  char text[32];
  std::snprintf(text, sizeof text, "%.9g", value);
  return text;
}

std::string json_object(const Row& row) {
  std::string text;
  auto field = [&](const char* name, const std::string& value) {
    text += (text.empty() ? "{\"" : ", \"") + std::string(name) + "\": " + value;
  };
  const int minimum = row.greedy.divergence_min();
  field("dtype", "\"" + row.dtype + "\"");
  field("key_offsets", row.key_offsets ? "true" : "false");
  field("kld", json_number(row.forced.kld));
  field("kld_keys_only", json_number(row.kld_keys_only));
  field("kld_values_only", json_number(row.kld_values_only));
  const bool windowed = !std::isnan(row.kld_keys_only);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  field("recent_exact_tokens", std::to_string(exact_window));
  field("kld_recent_exact", json_number(windowed ? row.recent_exact.kld : nan));
  field("top1_agreement_recent_exact", json_number(windowed ? row.recent_exact.top1_agreement : nan));
  field("top1_agreement", json_number(row.forced.top1_agreement));
  field("nll", json_number(row.forced.nll));
  field("nll_delta", json_number(row.forced.nll_delta));
  field("positions", std::to_string(row.forced.positions));
  field("bytes_per_token", std::to_string(row.bytes_per_token));
  field("bytes_vs_f16", json_number(row.bytes_vs_f16));
  field("llama3_8b_bytes_vs_f16", json_number(row.llama3_bytes_vs_f16));
  field("greedy_cases", std::to_string(row.greedy.cases));
  field("greedy_exact_cases", std::to_string(row.greedy.exact));
  field("first_divergence_mean", json_number(row.greedy.divergence_mean()));
  field("first_divergence_min", minimum < 0 ? "null" : std::to_string(minimum));
  field("attention_error_random", json_number(row.attention_random.mean));
  field("attention_error_random_max", json_number(row.attention_random.max));
  field("attention_error_model", json_number(row.attention_model.mean));
  field("attention_error_model_max", json_number(row.attention_model.max));
  return text + "}";
}

void write_json(const std::string& path, const std::vector<Row>& rows) {
  std::string text = "[\n";
  for (std::size_t i = 0; i < rows.size(); ++i) text += "  " + json_object(rows[i]) + (i + 1 < rows.size() ? ",\n" : "\n");
  text += "]\n";
  std::FILE* file = std::fopen(path.c_str(), "w");
  const bool written = file != nullptr && std::fwrite(text.data(), 1, text.size(), file) == text.size();
  if (file == nullptr || std::fclose(file) != 0 || !written) throw std::runtime_error("cannot write " + path);
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse_options(argc, argv);
  try {
    const auto start = std::chrono::steady_clock::now();
    // The model's attention calls are far too small to share: handing each to a worker thread
    // costs more than it saves, and waiting on a descheduled worker on a busy machine costs
    // milliseconds per call. Outputs are the same on any number of threads.
    kvcache::backend::cpu::set_threads(1);
    const llama2::Checkpoint checkpoint(options.model_dir + "/stories260K.bin");
    const llama2::Tokenizer tokenizer(options.model_dir + "/tok512.bin", checkpoint.config().vocab_size);
    const std::vector<ReferenceCase> cases = read_reference_cases(options.model_dir + "/expected.jsonl");
    llama2::Transformer model(checkpoint);
    const Baseline baseline = make_baseline(model, cases);

    std::vector<Row> rows;
    rows.push_back(evaluate<kvcache::f32>(model, tokenizer, cases, baseline));
    rows.push_back(evaluate<kvcache::f16>(model, tokenizer, cases, baseline));
    rows.push_back(evaluate<kvcache::bf16>(model, tokenizer, cases, baseline));
    rows.push_back(evaluate<kvcache::int8>(model, tokenizer, cases, baseline));
    rows.push_back(evaluate<kvcache::fp8_e4m3>(model, tokenizer, cases, baseline));
    rows.push_back(evaluate<kvcache::fp8_e5m2>(model, tokenizer, cases, baseline));
    rows.push_back(evaluate<kvcache::int8_hadamard>(model, tokenizer, cases, baseline));
    rows.push_back(evaluate<kvcache::fp8_e4m3_hadamard>(model, tokenizer, cases, baseline));
    rows.push_back(evaluate<kvcache::int4>(model, tokenizer, cases, baseline));
    rows.push_back(evaluate<kvcache::int4_hadamard>(model, tokenizer, cases, baseline));
    rows.push_back(evaluate<kvcache::int8_residual>(model, tokenizer, cases, baseline));
    rows.push_back(evaluate<kvcache::fp8_e4m3_residual>(model, tokenizer, cases, baseline));
    const std::vector<float> offsets = calibrated_key_offsets(model, tokenizer, options.model_dir);
    rows.push_back(evaluate<kvcache::bf16>(model, tokenizer, cases, baseline, offsets));
    rows.push_back(evaluate<kvcache::int8>(model, tokenizer, cases, baseline, offsets));
    rows.push_back(evaluate<kvcache::fp8_e4m3>(model, tokenizer, cases, baseline, offsets));
    rows.push_back(evaluate<kvcache::fp8_e5m2>(model, tokenizer, cases, baseline, offsets));
    rows.push_back(evaluate<kvcache::int4>(model, tokenizer, cases, baseline, offsets));
    rows.push_back(evaluate<kvcache::int8_residual>(model, tokenizer, cases, baseline, offsets));
    rows.push_back(evaluate<kvcache::fp8_e4m3_residual>(model, tokenizer, cases, baseline, offsets));

    print_summary(checkpoint.config(), cases, baseline, rows.front().forced.positions);
    print_table(rows);
    std::fflush(stdout);
    if (!options.json_path.empty()) write_json(options.json_path, rows);
    const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
    std::fprintf(stderr, "measured in %.1f s\n", elapsed.count());
  } catch (const std::exception& error) {
    std::fprintf(stderr, "error: %s\n", error.what());
    return 1;
  }
}
