// CPU gather_logprobs: log-sum-exp of each row and the log-probability of one id.
#include <cmath>

#include "dtype_or_throw.h"
#include "row_kernels.h"
#include "specdiff/ops.h"

namespace specdiff {
namespace cpu {

void gather_logprobs(const GatherParams& p) {
  dispatch_dtype(p.logits.dtype, [&](auto tv) {
    using T = decltype(tv);
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t r = 0; r < p.B * p.N; ++r) {
      const int64_t b = r / p.N, n = r % p.N;
      const T* row = p.logits.row<T>(b, n);
      const float tau = p.tau.at(b);
      const bool greedy = tau == 0.0f;
      float inv = greedy ? 1.0f : 1.0f / tau;
      const RowStats s = row_stats_safe(row, p.V, &inv);
      const int64_t id = p.ids.at(b, n);
      const float logit = id >= 0 && id < p.V ? to_float(row[id]) : 0.0f;
      const float raw_max = s.arg >= 0 ? to_float(row[s.arg]) : 0.0f;
      gather_finish(s, tau, inv, raw_max, id, p.V, logit, &p.out_lse[r], &p.out_logprobs[r]);
    }
  });
}

}  // namespace cpu
}  // namespace specdiff
