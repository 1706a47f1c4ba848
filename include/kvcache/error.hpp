// kvcache::Error: the one exception type of the public API.
//
// Every public call validates its arguments before it changes anything, so a call that throws
// leaves the cache exactly as it was. Messages name the offending value, the limit it broke and,
// where there is one, the remedy.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

#include "config.hpp"

KVCACHE_BEGIN_NAMESPACE

enum class errc {
  unknown_sequence,        // a SeqId that was never opened, or was released
  shape_mismatch,          // a tensor whose size disagrees with the model shape
  capacity_exceeded,       // no free sequence slot, block or token position left
  invalid_configuration,   // a ModelShape or policy that cannot work
  out_of_range,            // a layer, length or position outside what exists
  position_overwritten,    // a sliding-window position that the ring has already reused
  corrupt_data,            // a file or buffer that fails its format or checksum checks
  backend_error,           // the device runtime refused a call (driver, launch or copy failure)
};

constexpr std::string_view to_string(errc code) noexcept {
  switch (code) {
    case errc::unknown_sequence: return "unknown_sequence";
    case errc::shape_mismatch: return "shape_mismatch";
    case errc::capacity_exceeded: return "capacity_exceeded";
    case errc::invalid_configuration: return "invalid_configuration";
    case errc::out_of_range: return "out_of_range";
    case errc::position_overwritten: return "position_overwritten";
    case errc::corrupt_data: return "corrupt_data";
    case errc::backend_error: return "backend_error";
  }
  return "unknown";
}

class Error : public std::runtime_error {
 public:
  Error(errc code, const std::string& message)
      : std::runtime_error("kvcache: " + std::string(to_string(code)) + ": " + message),
        code_(code) {}

  errc code() const noexcept { return code_; }

 private:
  errc code_;
};

namespace detail {

// Cold path: builds the message from its pieces (anything streamable) and throws.
template <class... Parts>
[[noreturn]] [[gnu::cold]] [[gnu::noinline]] void fail(errc code, const Parts&... parts) {
  std::ostringstream message;
  (message << ... << parts);
  throw Error(code, message.str());
}

}  // namespace detail

KVCACHE_END_NAMESPACE
