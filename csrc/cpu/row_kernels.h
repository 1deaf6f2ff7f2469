// CPU row loops shared by the CPU ops.  A row is processed in tiles that are first converted to
// float32; the float loops are compiled for several x86-64 levels (function multi-versioning)
// so they vectorise on the host at hand.
#pragma once

#include <algorithm>
#include <cstdint>

#include "specdiff/common.h"
#include "specdiff/math.h"
#include "specdiff/philox.h"

namespace specdiff {
namespace cpu {

constexpr int64_t kTile = 2048;

// Max over x[0..n) and whether a NaN or +inf was seen.
void tile_max(const float* x, int64_t n, float* max_out, bool* bad_out);
// Sum of exp(x * inv_tau - m) over x[0..n).
float tile_sumexp(const float* x, int64_t n, float inv_tau, float m);
// Race over x[0..n): key_v = x_v * inv_tau + gumbel(v), v = base + i.  Entries with
// x_v = -inf and the index `exclude` never win.  Updates (best_key, best_idx).
void tile_race(const float* x, int64_t n, int64_t base, float inv_tau, const RowStream& st,
               uint32_t position, uint32_t tag, int64_t exclude, float* best_key,
               int64_t* best_idx);
// Residual race: weight_v = max(exp(x_v * inv_tau - lse_p) - exp(qx_v - lse_q), 0) where qx_v is
// the draft log-weight (-inf outside the drafter vocabulary).  Also tracks the plain race over
// x (fallback when no weight is positive).
void tile_race_residual(const float* x, const float* qx, int64_t n, int64_t base, float inv_tau,
                        float lse_p, float lse_q, const RowStream& st, uint32_t position,
                        float* best_key, int64_t* best_idx, float* fb_key, int64_t* fb_idx);

template <typename T>
inline void to_float_tile(const T* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

// A row viewed as float32 tiles, converting 16-bit types on the fly.
template <typename T>
struct FloatTiles {
  const T* row;
  int64_t V;
  float buf[kTile];

  // Calls f(const float* tile, int64_t n, int64_t base) for each tile.
  template <typename F>
  void for_each(F&& f) {
    for (int64_t base = 0; base < V; base += kTile) {
      const int64_t n = std::min<int64_t>(kTile, V - base);
      if constexpr (std::is_same_v<T, float>) {
        f(row + base, n, base);
      } else {
        to_float_tile(row + base, n, buf);
        f(static_cast<const float*>(buf), n, base);
      }
    }
  }
};

// Statistics of one row at inverse temperature inv_tau: two reads (max, then sum of exp).
template <typename T>
RowStats row_stats(const T* row, int64_t V, float inv_tau) {
  FloatTiles<T> tiles{row, V, {}};
  float m = kNegInf;
  bool bad = false;
  tiles.for_each([&](const float* x, int64_t n, int64_t) {
    float tm;
    bool tb;
    tile_max(x, n, &tm, &tb);
    m = std::max(m, tm);
    bad = bad || tb;
  });
  RowStats s;
  s.bad = bad;
  if (bad || m == kNegInf) return s;
  // argmax: first index holding the max.
  for (int64_t v = 0; v < V; ++v) {
    if (to_float(row[v]) == m) {
      s.arg = v;
      break;
    }
  }
  s.m = sd_mul(m, inv_tau);
  float sum = 0.0f;
  tiles.for_each([&](const float* x, int64_t n, int64_t) {
    sum += tile_sumexp(x, n, inv_tau, s.m);
  });
  s.s = sum;
  return s;
}

// Categorical draw from softmax(row * inv_tau) by race; -1 when no entry can win.
template <typename T>
int64_t row_race(const T* row, int64_t V, float inv_tau, const RowStream& st, uint32_t position,
                 uint32_t tag, int64_t exclude) {
  FloatTiles<T> tiles{row, V, {}};
  float best = kNegInf;
  int64_t idx = -1;
  tiles.for_each([&](const float* x, int64_t n, int64_t base) {
    tile_race(x, n, base, inv_tau, st, position, tag, exclude, &best, &idx);
  });
  return idx;
}

}  // namespace cpu
}  // namespace specdiff
