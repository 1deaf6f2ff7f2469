// Parameters and entry points of every op.  Arrays arrive as raw pointers with element strides;
// the caller (bindings.cpp) has validated shapes, dtypes, devices and id ranges.
#pragma once

#include <cstddef>
#include <string>

#include "common.h"
#include "filter.h"
#include "philox.h"

namespace specdiff {

// verify / rejection_sample (docs/ops.md).
struct VerifyParams {
  int64_t B = 0, G = 0, V = 0, Vd = 0;
  LogitsView target;       // (B, G+1, V)
  IdView draft_ids;        // (B, G)
  LogitsView draft;        // (B, G, Vd); data == nullptr: every draft is a point mass
  const uint8_t* point_mass = nullptr;  // (B, G) bool, may be null
  int64_t pm_s0 = 0, pm_s1 = 0;
  IdView vocab_map;        // (Vd,) target ids, data may be null (identity)
  const int32_t* vocab_inv = nullptr;  // (V,) drafter index of each target id or -1 (CUDA)
  RowTemperature tau, draft_tau;
  RowSeed seed;
  uint64_t offset = 0;
  const float* target_lse = nullptr;  // (B, G+1) contiguous; null: computed (verify)
  const float* draft_lse = nullptr;   // (B, G) contiguous; null: computed (verify)
  RowFilter filter;                   // top-k / top-p / min-p of the target law (CPU only;
                                      // the CUDA path is given filtered logits)
  int64_t* out_ids = nullptr;         // (B, G+1)
  int64_t* out_num_accepted = nullptr;  // (B,)
  bool* out_valid = nullptr;          // (B,)
};

// The per-row setup of verify on both devices: temperatures, whether drafts are soft, stream.
struct VerifyRow {
  float tau, inv_tau, dtau, inv_dtau;
  bool greedy, soft_drafts;
  RowStream st;
  SD_HD VerifyRow(const VerifyParams& p, int64_t b)
      : tau(p.tau.at(b)), dtau(p.draft_tau.at(b)), st(make_stream(p.seed, b, p.offset)) {
    greedy = tau == 0.0f;
    inv_tau = greedy ? 1.0f : 1.0f / tau;
    soft_drafts = p.draft.data != nullptr && dtau > 0.0f;
    inv_dtau = soft_drafts ? 1.0f / dtau : 1.0f;
  }
};

// verify_tree: a sample-and-match walk down a draft tree (docs/design.md, section 2).
struct TreeVerifyParams {
  int64_t B = 0, N = 0, V = 0;
  LogitsView target;  // (B, N, V): row i is the target's law of the token after node i
  IdView tokens;      // (B, N): node tokens (node 0, the root, is ignored)
  IdView parents;     // (B, N): -1 at the root and at unused nodes, else in [0, i)
  RowTemperature tau;
  RowSeed seed;
  uint64_t offset = 0;
  RowFilter filter;   // CPU only; the CUDA path is given filtered logits
  int64_t* out_ids = nullptr;           // (B, N)
  int64_t* out_num_accepted = nullptr;  // (B,)
  int64_t* out_path = nullptr;          // (B, N)
  bool* out_valid = nullptr;            // (B,)
};

// The child of `node` whose token is x (the lowest such index), or -1.  Children come after
// their parent, so the scan starts at node + 1.  Shared by the CPU loop and the CUDA kernel.
SD_HD int64_t tree_child(const TreeVerifyParams& p, int64_t b, int64_t node, int64_t x) {
  for (int64_t j = node + 1; j < p.N; ++j)
    if (p.parents.at(b, j) == node && p.tokens.at(b, j) == x) return j;
  return -1;
}

// gather_logprobs.
struct GatherParams {
  int64_t B = 0, N = 0, V = 0;
  LogitsView logits;  // (B, N, V)
  IdView ids;         // (B, N)
  RowTemperature tau;
  float* out_lse = nullptr;       // (B, N)
  float* out_logprobs = nullptr;  // (B, N)
};

// filter_logits: (B, N, V) -> same shape, entries the filters drop set to -inf.
struct FilterParams {
  int64_t B = 0, N = 0, V = 0;
  LogitsView logits;  // (B, N, V)
  RowTemperature tau;
  RowFilter filter;
  void* out = nullptr;  // (B, N, V) contiguous, dtype of logits
};

// apply_penalties: position n of row b has seen ids[b, 0 : lengths[b] + n].
struct PenaltyParams {
  int64_t B = 0, N = 0, V = 0, L = 0;
  LogitsView logits;  // (B, N, V)
  IdView ids;         // (B, L)
  const int64_t* lengths = nullptr;  // (B,) contiguous
  RowFloat repetition, presence, frequency;
  void* out = nullptr;  // (B, N, V) contiguous, dtype of logits
};

enum class CommitMode : int { kRandom = 0, kConfidence = 1, kLeftToRight = 2 };

// denoise_step.
struct DenoiseParams {
  int64_t B = 0, G = 0, Vd = 0;
  LogitsView logits;             // (B, G, Vd)
  IdView tokens;                 // (B, G)
  const int32_t* commit_step = nullptr;  // (B, G) with strides cs_s0, cs_s1
  int64_t cs_s0 = 0, cs_s1 = 0;
  int64_t step = 0, num_steps = 1;
  CommitMode mode = CommitMode::kRandom;
  IdView vocab_map;              // (Vd,) or null
  RowTemperature tau;
  RowSeed seed;
  uint64_t offset = 0;
  int64_t* out_tokens = nullptr;       // (B, G)
  int32_t* out_commit_step = nullptr;  // (B, G)
  float* out_lse = nullptr;            // (B, G)
  bool* out_valid = nullptr;           // (B,)
};

// Which masked positions of a block commit at this step (docs/ops.md, denoise_step): state[g]
// is 1 for a candidate (a masked position with a valid row) and becomes 3 where it commits;
// other values are left alone.  masked: the masked positions (candidates and invalid rows);
// R = num_steps - step.  The last step commits every candidate; random mode commits each with
// probability 1 / R (coin: position g, tag kTagDenoiseCommit); confidence / left_to_right
// commit the ceil(masked / R) most confident / leftmost candidates (ties: the leftmost).
// Shared by the CPU loop and the CUDA kernel.
SD_HD void select_commits(unsigned char* state, const float* conf, int64_t G, int64_t masked,
                          int64_t R, CommitMode mode, const RowStream& st) {
  if (R <= 1) {
    for (int64_t g = 0; g < G; ++g) state[g] = state[g] == 1 ? 3 : state[g];
    return;
  }
  if (mode == CommitMode::kRandom) {
    const float prob = 1.0f / static_cast<float>(R);
    for (int64_t g = 0; g < G; ++g)
      if (state[g] == 1 &&
          uniform_from_bits(st.word(static_cast<uint32_t>(g), 0, kTagDenoiseCommit)) < prob)
        state[g] = 3;
    return;
  }
  int64_t n = (masked + R - 1) / R;
  while (n-- > 0) {
    int64_t best = -1;
    for (int64_t g = 0; g < G; ++g) {
      if (state[g] != 1) continue;
      if (best < 0 || (mode == CommitMode::kConfidence && conf[g] > conf[best])) best = g;
    }
    if (best < 0) break;
    state[best] = 3;
  }
}

// out[M, N] = x[M, K] * W[N, K]^T in float32, W packed as (ceil(N / 16), K, 16) (csrc/cpu/linear.cpp).
struct LinearParams {
  const float* x = nullptr;  // (M, K), row stride x_s0, unit column stride
  int64_t x_s0 = 0;
  const float* w = nullptr;  // packed panels, contiguous
  float* out = nullptr;      // (M, N), row stride out_s0, unit column stride
  int64_t out_s0 = 0;
  int64_t M = 0, N = 0, K = 0;
  int threads = 1;
  bool use_simd = true;  // false: the portable path (the same bits, slower)
};

namespace cpu {
void linear_f32(const LinearParams& p);
bool linear_simd_available();
void verify(const VerifyParams& p);
void verify_tree(const TreeVerifyParams& p);
void gather_logprobs(const GatherParams& p);
void denoise_step(const DenoiseParams& p);
void filter_logits(const FilterParams& p);
void apply_penalties(const PenaltyParams& p);
bool has_openmp();
}  // namespace cpu

#if defined(SPECDIFF_WITH_CUDA)
namespace cuda {
// Workspace bytes verify needs for these sizes (0 when none).
size_t verify_workspace_bytes(int64_t B, int64_t G, int64_t V, int64_t Vd, int device);
size_t gather_workspace_bytes(int64_t B, int64_t N, int64_t V, int device);
size_t denoise_workspace_bytes(int64_t B, int64_t G, int64_t Vd, int device);
// Launchers: return the first CUDA error (a cudaError_t value); `device` is made current.
int verify(const VerifyParams& p, void* workspace, size_t workspace_bytes, void* stream, int device);
int verify_tree(const TreeVerifyParams& p, void* stream, int device);
int gather_logprobs(const GatherParams& p, void* workspace, size_t workspace_bytes, void* stream, int device);
int denoise_step(const DenoiseParams& p, void* workspace, size_t workspace_bytes, void* stream, int device);
size_t penalty_workspace_bytes(int64_t B, int64_t V);
int filter_logits(const FilterParams& p, void* stream, int device);
int apply_penalties(const PenaltyParams& p, void* workspace, size_t workspace_bytes, void* stream, int device);
const char* error_string(int err);
// "file:line: call" of the first CUDA call that failed in this thread since the last
// take_error_where() ("" when none); reading it clears it.
std::string take_error_where();
int device_count();
}  // namespace cuda
#endif

}  // namespace specdiff
