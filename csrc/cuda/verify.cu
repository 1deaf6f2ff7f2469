// CUDA verify / rejection_sample: three launches.
//   1. row_stats_kernel: every needed target row (and soft draft row) is normalised in one
//      pass, small batches split the vocabulary across blocks;
//   2. chain_kernel: one warp per batch row evaluates all acceptance tests in parallel and
//      finds the first rejection with a ballot;
//   3. sample_kernel: the one position per row that needs it (residual or bonus) is raced over
//      the vocabulary, split across blocks; the last block of a row writes the token.
#include <cuda_runtime.h>

#include "common.cuh"

namespace specdiff {
namespace cuda {
namespace {

enum JobMode : int32_t { kNone = 0, kBonus = 1, kPointResidual = 2, kSoftResidual = 3 };

struct __align__(16) Job {
  int64_t x;     // draft id at the rejected position
  float lse_p;   // target log-sum-exp at position k
  float lse_q;   // draft log-sum-exp at position k (soft residual)
  int32_t k;
  int32_t mode;
  int32_t pad0, pad1;
};

struct Layout {
  int64_t St, Sd, S2;
  size_t pt, pd, jobs, slots, counters, total;
};

Layout layout(int64_t B, int64_t G, int64_t V, int64_t Vd, int device) {
  const int sms = sm_count(device);
  Layout L;
  const int64_t rows = B * (G + 1) + B * G;
  L.St = chunks_for(rows, V, sms);
  L.Sd = chunks_for(rows, Vd, sms);
  L.S2 = chunks_for(B, V, sms, 1024);
  size_t o = 0;
  L.pt = o;
  o = align_up(o + sizeof(Partial) * static_cast<size_t>(B * (G + 1) * L.St), 256);
  L.pd = o;
  o = align_up(o + sizeof(Partial) * static_cast<size_t>(B * G * L.Sd), 256);
  L.jobs = o;
  o = align_up(o + sizeof(Job) * static_cast<size_t>(B), 256);
  L.slots = o;
  o = align_up(o + sizeof(uint64_t) * 2 * static_cast<size_t>(B), 256);
  L.counters = o;
  o = align_up(o + sizeof(uint32_t) * static_cast<size_t>(B), 256);
  L.total = o;
  return L;
}

__device__ __forceinline__ RowStats combine(const Partial* p, int64_t S) {
  RowStats r = to_stats(p[0]);
  for (int64_t s = 1; s < S; ++s) r.merge(to_stats(p[s]));
  return r;
}

template <typename TT, typename TD>
__global__ void __launch_bounds__(32)
chain_kernel(VerifyParams p, int64_t St, int64_t Sd, const Partial* __restrict__ pt,
             const Partial* __restrict__ pd, Job* __restrict__ jobs, uint64_t* __restrict__ slots,
             uint32_t* __restrict__ counters) {
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x;
  const int64_t G = p.G, V = p.V;
  int64_t* out = p.out_ids + b * (G + 1);
  for (int64_t i = lane; i <= G; i += 32) out[i] = -1;

  const VerifyRow row(p, b);
  const float tau = row.tau, dtau = row.dtau, inv_tau = row.inv_tau, inv_dtau = row.inv_dtau;
  const bool greedy = row.greedy, soft_drafts = row.soft_drafts;
  const RowStream& st = row.st;
  if (!(tau >= 0.0f) || !(dtau >= 0.0f)) {  // negative or NaN temperature: the row is invalid
    if (lane == 0) {
      p.out_num_accepted[b] = 0;
      p.out_valid[b] = false;
      Job job{};
      job.mode = kNone;
      jobs[b] = job;
    }
    return;
  }

  for (int64_t i0 = 0; i0 <= G; i0 += 32) {
    const int64_t i = i0 + lane;
    bool stop = false, bad = false, soft = false;
    int64_t x = -1, arg = -1;
    float lse_p = 0.0f, lse_q = 0.0f;
    if (i <= G) {
      if (p.target_lse != nullptr && !greedy) {
        lse_p = p.target_lse[b * (G + 1) + i];
        bad = !isfinite(lse_p);
      } else {
        const RowStats rs = combine(pt + (b * (G + 1) + i) * St, St);
        bad = !rs.valid();
        lse_p = rs.lse();
        arg = rs.arg;
      }
      stop = bad || i == G;
      if (!stop) {
        x = p.draft_ids.at(b, i);
        if (x < 0 || x >= V) {
          stop = bad = true;
        } else if (greedy) {
          stop = x != arg;
        } else {
          soft = soft_drafts && !(p.point_mass != nullptr && p.point_mass[b * p.pm_s0 + i * p.pm_s1]);
          float qx = 1.0f;
          if (soft) {
            if (p.draft_lse != nullptr) {
              lse_q = p.draft_lse[b * G + i];
              bad = !isfinite(lse_q);
            } else {
              const RowStats rq = combine(pd + (b * G + i) * Sd, Sd);
              bad = !rq.valid();
              lse_q = rq.lse();
            }
            if (!bad) {
              const int64_t j = p.vocab_inv != nullptr ? p.vocab_inv[x] : x;
              qx = (j >= 0 && j < p.Vd) ? fast_exp(sd_mul(to_float(p.draft.row<TD>(b, i)[j]), inv_dtau) - lse_q) : 0.0f;
            }
          }
          if (bad) {
            stop = true;
          } else {
            const float px = fast_exp(sd_mul(to_float(p.target.row<TT>(b, i)[x]), inv_tau) - lse_p);
            const float u = uniform_from_bits(st.word(static_cast<uint32_t>(i), 0, kTagAccept));
            stop = !accept_draft(u, qx, px);
          }
        }
      }
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, stop);
    if (ballot == 0) continue;
    const int src = __ffs(ballot) - 1;
    const int64_t k = i0 + src;
    const bool row_bad = __shfl_sync(0xffffffffu, static_cast<int>(bad), src) != 0;
    if (!row_bad) {
      for (int64_t t = lane; t < k; t += 32) out[t] = p.draft_ids.at(b, t);
    }
    if (lane == src) {
      Job job{};
      job.k = static_cast<int32_t>(k);
      job.mode = kNone;
      if (row_bad) {
        p.out_num_accepted[b] = 0;
        p.out_valid[b] = false;
      } else {
        p.out_num_accepted[b] = k;
        p.out_valid[b] = true;
        if (greedy) {
          out[k] = arg;
        } else {
          job.x = x;
          job.lse_p = lse_p;
          job.lse_q = lse_q;
          job.mode = k == G ? kBonus : (soft ? kSoftResidual : kPointResidual);
        }
      }
      jobs[b] = job;
      slots[2 * b] = 0;
      slots[2 * b + 1] = 0;
      counters[b] = 0;
    }
    return;
  }
}

template <typename TT, typename TD>
__global__ void __launch_bounds__(kThreads)
sample_kernel(VerifyParams p, int64_t S2, const Job* __restrict__ jobs,
              unsigned long long* __restrict__ slots, uint32_t* __restrict__ counters) {
  const int64_t b = blockIdx.x;
  const Job job = jobs[b];
  if (job.mode == kNone) return;
  const int64_t V = p.V, G = p.G;
  const int64_t k = job.k;
  const float tau = p.tau.at(b);
  const float inv_tau = 1.0f / tau;
  const float dtau = p.draft_tau.at(b);
  const float inv_dtau = dtau > 0.0f ? 1.0f / dtau : 1.0f;
  const RowStream st = make_stream(p.seed, b, p.offset);
  const TT* row = p.target.row<TT>(b, k);
  const TD* drow = job.mode == kSoftResidual ? p.draft.row<TD>(b, k) : nullptr;
  const int64_t chunk = chunk_len(V, S2);
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t c1 = c0 + chunk < V ? c0 + chunk : V;

  uint64_t best = 0, fb = 0;
  for (int64_t q = c0 / 4 + threadIdx.x; 4 * q < c1; q += blockDim.x) {
    const Philox4 w = st.words4(static_cast<uint32_t>(k), static_cast<uint64_t>(q), kTagSample);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t v = 4 * q + e;
      if (v >= c1) break;
      const float a = sd_mul(to_float(row[v]), inv_tau);
      if (a == kNegInf) continue;
      const float g = gumbel_from_bits(w.x[e]);
      const uint64_t pf = pack_argmax(a + g, static_cast<uint32_t>(v));
      fb = pf > fb ? pf : fb;
      if (job.mode == kSoftResidual) {
        const int64_t j = p.vocab_inv != nullptr ? p.vocab_inv[v] : v;
        const float qv = (j >= 0 && j < p.Vd) ? fast_exp(sd_mul(to_float(drow[j]), inv_dtau) - job.lse_q) : 0.0f;
        const float r = fast_exp(a - job.lse_p) - qv;
        if (r >= kFltMin) {
          const uint64_t pk = pack_argmax(fast_log(r) + g, static_cast<uint32_t>(v));
          best = pk > best ? pk : best;
        }
      } else if (job.mode == kBonus || v != job.x) {
        best = pf > best ? pf : best;
      }
    }
  }
  best = block_max_u64(best);
  fb = block_max_u64(fb);
  if (threadIdx.x == 0) {
    if (best) atomicMax(&slots[2 * b], static_cast<unsigned long long>(best));
    if (fb) atomicMax(&slots[2 * b + 1], static_cast<unsigned long long>(fb));
    __threadfence();
    const uint32_t done = atomicAdd(&counters[b], 1u);
    if (done + 1 == static_cast<uint32_t>(S2)) {
      __threadfence();
      const unsigned long long sel0 = atomicAdd(&slots[2 * b], 0ull);
      const unsigned long long sel1 = atomicAdd(&slots[2 * b + 1], 0ull);
      const unsigned long long sel = sel0 ? sel0 : sel1;
      int64_t* out = p.out_ids + b * (G + 1);
      if (sel == 0) {  // no entry can be drawn: the row is invalid
        for (int64_t i = 0; i <= G; ++i) out[i] = -1;
        p.out_num_accepted[b] = 0;
        p.out_valid[b] = false;
      } else {
        out[k] = static_cast<int64_t>(unpack_index(sel));
      }
    }
  }
}

template <typename TT, typename TD>
cudaError_t launch_verify(const VerifyParams& p, void* ws, const Layout& L, cudaStream_t stream) {
  char* base = static_cast<char*>(ws);
  Partial* pt = reinterpret_cast<Partial*>(base + L.pt);
  Partial* pd = reinterpret_cast<Partial*>(base + L.pd);
  Job* jobs = reinterpret_cast<Job*>(base + L.jobs);
  auto* slots = reinterpret_cast<unsigned long long*>(base + L.slots);
  auto* counters = reinterpret_cast<uint32_t*>(base + L.counters);

  // 1. Row statistics: target rows (skipped for sampled rows when the caller gave lse).
  RowSkip tskip;
  tskip.skip_if_tau_pos = p.target_lse != nullptr;
  // With the caller's lse and one positive temperature, no target row needs a pass.
  const bool no_target_pass = p.target_lse != nullptr && p.tau.data == nullptr && p.tau.at(0) > 0.0f;
  if (!no_target_pass)
    SD_CUDA_CALL(launch_row_stats<TT>(p.target, p.B, p.G + 1, p.V, L.St, p.tau, tskip, RaceSpec{}, pt, nullptr, stream));
  const bool no_soft = p.draft_tau.data == nullptr && p.draft_tau.at(0) == 0.0f;
  if (p.draft.data != nullptr && p.draft_lse == nullptr && p.G > 0 && !no_soft) {
    RowSkip dskip;
    dskip.point_mass = p.point_mass;
    dskip.pm_s0 = p.pm_s0;
    dskip.pm_s1 = p.pm_s1;
    dskip.skip_if_tau_zero = true;  // draft temperature 0: point masses
    SD_CUDA_CALL(launch_row_stats<TD>(p.draft, p.B, p.G, p.Vd, L.Sd, p.draft_tau, dskip, RaceSpec{}, pd, nullptr, stream));
  }
  // 2. Chain.
  chain_kernel<TT, TD><<<static_cast<unsigned>(p.B), 32, 0, stream>>>(
      p, L.St, L.Sd, pt, pd, jobs, reinterpret_cast<uint64_t*>(slots), counters);
  SD_CHECK_LAUNCH();
  // 3. Correction / bonus draws.
  const dim3 grid(static_cast<unsigned>(p.B), static_cast<unsigned>(L.S2));
  sample_kernel<TT, TD><<<grid, kThreads, 0, stream>>>(p, L.S2, jobs, slots, counters);
  SD_CHECK_LAUNCH();
  return cudaSuccess;
}

}  // namespace

size_t verify_workspace_bytes(int64_t B, int64_t G, int64_t V, int64_t Vd, int device) {
  return layout(B, G, V, Vd, device).total;
}

int verify(const VerifyParams& p, void* workspace, size_t workspace_bytes, void* stream, int device) {
  DeviceGuard guard(device);
  const Layout L = layout(p.B, p.G, p.V, p.Vd, device);
  if (workspace_bytes < L.total) return static_cast<int>(cudaErrorInvalidValue);
  if (L.S2 > 65535 || p.B > 0x7FFFFFFF) return static_cast<int>(cudaErrorInvalidConfiguration);
  const DType ddt = p.draft.data != nullptr ? p.draft.dtype : p.target.dtype;
  return static_cast<int>(dispatch_dtype(p.target.dtype, [&](auto tt) {
    return dispatch_dtype(ddt, [&](auto td) {
      return launch_verify<decltype(tt), decltype(td)>(p, workspace, L, static_cast<cudaStream_t>(stream));
    });
  }));
}

}  // namespace cuda
}  // namespace specdiff
