// CUDA verify_tree: one block per batch row walks the tree.  At each depth the block reads the
// current node's row twice (max and NaN check, then the Gumbel race of verify's bonus draw at
// position = depth), and thread 0 looks up the child that carries the drawn token.  Only the
// rows on the walked path are read.  Filters arrive applied (ops.filter_logits writes -inf).
#include <cuda_runtime.h>

#include "common.cuh"

namespace specdiff {
namespace cuda {
namespace {

constexpr float kMaxScaledTree = 1e37f;  // the CPU path's kMaxScaled (row_kernels.h)

// The CPU path's safe_inv_tau: a vanishing temperature (or logits near the float range) is read
// at kMaxScaled / |max|, which keeps the law (weight 0 below the max, ties tied).
__device__ __forceinline__ float safe_inv(float raw_max, float inv_tau) {
  const float a = fabsf(raw_max);
  if (!(a > 0.0f) || !isfinite(a)) return inv_tau;
  return a * inv_tau > kMaxScaledTree ? kMaxScaledTree / a : inv_tau;
}

// The block-wide max of v, seen by every thread.
__device__ __forceinline__ uint64_t block_max_all(uint64_t v) {
  __shared__ uint64_t s_out;
  v = block_max_u64(v);
  if (threadIdx.x == 0) s_out = v;
  __syncthreads();
  const uint64_t r = s_out;
  __syncthreads();
  return r;
}

template <typename TT>
__global__ void __launch_bounds__(kThreads) tree_kernel(TreeVerifyParams p) {
  const int64_t b = blockIdx.x;
  const int64_t N = p.N, V = p.V;
  int64_t* ids = p.out_ids + b * N;
  int64_t* path = p.out_path + b * N;
  __shared__ int64_t s_next;
  auto invalid = [&] {
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) ids[i] = path[i] = -1;
    if (threadIdx.x == 0) {
      p.out_num_accepted[b] = 0;
      p.out_valid[b] = false;
    }
  };
  invalid();
  __syncthreads();
  const float tau = p.tau.at(b);
  if (!(tau >= 0.0f)) return;  // negative or NaN (unchecked calls): the row stays invalid
  const bool greedy = tau == 0.0f;
  const float inv_tau0 = greedy ? 1.0f : 1.0f / tau;
  const RowStream st = make_stream(p.seed, b, p.offset);

  int64_t node = 0;
  for (int64_t d = 0; d < N; ++d) {
    const TT* row = p.target.row<TT>(b, node);
    // Pass 1: the max (packed with its lowest index) and whether a NaN or +inf is present.
    uint64_t best = 0;
    int bad = 0;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      const float x = to_float(row[v]);
      if (sd_isnan(x) || x == INFINITY) {
        bad = 1;
      } else if (x != kNegInf) {
        const uint64_t pk = pack_argmax(x, static_cast<uint32_t>(v));
        best = pk > best ? pk : best;
      }
    }
    bad = __syncthreads_or(bad);
    best = block_max_all(best);
    if (bad || best == 0) {
      invalid();
      return;
    }
    int64_t x = static_cast<int64_t>(unpack_index(best));
    if (!greedy) {
      // Pass 2: the race of position d (tag kTagSample), keys of verify's bonus draw.
      const float inv = safe_inv(to_float(row[x]), inv_tau0);
      uint64_t win = 0;
      for (int64_t q = threadIdx.x; 4 * q < V; q += blockDim.x) {
        const Philox4 w = st.words4(static_cast<uint32_t>(d), static_cast<uint64_t>(q), kTagSample);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t v = 4 * q + e;
          if (v >= V) break;
          const float a = sd_mul(to_float(row[v]), inv);
          if (a == kNegInf) continue;
          const uint64_t pk = pack_argmax(a + gumbel_from_bits(w.x[e]), static_cast<uint32_t>(v));
          win = pk > win ? pk : win;
        }
      }
      win = block_max_all(win);
      if (win == 0) {
        invalid();
        return;
      }
      x = static_cast<int64_t>(unpack_index(win));
    }
    if (threadIdx.x == 0) {
      ids[d] = x;
      const int64_t c = tree_child(p, b, node, x);
      if (c < 0) {
        p.out_num_accepted[b] = d;
        p.out_valid[b] = true;
      } else {
        path[d] = c;
      }
      s_next = c;
    }
    __syncthreads();
    node = s_next;
    __syncthreads();
    if (node < 0) return;
  }
}

}  // namespace

int verify_tree(const TreeVerifyParams& p, void* stream, int device) {
  DeviceGuard guard(device);
  if (p.B > 0x7FFFFFFF) return static_cast<int>(cudaErrorInvalidConfiguration);
  return static_cast<int>(dispatch_dtype(p.target.dtype, [&](auto tt) {
    tree_kernel<decltype(tt)><<<static_cast<unsigned>(p.B), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
    SD_CHECK_LAUNCH();
    return cudaSuccess;
  }));
}

}  // namespace cuda
}  // namespace specdiff
