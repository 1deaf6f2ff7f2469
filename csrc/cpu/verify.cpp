// CPU verify / rejection_sample: chain speculative sampling, one batch row per OpenMP task.
// Positions after the first rejection are never read.
#include <cmath>
#include <vector>

#include "dtype_or_throw.h"
#include "filter_row.h"
#include "row_kernels.h"
#include "specdiff/ops.h"

namespace specdiff {
namespace cpu {
namespace {

inline int64_t list_race(const std::vector<Cand>& kept, const RowStream& st, uint32_t position,
                         int64_t exclude) {
  return cand_race(kept.data(), static_cast<int64_t>(kept.size()), st, position, exclude);
}

// Drafter column of target id v (-1 when the drafter cannot propose it).
inline int64_t draft_column(const VerifyParams& p, int64_t v) {
  const int64_t j = p.vocab_inv != nullptr ? p.vocab_inv[v] : v;
  return j >= 0 && j < p.Vd ? j : -1;
}

struct Scratch {
  std::vector<float> qbuf, qk;
  FilterScratch filter;
};

template <typename TT, typename TD>
void verify_row(const VerifyParams& p, int64_t b, Scratch& scr, bool par) {
  std::vector<float>& qbuf = scr.qbuf;
  const int64_t G = p.G, V = p.V;
  int64_t* out = p.out_ids + b * (G + 1);
  for (int64_t i = 0; i <= G; ++i) out[i] = -1;
  p.out_num_accepted[b] = 0;
  p.out_valid[b] = false;

  const VerifyRow row(p, b);
  const bool greedy = row.greedy, soft_drafts = row.soft_drafts;
  const float inv_tau0 = row.inv_tau, inv_dtau0 = row.inv_dtau;
  const RowStream& st = row.st;
  // Top-k / top-p / min-p of the target law: every target row read below is reduced to its
  // kept entries (scr.filter.cand), and all draws run over that list.
  const RowSettings rs = row_settings(p.filter, b, V);
  const bool filtered = !greedy && rs.on();
  const std::vector<Cand>& kept = scr.filter.cand;
  // An invalid row is all -1 with nothing accepted, whatever was written before the bad row.
  auto invalid = [&] {
    for (int64_t t = 0; t <= G; ++t) out[t] = -1;
    p.out_num_accepted[b] = 0;
    p.out_valid[b] = false;
  };

  for (int64_t i = 0; i <= G; ++i) {
    const TT* trow = p.target.row<TT>(b, i);
    float inv_tau = inv_tau0;  // this position's (row_stats_safe may lower it)
    // Target statistics of position i (lse given by the caller, or one pass over the row).
    RowStats sp;
    if (filtered) {  // the max only: the filter's window read replaces the sum of exps
      sp.m = row_max_safe(trow, V, &inv_tau, &sp.bad, par);
      sp.s = 1.0f;
    } else if (p.target_lse != nullptr && !greedy) {
      sp.m = p.target_lse[b * (G + 1) + i];
      sp.s = 1.0f;
      sp.bad = !std::isfinite(sp.m);
    } else {
      sp = row_stats_safe(trow, V, &inv_tau, par);
    }
    if (!sp.valid()) return invalid();
    float lse_p = sp.lse();
    KeepRule rule;
    if (filtered) rule = filter_row(trow, V, inv_tau, sp.m, rs, scr.filter, &lse_p);

    if (i == G) {  // every draft accepted: bonus token
      out[G] = greedy     ? sp.arg
               : filtered ? list_race(kept, st, static_cast<uint32_t>(G), -1)
                          : row_race(trow, V, inv_tau, st, static_cast<uint32_t>(G), kTagSample, -1, par);
      if (out[G] < 0) return invalid();
      p.out_num_accepted[b] = G;
      p.out_valid[b] = true;
      return;
    }

    const int64_t x = p.draft_ids.at(b, i);
    if (x < 0 || x >= V) return invalid();
    if (greedy) {
      if (x == sp.arg) {
        out[i] = x;
        continue;
      }
      out[i] = sp.arg;
      p.out_num_accepted[b] = i;
      p.out_valid[b] = true;
      return;
    }

    const bool soft =
        soft_drafts && !(p.point_mass != nullptr && p.point_mass[b * p.pm_s0 + i * p.pm_s1]);
    float lse_q = 0.0f, qx = 1.0f;
    float inv_dtau = inv_dtau0;
    const TD* drow = soft ? p.draft.row<TD>(b, i) : nullptr;
    if (soft) {
      RowStats sq;
      if (p.draft_lse != nullptr) {
        sq.m = p.draft_lse[b * G + i];
        sq.s = 1.0f;
        sq.bad = !std::isfinite(sq.m);
      } else {
        sq = row_stats_safe(drow, p.Vd, &inv_dtau, par);
      }
      if (!sq.valid()) return invalid();
      lse_q = sq.lse();
      const int64_t j = draft_column(p, x);
      qx = j >= 0 ? fast_exp(sd_mul(to_float(drow[j]), inv_dtau) - lse_q) : 0.0f;
    }
    const float sx = sd_mul(to_float(trow[x]), inv_tau);
    const float px = (!filtered || rule.keep(sx, x)) ? fast_exp(sx - lse_p) : 0.0f;
    const float u = uniform_from_bits(st.word(static_cast<uint32_t>(i), 0, kTagAccept));
    if (accept_draft(u, qx, px)) {
      out[i] = x;
      continue;
    }

    // First rejection at i: draw the correction.
    int64_t c = -1;
    if (filtered) {
      if (!soft) {
        c = list_race(kept, st, static_cast<uint32_t>(i), x);
      } else {
        // Residual max(p - q, 0) over the kept entries (p is 0 elsewhere), then the fallback
        // race over p: the keys of tile_race_residual.
        scr.qk.resize(kept.size());
        for (size_t t = 0; t < kept.size(); ++t) {
          const int64_t j = draft_column(p, kept[t].v);
          scr.qk[t] = j >= 0 ? sd_mul(to_float(drow[j]), inv_dtau) : kNegInf;
        }
        int64_t fc = -1;
        cand_race_residual(kept.data(), scr.qk.data(), static_cast<int64_t>(kept.size()), lse_p,
                           lse_q, st, static_cast<uint32_t>(i), &c, &fc);
        if (c < 0) c = fc;
      }
      if (c < 0) c = list_race(kept, st, static_cast<uint32_t>(i), -1);
    } else if (!soft) {
      c = row_race(trow, V, inv_tau, st, static_cast<uint32_t>(i), kTagSample, x, par);
    } else {
      // Draft log-weights on the target vocabulary (-inf outside the drafter's).
      qbuf.assign(static_cast<size_t>(V), kNegInf);
      if (p.vocab_map.data != nullptr) {
        for (int64_t j = 0; j < p.Vd; ++j)
          qbuf[static_cast<size_t>(p.vocab_map.at(j))] = sd_mul(to_float(drow[j]), inv_dtau);
      } else {
        for (int64_t v = 0; v < V; ++v) qbuf[static_cast<size_t>(v)] = sd_mul(to_float(drow[v]), inv_dtau);
      }
      const size_t nt = static_cast<size_t>(num_tiles(V));
      std::vector<float> key(nt, kNegInf), fkey(nt, kNegInf);
      std::vector<int64_t> idx(nt, -1), fidx(nt, -1);
      for_tiles(trow, V, par, [&](int64_t t, const float* xs, int64_t n, int64_t base) {
        const size_t u = static_cast<size_t>(t);
        tile_race_residual(xs, qbuf.data() + base, n, base, inv_tau, lse_p, lse_q, st,
                           static_cast<uint32_t>(i), &key[u], &idx[u], &fkey[u], &fidx[u]);
      });
      c = merge_race(key, idx);
      if (c < 0) c = merge_race(fkey, fidx);
    }
    if (c < 0 && !filtered) c = row_race(trow, V, inv_tau, st, static_cast<uint32_t>(i), kTagSample, -1, par);
    if (c < 0) return invalid();
    out[i] = c;
    p.out_num_accepted[b] = i;
    p.out_valid[b] = true;
    return;
  }
}

}  // namespace

void verify(const VerifyParams& p) {
  dispatch_dtype(p.target.dtype, [&](auto tt) {
    using TT = decltype(tt);
    dispatch_dtype(p.draft.dtype, [&](auto td) {
      using TD = decltype(td);
      if (p.B < max_threads()) {
        // Too few rows to fill the threads: rows in turn, each row's passes split by tiles.
        static thread_local Scratch scr;  // buffers kept across calls
        for (int64_t b = 0; b < p.B; ++b) verify_row<TT, TD>(p, b, scr, true);
        return;
      }
#pragma omp parallel
      {
        static thread_local Scratch scr;
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < p.B; ++b) verify_row<TT, TD>(p, b, scr, false);
      }
    });
  });
}

bool has_openmp() {
#if defined(_OPENMP)
  return true;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace specdiff
