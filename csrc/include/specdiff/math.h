// Per-element formulas shared by the CPU and CUDA paths.  Every multiply-add is written as an
// explicit fmaf, so host code (compiled with -ffp-contract=off) and device code round alike and
// the race keys of docs/ops.md come out bit-identical on both.
#pragma once

#include <cmath>

#include "common.h"
#include "philox.h"

namespace specdiff {

constexpr float kNegInf = -INFINITY;
constexpr float kFltMin = 1.17549435e-38f;

SD_HD float sd_fmaf(float a, float b, float c) {
#if defined(SD_ON_DEVICE)
  return __fmaf_rn(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}

// A product that is never fused into a following add (device code contracts otherwise).
SD_HD float sd_mul(float a, float b) {
#if defined(SD_ON_DEVICE)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

SD_HD bool sd_isnan(float x) { return x != x; }

// exp(x) to about one ulp; 0 below -87.33, +inf above 88.72, NaN for NaN.
SD_HD float fast_exp(float x) {
  float xc = x < -87.33654f ? -87.33654f : x;
  xc = xc > 88.72283f ? 88.72283f : xc;
  // Round to nearest with the 1.5 * 2^23 trick: plain adds, no library call, vectorisable.
  const float n = (sd_mul(xc, 1.44269504088896341f) + 12582912.0f) - 12582912.0f;
  float r = sd_fmaf(n, -0.693359375f, xc);
  r = sd_fmaf(n, 2.12194440e-4f, r);
  const float z = sd_mul(r, r);
  float y = 1.9875691500e-4f;
  y = sd_fmaf(y, r, 1.3981999507e-3f);
  y = sd_fmaf(y, r, 8.3334519073e-3f);
  y = sd_fmaf(y, r, 4.1665795894e-2f);
  y = sd_fmaf(y, r, 1.6666665459e-1f);
  y = sd_fmaf(y, r, 5.0000001201e-1f);
  y = sd_fmaf(y, z, r) + 1.0f;
  const float scale = bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  float out = sd_mul(y, scale);
  out = x < -87.33654f ? 0.0f : out;
  out = x > 88.72283f ? INFINITY : out;
  return x != x ? x : out;
}

// log(x) for normal positive x, to about one ulp.
SD_HD float fast_log(float x) {
  const uint32_t bits = float_to_bits(x);
  float e = static_cast<float>(static_cast<int32_t>((bits >> 23) & 0xFFu) - 126);
  float m = bits_to_float((bits & 0x807FFFFFu) | 0x3F000000u);  // [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? (m + m) - 1.0f : m - 1.0f;
  const float z = sd_mul(m, m);
  float y = 7.0376836292e-2f;
  y = sd_fmaf(y, m, -1.1514610310e-1f);
  y = sd_fmaf(y, m, 1.1676998740e-1f);
  y = sd_fmaf(y, m, -1.2420140846e-1f);
  y = sd_fmaf(y, m, 1.4249322787e-1f);
  y = sd_fmaf(y, m, -1.6668057665e-1f);
  y = sd_fmaf(y, m, 2.0000714765e-1f);
  y = sd_fmaf(y, m, -2.4999993993e-1f);
  y = sd_fmaf(y, m, 3.3333331174e-1f);
  y = sd_mul(sd_mul(y, m), z);
  y = sd_fmaf(-2.12194440e-4f, e, y);
  y = sd_fmaf(-0.5f, z, y);
  return sd_fmaf(0.693359375f, e, m + y);
}

// An Exp(1) variate from a uniform w in (0, 1): -log1p(-w), accurate for small w.
SD_HD float exponential_from_uniform(float w) {
  const float u = 1.0f - w;
  // log1p(-w) = log(u) * (-w) / (u - 1) when u != 1 (u - 1 is exact).
  const float l = sd_mul(fast_log(u), -w / (u - 1.0f));
  return u == 1.0f ? w : -l;
}

// -log(E) for the exponential E drawn from one random word: a Gumbel variate.  The race key
// of an entry with log-weight a is a + gumbel; the categorical draw is the argmax.
SD_HD float gumbel_from_bits(uint32_t bits) {
  return -fast_log(exponential_from_uniform(uniform_from_bits(bits)));
}

// Key that orders (value, index) pairs for an atomic max: larger value wins, then lower index.
SD_HD uint64_t pack_argmax(float v, uint32_t idx) {
  const uint32_t b = float_to_bits(v);
  const uint32_t ord = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return (static_cast<uint64_t>(ord) << 32) | static_cast<uint64_t>(~idx);
}
SD_HD uint32_t unpack_index(uint64_t packed) { return ~static_cast<uint32_t>(packed); }

// Running statistics of one logits row (or a chunk of it) at inverse temperature inv_tau:
// max and argmax of x = l * inv_tau, sum of exp(x - max), and whether a NaN or +inf was seen.
struct RowStats {
  float m = kNegInf;
  float s = 0.0f;
  int64_t arg = -1;
  bool bad = false;

  SD_HD void merge(const RowStats& o) {
    bad = bad || o.bad;
    if (o.m > m || (o.m == m && o.arg >= 0 && (arg < 0 || o.arg < arg))) {
      if (o.m > m) {
        s = (m == kNegInf ? 0.0f : s * fast_exp(m - o.m)) + o.s;
        m = o.m;
      } else {
        s += o.s;
      }
      arg = o.arg;
    } else if (o.m != kNegInf) {
      s += o.s * fast_exp(o.m - m);
    }
  }
  // A row is usable when it held no NaN / +inf and at least one finite logit.
  SD_HD bool valid() const { return !bad && m != kNegInf; }
  SD_HD float lse() const { return m + fast_log(s); }
};

// The acceptance test of chain speculative sampling at one position: accept the draft x when
// u * q(x) < p(x), u uniform in (0, 1) (so a draft q cannot propose, q(x) = 0, is accepted
// whenever p(x) > 0).
SD_HD bool accept_draft(float u, float qx, float px) { return u * qx < px; }

// gather_logprobs' result for one row from its statistics read at inverse temperature inv
// (raw_max: the row's largest logit, logit_id: the id's logit): at tau = 0 the max and 0 / -inf
// for the argmax / any other id; else lse and the log-probability (l_id - max) / tau - log(s),
// the difference taken before scaling (exact where the id ties the max, however large the
// scaled max).  lse is reported at 1 / tau: where the row was read at a lower inv (logits near
// the float range), the true lse is beyond float32 and comes out +-inf.
SD_HD void gather_finish(const RowStats& s, float tau, float inv, float raw_max, int64_t id,
                         int64_t V, float logit_id, float* lse, float* logprob) {
  *lse = NAN;
  *logprob = NAN;
  if (!s.valid() || id < 0 || id >= V) return;
  if (tau == 0.0f) {
    *lse = s.m;
    *logprob = id == s.arg ? 0.0f : kNegInf;
    return;
  }
  const float inv_tau = 1.0f / tau;
  *lse = inv == inv_tau ? s.lse() : sd_mul(raw_max, inv_tau);
  *logprob = sd_mul(logit_id - raw_max, inv_tau) - fast_log(s.s);
}

}  // namespace specdiff
