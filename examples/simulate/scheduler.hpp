// The simulated engine: a vLLM-like scheduler driving one storage policy's bookkeeping.
//
// Each step:
//   1. requests whose arrival step has come join the waiting queue;
//   2. waiting requests are admitted in order while a sequence slot is free and the prompt
//      fits (room for the prompt and the first decoded token). Prefill happens at admission:
//      with prefix caching the slot first shares the longest cached whole-block prefix, and
//      the prompt's blocks are published right after its prefill, before the next admission,
//      so a later request of the same step can already reuse an earlier one's prefix;
//   3. every running sequence decodes one token, in admission order. When its next position
//      does not fit, the most recently admitted running request is preempted: released and put
//      back at the head of the queue, to recompute prompt + generated tokens when readmitted;
//   4. a request that has generated its output publishes all its ids (prefix caching) and is
//      released; the next turn of its conversation, if any, arrives think_steps later.
// A step is one decode iteration; prefill takes no simulated time, so prefix hits save compute
// (counted) but never steps. Only bookkeeping runs: no K/V bytes exist, so any budget costs a
// few MiB of block tables.
#pragma once

#include <kvcache/shape.hpp>
#include <kvcache/storage/paged.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <deque>
#include <functional>
#include <queue>
#include <span>
#include <stdexcept>
#include <unordered_set>
#include <utility>
#include <vector>

#include "trace.hpp"

namespace simulate {

struct Metrics {
  int peak_sequences = 0;
  int steps = 0;
  double mean_batch = 0;            // running sequences per step that decoded anything
  double waste_fraction = 0;        // (allocated - used) / allocated, summed over steps
  double memory_in_use = 0;         // allocated / budget, averaged over steps where requests wait
  std::uint64_t prefill_computed = 0;
  std::uint64_t prefill_saved = 0;  // every admission, readmissions after preemption included
  std::uint64_t first_saved = 0;    // first admissions only: what the ideal is measured on
  std::uint64_t ideal_saved = 0;
  std::uint64_t evictions = 0;
  std::uint64_t preemptions = 0;

  // NaN when even the ideal cache saves nothing (unique prompts).
  double saved_fraction_of_ideal() const {
    return ideal_saved == 0 ? std::nan("") : static_cast<double>(first_saved) / static_cast<double>(ideal_saved);
  }
  // Share of prefill tokens served from the cache.
  double hit_rate() const {
    const std::uint64_t total = prefill_computed + prefill_saved;
    return total == 0 ? 0.0 : static_cast<double>(prefill_saved) / static_cast<double>(total);
  }
};

// A cache with unlimited memory and token granularity: it saves, for each prompt, the longest
// prefix some earlier sequence started with. Every prefix of every sequence is in the set, so
// the set is prefix-closed and one walk along the prompt finds the longest match.
class IdealCache {
 public:
  int longest_prefix(std::span<const std::int32_t> ids, int limit) const {
    std::uint64_t hash = 0;
    int length = 0;
    while (length < limit) {
      hash = extend(hash, ids[static_cast<std::size_t>(length)]);
      if (!prefixes_.contains(hash)) break;
      ++length;
    }
    return length;
  }

  void add(std::span<const std::int32_t> ids) {
    std::uint64_t hash = 0;
    for (std::int32_t id : ids) prefixes_.insert(hash = extend(hash, id));
  }

 private:
  static std::uint64_t extend(std::uint64_t hash, std::int32_t id) {
    return kvcache::prefix_hash::step(hash, static_cast<std::uint32_t>(id));
  }
  std::unordered_set<std::uint64_t> prefixes_;
};

template <class Policy, bool PrefixCaching>
class Simulation {
 public:
  // watermark_blocks: a paged admission leaves at least this many blocks available, so that
  // the running sequences can grow for a few steps before one is preempted (vLLM keeps 1%).
  Simulation(const Trace& trace, const Policy& policy, kvcache::BlockHash root, int watermark_blocks)
      : trace_(trace),
        policy_(policy),
        book_(policy),
        root_(root),
        watermark_blocks_(watermark_blocks),
        progress_(trace.requests.size()),
        held_(static_cast<std::size_t>(policy.sequence_slots()), 0) {
    for (int slot = policy.sequence_slots() - 1; slot >= 0; --slot) free_slots_.push_back(slot);
    for (int r = 0; r < static_cast<int>(trace.requests.size()); ++r)
      if (!request(r).follow_up) arrivals_.push({request(r).arrival, r});
  }

  Metrics run() {
    double allocated = 0, used = 0, batch = 0, allocated_while_waiting = 0;
    int decoding_steps = 0, waiting_steps = 0;
    for (now_ = 0; finished_ < static_cast<int>(trace_.requests.size()); ++now_) {
      arrive();
      admit();
      metrics_.peak_sequences = std::max(metrics_.peak_sequences, static_cast<int>(running_.size()));
      if (running_.empty()) continue;
      const bool queued = !waiting_.empty();
      batch += static_cast<double>(running_.size());
      ++decoding_steps;
      decode();
      const double allocated_now = static_cast<double>(book_.pages_in_use()) * policy_.page_tokens();
      allocated += allocated_now;
      used += static_cast<double>(book_.rows_holding_tokens(held_));
      if (queued) {
        allocated_while_waiting += allocated_now;
        ++waiting_steps;
      }
    }
    metrics_.steps = now_;
    metrics_.mean_batch = decoding_steps == 0 ? 0 : batch / decoding_steps;
    metrics_.waste_fraction = allocated == 0 ? 0 : (allocated - used) / allocated;
    const double capacity = static_cast<double>(policy_.page_count()) * policy_.page_tokens();
    metrics_.memory_in_use = waiting_steps == 0 ? 0 : allocated_while_waiting / capacity / waiting_steps;
    if constexpr (requires { book_.audit(); }) {
      metrics_.evictions = book_.stats(held_).evictions;
      book_.audit();  // the run left the pool, the tables and the prefix index consistent
    }
    return metrics_;
  }

 private:
  struct Progress {
    int generated = 0;  // output tokens sampled so far; kept across preemption
    bool admitted = false;
  };
  struct Running {
    int request;
    int slot;
  };
  using Arrival = std::pair<int, int>;  // step, request

  const Request& request(int r) const { return trace_.requests[static_cast<std::size_t>(r)]; }
  std::span<const std::int32_t> ids(int r, int count) const {
    return std::span(request(r).ids).first(static_cast<std::size_t>(count));
  }
  int& held(int slot) { return held_[static_cast<std::size_t>(slot)]; }

  void arrive() {
    while (!arrivals_.empty() && arrivals_.top().first <= now_) {
      waiting_.push_back(arrivals_.top().second);
      arrivals_.pop();
    }
  }

  void admit() {
    while (!waiting_.empty() && !free_slots_.empty() && start(waiting_.front())) waiting_.pop_front();
    if (running_.empty() && !waiting_.empty())
      throw std::runtime_error("a request does not fit the whole budget; raise --budget-gib");
  }

  // Prefills request r into a free slot; false, the slot given back, when it does not fit.
  bool start(int r) {
    Progress& progress = progress_[static_cast<std::size_t>(r)];
    const int context = request(r).prompt + progress.generated;
    const int slot = free_slots_.back();
    book_.open(slot);
    int matched = 0;
    if constexpr (PrefixCaching) matched = book_.match_prefix(slot, ids(r, context), context - 1, root_, 0);
    if (!fits(slot, matched, context + 1)) {
      book_.release(slot);
      return false;
    }
    free_slots_.pop_back();
    book_.reserve(slot, matched, context, no_copy());
    if constexpr (PrefixCaching) book_.publish(slot, ids(r, context), root_, 0);
    count_prefill(r, context, matched);
    progress.generated += 1;  // the prefill samples the first output token
    held(slot) = context;
    running_.push_back({r, slot});
    if (progress.generated == request(r).output) finish(running_.size() - 1);
    return true;
  }

  bool fits(int slot, int write_from, int tokens) const {
    if (!book_.can_reserve(slot, write_from, tokens)) return false;
    if constexpr (requires { book_.pool(); }) {
      const int needed = Policy::blocks_for(tokens) - write_from / Policy::block_tokens;
      return running_.empty() || book_.pool().available_count() - needed >= watermark_blocks_;
    }
    return true;
  }

  void count_prefill(int r, int context, int matched) {
    metrics_.prefill_computed += static_cast<std::uint64_t>(context - matched);
    metrics_.prefill_saved += static_cast<std::uint64_t>(matched);
    Progress& progress = progress_[static_cast<std::size_t>(r)];
    if (progress.admitted) return;
    progress.admitted = true;
    metrics_.first_saved += static_cast<std::uint64_t>(matched);
    metrics_.ideal_saved += static_cast<std::uint64_t>(ideal_.longest_prefix(ids(r, context), context - 1));
    ideal_.add(request(r).ids);
  }

  void decode() {
    for (std::size_t i = 0; i < running_.size();) {
      if (!make_room(i)) break;  // i itself was preempted: it was the last one running
      const Running sequence = running_[i];
      book_.reserve(sequence.slot, held(sequence.slot), held(sequence.slot) + 1, no_copy());
      held(sequence.slot) += 1;
      Progress& progress = progress_[static_cast<std::size_t>(sequence.request)];
      progress.generated += 1;
      if (progress.generated == request(sequence.request).output) finish(i);
      else ++i;
    }
  }

  // Preempts the most recently admitted requests until running_[i] can grow by one position;
  // false when running_[i] had to go too.
  bool make_room(std::size_t i) {
    const int slot = running_[i].slot;
    while (!book_.can_reserve(slot, held(slot), held(slot) + 1)) {
      const bool self = i + 1 == running_.size();
      const Running victim = running_.back();
      running_.pop_back();
      vacate(victim.slot);
      waiting_.push_front(victim.request);
      ++metrics_.preemptions;
      if (self) return false;
    }
    return true;
  }

  void finish(std::size_t i) {
    const Running sequence = running_[i];
    if constexpr (PrefixCaching)
      book_.publish(sequence.slot, ids(sequence.request, held(sequence.slot)), root_, 0);
    vacate(sequence.slot);
    running_.erase(running_.begin() + static_cast<std::ptrdiff_t>(i));
    ++finished_;
    const Request& done = request(sequence.request);
    if (done.next_turn >= 0) arrivals_.push({now_ + done.think_steps, done.next_turn});
  }

  void vacate(int slot) {
    book_.release(slot);
    held(slot) = 0;
    free_slots_.push_back(slot);
  }

  // No K/V bytes exist, so there is nothing to copy (copy-on-write never triggers here anyway:
  // sequences only write past their shared, block-aligned prefix).
  static kvcache::PageCopier no_copy() {
    return {nullptr, [](void*, int, int, int) {}};
  }

  const Trace& trace_;
  Policy policy_;
  typename Policy::bookkeeping book_;
  kvcache::BlockHash root_;
  int watermark_blocks_;
  std::vector<Progress> progress_;         // [request]
  std::vector<int> held_;                  // [slot] positions holding K/V; 0: free
  std::vector<int> free_slots_;
  std::priority_queue<Arrival, std::vector<Arrival>, std::greater<>> arrivals_;
  std::deque<int> waiting_;                // arrived, not running; preempted ones at the head
  std::vector<Running> running_;           // in admission order
  IdealCache ideal_;
  Metrics metrics_;
  int now_ = 0;
  int finished_ = 0;
};

}  // namespace simulate
