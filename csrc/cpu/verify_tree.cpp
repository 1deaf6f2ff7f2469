// CPU verify_tree: the sample-and-match walk down a draft tree, one batch row per OpenMP task.
// At depth d the walk draws x from the target's law at the current node (the race of position
// d, tag kTagSample: the draws of verify's bonus token), moves to the child carrying x, or
// emits x and stops.  Only the rows on the walked path are read.
#include <cmath>
#include <vector>

#include "dtype_or_throw.h"
#include "filter_row.h"
#include "row_kernels.h"
#include "specdiff/ops.h"

namespace specdiff {
namespace cpu {
namespace {

template <typename TT>
void tree_row(const TreeVerifyParams& p, int64_t b, FilterScratch& fs, bool par) {
  const int64_t N = p.N, V = p.V;
  int64_t* ids = p.out_ids + b * N;
  int64_t* path = p.out_path + b * N;
  auto invalid = [&] {
    for (int64_t i = 0; i < N; ++i) ids[i] = path[i] = -1;
    p.out_num_accepted[b] = 0;
    p.out_valid[b] = false;
  };
  invalid();
  const float tau = p.tau.at(b);
  if (!(tau >= 0.0f)) return;  // negative or NaN (only through an unchecked call)
  const bool greedy = tau == 0.0f;
  const float inv_tau0 = greedy ? 1.0f : 1.0f / tau;
  const RowStream st = make_stream(p.seed, b, p.offset);
  const RowSettings rs = row_settings(p.filter, b, V);
  const bool filtered = !greedy && rs.on();

  int64_t node = 0;
  for (int64_t d = 0; d < N; ++d) {
    const TT* trow = p.target.row<TT>(b, node);
    float inv_tau = inv_tau0;
    int64_t x = -1;
    if (greedy) {
      const RowStats sp = row_stats(trow, V, 1.0f, par);
      if (!sp.valid()) return invalid();
      x = sp.arg;
    } else {
      bool bad = false;
      const float m = row_max_safe(trow, V, &inv_tau, &bad, par);
      if (bad) return invalid();
      if (filtered) {
        float lse = 0.0f;
        filter_row(trow, V, inv_tau, m, rs, fs, &lse);
        x = cand_race(fs.cand.data(), static_cast<int64_t>(fs.cand.size()), st,
                      static_cast<uint32_t>(d), -1);
      } else {
        x = row_race(trow, V, inv_tau, st, static_cast<uint32_t>(d), kTagSample, -1, par);
      }
    }
    if (x < 0) return invalid();
    ids[d] = x;
    const int64_t c = tree_child(p, b, node, x);
    if (c < 0) {
      p.out_num_accepted[b] = d;
      p.out_valid[b] = true;
      return;
    }
    path[d] = c;
    node = c;
  }
  // Unreachable: a path holds at most N - 1 accepted nodes, so the walk stops by depth N - 1.
  invalid();
}

}  // namespace

void verify_tree(const TreeVerifyParams& p) {
  dispatch_dtype(p.target.dtype, [&](auto tt) {
    using TT = decltype(tt);
    if (p.B < max_threads()) {
      static thread_local FilterScratch fs;
      for (int64_t b = 0; b < p.B; ++b) tree_row<TT>(p, b, fs, true);
      return;
    }
#pragma omp parallel
    {
      static thread_local FilterScratch fs;
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < p.B; ++b) tree_row<TT>(p, b, fs, false);
    }
  });
}

}  // namespace cpu
}  // namespace specdiff
