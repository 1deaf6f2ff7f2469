// Dispatch over the logits element type, for the CPU ops and the CUDA launchers alike:
// f(T{}) with T = float, bf16_t or f16_t; an unknown dtype code returns unknown() (the CPU
// throws, the CUDA launchers record where and return an error code) -- never runs as float32.
#pragma once

#include "common.h"

namespace specdiff {

template <typename F, typename U>
auto dispatch_dtype_or(DType dtype, F&& f, U&& unknown) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kBFloat16: return f(bf16_t{});
    case DType::kFloat16: return f(f16_t{});
  }
  return unknown();
}

}  // namespace specdiff
