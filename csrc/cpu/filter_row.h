// CPU top-k / top-p / min-p of one row without sorting the vocabulary: one read counts the
// entries and their mass within a few distances below the max (the pivots), the narrowest that
// provably holds the boundaries is gathered in a second, compare-only read, then top-k is a
// selection (nth_element) and top-p a weighted quickselect over that short list.  The result
// is the keep rule, the kept entries and the log-sum-exp of the kept set, summed exactly as
// row_stats sums the masked row, so verifying with the fused filter and verifying the output
// of filter_logits give the same bits.
#pragma once

#include <algorithm>
#include <functional>
#include <cstdint>
#include <vector>

#include "row_kernels.h"
#include "specdiff/filter.h"

namespace specdiff {
namespace cpu {

// Order of the filters: a precedes b when it is larger, ties by the larger index.
inline bool precedes(const Cand& a, const Cand& b) { return a.x > b.x || (a.x == b.x && a.v > b.v); }

// Per-thread buffers, kept across calls (thread_local in the ops): `buf` holds room for a
// whole row so the gather never reallocates.
struct FilterScratch {
  std::vector<Cand> cand, work, buf;
  std::vector<float> tmp;
};

// Top-p boundary over c[0..n) (n >= 1): the last entry, in filter order, whose mass before it
// is < P (the first entry is always kept).  Weighted quickselect, expected O(n); c is permuted.
inline KeepRule top_p_rule(Cand* c, int64_t n, double P, bool* reached) {
  *reached = true;
  int64_t lo = 0, hi = n;
  // Mass of the entries before c[lo..hi) in filter order (all kept), in double: near p = 1 the
  // boundary is decided by a small tail of the row's mass, which float32 sums blur.
  double above = 0.0;
  KeepRule last;
  bool have = false;
  if (!(P > 0.0)) {  // keep the first entry only
    const Cand* f = std::min_element(c, c + n, precedes);
    return KeepRule{f->x, f->v};
  }
  while (hi - lo > 32) {
    const int64_t mid = lo + (hi - lo) / 2;
    const Cand &a = c[lo], &b = c[mid], &d = c[hi - 1];
    const int64_t pi = precedes(a, b) ? (precedes(b, d) ? mid : (precedes(a, d) ? hi - 1 : lo))
                                      : (precedes(a, d) ? lo : (precedes(b, d) ? hi - 1 : mid));
    std::swap(c[lo], c[pi]);
    const Cand piv = c[lo];
    const int64_t m1 =
        std::partition(c + lo + 1, c + hi, [&](const Cand& e) { return precedes(e, piv); }) - c;
    double pre = 0.0;  // [lo+1, m1) precede the pivot, [m1, hi) follow it
    for (int64_t i = lo + 1; i < m1; ++i) pre += c[i].w;
    if (above + pre >= P) {
      // The pivot has mass >= P before it: it and everything after it are dropped.  (Then
      // m1 > lo + 1: above < P holds on entry.)
      std::swap(c[lo], c[m1 - 1]);
      hi = m1 - 1;
    } else {
      // The pivot and everything before it are kept.
      above += pre + piv.w;
      last = KeepRule{piv.x, piv.v};
      have = true;
      lo = m1;
      if (above >= P) return last;
    }
  }
  std::sort(c + lo, c + hi, precedes);
  for (int64_t i = lo; i < hi; ++i) {
    if (have && above >= P) break;
    last = KeepRule{c[i].x, c[i].v};
    have = true;
    above += c[i].w;
  }
  *reached = above >= P;  // false: every entry is kept and the mass still falls short of P
  return last;
}

// Log-sum-exp of the kept entries (kept[] in index order, w = exp(x - xm)), added up exactly as
// row_stats adds up the row with every other entry at -inf: per kTile tile, kLanes running
// sums over the full lanes, then the tail, then the tiles in order (adding zeros is exact).
inline float kept_lse(const std::vector<Cand>& kept, int64_t V, float xm) {
  float total = 0.0f;
  size_t i = 0;
  while (i < kept.size()) {
    const int64_t t = kept[i].v / kTile, base = t * kTile;
    const int64_t n = std::min<int64_t>(kTile, V - base);
    const int64_t full = n - n % kLanes;
    float acc[kLanes] = {};
    float s = 0.0f;
    size_t j = i;
    for (; j < kept.size() && kept[j].v < base + full; ++j)
      acc[(kept[j].v - base) % kLanes] += kept[j].w;
    for (int l = 0; l < kLanes; ++l) s += acc[l];
    for (; j < kept.size() && kept[j].v < base + n; ++j) s += kept[j].w;
    total += s;
    i = j;
  }
  return xm + fast_log(total);
}

// Keep rule of one row at inv_tau whose scaled max is xm (row_max).  Counts and masses within
// kWindowD below the max (one read) locate the top-k, top-p and min-p boundaries to within a
// window; only the entries of that window are gathered (a second, compare-only read) and
// selected among.  On return sc.cand holds the kept entries in index order; *lse is their
// log-sum-exp.
template <typename T>
KeepRule filter_row(const T* row, int64_t V, float inv_tau, float xm, const RowSettings& rs,
                    FilterScratch& sc, float* lse) {
  int64_t cnt[kWindows] = {};
  float mass[kWindows] = {};
  double S = 0.0;
  for_tiles(row, V, false, [&](int64_t, const float* x, int64_t n, int64_t) {
    tile_windows(x, n, inv_tau, xm, cnt, mass, &S);
  });
  const float mcut = rs.min_p_on() ? min_p_threshold(xm, rs.mp) : kNegInf;
  // The narrowest window that holds the answer: k entries (top-k; with top-p on too, the whole
  // top-k set, whose mass is top-p's total), or mass >= p * S (top-p alone; if the selection's
  // own sums fall short of p * S there, every entry is taken).  Entries below min-p's cut are
  // dropped anyway, except that top-p's total needs the whole top-k set.
  float D = INFINITY, cut = mcut;
  std::vector<Cand>& c = sc.cand;
  auto finish = [&](const KeepRule& rule) {  // keep rule's entries of c, and their lse
    size_t n = 0;
    for (size_t i = 0; i < c.size(); ++i)
      if (rule.keep(c[i].x, c[i].v)) c[n++] = c[i];
    c.resize(n);
    *lse = kept_lse(c, V, xm);
    return rule;
  };
  auto gather = [&] {  // the entries with xm - a < D and a >= cut, into c
    if (sc.buf.size() < static_cast<size_t>(V)) sc.buf.resize(static_cast<size_t>(V));
    int64_t m = 0;
    for_tiles(row, V, false, [&](int64_t, const float* x, int64_t n, int64_t base) {
      m += tile_gather_window(x, n, base, inv_tau, xm, D, cut, sc.buf.data() + m);
    });
    cand_weights(sc.buf.data(), m, xm);
    c.assign(sc.buf.begin(), sc.buf.begin() + m);
  };
  // Count-only read at kCountD distances; returns the first whose count reaches k (else +inf).
  auto count_search = [&](const float* Ds) {
    int64_t got[kCountD] = {};
    for_tiles(row, V, false, [&](int64_t, const float* x, int64_t n, int64_t) {
      tile_count_at(x, n, inv_tau, xm, Ds, got);
    });
    for (int q = 0; q < kCountD; ++q)
      if (got[q] >= rs.k) return Ds[q];
    return static_cast<float>(INFINITY);
  };
  if (rs.top_k_on()) {
    for (int q = 0; q < kWindows; ++q)
      if (cnt[q] >= rs.k) {
        D = kWindowD[q];
        // Far more than k entries in the window: one count-only read narrows it first
        // (a selection over thousands of candidates costs more than the read).
        if (q > 0 && cnt[q] > 8 * rs.k + 1024) {
          float Ds[kCountD];
          const float lo = kWindowD[q - 1], step = (kWindowD[q] - lo) / kCountD;
          for (int j = 0; j < kCountD; ++j) Ds[j] = j + 1 < kCountD ? lo + step * (j + 1) : kWindowD[q];
          D = count_search(Ds);
        }
        break;
      }
    if (D == INFINITY && rs.top_p_on()) {
      // A confident row: the top-k set reaches past the widest window.  Top-p's total W_k is
      // then bracketed by the window's mass and that plus (k - count) entries of weight
      // < 1.2e-7 (= e^-16 with the kernel exp's error); where top-p's boundary is the same at
      // both ends it is the answer, and it lies in the window, above the k-th largest.
      D = kWindowD[kWindows - 1];
      cut = kNegInf;
      gather();
      double lo = 0.0;
      for (const Cand& e : c) lo += static_cast<double>(e.w);
      const double hi = lo + 1.2e-7 * static_cast<double>(rs.k - static_cast<int64_t>(c.size()));
      bool r1, r2;
      sc.work.assign(c.begin(), c.end());
      const KeepRule a = top_p_rule(sc.work.data(), static_cast<int64_t>(c.size()), rs.p * lo, &r1);
      sc.work.assign(c.begin(), c.end());
      const KeepRule b = top_p_rule(sc.work.data(), static_cast<int64_t>(c.size()), rs.p * hi, &r2);
      if (r1 && r2 && a.t == b.t && a.c == b.c)
        return finish(rs.min_p_on() ? a.tighter(KeepRule{mcut, 0}) : a);
      D = INFINITY;  // undecided: the exact path below
    }
    if (D == INFINITY && (rs.top_p_on() || xm - kWindowD[kWindows - 1] > mcut)) {
      // The k-th largest lies further down (a confident row): count wider windows.
      static constexpr float kWideD[kCountD] = {20.0f, 24.0f, 32.0f, 48.0f, 64.0f, 96.0f, 160.0f, INFINITY};
      D = count_search(kWideD);
    }
    if (rs.top_p_on()) cut = kNegInf;
  } else if (rs.top_p_on()) {
    const float P = static_cast<float>(rs.p * S);  // the window only needs to be wide enough
    for (int q = 0; q < kWindows; ++q)
      if (mass[q] >= P) {
        D = kWindowD[q];
        break;
      }
  }
  gather();

  KeepRule rule;
  if (rs.min_p_on()) rule = KeepRule{mcut, 0};
  double W = S;
  if (rs.top_k_on()) {
    float tk;
    if (rs.k < static_cast<int64_t>(c.size())) {
      sc.tmp.resize(c.size());
      for (size_t i = 0; i < c.size(); ++i) sc.tmp[i] = c[i].x;
      std::nth_element(sc.tmp.begin(), sc.tmp.begin() + (rs.k - 1), sc.tmp.end(), std::greater<float>());
      tk = sc.tmp[static_cast<size_t>(rs.k - 1)];
    } else {  // the candidates are the top-k set (or min-p's cut came first)
      tk = c.front().x;
      for (const Cand& e : c) tk = std::min(tk, e.x);
    }
    rule = rule.tighter(KeepRule{tk, 0});
    // The top-k survivors, and their mass (top-p's total).
    size_t n = 0;
    W = 0.0;
    for (size_t i = 0; i < c.size(); ++i)
      if (c[i].x >= tk) {
        W += static_cast<double>(c[i].w);
        c[n++] = c[i];
      }
    c.resize(n);
  }
  if (rs.top_p_on()) {
    sc.work.assign(c.begin(), c.end());
    bool reached;
    KeepRule pr = top_p_rule(sc.work.data(), static_cast<int64_t>(sc.work.size()), static_cast<double>(rs.p) * W, &reached);
    if (!reached && !rs.top_k_on() && D < INFINITY) {
      // The window's mass reached p * S in the window sums but not in the selection's (float
      // rounding): the boundary may lie just outside it.  Take every entry and select again.
      D = INFINITY;
      gather();
      sc.work.assign(c.begin(), c.end());
      pr = top_p_rule(sc.work.data(), static_cast<int64_t>(sc.work.size()), static_cast<double>(rs.p) * W, &reached);
    }
    rule = rule.tighter(pr);
  }
  return finish(rule);
}

}  // namespace cpu
}  // namespace specdiff
