// CUDA gather_logprobs: chunked row statistics, then one thread per row combines the chunks.
#include <cuda_runtime.h>

#include "common.cuh"

namespace specdiff {
namespace cuda {
namespace {

int64_t gather_chunks(int64_t B, int64_t N, int64_t V, int device) {
  return chunks_for(B * N, V, sm_count(device));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
gather_finalize_kernel(GatherParams p, int64_t S, const Partial* __restrict__ part) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= p.B * p.N) return;
  const int64_t b = r / p.N, n = r % p.N;
  RowStats rs = to_stats(part[r * S]);
  for (int64_t s = 1; s < S; ++s) rs.merge(to_stats(part[r * S + s]));
  const float tau = p.tau.at(b);
  const int64_t id = p.ids.at(b, n);
  const T* row = p.logits.row<T>(b, n);
  const float logit = id >= 0 && id < p.V ? to_float(row[id]) : 0.0f;
  const float raw_max = rs.arg >= 0 && rs.arg < p.V ? to_float(row[rs.arg]) : 0.0f;
  // CUDA reads every row at 1 / tau (no rescue of overflowing scaled maxima yet: docs/ops.md)
  const float inv = tau == 0.0f ? 1.0f : 1.0f / tau;
  gather_finish(rs, tau, inv, raw_max, id, p.V, logit, &p.out_lse[r], &p.out_logprobs[r]);
}

template <typename T>
cudaError_t launch_gather(const GatherParams& p, Partial* part, int64_t S, cudaStream_t stream) {
  SD_CUDA_CALL(launch_row_stats<T>(p.logits, p.B, p.N, p.V, S, p.tau, RowSkip{}, RaceSpec{}, part, nullptr, stream));
  const int64_t rows = p.B * p.N;
  gather_finalize_kernel<T><<<static_cast<unsigned>(ceil_div(rows, kThreads)), kThreads, 0, stream>>>(p, S, part);
  SD_CHECK_LAUNCH();
  return cudaSuccess;
}

}  // namespace

size_t gather_workspace_bytes(int64_t B, int64_t N, int64_t V, int device) {
  return sizeof(Partial) * static_cast<size_t>(B * N * gather_chunks(B, N, V, device));
}

int gather_logprobs(const GatherParams& p, void* workspace, size_t workspace_bytes, void* stream, int device) {
  DeviceGuard guard(device);
  const int64_t S = gather_chunks(p.B, p.N, p.V, device);
  if (workspace_bytes < gather_workspace_bytes(p.B, p.N, p.V, device)) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(dispatch_dtype(p.logits.dtype, [&](auto t) {
    return launch_gather<decltype(t)>(p, static_cast<Partial*>(workspace), S, static_cast<cudaStream_t>(stream));
  }));
}

}  // namespace cuda
}  // namespace specdiff
