// Counter-based randomness shared by the CPU and CUDA paths (docs/ops.md, "Randomness").
// Every random number is a pure function of (row key, offset, position, index, tag), so the
// draws do not depend on thread layout and the two paths see the same numbers.
#pragma once

#include "common.h"

namespace specdiff {

enum RandomTag : uint32_t {
  kTagAccept = 1,         // acceptance uniform: index 0, position i
  kTagSample = 2,         // correction / bonus race: index v, position k
  kTagDenoiseToken = 3,   // denoise token race: index j, position g
  kTagDenoiseCommit = 4,  // denoise commit coin: index 0, position g
};

struct Philox4 {
  uint32_t x[4];
};

SD_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Philox-4x32-10.
SD_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                            uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kM0, c0, hi0, lo0);
    mulhilo32(kM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4{{c0, c1, c2, c3}};
}

SD_HD uint64_t splitmix64(uint64_t x) {
  uint64_t z = x + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The Philox key and stream position of one batch row at one call.
struct RowStream {
  uint32_t k0, k1;
  uint32_t off_lo, off_hi;  // off_hi holds the high offset bits (24 of them)

  // The 32-bit word for (position, index, tag).
  SD_HD uint32_t word(uint32_t position, uint64_t index, uint32_t tag) const {
    const Philox4 r = philox4x32_10(static_cast<uint32_t>(index >> 2), position, off_lo,
                                    off_hi | (tag << 24), k0, k1);
    return r.x[index & 3];
  }
  // Four consecutive words, indices 4*group .. 4*group+3.
  SD_HD Philox4 words4(uint32_t position, uint64_t group, uint32_t tag) const {
    return philox4x32_10(static_cast<uint32_t>(group), position, off_lo, off_hi | (tag << 24),
                         k0, k1);
  }
};

SD_HD uint64_t row_seed(const RowSeed& s, int64_t b) {
  return s.data ? static_cast<uint64_t>(s.data[b])
                : s.value + 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(b + 1);
}

SD_HD RowStream make_stream(const RowSeed& s, int64_t b, uint64_t offset) {
  const uint64_t k = splitmix64(row_seed(s, b));
  RowStream st;
  st.k0 = static_cast<uint32_t>(k);
  st.k1 = static_cast<uint32_t>(k >> 32);
  st.off_lo = static_cast<uint32_t>(offset);
  st.off_hi = static_cast<uint32_t>(offset >> 32) & 0xFFFFFFu;
  return st;
}

// A uniform strictly inside (0, 1): (x + 1/2) / 2^32 in float32, clamped below 1.
SD_HD float uniform_from_bits(uint32_t x) {
  const float w = (static_cast<float>(x) + 0.5f) * 2.3283064365386963e-10f;  // 2^-32
  return w < 0.99999994f ? w : 0.99999994f;  // 0x1.fffffep-1
}

}  // namespace specdiff
