// simulate: how many requests does a KV memory budget serve, under each storage policy?
//
//   simulate --trace sharegpt|shared-prefix|multi-turn [--json FILE] [--budget-gib X]
//            [--block N] [--seed S] [--requests N] [--rate R] [--max-seqs N] [--watermark F]
//
// Replays a synthetic request trace (trace.hpp) through a vLLM-like scheduler (scheduler.hpp)
// that drives the real allocator of each policy: Contiguous slots of 4096 positions, Paged
// blocks of 8, 16 and 32 positions, and Paged with prefix caching. Only the bookkeeping runs,
// so the budget is free to pick: it becomes a token count through the KV size of Llama-3-8B in
// f16 (32 layers, 8 kv-heads of 128: 128 KiB per token), 8 GiB = 65536 tokens by default.
//
// Traces: sharegpt (unique chat prompts, long-tailed lengths), shared-prefix (4 system prompts
// of 1000-2000 tokens before short user messages), multi-turn (conversations resending their
// history). Arrivals are Poisson and, by default, faster than any policy serves them, so memory
// stays full while requests wait: the regime where policies differ.
//
// Columns, per policy:
//   peak      most sequences running at once        batch   mean running sequences per step
//   mem%      budget handed to sequences, averaged over the steps where requests waited
//   waste%    unused positions of that memory (slot tails, last partial blocks), summed over
//             all steps, as a share of it
//   steps     decode iterations to serve the whole trace (prefill takes no simulated time)
//   preempt   running requests pushed back to the queue for room, to recompute later
//   computed  prefill tokens computed, recomputation after preemption included
//   saved     prefill tokens served by prefix hits       ideal  what an ideal cache saves:
//             unlimited memory, any token boundary, the longest prefix of each prompt that an
//             earlier prompt or answer shares, counted at each request's first admission
//   of ideal  saved at first admissions / ideal          hit%   saved / (computed + saved)
//   evictions cached prefix blocks given up for room
// Assumption worth knowing: a prompt is published as soon as it is prefilled, so a later
// request admitted in the same step already reuses it.
#include <kvcache/dtype/float.hpp>
#include <kvcache/prefix/block_hash.hpp>
#include <kvcache/shape.hpp>
#include <kvcache/storage/contiguous.hpp>
#include <kvcache/storage/paged.hpp>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <utility>
#include <vector>

#include "scheduler.hpp"
#include "trace.hpp"

namespace {

using namespace simulate;

const kvcache::ModelShape llama3_8b{.layers = 32, .q_heads = 32, .kv_heads = 8, .head_dim = 128};
using KVType = kvcache::f16;

struct Options {
  std::string trace;
  std::string json_path;
  double budget_gib = 8;
  std::vector<int> blocks{8, 16, 32};
  std::uint64_t seed = 1;
  int requests = 2000;
  double rate = 0;  // arrivals (conversations for multi-turn) per step; 0: the trace's default
  int max_sequences = 1024;
  double watermark = 0.01;
};

struct Row {
  std::string policy;
  int block_tokens;
  Metrics metrics;
  std::string label() const {
    return policy == "contiguous" ? policy + " " + std::to_string(block_tokens)
                                  : policy + " B=" + std::to_string(block_tokens);
  }
};

constexpr const char* usage_text =
    "usage: simulate --trace sharegpt|shared-prefix|multi-turn [--json FILE] [--budget-gib X]\n"
    "                [--block N] [--seed S] [--requests N] [--rate R] [--max-seqs N] [--watermark F]\n"
    "  --block N      also simulate paged blocks of N tokens (1, 2, 4, 8, 16, 32, 64, 128)\n"
    "  --rate R       arrivals per step (multi-turn: conversations); default fills memory\n"
    "  --max-seqs N   paged sequence slots (default 1024)\n"
    "  --watermark F  fraction of blocks a paged admission leaves free (default 0.01, as vLLM)\n";

[[noreturn]] void usage(const std::string& message) {
  std::fprintf(stderr, "error: %s\n%s", message.c_str(), usage_text);
  std::exit(2);
}

std::size_t budget_bytes(const Options& options) {
  return static_cast<std::size_t>(options.budget_gib * static_cast<double>(std::size_t{1} << 30));
}

// `text` as a Number >= low; exits with usage, saying what was `expected`, otherwise.
template <class Number>
Number parse(const std::string& flag, const char* text, Number low, const char* expected) {
  Number value{};
  const char* end = text + std::char_traits<char>::length(text);
  const auto [stop, error] = std::from_chars(text, end, value);
  if (error != std::errc{} || stop != end || value < low)
    usage(flag + " needs " + expected + ", not '" + text + "'");
  return value;
}

void add_block(Options& options, int block) {
  if (block > 128 || (block & (block - 1)) != 0)
    usage("--block " + std::to_string(block) + ": use 1, 2, 4, 8, 16, 32, 64 or 128");
  if (std::find(options.blocks.begin(), options.blocks.end(), block) == options.blocks.end())
    options.blocks.push_back(block);
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
    const char* value = argv[i + 1];
    if (flag == "--trace") options.trace = value;
    else if (flag == "--json") options.json_path = value;
    else if (flag == "--budget-gib") options.budget_gib = parse(flag, value, 1e-6, "a number > 0");
    else if (flag == "--block") add_block(options, parse(flag, value, 1, "a whole number >= 1"));
    else if (flag == "--seed") options.seed = parse<std::uint64_t>(flag, value, 0, "a whole number >= 0");
    else if (flag == "--requests") options.requests = parse(flag, value, 1, "a whole number >= 1");
    else if (flag == "--rate") options.rate = parse(flag, value, 1e-6, "a number > 0");
    else if (flag == "--max-seqs") options.max_sequences = parse(flag, value, 1, "a whole number >= 1");
    else if (flag == "--watermark") options.watermark = parse(flag, value, 0.0, "a number >= 0");
    else usage("unknown option " + flag);
  }
  if (options.trace.empty()) usage("--trace is required");
  if (options.trace != "sharegpt" && options.trace != "shared-prefix" && options.trace != "multi-turn")
    usage("--trace " + options.trace + ": use sharegpt, shared-prefix or multi-turn");
  if (options.watermark >= 1) usage("--watermark must be below 1");
  if (kvcache::tokens_in_budget<KVType>(llama3_8b, budget_bytes(options)) < max_context)
    usage("--budget-gib must hold one request's whole context, 4096 tokens = 0.5 GiB");
  return options;
}

// Default arrival rates outpace what the budget serves, so the queue never drains early and
// memory stays full: the regime where the policies differ.
Trace make_trace(const Options& options) {
  auto rate = [&](double fallback) { return options.rate > 0 ? options.rate : fallback; };
  if (options.trace == "sharegpt") return sharegpt_trace(options.requests, rate(1.0), options.seed);
  if (options.trace == "shared-prefix") return shared_prefix_trace(options.requests, rate(2.0), options.seed);
  return multi_turn_trace(options.requests, rate(0.25), options.seed);
}

template <int Block, bool PrefixCaching>
Row run_paged(const Trace& trace, const Options& options) {
  using Policy = kvcache::Paged<Block>;
  Policy policy =
      Policy::template from_budget<KVType>(llama3_8b, budget_bytes(options), options.max_sequences);
  policy.max_tokens = max_context;  // sizes the block tables for the longest request only
  policy.validate();
  const int watermark = static_cast<int>(options.watermark * policy.num_blocks);
  const kvcache::BlockHash root = kvcache::prefix_root<KVType>(llama3_8b, Block, 0);
  Simulation<Policy, PrefixCaching> simulation(trace, policy, root, watermark);
  return {PrefixCaching ? "paged+prefix" : "paged", Block, simulation.run()};
}

Row run_contiguous(const Trace& trace, const Options& options) {
  const auto policy = kvcache::Contiguous::from_budget<KVType>(llama3_8b, budget_bytes(options), max_context);
  policy.validate();
  Simulation<kvcache::Contiguous, false> simulation(trace, policy, 0, 0);
  return {"contiguous", max_context, simulation.run()};
}

// Runs paged with `block` tokens per block, instantiated for each size the option accepts.
template <bool PrefixCaching, int... Sizes>
bool run_block(int block, const Trace& trace, const Options& options, std::vector<Row>& rows,
               std::integer_sequence<int, Sizes...>) {
  return ((block == Sizes && (rows.push_back(run_paged<Sizes, PrefixCaching>(trace, options)), true)) || ...);
}
using BlockSizes = std::integer_sequence<int, 1, 2, 4, 8, 16, 32, 64, 128>;

std::vector<Row> run_all(const Trace& trace, const Options& options) {
  std::vector<Row> rows{run_contiguous(trace, options)};
  for (int block : options.blocks) run_block<false>(block, trace, options, rows, BlockSizes{});
  for (int block : options.blocks) run_block<true>(block, trace, options, rows, BlockSizes{});
  return rows;
}

void print_summary(const Trace& trace, const Options& options) {
  long long prompts = 0, outputs = 0;
  int longest = 0;
  for (const Request& request : trace.requests) {
    prompts += request.prompt;
    outputs += request.output;
    longest = std::max(longest, request.prompt + request.output);
  }
  const auto count = static_cast<double>(trace.requests.size());
  const std::size_t tokens = kvcache::tokens_in_budget<KVType>(llama3_8b, budget_bytes(options));
  std::printf("trace %s: %zu requests, prompt mean %.0f, output mean %.0f, longest %d tokens (seed %llu)\n",
              trace.name.c_str(), trace.requests.size(), static_cast<double>(prompts) / count,
              static_cast<double>(outputs) / count, longest, static_cast<unsigned long long>(options.seed));
  std::printf("budget %.3g GiB = %zu tokens of Llama-3-8B f16 K/V (%zu bytes per token)\n\n",
              options.budget_gib, tokens, kvcache::bytes_per_token<KVType>(llama3_8b));
}

// "-" where a fraction has no meaning: nothing to save, or a policy that cannot save it.
std::string percent_of_ideal(const Row& row) {
  const double fraction = row.metrics.saved_fraction_of_ideal();
  if (std::isnan(fraction) || row.policy != "paged+prefix") return "-";
  char text[16];
  std::snprintf(text, sizeof text, "%.2f%%", 100 * fraction);
  return text;
}

void print_table(const std::vector<Row>& rows) {
  std::printf("%-18s %5s %6s %5s %7s %6s %8s %10s %10s %10s %9s %5s %9s\n", "config", "peak", "batch", "mem%",
              "waste%", "steps", "preempt", "computed", "saved", "ideal", "of ideal", "hit%", "evictions");
  for (const Row& row : rows) {
    const Metrics& m = row.metrics;
    std::printf("%-18s %5d %6.1f %5.1f %7.2f %6d %8llu %10llu %10llu %10llu %9s %5.1f %9llu\n", row.label().c_str(),
                m.peak_sequences, m.mean_batch, 100 * m.memory_in_use, 100 * m.waste_fraction, m.steps,
                static_cast<unsigned long long>(m.preemptions), static_cast<unsigned long long>(m.prefill_computed),
                static_cast<unsigned long long>(m.prefill_saved), static_cast<unsigned long long>(m.ideal_saved),
                percent_of_ideal(row).c_str(), 100 * m.hit_rate(), static_cast<unsigned long long>(m.evictions));
  }
}

// JSON has no NaN: an undefined fraction is null.
std::string json_number(double value) {
  if (std::isnan(value)) return "null";
  char text[32];
  std::snprintf(text, sizeof text, "%.6g", value);
  return text;
}

std::string json_object(const Row& row, const Trace& trace, const Options& options) {
  const Metrics& m = row.metrics;
  std::string text;
  auto field = [&](const char* name, const std::string& value) {
    text += (text.empty() ? "{\"" : ", \"") + std::string(name) + "\": " + value;
  };
  auto quoted = [](const std::string& value) { return "\"" + value + "\""; };
  field("trace", quoted(trace.name));
  field("requests", std::to_string(trace.requests.size()));
  field("seed", std::to_string(options.seed));
  field("budget_gib", json_number(options.budget_gib));
  field("budget_tokens", std::to_string(kvcache::tokens_in_budget<KVType>(llama3_8b, budget_bytes(options))));
  field("policy", quoted(row.policy));
  field("block_tokens", std::to_string(row.block_tokens));
  field("waste_fraction", json_number(m.waste_fraction));
  field("memory_in_use", json_number(m.memory_in_use));
  field("peak_sequences", std::to_string(m.peak_sequences));
  field("mean_batch", json_number(m.mean_batch));
  field("steps", std::to_string(m.steps));
  field("preemptions", std::to_string(m.preemptions));
  field("prefill_tokens_computed", std::to_string(m.prefill_computed));
  field("prefill_tokens_saved", std::to_string(m.prefill_saved));
  field("first_admission_tokens_saved", std::to_string(m.first_saved));
  field("ideal_tokens_saved", std::to_string(m.ideal_saved));
  field("saved_fraction_of_ideal", json_number(m.saved_fraction_of_ideal()));
  field("hit_rate", json_number(m.hit_rate()));
  field("evictions", std::to_string(m.evictions));
  return text + "}";
}

void write_json(const std::string& path, const std::vector<Row>& rows, const Trace& trace,
                const Options& options) {
  std::string text = "[\n";
  for (std::size_t i = 0; i < rows.size(); ++i)
    text += "  " + json_object(rows[i], trace, options) + (i + 1 < rows.size() ? ",\n" : "\n");
  text += "]\n";
  std::FILE* file = std::fopen(path.c_str(), "w");
  const bool written = file != nullptr && std::fwrite(text.data(), 1, text.size(), file) == text.size();
  if (file == nullptr || std::fclose(file) != 0 || !written)
    throw std::runtime_error("cannot write " + path);
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse_options(argc, argv);
  try {
    const auto start = std::chrono::steady_clock::now();
    const Trace trace = make_trace(options);
    print_summary(trace, options);
    const std::vector<Row> rows = run_all(trace, options);
    print_table(rows);
    if (!options.json_path.empty()) write_json(options.json_path, rows, trace, options);
    const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
    std::fprintf(stderr, "simulated in %.1f s\n", elapsed.count());
  } catch (const std::exception& error) {
    std::fprintf(stderr, "error: %s\n", error.what());
    return 1;
  }
}
