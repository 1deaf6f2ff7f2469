// Dispatch over the logits element type: f(T{}) with T = float, bf16_t or f16_t.
#pragma once

#include <stdexcept>
#include <string>

#include "specdiff/common.h"

namespace specdiff {

template <typename F>
auto dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kBFloat16: return f(bf16_t{});
    case DType::kFloat16: return f(f16_t{});
    default:
      throw std::invalid_argument("unsupported logits dtype code " +
                                  std::to_string(static_cast<int>(dtype)));
  }
}

}  // namespace specdiff
