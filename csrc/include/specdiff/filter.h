// Sampling controls shared by the CPU and CUDA paths: the per-row settings of top-k, top-p and
// min-p, the keep rule they reduce to, and the repetition / presence / frequency penalty of one
// logit (docs/ops.md, "Sampling controls").
//
// The filters act on the scaled row x_v = l_v / tau in the order of transformers' generate():
// top-k, then top-p on the survivors, then min-p.  Each keeps an upper set of the row in the
// order (x descending, then index descending) -- the reverse of a stable ascending sort, which
// is the order transformers' top-p walks -- so their intersection is again an upper set: the
// entries at or above one boundary entry (t, c).  That pair is all a kernel needs.
#pragma once

#include <cstdint>

#include "common.h"
#include "math.h"

namespace specdiff {

// Per-row filter settings; a null pointer means one value for the whole batch.
//   top_k: keep the k largest (ties with the k-th kept); 0 = off (also for k >= V).
//   top_p: keep the smallest head of mass >= p; 1 = off.
//   min_p: keep probabilities >= min_p * the largest; 0 = off.
struct RowFilter {
  const int64_t* top_k = nullptr;
  int64_t top_k_value = 0;
  const float* top_p = nullptr;
  float top_p_value = 1.0f;
  const float* min_p = nullptr;
  float min_p_value = 0.0f;

  SD_HD int64_t k(int64_t b) const { return top_k ? top_k[b] : top_k_value; }
  SD_HD float p(int64_t b) const { return top_p ? top_p[b] : top_p_value; }
  SD_HD float mp(int64_t b) const { return min_p ? min_p[b] : min_p_value; }
  // Whether any setting was given for the batch (cheap test before the per-row ones).
  SD_HD bool any() const {
    return top_k || top_p || min_p || top_k_value > 0 || top_p_value < 1.0f || min_p_value > 0.0f;
  }
};

// Effective settings of one row over a vocabulary of V entries.  Values the boundary checks
// refuse (negative k, p outside (0, 1], min_p outside [0, 1], NaN) can only reach a kernel
// through an unchecked call; they are read as: k < 0 off, p NaN or <= 0 keeps the top entry,
// min_p NaN off, min_p > 1 keeps the entries tied with the top.
struct RowSettings {
  int64_t k = 0;      // 0: off
  float p = 1.0f;     // >= 1: off
  float mp = 0.0f;    // <= 0: off
  SD_HD bool top_k_on() const { return k > 0; }
  SD_HD bool top_p_on() const { return p < 1.0f; }
  SD_HD bool min_p_on() const { return mp > 0.0f; }
  SD_HD bool on() const { return top_k_on() || top_p_on() || min_p_on(); }
};

SD_HD RowSettings row_settings(const RowFilter& f, int64_t b, int64_t V) {
  RowSettings s;
  const int64_t k = f.k(b);
  s.k = (k > 0 && k < V) ? k : 0;
  const float p = f.p(b);
  s.p = sd_isnan(p) || p <= 0.0f ? 0.0f : (p >= 1.0f ? 1.0f : p);
  const float mp = f.mp(b);
  s.mp = sd_isnan(mp) ? 0.0f : (mp > 1.0f ? 1.0f : mp);
  return s;
}

// Entries kept by a filter: (x, v) at or above (t, c) in the order (x, then index).
struct KeepRule {
  float t = kNegInf;
  int64_t c = 0;
  SD_HD bool keep(float x, int64_t v) const { return x > t || (x == t && v >= c); }
  // The tighter of two rules (the intersection of two upper sets).
  SD_HD KeepRule tighter(const KeepRule& o) const {
    return (o.t > t || (o.t == t && o.c > c)) ? o : *this;
  }
};

// The min-p boundary of a row whose scaled max is xm: keep x >= xm + log(min_p).
SD_HD float min_p_threshold(float xm, float mp) {
  return mp >= 1.0f ? xm : xm + fast_log(mp);
}

// Penalised logit of one token seen `count` > 0 times before the position:
//   repetition (transformers' RepetitionPenaltyLogitsProcessor, CTRL): l < 0 ? l * r : l / r;
//   then presence and frequency (OpenAI / vLLM): l - presence - frequency * count.
SD_HD float penalize(float l, int32_t count, float rep, float presence, float frequency) {
  if (count <= 0) return l;
  float y = l < 0.0f ? sd_mul(l, rep) : l / rep;
  y = y - presence;
  y = y - sd_mul(frequency, static_cast<float>(count));
  return y;
}

}  // namespace specdiff
