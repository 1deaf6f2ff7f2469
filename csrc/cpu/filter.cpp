// CPU filter_logits and apply_penalties: one (batch row, position) row per OpenMP task.
#include <cmath>
#include <vector>

#include "dtype_or_throw.h"
#include "filter_row.h"
#include "row_kernels.h"
#include "specdiff/ops.h"

namespace specdiff {
namespace cpu {
namespace {

template <typename T>
T neg_inf_of();
template <>
float neg_inf_of<float>() { return kNegInf; }
template <>
bf16_t neg_inf_of<bf16_t>() { return bf16_t{0xFF80u}; }
template <>
f16_t neg_inf_of<f16_t>() { return f16_t{0xFC00u}; }

template <typename T>
void filter_one(const FilterParams& p, int64_t r, FilterScratch& sc, bool par) {
  const int64_t b = r / p.N, n = r % p.N, V = p.V;
  const T* row = p.logits.row<T>(b, n);
  T* out = static_cast<T*>(p.out) + r * V;
  const float tau = p.tau.at(b);
  const RowSettings rs = row_settings(p.filter, b, V);
  bool copy = !(tau > 0.0f) || !rs.on();  // greedy rows and rows without filters pass through
  float inv_tau = copy ? 1.0f : 1.0f / tau;
  float xm = 0.0f;
  if (!copy) {
    bool bad;
    xm = row_max_safe(row, V, &inv_tau, &bad, par);
    copy = bad;  // NaN / +inf / all -inf rows stay as they are (invalid downstream)
  }
  if (copy) {
    for (int64_t v = 0; v < V; ++v) out[v] = row[v];
    return;
  }
  float lse;
  const KeepRule rule = filter_row(row, V, inv_tau, xm, rs, sc, &lse);
  const T ninf = neg_inf_of<T>();
  for (int64_t v = 0; v < V; ++v)
    out[v] = rule.keep(sd_mul(to_float(row[v]), inv_tau), v) ? row[v] : ninf;
}

template <typename T>
void penalize_row(const PenaltyParams& p, int64_t b, std::vector<int32_t>& count,
                  std::vector<int64_t>& seen) {
  const int64_t V = p.V, N = p.N;
  const float rep = p.repetition.at(b), pres = p.presence.at(b), freq = p.frequency.at(b);
  count.assign(static_cast<size_t>(V), 0);
  seen.clear();
  auto add = [&](int64_t t) {
    if (t < 0 || t >= V) return;  // refused at the boundary; never indexes out of range
    if (count[static_cast<size_t>(t)]++ == 0) seen.push_back(t);
  };
  const int64_t len = p.lengths[b];
  for (int64_t j = 0; j < len; ++j) add(p.ids.at(b, j));
  for (int64_t n = 0; n < N; ++n) {
    const T* row = p.logits.row<T>(b, n);
    float* out = static_cast<float*>(p.out) + (b * N + n) * V;
    for (int64_t v = 0; v < V; ++v) out[v] = to_float(row[v]);
    for (int64_t t : seen)
      out[t] = penalize(out[t], count[static_cast<size_t>(t)], rep, pres, freq);
    if (n + 1 < N) add(p.ids.at(b, len + n));
  }
}

}  // namespace

void filter_logits(const FilterParams& p) {
  dispatch_dtype(p.logits.dtype, [&](auto tv) {
    using T = decltype(tv);
    const int64_t rows = p.B * p.N;
    if (rows < max_threads()) {
      static thread_local FilterScratch sc;  // buffers kept across calls
      for (int64_t r = 0; r < rows; ++r) filter_one<T>(p, r, sc, true);
      return;
    }
#pragma omp parallel
    {
      static thread_local FilterScratch sc;
#pragma omp for schedule(dynamic, 1)
      for (int64_t r = 0; r < rows; ++r) filter_one<T>(p, r, sc, false);
    }
  });
}

void apply_penalties(const PenaltyParams& p) {
  dispatch_dtype(p.logits.dtype, [&](auto tv) {
    using T = decltype(tv);
#pragma omp parallel
    {
      std::vector<int32_t> count;
      std::vector<int64_t> seen;
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < p.B; ++b) penalize_row<T>(p, b, count, seen);
    }
  });
}

}  // namespace cpu
}  // namespace specdiff
