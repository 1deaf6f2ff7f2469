// CPU denoise_step: one reverse step of the masked-diffusion drafter, one batch row per task.
#include <cmath>
#include <vector>

#include "dtype_or_throw.h"
#include "row_kernels.h"
#include "specdiff/ops.h"

namespace specdiff {
namespace cpu {
namespace {

template <typename T>
void denoise_row(const DenoiseParams& p, int64_t b, std::vector<float>& conf,
                 std::vector<char>& commit, std::vector<int64_t>& arg, bool par) {
  const int64_t G = p.G;
  const float tau = p.tau.at(b);
  const float inv_te = tau > 0.0f ? 1.0f / tau : 1.0f;
  const int64_t R = p.num_steps - p.step;
  const RowStream st = make_stream(p.seed, b, p.offset);
  bool valid = true;
  int64_t masked = 0;
  conf.assign(static_cast<size_t>(G), kNegInf);
  std::vector<float> inv_g(static_cast<size_t>(G), inv_te);
  commit.assign(static_cast<size_t>(G), 0);
  arg.assign(static_cast<size_t>(G), -1);

  for (int64_t g = 0; g < G; ++g) {
    const int32_t cs = p.commit_step[b * p.cs_s0 + g * p.cs_s1];
    p.out_tokens[b * G + g] = p.tokens.at(b, g);
    p.out_commit_step[b * G + g] = cs;
    p.out_lse[b * G + g] = NAN;
    if (cs >= 0) continue;
    ++masked;
    float inv = inv_te;
    const RowStats s = row_stats_safe(p.logits.row<T>(b, g), p.Vd, &inv, par);
    inv_g[static_cast<size_t>(g)] = inv;
    if (!s.valid()) {
      valid = false;
      continue;
    }
    const float lse = s.lse();
    p.out_lse[b * G + g] = lse;
    conf[static_cast<size_t>(g)] = fast_exp(s.m - lse);
    arg[static_cast<size_t>(g)] = s.arg;
    commit[static_cast<size_t>(g)] = 1;  // candidate
  }

  // Which candidates commit at this step (commit: 1 = candidate, then 3 = commits).
  select_commits(reinterpret_cast<unsigned char*>(commit.data()), conf.data(), G, masked, R,
                 p.mode, st);
  for (int64_t g = 0; g < G; ++g) {
    if (commit[static_cast<size_t>(g)] != 3) continue;
    int64_t j = arg[static_cast<size_t>(g)];
    if (tau > 0.0f) {
      j = row_race(p.logits.row<T>(b, g), p.Vd, inv_g[static_cast<size_t>(g)], st, static_cast<uint32_t>(g),
                   kTagDenoiseToken, -1, par);
    }
    if (j < 0 || j >= p.Vd) {  // no entry could win: the position stays masked, the row invalid
      valid = false;
      continue;
    }
    p.out_tokens[b * G + g] = p.vocab_map.data != nullptr ? p.vocab_map.at(j) : j;
    p.out_commit_step[b * G + g] = static_cast<int32_t>(p.step);
  }
  p.out_valid[b] = valid;
}

}  // namespace

void denoise_step(const DenoiseParams& p) {
  dispatch_dtype(p.logits.dtype, [&](auto tv) {
    using T = decltype(tv);
    if (p.B < max_threads()) {
      std::vector<float> conf;
      std::vector<char> commit;
      std::vector<int64_t> arg;
      for (int64_t b = 0; b < p.B; ++b) denoise_row<T>(p, b, conf, commit, arg, true);
      return;
    }
#pragma omp parallel
    {
      std::vector<float> conf;
      std::vector<char> commit;
      std::vector<int64_t> arg;
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < p.B; ++b) denoise_row<T>(p, b, conf, commit, arg, false);
    }
  });
}

}  // namespace cpu
}  // namespace specdiff
