// The CPU ops' dtype dispatch: specdiff/dispatch.h with an unknown dtype code thrown as an error.
#pragma once

#include <stdexcept>
#include <string>

#include "specdiff/dispatch.h"

namespace specdiff {

template <typename F>
auto dispatch_dtype(DType dtype, F&& f) {
  return dispatch_dtype_or(dtype, f, [&]() -> decltype(f(float{})) {
    throw std::invalid_argument("unsupported logits dtype code " +
                                std::to_string(static_cast<int>(dtype)));
  });
}

}  // namespace specdiff
