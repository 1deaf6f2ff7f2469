// Float32 linear layer for few rows on CPUs: out[M, N] = x[M, K] * W[N, K]^T.
//
// Why: a verification forward runs the target's linear layers on a handful of rows (the
// nodes of a draft tree). There the time is reading W; a good kernel reads each weight once
// for all rows, so 16 rows cost little more than one. Some BLAS builds do not (on an AMD EPYC,
// MKL's float32 GEMM over 2 rows of the 49,152 x 576 head took 2.1x its time over 1 row).
//
// Layout: W is packed in panels of 16 output columns, K-major: w[p][k][j] = W[16 p + j][k]
// (shape (P, K, 16), P = ceil(N / 16), the last panel zero-padded). A panel is read once per
// tile of up to 6 rows; every row keeps 16 accumulators.
//
// Exactness: each output is sum_k x[m][k] W[n][k] accumulated by fused multiply-adds in the
// order k = 0, 1, ..., K - 1, from 0. The order does not depend on M, on the row's tile, on the
// thread count or on the code path (AVX2 or the portable one, which does the same fmaf calls),
// so a row's result is the same bits whatever rows share the call.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "specdiff/ops.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SD_LINEAR_X86 1
#endif

namespace specdiff {
namespace cpu {
namespace {

constexpr int kNR = 16;  // output columns per panel
constexpr int kMR = 6;   // rows per tile

// Portable tile: the same fused multiply-adds in the same order as the AVX2 tile.
template <int MR>
void tile_portable(const float* x, int64_t xs, const float* wp, int64_t K, float* out, int64_t os,
                   int ncols) {
  float acc[MR][kNR];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < kNR; ++j) acc[m][j] = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    const float* w = wp + k * kNR;
    for (int m = 0; m < MR; ++m) {
      const float xv = x[m * xs + k];
      for (int j = 0; j < kNR; ++j) acc[m][j] = std::fma(xv, w[j], acc[m][j]);
    }
  }
  for (int m = 0; m < MR; ++m) std::memcpy(out + m * os, acc[m], sizeof(float) * ncols);
}

#if defined(SD_LINEAR_X86)
// One named accumulator pair per row (an array of them ends up on the stack, stored back
// every step); rows m >= MR compile away.
#define SD_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)

template <int MR>
__attribute__((target("avx2,fma"))) void tile_avx2(const float* x, int64_t xs, const float* wp,
                                                   int64_t K, float* out, int64_t os, int ncols) {
#define SD_DECL(m)                                        \
  __m256 c##m##0 = _mm256_setzero_ps();                   \
  __m256 c##m##1 = _mm256_setzero_ps();                   \
  const float* x##m = x + (MR > m ? m : 0) * xs;
  SD_ROWS(SD_DECL)
#undef SD_DECL
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(wp + k * kNR);
    const __m256 w1 = _mm256_loadu_ps(wp + k * kNR + 8);
#define SD_STEP(m)                                        \
  if constexpr (MR > m) {                                 \
    const __m256 xv = _mm256_broadcast_ss(x##m + k);      \
    c##m##0 = _mm256_fmadd_ps(xv, w0, c##m##0);           \
    c##m##1 = _mm256_fmadd_ps(xv, w1, c##m##1);           \
  }
    SD_ROWS(SD_STEP)
#undef SD_STEP
  }
  alignas(32) float buf[kNR];
#define SD_STORE(m)                                                   \
  if constexpr (MR > m) {                                             \
    if (ncols == kNR) {                                               \
      _mm256_storeu_ps(out + m * os, c##m##0);                        \
      _mm256_storeu_ps(out + m * os + 8, c##m##1);                    \
    } else { /* the last, partial panel: never past column N */       \
      _mm256_store_ps(buf, c##m##0);                                  \
      _mm256_store_ps(buf + 8, c##m##1);                              \
      std::memcpy(out + m * os, buf, sizeof(float) * ncols);          \
    }                                                                 \
  }
  SD_ROWS(SD_STORE)
#undef SD_STORE
  (void)x1, (void)x2, (void)x3, (void)x4, (void)x5;
}
#undef SD_ROWS

bool cpu_has_avx2_fma() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
}
#endif

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int);

// The tile of mr rows is tiles[mr - 1].
constexpr TileFn kPortableTiles[kMR] = {tile_portable<1>, tile_portable<2>, tile_portable<3>,
                                        tile_portable<4>, tile_portable<5>, tile_portable<6>};
#if defined(SD_LINEAR_X86)
constexpr TileFn kAvx2Tiles[kMR] = {tile_avx2<1>, tile_avx2<2>, tile_avx2<3>,
                                    tile_avx2<4>, tile_avx2<5>, tile_avx2<6>};
#endif

// Rows per block: a block's rows of x stay in cache while every panel passes over them.
constexpr int64_t kRowBlock = 96;

}  // namespace

bool linear_simd_available() {
#if defined(SD_LINEAR_X86)
  return cpu_has_avx2_fma();
#else
  return false;
#endif
}

void linear_f32(const LinearParams& p) {
  const int64_t P = (p.N + kNR - 1) / kNR;
  const int64_t blocks = (p.M + kRowBlock - 1) / kRowBlock;
  const TileFn* tiles = kPortableTiles;
#if defined(SD_LINEAR_X86)
  if (p.use_simd && cpu_has_avx2_fma()) tiles = kAvx2Tiles;
#endif
  const int64_t tasks = blocks * P;
  auto run = [&](int64_t t) {
    const int64_t b = t / P, panel = t % P;
    const int ncols = static_cast<int>(std::min<int64_t>(kNR, p.N - panel * kNR));
    const float* wp = p.w + panel * p.K * kNR;
    const int64_t m_end = std::min(p.M, (b + 1) * kRowBlock);
    for (int64_t m0 = b * kRowBlock; m0 < m_end; m0 += kMR) {
      const int64_t mr = std::min<int64_t>(kMR, m_end - m0);
      tiles[mr - 1](p.x + m0 * p.x_s0, p.x_s0, wp, p.K, p.out + m0 * p.out_s0 + panel * kNR,
                    p.out_s0, ncols);
    }
  };
#if defined(_OPENMP)
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(p.threads, tasks)));
  if (threads > 1) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tasks; ++t) run(t);
    return;
  }
#endif
  for (int64_t t = 0; t < tasks; ++t) run(t);
}

}  // namespace cpu
}  // namespace specdiff
