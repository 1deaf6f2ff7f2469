// Float32 tile loops, multi-versioned for x86-64 levels so that they vectorise.  Reductions keep
// kLanes independent accumulators (a fixed, layout-independent order), which lets the compiler
// vectorise them without reassociating floating-point sums.
#include "row_kernels.h"

#include <cmath>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SD_CLONES
#endif

namespace specdiff {
namespace cpu {

namespace {
constexpr int64_t kChunk = 256;  // entries per race block (a multiple of 4 * kLanes)
}  // namespace

SD_CLONES void tile_max(const float* x, int64_t n, float* max_out, bool* bad_out) {
  // NaN check in float arithmetic (vectorises): (v clamped below at -FLT_MAX) * 0 is 0 for
  // finite values and -inf, NaN for NaN and +inf.  The max is exact in any order.
  float mm = kNegInf, cc = 0.0f;
#pragma omp simd reduction(max : mm) reduction(+ : cc)
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    cc += (v < -3.4028235e38f ? -3.4028235e38f : v) * 0.0f;
    mm = v > mm ? v : mm;
  }
  *max_out = mm;
  *bad_out = cc != cc || mm == INFINITY;
}

SD_CLONES float tile_sumexp(const float* x, int64_t n, float inv_tau, float m) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += fast_exp(sd_mul(x[i + j], inv_tau) - m);
  float s = 0.0f;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  for (; i < n; ++i) s += fast_exp(sd_mul(x[i], inv_tau) - m);
  return s;
}

namespace {

// Gumbel variates for indices base .. base+n-1 (base a multiple of 4, n <= kChunk).  Philox runs
// on kLanes counters at a time in structure-of-arrays form so the 32x32->64 products vectorise.
SD_CLONES void gumbel_block(int64_t base, int64_t n, const RowStream& st, uint32_t position,
                            uint32_t tag, float* g) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  const int64_t groups = (n + 3) / 4;
  const uint32_t c3in = st.off_hi | (tag << 24);
  for (int64_t q0 = 0; q0 < groups; q0 += kLanes) {
    uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
    for (int j = 0; j < kLanes; ++j) {
      c0[j] = static_cast<uint32_t>((base >> 2) + q0 + j);
      c1[j] = position;
      c2[j] = st.off_lo;
      c3[j] = c3in;
    }
    uint32_t k0 = st.k0, k1 = st.k1;
    for (int r = 0; r < 10; ++r) {
      if (r > 0) {
        k0 += kW0;
        k1 += kW1;
      }
      for (int j = 0; j < kLanes; ++j) {
        const uint64_t p0 = static_cast<uint64_t>(kM0) * c0[j];
        const uint64_t p1 = static_cast<uint64_t>(kM1) * c2[j];
        const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[j] ^ k0;
        const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[j] ^ k1;
        c1[j] = static_cast<uint32_t>(p1);
        c3[j] = static_cast<uint32_t>(p0);
        c0[j] = n0;
        c2[j] = n2;
      }
    }
    float g0[kLanes], g1[kLanes], g2[kLanes], g3[kLanes];
    for (int j = 0; j < kLanes; ++j) {
      g0[j] = gumbel_from_bits(c0[j]);
      g1[j] = gumbel_from_bits(c1[j]);
      g2[j] = gumbel_from_bits(c2[j]);
      g3[j] = gumbel_from_bits(c3[j]);
    }
    const int64_t lim = groups - q0 < kLanes ? groups - q0 : kLanes;
    for (int64_t j = 0; j < lim; ++j) {
      float* o = g + 4 * (q0 + j);
      o[0] = g0[j];
      o[1] = g1[j];
      o[2] = g2[j];
      o[3] = g3[j];
    }
  }
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

SD_CLONES void tile_windows(const float* x, int64_t n, float inv_tau, float xm, int64_t* cnt,
                            float* mass, double* total) {
  // kLanes running sums per window, in a fixed order (vectorises like tile_sumexp); the total
  // in double (top-p near 1 is decided by a small tail of it).
  float am[kWindows][kLanes] = {};
  double at[kLanes] = {};
  int32_t ac[kWindows][kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const float a = sd_mul(x[i + j], inv_tau);
      const float w = fast_exp(a - xm);
      const float d = xm - a;
      at[j] += static_cast<double>(w);
      for (int q = 0; q < kWindows; ++q) {
        const bool in = d < kWindowD[q];
        am[q][j] += in ? w : 0.0f;
        ac[q][j] += in ? 1 : 0;
      }
    }
  for (int q = 0; q < kWindows; ++q) {
    float s = 0.0f;
    int64_t c = 0;
    for (int j = 0; j < kLanes; ++j) {
      s += am[q][j];
      c += ac[q][j];
    }
    mass[q] += s;
    cnt[q] += c;
  }
  double t = 0.0;
  for (int j = 0; j < kLanes; ++j) t += at[j];
  for (; i < n; ++i) {
    const float a = sd_mul(x[i], inv_tau);
    const float w = fast_exp(a - xm);
    const float d = xm - a;
    t += static_cast<double>(w);
    for (int q = 0; q < kWindows; ++q)
      if (d < kWindowD[q]) {
        mass[q] += w;
        cnt[q] += 1;
      }
  }
  *total += t;
}

SD_CLONES void tile_count_at(const float* x, int64_t n, float inv_tau, float xm, const float* Ds,
                             int64_t* cnt) {
  float D[kCountD];
  for (int q = 0; q < kCountD; ++q) D[q] = Ds[q];
  int32_t ac[kCountD][kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const float d = xm - sd_mul(x[i + j], inv_tau);
      for (int q = 0; q < kCountD; ++q) ac[q][j] += d < D[q] ? 1 : 0;
    }
  for (int q = 0; q < kCountD; ++q)
    for (int j = 0; j < kLanes; ++j) cnt[q] += ac[q][j];
  for (; i < n; ++i) {
    const float d = xm - sd_mul(x[i], inv_tau);
    for (int q = 0; q < kCountD; ++q) cnt[q] += d < D[q] ? 1 : 0;
  }
}

SD_CLONES int64_t tile_gather_window(const float* x, int64_t n, int64_t base, float inv_tau,
                                     float xm, float D, float cut, Cand* out) {
  int64_t m = 0;
  for (int64_t i0 = 0; i0 < n; i0 += 64) {
    const int64_t len = std::min<int64_t>(64, n - i0);
    int any = 0;  // a vectorised test first: most blocks hold no candidate
    for (int64_t j = 0; j < len; ++j) {
      const float a = sd_mul(x[i0 + j], inv_tau);
      any |= (xm - a < D) & (a >= cut);
    }
    if (!any) continue;
    for (int64_t j = 0; j < len; ++j) {  // branch-free: the slot only advances past a keeper
      const float a = sd_mul(x[i0 + j], inv_tau);
      out[m] = Cand{a, 0.0f, base + i0 + j};
      m += (xm - a < D) & (a >= cut);
    }
  }
  return m;
}

SD_CLONES void cand_weights(Cand* c, int64_t n, float xm) {
  for (int64_t i = 0; i < n; ++i) c[i].w = fast_exp(c[i].x - xm);
}

SD_CLONES int64_t cand_race(const Cand* c, int64_t n, const RowStream& st, uint32_t position,
                            int64_t exclude) {
  float best = kNegInf;
  int64_t win = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (c[i].v == exclude || c[i].x == kNegInf) continue;
    const float key =
        c[i].x + gumbel_from_bits(st.word(position, static_cast<uint64_t>(c[i].v), kTagSample));
    if (key > best) {
      best = key;
      win = c[i].v;
    }
  }
  return win;
}

SD_CLONES void cand_race_residual(const Cand* c, const float* qx, int64_t n, float lse_p,
                                  float lse_q, const RowStream& st, uint32_t position,
                                  int64_t* win, int64_t* fb) {
  float best = kNegInf, fbest = kNegInf;
  *win = -1;
  *fb = -1;
  for (int64_t i = 0; i < n; ++i) {
    const float g = gumbel_from_bits(st.word(position, static_cast<uint64_t>(c[i].v), kTagSample));
    const float r = fast_exp(c[i].x - lse_p) - fast_exp(qx[i] - lse_q);
    const float key = r >= kFltMin ? fast_log(r) + g : kNegInf;
    if (key > best) {
      best = key;
      *win = c[i].v;
    }
    const float fkey = c[i].x == kNegInf ? kNegInf : c[i].x + g;
    if (fkey > fbest) {
      fbest = fkey;
      *fb = c[i].v;
    }
  }
}

}  // namespace cpu
}  // namespace specdiff
