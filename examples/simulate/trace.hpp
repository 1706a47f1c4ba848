// Synthetic request traces for the capacity simulator, seeded and deterministic.
//
// Token ids stand in for text: two requests share a prefix of ids exactly when they share that
// prefix of text. Fresh ids come from one counter, so unique text never matches anything by
// accident. Lengths are lognormal (the long tail of real chat traffic), clipped so that
// prompt + output fits a 4096-token context.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace simulate {

inline constexpr int max_context = 4096;

struct Request {
  int arrival = 0;                 // step from which it can be admitted (first turns only)
  int prompt = 0;
  int output = 0;                  // tokens to generate, >= 1
  std::vector<std::int32_t> ids;   // prompt ids, then output ids
  int next_turn = -1;              // the request that continues this conversation
  int think_steps = 0;             // a follow-up arrives this many steps after this turn finishes
  bool follow_up = false;          // its arrival waits for the previous turn
};

struct Trace {
  std::string name;
  std::vector<Request> requests;
};

class TraceBuilder {
 public:
  explicit TraceBuilder(std::uint64_t seed) : rng_(seed) {}

  // Ids no other text uses.
  std::vector<std::int32_t> fresh(int count) {
    std::vector<std::int32_t> ids(static_cast<std::size_t>(count));
    for (std::int32_t& id : ids) id = next_id_++;
    return ids;
  }

  // Lognormal with this mean, rounded and clamped to [low, high].
  int lognormal(double mean, double sigma, int low, int high) {
    std::lognormal_distribution<double> draw(std::log(mean) - sigma * sigma / 2, sigma);
    return static_cast<int>(std::clamp<double>(std::round(draw(rng_)), low, high));
  }

  double exponential(double mean) { return std::exponential_distribution<double>(1 / mean)(rng_); }
  int uniform(int low, int high) { return std::uniform_int_distribution<int>(low, high)(rng_); }
  bool chance(double p) { return std::bernoulli_distribution(p)(rng_); }

  // Appends a request of `prompt` ids and `output` fresh output ids.
  Request& add(Trace& trace, std::vector<std::int32_t> prompt, int output) {
    Request& request = trace.requests.emplace_back();
    request.prompt = static_cast<int>(prompt.size());
    request.output = output;
    request.ids = std::move(prompt);
    const std::vector<std::int32_t> generated = fresh(output);
    request.ids.insert(request.ids.end(), generated.begin(), generated.end());
    return request;
  }

 private:
  std::mt19937_64 rng_;
  std::int32_t next_id_ = 1;
};

// (a) ShareGPT-like chat: unique prompts, mean ~160 tokens, outputs mean ~340, long tails.
inline Trace sharegpt_trace(int requests, double per_step, std::uint64_t seed) {
  TraceBuilder builder(seed);
  Trace trace{"sharegpt", {}};
  double time = 0;
  for (int i = 0; i < requests; ++i) {
    time += builder.exponential(1 / per_step);
    const int prompt = builder.lognormal(160, 1.0, 4, max_context - 1);
    const int output = builder.lognormal(340, 0.9, 1, max_context - prompt);
    builder.add(trace, builder.fresh(prompt), output).arrival = static_cast<int>(time);
  }
  return trace;
}

// (b) A few long system prompts, each followed by a short unique user message.
inline Trace shared_prefix_trace(int requests, double per_step, std::uint64_t seed) {
  TraceBuilder builder(seed);
  Trace trace{"shared-prefix", {}};
  std::vector<std::vector<std::int32_t>> systems;
  for (int i = 0; i < 4; ++i) systems.push_back(builder.fresh(builder.uniform(1000, 2000)));
  double time = 0;
  for (int i = 0; i < requests; ++i) {
    time += builder.exponential(1 / per_step);
    std::vector<std::int32_t> prompt = systems[static_cast<std::size_t>(builder.uniform(0, 3))];
    const std::vector<std::int32_t> user = builder.fresh(builder.lognormal(60, 0.8, 4, 1000));
    prompt.insert(prompt.end(), user.begin(), user.end());
    const int output = builder.lognormal(200, 0.8, 1, max_context - static_cast<int>(prompt.size()));
    builder.add(trace, std::move(prompt), output).arrival = static_cast<int>(time);
  }
  return trace;
}

// (c) Conversations that resend their whole history each turn: the next prompt is the previous
// prompt, the previous answer and a new user message. A user reads the answer for a while
// before the next turn arrives. A conversation ends by chance (5 turns on average) or when the
// next turn would not fit the context.
inline Trace multi_turn_trace(int requests, double conversations_per_step, std::uint64_t seed) {
  TraceBuilder builder(seed);
  Trace trace{"multi-turn", {}};
  double time = 0;
  while (static_cast<int>(trace.requests.size()) < requests) {
    time += builder.exponential(1 / conversations_per_step);
    std::vector<std::int32_t> history;
    int previous = -1;
    do {
      const int room = max_context - static_cast<int>(history.size());
      const int user_mean = previous < 0 ? 120 : 60;
      const int user = builder.lognormal(user_mean, 0.9, 4, max_context);
      if (user + 1 > room) break;
      std::vector<std::int32_t> prompt = history;
      const std::vector<std::int32_t> message = builder.fresh(user);
      prompt.insert(prompt.end(), message.begin(), message.end());
      const int output = builder.lognormal(250, 0.8, 1, room - user);
      Request& request = builder.add(trace, std::move(prompt), output);
      const int index = static_cast<int>(trace.requests.size()) - 1;
      if (previous < 0) {
        request.arrival = static_cast<int>(time);
      } else {
        request.follow_up = true;
        trace.requests[static_cast<std::size_t>(previous)].next_turn = index;
      }
      request.think_steps = static_cast<int>(builder.exponential(200));
      history = request.ids;
      previous = index;
    } while (builder.chance(0.8) && static_cast<int>(trace.requests.size()) < requests);
  }
  return trace;
}

}  // namespace simulate
