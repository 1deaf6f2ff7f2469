// Device helpers shared by the CUDA ops: error checks, vector loads, block reductions, and the
// chunked row-statistics kernel (max, argmax, sum of exp, NaN/+inf flag, optional race).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "specdiff/common.h"
#include "specdiff/dispatch.h"
#include "specdiff/math.h"
#include "specdiff/ops.h"
#include "specdiff/philox.h"

// Every CUDA runtime call and launcher goes through this: on failure it records where (file,
// line, the call) for the bindings' error message and returns the error.
#define SD_CUDA_CALL(expr)                                                  \
  do {                                                                      \
    const cudaError_t sd_err_ = (expr);                                     \
    if (sd_err_ != cudaSuccess) {                                           \
      ::specdiff::cuda::note_error_where(__FILE__, __LINE__, #expr);        \
      return sd_err_;                                                       \
    }                                                                       \
  } while (0)

// Check the launch error after every kernel.
#define SD_CHECK_LAUNCH() SD_CUDA_CALL(cudaGetLastError())

namespace specdiff {
namespace cuda {

constexpr int kThreads = 256;

// Records the first failing call of this thread (runtime.cu); see take_error_where().
void note_error_where(const char* file, int line, const char* call);

int sm_count(int device);

// Makes `device` current for the launcher's lifetime and restores the caller's device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&prev_) == cudaSuccess && prev_ != device) {
      cudaSetDevice(device);
    } else {
      prev_ = -1;
    }
  }
  ~DeviceGuard() {
    if (prev_ >= 0) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
};

SD_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
SD_HD size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// Chunks per row so that about two waves of blocks cover the rows.
inline int64_t chunks_for(int64_t rows, int64_t V, int sms, int64_t min_chunk = 2048) {
  if (rows <= 0) return 1;
  int64_t s = ceil_div(2 * static_cast<int64_t>(sms), rows);
  const int64_t cap = ceil_div(V, min_chunk);
  if (s > cap) s = cap;
  if (s < 1) s = 1;
  return s;
}

// Elements of one chunk (a multiple of 8 so vector loads and Philox groups stay aligned).
SD_HD int64_t chunk_len(int64_t V, int64_t S) { return align_up(static_cast<size_t>(ceil_div(V, S)), 8); }

template <typename T>
struct Vec16 {
  static constexpr int N = 16 / sizeof(T);
};

// Whether every row of a logits view starts on a 16-byte boundary.
template <typename T>
inline bool rows_aligned(const LogitsView& v) {
  return (reinterpret_cast<uintptr_t>(v.data) % 16 == 0) &&
         ((v.s0 * static_cast<int64_t>(sizeof(T))) % 16 == 0) &&
         ((v.s1 * static_cast<int64_t>(sizeof(T))) % 16 == 0);
}

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = to_float(p[0]);
  } else {
    static_assert(VEC * sizeof(T) == 16, "16-byte vectors");
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_float(e[i]);
  }
}

// Visits indices [c0, c1) of a row, VEC at a time (c0 a multiple of VEC), calling
// f(index, value) for each element in increasing order per thread.
template <typename T, int VEC, typename F>
__device__ __forceinline__ void for_chunk(const T* row, int64_t c0, int64_t c1, F&& f) {
  for (int64_t base = c0 + static_cast<int64_t>(threadIdx.x) * VEC; base < c1;
       base += static_cast<int64_t>(blockDim.x) * VEC) {
    if (base + VEC <= c1) {
      float x[VEC];
      load_vec<T, VEC>(row + base, x);
#pragma unroll
      for (int i = 0; i < VEC; ++i) f(base + i, x[i]);
    } else {
      for (int64_t v = base; v < c1; ++v) f(v, to_float(row[v]));
    }
  }
}

// Running row statistics of one thread.
struct ThreadStats {
  float m = kNegInf;
  float s = 0.0f;
  int64_t arg = -1;
  bool bad = false;

  __device__ __forceinline__ void add(int64_t idx, float l, float inv_tau) {
    bad |= sd_isnan(l) || l == INFINITY;
    const float x = sd_mul(l, inv_tau);
    if (x > m) {
      s = (m == kNegInf ? 0.0f : s * fast_exp(m - x)) + 1.0f;
      m = x;
      arg = idx;
    } else if (x != kNegInf) {
      s += fast_exp(x - m);
    }
  }
};

struct __align__(16) Partial {
  float m;
  float s;
  int32_t arg;  // -1: none
  int32_t bad;
};

__device__ __forceinline__ RowStats to_stats(const Partial& p) {
  RowStats r;
  r.m = p.m;
  r.s = p.s;
  r.arg = p.arg;
  r.bad = p.bad != 0;
  return r;
}

__device__ __forceinline__ RowStats shfl_stats(const RowStats& a, int lane_delta) {
  RowStats o;
  o.m = __shfl_down_sync(0xffffffffu, a.m, lane_delta);
  o.s = __shfl_down_sync(0xffffffffu, a.s, lane_delta);
  o.arg = __shfl_down_sync(0xffffffffu, a.arg, lane_delta);
  o.bad = __shfl_down_sync(0xffffffffu, static_cast<int>(a.bad), lane_delta) != 0;
  return o;
}

// Block-wide merge of RowStats; the result is valid in thread 0.
__device__ __forceinline__ RowStats block_merge(RowStats v) {
  __shared__ RowStats warp_part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int d = 16; d > 0; d >>= 1) {
    const RowStats o = shfl_stats(v, d);
    v.merge(o);
  }
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int nw = (blockDim.x + 31) >> 5;
    v = lane < nw ? warp_part[lane] : RowStats{};
    for (int d = 16; d > 0; d >>= 1) {
      const RowStats o = shfl_stats(v, d);
      v.merge(o);
    }
  }
  __syncthreads();
  return v;
}

// Block-wide max of packed (key, index); valid in thread 0.
__device__ __forceinline__ uint64_t block_max_u64(uint64_t v) {
  __shared__ uint64_t warp_part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int d = 16; d > 0; d >>= 1) {
    const uint64_t o = __shfl_down_sync(0xffffffffu, v, d);
    v = o > v ? o : v;
  }
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int nw = (blockDim.x + 31) >> 5;
    v = lane < nw ? warp_part[lane] : 0ull;
    for (int d = 16; d > 0; d >>= 1) {
      const uint64_t o = __shfl_down_sync(0xffffffffu, v, d);
      v = o > v ? o : v;
    }
  }
  __syncthreads();
  return v;
}

// Which rows of a (B, N, V) view a stats launch skips.
struct RowSkip {
  const uint8_t* point_mass = nullptr;  // skip rows whose point-mass flag is set
  int64_t pm_s0 = 0, pm_s1 = 0;
  const int32_t* commit_step = nullptr;  // skip committed rows (commit_step >= 0)
  int64_t cs_s0 = 0, cs_s1 = 0;
  bool skip_if_tau_zero = false;  // rows of greedy batch rows
  bool skip_if_tau_pos = false;   // rows of sampled batch rows
  bool skip_all = false;

  __device__ __forceinline__ bool operator()(int64_t b, int64_t n, float tau) const {
    if (skip_all) return true;
    if (skip_if_tau_zero && tau == 0.0f) return true;
    if (skip_if_tau_pos && tau > 0.0f) return true;
    if (point_mass && point_mass[b * pm_s0 + n * pm_s1]) return true;
    if (commit_step && commit_step[b * cs_s0 + n * cs_s1] >= 0) return true;
    return false;
  }
};

// Race settings of a stats launch (denoise token draws).
struct RaceSpec {
  bool on = false;
  RowSeed seed;
  uint64_t offset = 0;
  uint32_t tag = 0;
};

// grid (B*N, S): block (r, s) reduces chunk s of row r = b*N + n into partial[r*S + s] (and the
// race winner of the chunk into race[r*S + s] when race.on).  Temperature te = tau, or 1 at 0.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
row_stats_kernel(LogitsView lv, int64_t N, int64_t V, int64_t S, RowTemperature tau, RowSkip skip,
                 RaceSpec race, Partial* __restrict__ partial, uint64_t* __restrict__ race_out) {
  const int64_t r = blockIdx.x;
  const int64_t s = blockIdx.y;
  const int64_t b = r / N, n = r % N;
  const float t = tau.at(b);
  if (skip(b, n, t)) return;
  const float inv_te = t > 0.0f ? 1.0f / t : 1.0f;
  const int64_t chunk = chunk_len(V, S);
  const int64_t c0 = s * chunk;
  const int64_t c1 = c0 + chunk < V ? c0 + chunk : V;
  const T* row = lv.row<T>(b, n);

  ThreadStats ts;
  uint64_t best = 0;
  if (race.on && t > 0.0f) {
    // Groups of 4 consecutive entries share one Philox call (c0 is a multiple of 8).
    const RowStream st = make_stream(race.seed, b, race.offset);
    for (int64_t q = c0 / 4 + threadIdx.x; 4 * q < c1; q += blockDim.x) {
      const Philox4 w = st.words4(static_cast<uint32_t>(n), static_cast<uint64_t>(q), race.tag);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t v = 4 * q + i;
        if (v >= c1) break;
        const float l = to_float(row[v]);
        ts.add(v, l, inv_te);
        const float a = sd_mul(l, inv_te);
        if (a != kNegInf && !sd_isnan(a)) {
          const uint64_t pk = pack_argmax(a + gumbel_from_bits(w.x[i]), static_cast<uint32_t>(v));
          best = pk > best ? pk : best;
        }
      }
    }
  } else if constexpr (VEC > 1) {
    // One max per vector, then one rescale at most: the per-element work is a conversion, a
    // product, a max and one exp.
    for (int64_t base = c0 + static_cast<int64_t>(threadIdx.x) * VEC; base < c1;
         base += static_cast<int64_t>(blockDim.x) * VEC) {
      if (base + VEC <= c1) {
        float x[VEC];
        load_vec<T, VEC>(row + base, x);
        float vm = kNegInf;
        bool vbad = false;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          vbad |= sd_isnan(x[i]) || x[i] == INFINITY;
          x[i] = sd_mul(x[i], inv_te);
          vm = fmaxf(vm, x[i]);
        }
        ts.bad |= vbad;
        if (vm > ts.m) {
          int first = 0;
#pragma unroll
          for (int i = VEC - 1; i >= 0; --i) first = x[i] == vm ? i : first;
          ts.s = ts.m == kNegInf ? 0.0f : ts.s * fast_exp(ts.m - vm);
          ts.m = vm;
          ts.arg = base + first;
        }
        if (ts.m != kNegInf) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) ts.s += fast_exp(x[i] - ts.m);
        }
      } else {
        for (int64_t v = base; v < c1; ++v) ts.add(v, to_float(row[v]), inv_te);
      }
    }
  } else {
    for_chunk<T, VEC>(row, c0, c1, [&](int64_t v, float l) { ts.add(v, l, inv_te); });
  }
  RowStats rs;
  rs.m = ts.m;
  rs.s = ts.s;
  rs.arg = ts.arg;
  rs.bad = ts.bad;
  rs = block_merge(rs);
  if (race.on) best = block_max_u64(best);
  if (threadIdx.x == 0) {
    partial[r * S + s] = Partial{rs.m, rs.s, static_cast<int32_t>(rs.arg), rs.bad ? 1 : 0};
    if (race.on) race_out[r * S + s] = best;
  }
}

template <typename T>
cudaError_t launch_row_stats(const LogitsView& lv, int64_t B, int64_t N, int64_t V, int64_t S,
                             const RowTemperature& tau, const RowSkip& skip, const RaceSpec& race,
                             Partial* partial, uint64_t* race_out, cudaStream_t stream) {
  if (B * N == 0) return cudaSuccess;
  if (S > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(B * N), static_cast<unsigned>(S));
  if (rows_aligned<T>(lv)) {
    row_stats_kernel<T, Vec16<T>::N><<<grid, kThreads, 0, stream>>>(lv, N, V, S, tau, skip, race, partial, race_out);
  } else {
    row_stats_kernel<T, 1><<<grid, kThreads, 0, stream>>>(lv, N, V, S, tau, skip, race, partial, race_out);
  }
  SD_CHECK_LAUNCH();
  return cudaSuccess;
}

// The launchers' dtype dispatch (specdiff/dispatch.h): an unknown dtype is an error that says
// so (never run as float32).
template <typename F>
auto dispatch_dtype(DType dtype, F&& f) {
  return dispatch_dtype_or(dtype, f, [&] {
    note_error_where(__FILE__, __LINE__, "dispatch_dtype: unknown logits dtype");
    return decltype(f(float{}))(cudaErrorInvalidValue);
  });
}

}  // namespace cuda
}  // namespace specdiff
