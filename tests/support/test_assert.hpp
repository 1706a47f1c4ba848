// Force-included into every test: kvcache's internal assertions throw instead of aborting, so a
// test can prove that a broken precondition is caught.
#pragma once

#include <stdexcept>

#define KVCACHE_ASSERT(condition, message)                        \
  do {                                                            \
    if (!(condition)) throw std::logic_error(message);            \
  } while (false)
