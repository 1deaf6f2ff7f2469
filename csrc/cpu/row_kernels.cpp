// Float32 tile loops, multi-versioned for x86-64 levels so that they vectorise.
#include "row_kernels.h"

#include <cmath>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SD_CLONES
#endif

namespace specdiff {
namespace cpu {

SD_CLONES void tile_max(const float* x, int64_t n, float* max_out, bool* bad_out) {
  float m = kNegInf;
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    bad |= (v != v) | (v == INFINITY);
    m = v > m ? v : m;
  }
  *max_out = m;
  *bad_out = bad != 0;
}

SD_CLONES float tile_sumexp(const float* x, int64_t n, float inv_tau, float m) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += fast_exp(sd_mul(x[i], inv_tau) - m);
  return s;
}

namespace {
constexpr int64_t kChunk = 256;  // entries per inner block (a multiple of 4)

// Gumbel variates for indices base .. base+n-1 (base a multiple of 4).
SD_CLONES void gumbel_block(int64_t base, int64_t n, const RowStream& st, uint32_t position,
                            uint32_t tag, float* g) {
  const int64_t groups = (n + 3) / 4;
  uint32_t w[kChunk];
  for (int64_t q = 0; q < groups; ++q) {
    const Philox4 r = st.words4(position, static_cast<uint64_t>((base >> 2) + q), tag);
    w[4 * q + 0] = r.x[0];
    w[4 * q + 1] = r.x[1];
    w[4 * q + 2] = r.x[2];
    w[4 * q + 3] = r.x[3];
  }
  for (int64_t i = 0; i < n; ++i) g[i] = gumbel_from_bits(w[i]);
}

// Argmax of key[0..n), lowest index on ties; -inf entries never win.
inline void block_argmax(const float* key, int64_t n, int64_t base, float* best, int64_t* idx) {
  float m = kNegInf;
  for (int64_t i = 0; i < n; ++i) m = key[i] > m ? key[i] : m;
  if (m == kNegInf || !(m > *best)) return;
  for (int64_t i = 0; i < n; ++i) {
    if (key[i] == m) {
      *best = m;
      *idx = base + i;
      return;
    }
  }
}
}  // namespace

SD_CLONES void tile_race(const float* x, int64_t n, int64_t base, float inv_tau,
                         const RowStream& st, uint32_t position, uint32_t tag, int64_t exclude,
                         float* best_key, int64_t* best_idx) {
  float g[kChunk];
  float key[kChunk];
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t m = std::min<int64_t>(kChunk, n - c);
    gumbel_block(base + c, m, st, position, tag, g);
    for (int64_t i = 0; i < m; ++i) {
      const float a = sd_mul(x[c + i], inv_tau);
      key[i] = a == kNegInf ? kNegInf : a + g[i];
    }
    if (exclude >= base + c && exclude < base + c + m) key[exclude - base - c] = kNegInf;
    block_argmax(key, m, base + c, best_key, best_idx);
  }
}

SD_CLONES void tile_race_residual(const float* x, const float* qx, int64_t n, int64_t base,
                                  float inv_tau, float lse_p, float lse_q, const RowStream& st,
                                  uint32_t position, float* best_key, int64_t* best_idx,
                                  float* fb_key, int64_t* fb_idx) {
  float g[kChunk];
  float key[kChunk];
  float fkey[kChunk];
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t m = std::min<int64_t>(kChunk, n - c);
    gumbel_block(base + c, m, st, position, kTagSample, g);
    for (int64_t i = 0; i < m; ++i) {
      const float a = sd_mul(x[c + i], inv_tau);
      const float r = fast_exp(a - lse_p) - fast_exp(qx[c + i] - lse_q);
      key[i] = r >= kFltMin ? fast_log(r) + g[i] : kNegInf;
      fkey[i] = a == kNegInf ? kNegInf : a + g[i];
    }
    block_argmax(key, m, base + c, best_key, best_idx);
    block_argmax(fkey, m, base + c, fb_key, fb_idx);
  }
}

}  // namespace cpu
}  // namespace specdiff
