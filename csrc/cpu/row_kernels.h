// CPU row loops shared by the CPU ops.  A row is processed in tiles that are first converted to
// float32; the float loops are compiled for several x86-64 levels (function multi-versioning)
// so they vectorise on the host at hand.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "specdiff/common.h"
#include "specdiff/math.h"
#include "specdiff/philox.h"

namespace specdiff {
namespace cpu {

constexpr int64_t kTile = 2048;
// Independent running sums per reduction (tile_sumexp and the sums that must match it).
constexpr int kLanes = 16;

// An entry of a row kept by the sampling filters (filter_row.h).
struct Cand {
  float x;  // scaled logit
  float w;  // exp(x - xm)
  int64_t v;
};

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

// Window statistics of the scaled entries a of x[0..n) below the scaled max xm: for each
// distance kWindowD[q], the count and mass (sum of exp(a - xm)) of the entries with
// xm - a < kWindowD[q]; *total gets the mass of every entry (in double).  Adds to the outputs.
constexpr int kWindows = 7;
constexpr float kWindowD[kWindows] = {1.5f, 3.0f, 4.5f, 6.0f, 8.0f, 11.0f, 16.0f};
void tile_windows(const float* x, int64_t n, float inv_tau, float xm, int64_t* cnt, float* mass,
                  double* total);
// Counts only: cnt[q] += #{xm - a < Ds[q]} for kCountD distances (pad with +inf).
constexpr int kCountD = 8;
void tile_count_at(const float* x, int64_t n, float inv_tau, float xm, const float* Ds, int64_t* cnt);
// Appends the entries with xm - a < D and a >= cut (a = x * inv_tau; D = +inf: every finite
// distance) to out in index order (w unset); returns how many.  out must have room for n.
int64_t tile_gather_window(const float* x, int64_t n, int64_t base, float inv_tau, float xm,
                           float D, float cut, Cand* out);
// c[i].w = exp(c[i].x - xm).
void cand_weights(Cand* c, int64_t n, float xm);
// Race over c[0..n) (index order): key x + gumbel(v) (tag kTagSample), lowest index on ties,
// `exclude` and -inf entries never win; -1 when none can.  The keys of tile_race.
int64_t cand_race(const Cand* c, int64_t n, const RowStream& st, uint32_t position, int64_t exclude);
// Residual race over c[0..n): weight max(exp(x - lse_p) - exp(qx[i] - lse_q), 0), and the plain
// race as fallback (*fb); the keys of tile_race_residual.
void cand_race_residual(const Cand* c, const float* qx, int64_t n, float lse_p, float lse_q,
                        const RowStream& st, uint32_t position, int64_t* win, int64_t* fb);

template <typename T>
inline void to_float_tile(const T* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

inline int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Calls f(tile, const float* x, n, base) for each kTile-long tile of a row, converting 16-bit
// types to float32 on the fly.  parallel: tiles are spread over the OpenMP threads (for batches
// too small to fill the threads with rows).  Callers reduce per-tile results in tile order, so
// the result does not depend on the number of threads.
template <typename T, typename F>
void for_tiles(const T* row, int64_t V, bool parallel, F&& f) {
  const int64_t nt = (V + kTile - 1) / kTile;
  auto one = [&](int64_t t, float* buf) {
    const int64_t base = t * kTile;
    const int64_t n = std::min<int64_t>(kTile, V - base);
    if constexpr (std::is_same_v<T, float>) {
      (void)buf;
      f(t, row + base, n, base);
    } else {
      to_float_tile(row + base, n, buf);
      f(t, static_cast<const float*>(buf), n, base);
    }
  };
  if (parallel && nt > 1) {
#pragma omp parallel
    {
      float buf[kTile];
#pragma omp for schedule(static)
      for (int64_t t = 0; t < nt; ++t) one(t, buf);
    }
  } else {
    float buf[kTile];
    for (int64_t t = 0; t < nt; ++t) one(t, buf);
  }
}

inline int64_t num_tiles(int64_t V) { return (V + kTile - 1) / kTile; }

// Merges per-tile race winners in tile order (ties keep the lower index).
inline int64_t merge_race(const std::vector<float>& key, const std::vector<int64_t>& idx) {
  float best = kNegInf;
  int64_t win = -1;
  for (size_t t = 0; t < key.size(); ++t)
    if (idx[t] >= 0 && key[t] > best) {
      best = key[t];
      win = idx[t];
    }
  return win;
}

// Per-tile maxima of a row (raw values) and whether a NaN or +inf was seen; returns the row max.
template <typename T>
float row_tile_max(const T* row, int64_t V, bool parallel, std::vector<float>& tmax, bool* bad_out) {
  const int64_t nt = num_tiles(V);
  tmax.assign(static_cast<size_t>(nt), kNegInf);
  std::vector<char> tbad(static_cast<size_t>(nt));
  for_tiles(row, V, parallel, [&](int64_t t, const float* x, int64_t n, int64_t) {
    bool b;
    tile_max(x, n, &tmax[static_cast<size_t>(t)], &b);
    tbad[static_cast<size_t>(t)] = b;
  });
  float m = kNegInf;
  bool bad = false;
  for (int64_t t = 0; t < nt; ++t) {
    m = std::max(m, tmax[static_cast<size_t>(t)]);
    bad = bad || tbad[static_cast<size_t>(t)];
  }
  *bad_out = bad;
  return m;
}

// Statistics of one row at inverse temperature inv_tau: two reads (max, then sum of exp).
template <typename T>
RowStats row_stats(const T* row, int64_t V, float inv_tau, bool parallel = false) {
  const int64_t nt = num_tiles(V);
  std::vector<float> tmax, tsum(static_cast<size_t>(nt));
  bool bad;
  const float m = row_tile_max(row, V, parallel, tmax, &bad);
  RowStats s;
  s.bad = bad;
  if (bad || m == kNegInf) return s;
  // argmax: the first index holding the max, searched in the first tile whose max it is.
  for (int64_t t = 0; t < nt && s.arg < 0; ++t) {
    if (tmax[static_cast<size_t>(t)] != m) continue;
    const int64_t end = std::min<int64_t>(V, (t + 1) * kTile);
    for (int64_t v = t * kTile; v < end; ++v) {
      if (to_float(row[v]) == m) {
        s.arg = v;
        break;
      }
    }
  }
  s.m = sd_mul(m, inv_tau);
  for_tiles(row, V, parallel, [&](int64_t t, const float* x, int64_t n, int64_t) {
    tsum[static_cast<size_t>(t)] = tile_sumexp(x, n, inv_tau, s.m);
  });
  float sum = 0.0f;
  for (int64_t t = 0; t < nt; ++t) sum += tsum[static_cast<size_t>(t)];
  s.s = sum;
  return s;
}

// The largest |scaled max| a row is read at: room for Gumbel keys and logs above it.
constexpr float kMaxScaled = 1e37f;

// The inverse temperature to read a row whose raw max is raw_max at: inv_tau, unless
// |raw_max| * inv_tau would pass kMaxScaled (a vanishing temperature, or logits near the float
// range), then kMaxScaled / |raw_max|.  The law is the same in float32 either way: every entry
// below the max is at least ulp(max) * inv below it, so its weight is exactly 0, and tied
// maxima stay tied.
inline float safe_inv_tau(float raw_max, float inv_tau) {
  const float a = std::fabs(raw_max);
  if (!(a > 0.0f) || !std::isfinite(a)) return inv_tau;
  return a * inv_tau > kMaxScaled ? kMaxScaled / a : inv_tau;
}

// row_stats at safe_inv_tau(row max, *inv); *inv becomes the inverse temperature used.
template <typename T>
RowStats row_stats_safe(const T* row, int64_t V, float* inv, bool parallel = false) {
  RowStats s = row_stats(row, V, *inv, parallel);
  if (!s.bad && s.arg >= 0 && !std::isfinite(s.m)) {
    *inv = safe_inv_tau(to_float(row[s.arg]), *inv);
    s = row_stats(row, V, *inv, parallel);
  }
  return s;
}

// Max of the row read at safe_inv_tau(row max, *inv) (one read); *inv becomes the inverse
// temperature used; *bad_out: a NaN or +inf was seen, or no finite entry.
template <typename T>
float row_max_safe(const T* row, int64_t V, float* inv, bool* bad_out, bool parallel = false) {
  std::vector<float> tmax;
  const float m = row_tile_max(row, V, parallel, tmax, bad_out);
  *bad_out = *bad_out || m == kNegInf;
  if (!*bad_out) *inv = safe_inv_tau(m, *inv);
  return sd_mul(m, *inv);
}

// Categorical draw from softmax(row * inv_tau) by race; -1 when no entry can win.
template <typename T>
int64_t row_race(const T* row, int64_t V, float inv_tau, const RowStream& st, uint32_t position,
                 uint32_t tag, int64_t exclude, bool parallel = false) {
  const size_t nt = static_cast<size_t>(num_tiles(V));
  std::vector<float> key(nt, kNegInf);
  std::vector<int64_t> idx(nt, -1);
  for_tiles(row, V, parallel, [&](int64_t t, const float* x, int64_t n, int64_t base) {
    tile_race(x, n, base, inv_tau, st, position, tag, exclude, &key[static_cast<size_t>(t)],
              &idx[static_cast<size_t>(t)]);
  });
  return merge_race(key, idx);
}

}  // namespace cpu
}  // namespace specdiff
