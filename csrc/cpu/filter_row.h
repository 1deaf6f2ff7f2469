// CPU top-k / top-p / min-p of one row without sorting the vocabulary: the entries that can
// survive are gathered in one pass (those within a window below the max that provably holds
// the answer, else the whole row), top-k is a selection (nth_element) and top-p a weighted
// quickselect over that short list.  The result is the keep rule, the kept entries and the
// log-sum-exp of the kept set, summed exactly as row_stats sums the masked row, so verifying
// with the fused filter and verifying the output of filter_logits give the same bits.
#pragma once

#include <algorithm>
#include <functional>
#include <cstdint>
#include <vector>

#include "row_kernels.h"
#include "specdiff/filter.h"

namespace specdiff {
namespace cpu {

struct Cand {
  float x;  // scaled logit
  float w;  // exp(x - xm)
  int64_t v;
};

// Order of the filters: a precedes b when it is larger, ties by the larger index.
inline bool precedes(const Cand& a, const Cand& b) { return a.x > b.x || (a.x == b.x && a.v > b.v); }

struct FilterScratch {
  std::vector<Cand> cand, work;
  std::vector<float> tmp;
};

// Scaled entries at or above `cut`, in index order, with their weights.
template <typename T>
void gather_candidates(const T* row, int64_t V, float inv_tau, float xm, float cut,
                       std::vector<Cand>& out) {
  out.clear();
  for (int64_t v = 0; v < V; ++v) {
    const float x = sd_mul(to_float(row[v]), inv_tau);
    if (x >= cut) out.push_back(Cand{x, 0.0f, v});
  }
  for (Cand& c : out) c.w = fast_exp(c.x - xm);
}

// Top-p boundary over c[0..n) (n >= 1): the last entry, in filter order, whose mass before it
// is < P (the first entry is always kept).  Weighted quickselect, expected O(n); c is permuted.
inline KeepRule top_p_rule(Cand* c, int64_t n, float P) {
  int64_t lo = 0, hi = n;
  float above = 0.0f;  // mass of the entries before c[lo..hi) in filter order (all kept)
  KeepRule last;
  bool have = false;
  if (!(P > 0.0f)) {  // keep the first entry only
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
    float pre = 0.0f;  // [lo+1, m1) precede the pivot, [m1, hi) follow it
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
  return last;
}

// Log-sum-exp of the kept entries (kept[] in index order, w = exp(x - xm)), added up exactly as
// row_stats adds up the row with every other entry at -inf: per kTile tile, kLanes running
// sums over the full lanes, then the tail, then the tiles in order (adding zeros is exact).
inline float kept_lse(const std::vector<Cand>& kept, int64_t V, float xm) {
  constexpr int kLanes = 16;  // tile_sumexp's accumulators
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

// Keep rule of one row at inv_tau with scaled max xm and unfiltered sum S = sum exp(x - xm)
// (row_stats).  On return sc.cand holds the kept entries in index order; *lse is their
// log-sum-exp.
template <typename T>
KeepRule filter_row(const T* row, int64_t V, float inv_tau, float xm, float S, const RowSettings& rs,
                    FilterScratch& sc, float* lse) {
  std::vector<Cand>& c = sc.cand;
  const float mcut = rs.min_p_on() ? min_p_threshold(xm, rs.mp) : kNegInf;
  // Window: entries more than 16 below the max weigh < 1.2e-7 each; the window holds the
  // answer when it has k entries (top-k) or mass >= p * S (top-p alone).
  const bool window = (rs.top_k_on() || rs.top_p_on()) && xm - 16.0f > mcut;
  gather_candidates(row, V, inv_tau, xm, window ? xm - 16.0f : mcut, c);
  bool ok = true;
  const int64_t n0 = static_cast<int64_t>(c.size());
  if (rs.top_k_on() && rs.top_p_on()) {
    ok = n0 >= rs.k;  // top-p needs the mass of the whole top-k set
  } else if (rs.top_k_on()) {
    ok = n0 >= rs.k || !window;  // below min-p's cut everything is dropped anyway
  } else if (rs.top_p_on() && window) {
    float mass = 0.0f;
    for (const Cand& e : c) mass += e.w;
    ok = mass >= rs.p * S;
  }
  if (!ok) gather_candidates(row, V, inv_tau, xm, rs.top_k_on() && rs.top_p_on() ? kNegInf : mcut, c);
  KeepRule rule;
  if (rs.min_p_on()) rule = KeepRule{mcut, 0};
  float W = S;
  if (rs.top_k_on() && rs.k >= static_cast<int64_t>(c.size())) {
    // The candidates are exactly the top-k set (and its ties): top-p's total is their mass.
    W = 0.0f;
    for (const Cand& e : c) W += e.w;
  } else if (rs.top_k_on()) {
    sc.tmp.resize(c.size());
    for (size_t i = 0; i < c.size(); ++i) sc.tmp[i] = c[i].x;
    std::nth_element(sc.tmp.begin(), sc.tmp.begin() + (rs.k - 1), sc.tmp.end(), std::greater<float>());
    const float tk = sc.tmp[static_cast<size_t>(rs.k - 1)];
    rule = rule.tighter(KeepRule{tk, 0});
    // The top-k survivors, and their mass (top-p's total).
    size_t m = 0;
    W = 0.0f;
    for (size_t i = 0; i < c.size(); ++i)
      if (c[i].x >= tk) {
        W += c[i].w;
        c[m++] = c[i];
      }
    c.resize(m);
  }
  if (rs.top_p_on()) {
    // Only entries the other filters keep can bound top-p from above; min-p's cut is applied
    // after top-p, so top-p runs over the top-k survivors (all still in c).
    sc.work.assign(c.begin(), c.end());
    rule = rule.tighter(top_p_rule(sc.work.data(), static_cast<int64_t>(sc.work.size()), rs.p * W));
  }
  size_t m = 0;
  for (size_t i = 0; i < c.size(); ++i)
    if (rule.keep(c[i].x, c[i].v)) c[m++] = c[i];
  c.resize(m);
  *lse = kept_lse(c, V, xm);
  return rule;
}

}  // namespace cpu
}  // namespace specdiff
