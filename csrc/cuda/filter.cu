// CUDA filter_logits and apply_penalties.
//
// filter_logits: one block per (batch row, position).  No sort: the top-k boundary is a
// bisection over the 32-bit order keys of the scaled row (count of entries at or above a key),
// the top-p boundary a bisection over the same keys on the mass at or above a key, then a
// bisection over the index for the entries tied at the boundary; min-p is one threshold.  The
// output is the row with every dropped entry at -inf, so the unchanged verify, gather and
// denoise kernels read the filtered law from it.
//
// apply_penalties: the context of each batch row is counted once (atomics into a (B, V)
// workspace); each position then rewrites the tokens seen before it, its draft prefix included.
#include <cuda_runtime.h>

#include <climits>

#include "common.cuh"
#include "specdiff/filter.h"

namespace specdiff {
namespace cuda {
namespace {

__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t b = float_to_bits(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float from_order_key(uint32_t u) {
  return bits_to_float((u & 0x80000000u) ? (u & 0x7FFFFFFFu) : ~u);
}

// Block-wide reduction (sum or max), broadcast to every thread; a fixed order for a fixed
// block size, so the result does not depend on timing.
template <typename V, typename Op>
__device__ V block_reduce(V v, V identity, Op op) {
  __shared__ V part[32];
  __shared__ V total;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int d = 16; d > 0; d >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, d));
  if (lane == 0) part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int nw = (blockDim.x + 31) >> 5;
    v = lane < nw ? part[lane] : identity;
    for (int d = 16; d > 0; d >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, d));
    if (lane == 0) total = v;
  }
  __syncthreads();
  const V r = total;
  __syncthreads();
  return r;
}

struct AddOp {
  template <typename V>
  __device__ V operator()(V a, V b) const { return a + b; }
};
struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

__device__ double block_sum_d(double v) { return block_reduce(v, 0.0, AddOp{}); }
__device__ long long block_count(long long v) { return block_reduce(v, 0LL, AddOp{}); }
__device__ float block_max(float v) { return block_reduce(v, kNegInf, MaxOp{}); }

template <typename T>
__device__ __forceinline__ T neg_inf_of();
template <>
__device__ __forceinline__ float neg_inf_of<float>() { return kNegInf; }
template <>
__device__ __forceinline__ bf16_t neg_inf_of<bf16_t>() { return bf16_t{0xFF80u}; }
template <>
__device__ __forceinline__ f16_t neg_inf_of<f16_t>() { return f16_t{0xFC00u}; }

template <typename T>
__global__ void __launch_bounds__(kThreads) filter_kernel(FilterParams p) {
  const int64_t r = blockIdx.x;
  const int64_t b = r / p.N, n = r % p.N, V = p.V;
  const T* row = p.logits.row<T>(b, n);
  T* out = static_cast<T*>(p.out) + r * V;
  const float tau = p.tau.at(b);
  const RowSettings rs = row_settings(p.filter, b, V);
  const bool on = tau > 0.0f && rs.on();
  const float inv_tau = on ? 1.0f / tau : 1.0f;
  auto X = [&](int64_t v) { return sd_mul(to_float(row[v]), inv_tau); };

  float m = kNegInf, bad = 0.0f;
  if (on) {
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      const float x = X(v);
      if (x != x || x == INFINITY) bad = 1.0f;
      m = fmaxf(m, x);
    }
  }
  m = block_max(m);
  bad = block_max(bad);
  if (!on || bad > 0.0f || m == kNegInf) {  // pass through (greedy, no filter, invalid row)
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) out[v] = row[v];
    return;
  }

  KeepRule rule;
  if (rs.min_p_on()) rule = KeepRule{min_p_threshold(m, rs.mp), 0};
  // Masses in double, as on the CPU: near p = 1 top-p is decided by a small tail of the total.
  double W = 0.0;
  {
    double s = 0.0;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) s += fast_exp(X(v) - m);
    W = block_sum_d(s);
  }
  uint32_t floor_key = 0;  // top-p searches at or above the top-k boundary
  if (rs.top_k_on()) {
    // Largest key u with #(key >= u) >= k: the key of the k-th largest entry.
    uint64_t lo = 0, hi = 0xFFFFFFFFull;
    while (lo < hi) {
      const uint64_t mid = lo + (hi - lo + 1) / 2;
      long long c = 0;
      for (int64_t v = threadIdx.x; v < V; v += blockDim.x) c += order_key(X(v)) >= mid;
      if (block_count(c) >= rs.k) lo = mid; else hi = mid - 1;
    }
    floor_key = static_cast<uint32_t>(lo);
    const float tk = from_order_key(floor_key);
    rule = rule.tighter(KeepRule{tk, 0});
    double s = 0.0;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      const float x = X(v);
      if (x >= tk) s += fast_exp(x - m);
    }
    W = block_sum_d(s);
  }
  if (rs.top_p_on()) {
    const double P = static_cast<double>(rs.p) * W;
    uint64_t lo = floor_key, hi = 0xFFFFFFFFull;
    if (!(P > 0.0)) {
      lo = order_key(m);  // the top entry only
    } else {
      // Largest key u >= floor_key with mass(key >= u) >= P.
      while (lo < hi) {
        const uint64_t mid = lo + (hi - lo + 1) / 2;
        double s = 0.0;
        for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
          const float x = X(v);
          if (order_key(x) >= mid) s += fast_exp(x - m);
        }
        if (block_sum_d(s) >= P) lo = mid; else hi = mid - 1;
      }
    }
    const float t = from_order_key(static_cast<uint32_t>(lo));
    // The entries tied at t, in order of descending index, each weigh w_t.
    double above = 0.0;
    long long ties = 0;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      const float x = X(v);
      if (x > t) above += fast_exp(x - m);
      ties += x == t;
    }
    above = block_sum_d(above);
    ties = block_count(ties);
    long long keep_n = 1;
    if (P > 0.0) {
      const double wt = fast_exp(t - m);
      double acc = above;
      keep_n = 0;
      while (keep_n < ties && acc < P) {
        ++keep_n;
        acc += wt;
      }
      if (keep_n < 1) keep_n = 1;
    }
    int64_t c = 0;
    if (keep_n < ties) {
      // Largest index c with #(x == t, v >= c) >= keep_n.
      int64_t clo = 0, chi = V - 1;
      while (clo < chi) {
        const int64_t mid = clo + (chi - clo + 1) / 2;
        long long cnt = 0;
        for (int64_t v = threadIdx.x; v < V; v += blockDim.x) cnt += (v >= mid && X(v) == t);
        if (block_count(cnt) >= keep_n) clo = mid; else chi = mid - 1;
      }
      c = clo;
    }
    rule = rule.tighter(KeepRule{t, c});
  }
  const T ninf = neg_inf_of<T>();
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) out[v] = rule.keep(X(v), v) ? row[v] : ninf;
}

template <typename T>
cudaError_t launch_filter(const FilterParams& p, cudaStream_t stream) {
  const int64_t rows = p.B * p.N;
  if (rows > INT_MAX) return cudaErrorInvalidValue;
  filter_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(p);
  SD_CHECK_LAUNCH();
  return cudaSuccess;
}

// ----------------------------------------------------------------------------- penalties
struct PenaltyWork {
  int32_t* count;  // (B, V) occurrences in the context
  int32_t* first;  // (B, V) first context position of each token (INT32 max when absent)
};

__global__ void count_kernel(PenaltyParams p, PenaltyWork w) {
  const int64_t b = blockIdx.y;
  const int64_t len = p.lengths[b];
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < len && j < p.L;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = p.ids.at(b, j);
    if (t < 0 || t >= p.V) continue;
    atomicAdd(&w.count[b * p.V + t], 1);
    atomicMin(&w.first[b * p.V + t], static_cast<int32_t>(j));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) penalty_kernel(PenaltyParams p, PenaltyWork w) {
  const int64_t r = blockIdx.x;
  const int64_t b = r / p.N, n = r % p.N, V = p.V;
  const T* row = p.logits.row<T>(b, n);
  float* out = static_cast<float*>(p.out) + r * V;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) out[v] = to_float(row[v]);
  __syncthreads();
  const int64_t len = p.lengths[b];
  if (len < 0 || len + n > p.L) return;  // refused at the boundary; never reads past ids
  const float rep = p.repetition.at(b), pres = p.presence.at(b), freq = p.frequency.at(b);
  auto draft = [&](int64_t k) { return p.ids.at(b, len + k); };
  // Each distinct token seen before position n is rewritten by exactly one thread.
  for (int64_t j = threadIdx.x; j < len + n; j += blockDim.x) {
    const int64_t t = p.ids.at(b, j);
    if (t < 0 || t >= V) continue;
    int32_t cnt = 0;
    if (j < len) {
      if (w.first[b * V + t] != static_cast<int32_t>(j)) continue;
      cnt = w.count[b * V + t];
    } else {
      const int64_t k = j - len;
      if (w.count[b * V + t] > 0) continue;  // the context's first occurrence owns it
      bool earlier = false;
      for (int64_t k2 = 0; k2 < k; ++k2) earlier = earlier || draft(k2) == t;
      if (earlier) continue;
    }
    for (int64_t k = 0; k < n; ++k) cnt += draft(k) == t;
    out[t] = penalize(to_float(row[t]), cnt, rep, pres, freq);
  }
}

template <typename T>
cudaError_t launch_penalties(const PenaltyParams& p, PenaltyWork w, cudaStream_t stream) {
  const size_t cells = static_cast<size_t>(p.B * p.V);
  SD_CUDA_CALL(cudaMemsetAsync(w.count, 0, cells * sizeof(int32_t), stream));
  SD_CUDA_CALL(cudaMemsetAsync(w.first, 0x7F, cells * sizeof(int32_t), stream));
  if (p.B > 65535 || p.B * p.N > INT_MAX) return cudaErrorInvalidValue;
  count_kernel<<<dim3(32, static_cast<unsigned>(p.B)), kThreads, 0, stream>>>(p, w);
  SD_CHECK_LAUNCH();
  penalty_kernel<T><<<static_cast<unsigned>(p.B * p.N), kThreads, 0, stream>>>(p, w);
  SD_CHECK_LAUNCH();
  return cudaSuccess;
}

}  // namespace

int filter_logits(const FilterParams& p, void* stream, int device) {
  DeviceGuard guard(device);
  return static_cast<int>(dispatch_dtype(p.logits.dtype, [&](auto t) {
    return launch_filter<decltype(t)>(p, static_cast<cudaStream_t>(stream));
  }));
}

size_t penalty_workspace_bytes(int64_t B, int64_t V) {
  return 2 * sizeof(int32_t) * static_cast<size_t>(B * V);
}

int apply_penalties(const PenaltyParams& p, void* workspace, size_t workspace_bytes, void* stream, int device) {
  DeviceGuard guard(device);
  if (workspace_bytes < penalty_workspace_bytes(p.B, p.V)) return static_cast<int>(cudaErrorInvalidValue);
  int32_t* base = static_cast<int32_t*>(workspace);
  PenaltyWork w{base, base + p.B * p.V};
  return static_cast<int>(dispatch_dtype(p.logits.dtype, [&](auto t) {
    return launch_penalties<decltype(t)>(p, w, static_cast<cudaStream_t>(stream));
  }));
}

}  // namespace cuda
}  // namespace specdiff
