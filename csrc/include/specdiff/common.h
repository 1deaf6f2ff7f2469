// Shared definitions for the CPU and CUDA paths: host/device qualifiers, element types,
// loads of logits and ids.  No Python or torch types here.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define SD_HD __host__ __device__ __forceinline__
#define SD_DEVICE_CODE 1
#else
#define SD_HD inline
#endif

#if defined(__CUDA_ARCH__)
#define SD_ON_DEVICE 1
#endif

namespace specdiff {

// Element type of a logits array.
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Storage types: plain 16-bit payloads, converted to float in registers.
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

SD_HD float bits_to_float(uint32_t u) {
#if defined(SD_ON_DEVICE)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

SD_HD uint32_t float_to_bits(float f) {
#if defined(SD_ON_DEVICE)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

SD_HD float to_float(float x) { return x; }
SD_HD float to_float(bf16_t x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }
SD_HD float to_float(f16_t x) {
#if defined(SD_ON_DEVICE)
  return __half2float(__ushort_as_half(x.bits));
#else
  // IEEE binary16 -> binary32, exact (subnormals, infinities and NaN included).
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  if (exp == 0x1Fu) return bits_to_float(sign | 0x7F800000u | (mant << 13));
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);
    // Subnormal: normalise.
    exp = 127 - 15 + 1;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --exp;
    }
    mant &= 0x3FFu;
    return bits_to_float(sign | (exp << 23) | (mant << 13));
  }
  return bits_to_float(sign | ((exp + 127 - 15) << 23) | (mant << 13));
#endif
}

// Token ids arrive as int32 or int64.
struct IdView {
  const void* data = nullptr;
  bool is64 = true;
  int64_t s0 = 0;  // stride of the first dimension, in elements
  int64_t s1 = 0;  // stride of the second dimension, in elements (0 for 1-D views)

  SD_HD int64_t at(int64_t i, int64_t j = 0) const {
    const int64_t k = i * s0 + j * s1;
    return is64 ? static_cast<const int64_t*>(data)[k]
                : static_cast<int64_t>(static_cast<const int32_t*>(data)[k]);
  }
};

// A (B, N, V) logits array whose last dimension is contiguous.
struct LogitsView {
  const void* data = nullptr;
  DType dtype = DType::kFloat32;
  int64_t s0 = 0;  // batch stride, elements
  int64_t s1 = 0;  // position stride, elements

  template <typename T>
  SD_HD const T* row(int64_t b, int64_t n) const {
    return static_cast<const T*>(data) + b * s0 + n * s1;
  }
};

// Per-row scalar parameter: a (B,) float array or one value for the batch.
struct RowFloat {
  const float* data = nullptr;
  float value = 1.0f;
  SD_HD float at(int64_t b) const { return data ? data[b] : value; }
};

// A temperature tau > 0 whose float32 inverse 1 / tau is infinite (tau < 2^-128, about
// 2.9e-39: every subnormal below it) vanishes: nothing computed at 1 / tau is finite there
// (0 * inf is NaN), and its law is the argmax law, so every op reads it as 0, greedy
// (docs/ops.md, "Vanishing temperatures").  NaN and other values are returned as they are.
SD_HD bool vanishing_temperature(float tau) { return tau > 0.0f && !(1.0f / tau < INFINITY); }

// Per-row temperature: a (B,) float array or one value for the batch, read through
// vanishing_temperature by every op on both devices.
struct RowTemperature {
  const float* data = nullptr;
  float value = 1.0f;
  SD_HD float at(int64_t b) const {
    const float t = data ? data[b] : value;
    return vanishing_temperature(t) ? 0.0f : t;
  }
};

// Per-row seed: a (B,) int64 array of row seeds, or one batch seed.
struct RowSeed {
  const int64_t* data = nullptr;
  uint64_t value = 0;
};

}  // namespace specdiff
