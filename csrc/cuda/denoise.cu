// CUDA denoise_step: chunked statistics and token race of every masked position, then one block
// per batch row decides which positions commit and writes the block.
#include <cuda_runtime.h>

#include "common.cuh"

namespace specdiff {
namespace cuda {
namespace {

struct DLayout {
  int64_t S;
  size_t part, race, total;
};

DLayout dlayout(int64_t B, int64_t G, int64_t Vd, int device) {
  DLayout L;
  L.S = chunks_for(B * G, Vd, sm_count(device));
  const size_t n = static_cast<size_t>(B * G * L.S);
  L.part = 0;
  L.race = align_up(sizeof(Partial) * n, 256);
  L.total = align_up(L.race + sizeof(uint64_t) * n, 256);
  return L;
}

constexpr int kCommitThreads = 128;

__global__ void __launch_bounds__(kCommitThreads)
commit_kernel(DenoiseParams p, int64_t S, const Partial* __restrict__ part,
              const uint64_t* __restrict__ race) {
  extern __shared__ unsigned char smem[];
  const int64_t b = blockIdx.x;
  const int64_t G = p.G;
  float* conf = reinterpret_cast<float*>(smem);               // G
  int64_t* tok = reinterpret_cast<int64_t*>(conf + align_up(static_cast<size_t>(G), 2));  // G
  unsigned char* state = reinterpret_cast<unsigned char*>(tok + G);  // G: 0 done, 1 candidate, 2 bad, 3 commit
  __shared__ int any_bad;
  if (threadIdx.x == 0) any_bad = 0;
  __syncthreads();
  const float tau = p.tau.at(b);

  for (int64_t g = threadIdx.x; g < G; g += blockDim.x) {
    const int32_t cs = p.commit_step[b * p.cs_s0 + g * p.cs_s1];
    p.out_tokens[b * G + g] = p.tokens.at(b, g);
    p.out_commit_step[b * G + g] = cs;
    p.out_lse[b * G + g] = NAN;
    state[g] = 0;
    if (cs >= 0) continue;
    const int64_t r = b * G + g;
    RowStats rs = to_stats(part[r * S]);
    uint64_t best = race[r * S];
    for (int64_t s = 1; s < S; ++s) {
      rs.merge(to_stats(part[r * S + s]));
      const uint64_t o = race[r * S + s];
      best = o > best ? o : best;
    }
    if (!rs.valid() || (tau > 0.0f && best == 0)) {
      state[g] = 2;
      any_bad = 1;
      continue;
    }
    const float lse = rs.lse();
    p.out_lse[b * G + g] = lse;
    conf[g] = fast_exp(rs.m - lse);
    tok[g] = tau > 0.0f ? static_cast<int64_t>(unpack_index(best)) : rs.arg;
    state[g] = 1;
  }
  __syncthreads();

  if (threadIdx.x == 0) {
    const int64_t R = p.num_steps - p.step;
    int64_t masked = 0;
    for (int64_t g = 0; g < G; ++g) masked += state[g] != 0;
    select_commits(state, conf, G, masked, R, p.mode, make_stream(p.seed, b, p.offset));
    p.out_valid[b] = any_bad == 0;
  }
  __syncthreads();
  for (int64_t g = threadIdx.x; g < G; g += blockDim.x) {
    if (state[g] != 3) continue;
    const int64_t j = tok[g];
    if (j < 0 || j >= p.Vd) {  // no entry could win: the position stays masked, the row invalid
      p.out_valid[b] = false;
      continue;
    }
    p.out_tokens[b * G + g] = p.vocab_map.data != nullptr ? p.vocab_map.at(j) : j;
    p.out_commit_step[b * G + g] = static_cast<int32_t>(p.step);
  }
}

template <typename T>
cudaError_t launch_denoise(const DenoiseParams& p, void* ws, const DLayout& L, cudaStream_t stream) {
  char* base = static_cast<char*>(ws);
  Partial* part = reinterpret_cast<Partial*>(base + L.part);
  uint64_t* race = reinterpret_cast<uint64_t*>(base + L.race);
  RowSkip skip;
  skip.commit_step = p.commit_step;
  skip.cs_s0 = p.cs_s0;
  skip.cs_s1 = p.cs_s1;
  RaceSpec rs;
  rs.on = true;
  rs.seed = p.seed;
  rs.offset = p.offset;
  rs.tag = kTagDenoiseToken;
  SD_CUDA_CALL(launch_row_stats<T>(p.logits, p.B, p.G, p.Vd, L.S, p.tau, skip, rs, part, race, stream));
  const size_t smem = align_up(static_cast<size_t>(p.G), 2) * sizeof(float) + static_cast<size_t>(p.G) * (sizeof(int64_t) + 1);
  if (smem > 48 * 1024) return cudaErrorInvalidConfiguration;
  commit_kernel<<<static_cast<unsigned>(p.B), kCommitThreads, smem, stream>>>(p, L.S, part, race);
  SD_CHECK_LAUNCH();
  return cudaSuccess;
}

}  // namespace

size_t denoise_workspace_bytes(int64_t B, int64_t G, int64_t Vd, int device) {
  return dlayout(B, G, Vd, device).total;
}

int denoise_step(const DenoiseParams& p, void* workspace, size_t workspace_bytes, void* stream, int device) {
  DeviceGuard guard(device);
  const DLayout L = dlayout(p.B, p.G, p.Vd, device);
  if (workspace_bytes < L.total) return static_cast<int>(cudaErrorInvalidValue);
  if (p.G == 0) return static_cast<int>(cudaSuccess);
  return static_cast<int>(dispatch_dtype(p.logits.dtype, [&](auto t) {
    return launch_denoise<decltype(t)>(p, workspace, L, static_cast<cudaStream_t>(stream));
  }));
}

}  // namespace cuda
}  // namespace specdiff
