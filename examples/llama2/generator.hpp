// Text generation for many prompts at once: continuous batching over a KVCache.
//
// Up to max_batch sequences run together; each step decodes one token for every running
// sequence in one batched forward pass. A sequence that finishes releases its memory at once
// and a waiting prompt takes its place (its prompt is prefilled, in chunks the cache accepts).
// Results per prompt are exactly those of running the prompt alone. In recompute mode there is
// no persistent cache: every step recomputes K/V of the whole prefix in a scratch sequence, as
// a decode loop without a KV cache does (the baseline the cache is measured against).
#pragma once

#include <chrono>
#include <climits>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "sampler.hpp"
#include "tokenizer.hpp"
#include "transformer.hpp"

namespace llama2 {

enum class KVMode { cached, recompute };

struct GenerationOptions {
  int steps = 256;            // positions per prompt, prompt included; <= 0 or > context: context
  float temperature = 1.0f;
  float top_p = 0.9f;
  std::uint64_t seed = 1;
  int max_batch = 1;
  int prefill_chunk = INT_MAX;  // most prompt tokens per forward pass
  bool stop_on_bos = true;      // the model ends a story with BOS
  KVMode mode = KVMode::cached;
};

struct Generation {
  std::vector<int> prompt_ids;
  std::vector<int> generated_ids;  // after the prompt, without a stopping BOS
  std::string text;                // as run.c prints it, without the final newline
  int forward_calls = 0;           // positions run
  double first_token_seconds = 0;  // from admission to the first generated token
};

struct GenerationStats {
  double seconds = 0;
  int generated_tokens = 0;
  std::size_t peak_bytes_used = 0;      // most KV bytes holding tokens after any step
  std::size_t peak_bytes_reserved = 0;  // most KV bytes assigned to sequences after any step
  std::size_t bytes_capacity = 0;
};

class Generator {
 public:
  // on_text(prompt index, text) is called as each piece of text is produced.
  using TextCallback = std::function<void(std::size_t, const std::string&)>;

  // Generates into `cache`, a KVCache (through CacheOf, so that the generator compiles once).
  template <class Cache>
  Generator(Transformer& model, const Tokenizer& tokenizer, Cache& cache, GenerationOptions options)
      : model_(model), tokenizer_(tokenizer), cache_(std::make_unique<CacheOf<Cache>>(cache)),
        options_(options) {}

  // Throws kvcache::Error{out_of_range} before running anything if a prompt does not fit the
  // model's context.
  std::vector<Generation> run(const std::vector<std::string>& prompts, const TextCallback& on_text = {}) {
    const int context = model_.config().seq_len;
    const int steps = options_.steps <= 0 || options_.steps > context ? context : options_.steps;
    std::vector<Generation> results(prompts.size());
    std::deque<std::size_t> waiting;
    for (std::size_t i = 0; i < prompts.size(); ++i) {
      results[i].prompt_ids = tokenizer_.encode(prompts[i]);
      if (static_cast<int>(results[i].prompt_ids.size()) > context)
        kvcache::detail::fail(kvcache::errc::out_of_range, "prompt ", i, " is ",
                              results[i].prompt_ids.size(), " tokens; the model's context is ", context);
      waiting.push_back(i);
    }
    stats_ = {};
    stats_.bytes_capacity = cache_->stats().bytes_capacity;
    const auto start = Clock::now();
    std::vector<Running> running;
    while (!waiting.empty() || !running.empty()) {
      while (!waiting.empty() && static_cast<int>(running.size()) < options_.max_batch) {
        Running admitted(waiting.front(), Sampler(model_.config().vocab_size, options_.temperature, options_.top_p, options_.seed));
        waiting.pop_front();
        admitted.steps = steps;
        admitted.admitted = Clock::now();
        prefill(admitted, results[admitted.index], on_text);
        if (admitted.done)
          finish(admitted);
        else
          running.push_back(std::move(admitted));
      }
      decode_step(running, results, on_text);
      std::erase_if(running, [&](Running& r) {
        if (r.done) finish(r);
        return r.done;
      });
    }
    stats_.seconds = std::chrono::duration<double>(Clock::now() - start).count();
    return results;
  }

  const GenerationStats& stats() const { return stats_; }

 private:
  using Clock = std::chrono::steady_clock;

  struct Running {
    Running(std::size_t index_, Sampler sampler_) : index(index_), sampler(std::move(sampler_)) {}
    std::size_t index;
    Sampler sampler;
    int steps = 0;
    std::optional<kvcache::SeqId> seq;  // cached mode: the sequence holding this prompt's K/V
    std::vector<int> history;            // recompute mode: every token fed so far
    int token = 0;                       // the token to feed next
    bool done = false;
    Clock::time_point admitted;
  };

  // Feeds tokens and returns the logits after the last of them.
  std::span<float> feed(Running& r, std::span<const int> tokens) {
    logits_.resize(static_cast<std::size_t>(model_.config().vocab_size));
    if (options_.mode == KVMode::cached) {
      if (!r.seq) r.seq = cache_->open();
      cache_->reserve(*r.seq, static_cast<int>(tokens.size()));
      const Feed step{*r.seq, tokens};
      model_.forward(*cache_, std::span<const Feed>(&step, 1), logits_);
    } else {
      r.history.insert(r.history.end(), tokens.begin(), tokens.end());
      const kvcache::SeqId scratch = cache_->open();
      cache_->reserve(scratch, static_cast<int>(r.history.size()));
      const Feed step{scratch, r.history};
      model_.forward(*cache_, std::span<const Feed>(&step, 1), logits_);
      cache_->release(scratch);
    }
    return logits_;
  }

  // Runs the prompt (as far as the steps allow), emitting its forced tokens, then takes the
  // first generated token from the logits of its last position.
  void prefill(Running& r, Generation& result, const TextCallback& on_text) {
    const std::vector<int>& prompt = result.prompt_ids;
    const int positions = std::min(static_cast<int>(prompt.size()), r.steps);
    std::span<float> logits;
    for (int begin = 0; begin < positions; begin += options_.prefill_chunk) {
      const int end = std::min(positions, begin + std::min(options_.prefill_chunk, positions - begin));
      logits = feed(r, std::span<const int>(prompt).subspan(begin, end - begin));
      for (int p = begin; p < end && p + 1 < static_cast<int>(prompt.size()); ++p) emit(r, result, prompt[p], prompt[p + 1], on_text);
    }
    result.forward_calls = positions;
    sample_or_finish(r, result, prompt[positions - 1], positions == static_cast<int>(prompt.size()) ? logits : std::span<float>(), on_text);
    sample_stats();
  }

  void decode_step(std::vector<Running>& running, std::vector<Generation>& results, const TextCallback& on_text) {
    if (running.empty()) return;
    const int vocab = model_.config().vocab_size;
    if (options_.mode == KVMode::recompute) {
      for (Running& r : running) {
        const int token = r.token;
        std::span<float> logits = feed(r, std::span<const int>(&token, 1));
        ++results[r.index].forward_calls;
        sample_or_finish(r, results[r.index], token, logits, on_text);
      }
      return;
    }
    feeds_.clear();
    for (Running& r : running) {
      cache_->reserve(*r.seq, 1);
      feeds_.push_back({*r.seq, std::span<const int>(&r.token, 1)});
    }
    batch_logits_.resize(running.size() * static_cast<std::size_t>(vocab));
    model_.forward(*cache_, feeds_, batch_logits_);
    sample_stats();
    for (std::size_t i = 0; i < running.size(); ++i) {
      Running& r = running[i];
      ++results[r.index].forward_calls;
      sample_or_finish(r, results[r.index], r.token, std::span<float>(batch_logits_).subspan(i * vocab, vocab), on_text);
    }
  }

  // `previous` was fed at the last position run; logits (empty if the prompt is not done)
  // give the next token.
  void sample_or_finish(Running& r, Generation& result, int previous, std::span<float> logits, const TextCallback& on_text) {
    if (logits.empty()) {
      r.done = true;
      return;
    }
    const int next = r.sampler.next(logits);
    if (result.generated_ids.empty()) result.first_token_seconds = std::chrono::duration<double>(Clock::now() - r.admitted).count();
    if (next == Tokenizer::bos && options_.stop_on_bos) {
      r.done = true;
      return;
    }
    result.generated_ids.push_back(next);
    ++stats_.generated_tokens;
    emit(r, result, previous, next, on_text);
    r.token = next;
    r.done = result.forward_calls >= r.steps;
  }

  void emit(Running& r, Generation& result, int previous, int next, const TextCallback& on_text) {
    const std::string piece = tokenizer_.text_of(previous, next);
    result.text += piece;
    if (on_text && !piece.empty()) on_text(r.index, piece);
  }

  void finish(Running& r) {
    if (r.seq) cache_->release(*r.seq);
    r.seq.reset();
  }

  void sample_stats() {
    const kvcache::MemoryStats memory = cache_->stats();
    stats_.peak_bytes_used = std::max(stats_.peak_bytes_used, memory.bytes_used);
    stats_.peak_bytes_reserved = std::max(stats_.peak_bytes_reserved, memory.bytes_reserved);
  }

  Transformer& model_;
  const Tokenizer& tokenizer_;
  std::unique_ptr<CacheAccess> cache_;
  GenerationOptions options_;
  GenerationStats stats_;
  std::vector<float> logits_, batch_logits_;
  std::vector<Feed> feeds_;
};

}  // namespace llama2
