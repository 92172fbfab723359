// The fused [E, N, K] reduction on the GPU (docs/contract.md section 8): each sample is owned by a group of
// lanes (K <= 1024) or a block (larger K) that loops over the E members in stream order and keeps
// pbar and the votes on chip; only the scores are written. Per row: validity (check_row's rule),
// max / first argmax / s / t (row.h's process_row quantities), H(p_e) = log s - t / s,
// pbar += exp(l - m) / s; per sample: write_scores (row.h). Semantics are the CPU kernel's
// (csrc/cpu/score_cpu.cpp): a sample's first invalid member stops its accumulation and is reported
// through the failure word; outputs of failed calls are never used.
#include "cuda/device.cuh"
#include "cuda/row_pass.cuh"
#include "cuda/score_cuda.h"

namespace ensel {
namespace cuda {
namespace {

struct FusedParams {
  const void* logits;
  int64_t E, N;
  int32_t K;
  int64_t member_stride, sample_stride;  // elements; class stride 1
  const int64_t* labels;                 // [N] or null
  ScoreOutputs out;                      // floats [9, N], ints [3, N]; out.vote_log [E + 1]
  unsigned long long* failure;
  bool vec;  // every row base aligned for vector chunk loads
};

template <typename T>
__device__ __forceinline__ const T* row_of(const FusedParams& p, int64_t e, int64_t n) {
  return static_cast<const T*>(p.logits) + e * p.member_stride + n * p.sample_stride;
}

// ------------------------------------------------------------------------------------ group kernel
// G lanes per sample (G in {1, 4, 32}), 32 / G samples per warp, K <= 32 G. Lane g of a group owns
// chunks c = j G + g, j < kChunksPerLane, i.e. up to 32 classes whose exponentials and pbar sums stay
// in registers (x[], pbar[]); slots of chunks past the row hold -inf / 0 and change nothing (-inf
// never equals a finite max, exp gives 0, 0 log 0 = 0, 0 never exceeds a pbar entry).
// The votes are counted in shared memory, K int32 per sample (<= 32 KB per block by the choice of
// G), written only by the group's leader and read after __syncwarp; no __syncthreads anywhere, warps
// are independent. Lanes of samples >= N run the same (warp-uniform) control flow on -inf rows and
// write nothing. The row passes are row_pass.cuh's, shared with the streaming update.

template <typename T, int G>
__global__ void __launch_bounds__(kGroupThreads, 2) fused_group_kernel(FusedParams p) {
  using C = compute_t<T>;
  constexpr int kSamplesPerBlock = kGroupThreads / G;
  extern __shared__ int32_t group_votes[];

  const int32_t K = p.K;
  const int lane_in_group = threadIdx.x % G;
  const int sample_slot = threadIdx.x / G;  // groups never straddle warps: G divides 32
  int32_t* votes = group_votes + static_cast<int64_t>(sample_slot) * K;
  const int32_t num_chunks = (K + kChunk - 1) / kChunk;
  const int lane_chunks = (num_chunks + G - 1) / G;  // <= kChunksPerLane since K <= 32 G; warp-uniform
  const int64_t num_tiles = (p.N + kSamplesPerBlock - 1) / kSamplesPerBlock;
  const float inv_e = 1.0f / static_cast<float>(p.E);
  const C neg_inf = static_cast<C>(-kInf);

  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int64_t n = tile * kSamplesPerBlock + sample_slot;
    const bool active = n < p.N;
    const int64_t label = active && p.labels != nullptr ? p.labels[n] : -1;

    for (int32_t k = lane_in_group; k < K; k += G) votes[k] = 0;
    __syncwarp();

    float pbar[kGroupSlots];
#pragma unroll
    for (int i = 0; i < kGroupSlots; ++i) pbar[i] = 0.0f;
    float entropy_sum = 0.0f;
    LabelState label_state = empty_label_state();
    bool dead = !active;  // group-uniform: inactive, or a member's row was invalid

    for (int64_t e = 0; e < p.E; ++e) {
      const T* row = active ? row_of<T>(p, e, n) : nullptr;
      C x[kGroupSlots];
      load_group_row<G>(row, active, K, p.vec, lane_in_group, lane_chunks, x);
      // Max and validity.
      int32_t bad = 0;
      C m = lane_max<true>(x, lane_chunks, bad);
      m = group_reduce<G>(m, MaxOp());
      Status status = m == neg_inf ? kAllNegInf : kOk;
      if (__any_sync(kFullMask, bad)) {  // rare: the first NaN / +inf of the row decides
        RowCheck check = RowCheck::empty();
#pragma unroll
        for (int j = 0; j < kChunksPerLane; ++j) {
          if (j < lane_chunks) {
            const int32_t k0 = (j * G + lane_in_group) * kChunk;
#pragma unroll
            for (int v = 0; v < kChunk; ++v) check.push(x[j * kChunk + v], k0 + v);
          }
        }
        check.first_bad = group_reduce<G>(check.first_bad, MinOp());
        if (check.first_bad != RowCheck::kNone) status = check.status();
      }
      if (status != kOk && !dead && lane_in_group == 0) record_failure(p.failure, e, p.N, n, status);
      dead = dead || status != kOk;

      // First argmax, s, t; the exponentials replace the logits in x[].
      int32_t a;
      float s, t;
      group_row_exponentials<G>(x, m, K, lane_in_group, lane_chunks, a, s, t);
      const float inv_s = 1.0f / s;
      const float log_s = logf(s);
      entropy_sum += member_entropy(log_s, t, inv_s);
#pragma unroll
      for (int j = 0; j < kChunksPerLane; ++j) {
        if (j < lane_chunks) {
#pragma unroll
          for (int v = 0; v < kChunk; ++v) pbar[j * kChunk + v] += static_cast<float>(x[j * kChunk + v]) * inv_s;
        }
      }
      if (!dead) {  // a valid row has a finite max, so 0 <= a < K
        if (lane_in_group == 0) votes[a] += 1;
        if (label >= 0) {
          const float log_p = static_cast<float>(static_cast<C>(load_value(row + label)) - m) - log_s;
          observe_label(label_state, a, label, log_p);
        }
      }
    }
    __syncwarp();  // the leader's votes, visible to the group

    PbarParts parts{0.0f, TopTwo{0.0f, 0.0f}};
#pragma unroll
    for (int j = 0; j < kChunksPerLane; ++j) {
      if (j < lane_chunks) {
#pragma unroll
        for (int v = 0; v < kChunk; ++v) {
          const float q = pbar[j * kChunk + v] * inv_e;
          parts.neg_entropy += xlogx(q);
          parts.top.push(q);
        }
      }
    }
    parts = group_reduce<G>(parts, PbarPartsOp());
    unsigned long long best = 0;
    long long vote_log_sum = 0;  // sum_c v_c L[v_c]: an integer, so the lanes' order does not matter
    for (int32_t k = lane_in_group; k < K; k += G) {
      const int32_t v = votes[k];
      const unsigned long long key = vote_key(v, k);
      best = key > best ? key : best;
      if (v != 0) vote_log_sum += static_cast<long long>(v) * p.out.vote_log[v];
    }
    best = group_reduce<G>(best, MaxOp());
    vote_log_sum = group_reduce<G>(vote_log_sum, SumOp());
    if (!dead && lane_in_group == 0) {
      write_scores(p.out, n, K, static_cast<int32_t>(p.E), PbarSummary{parts.neg_entropy, parts.top.top1, parts.top.top2},
                   entropy_sum, vote_key_class(best), vote_key_votes(best), vote_log_sum,
                   p.labels != nullptr ? &label_state : nullptr);
    }
    __syncwarp();  // every lane has read the votes before the next tile clears them
  }
}

// ------------------------------------------------------------------------------------ block kernel
// K > 1024: a block of kBlockThreads per sample, persistent over samples (n = blockIdx.x, + gridDim.x,
// ...). pbar_sum lives in shared memory (K floats; in a per-block global workspace row when K is
// beyond the device's shared memory), thread i owning chunks i, i + kBlockThreads, ... Per member:
// one online pass over the row (OnlineRow + RowCheck per thread, block_reduce), then a second pass
// that re-reads the row (now in L2, or L1 for smaller K) and adds exp(l - m) / s to pbar. The
// members' argmaxes go to the block's workspace row (E int32); at the end pbar's memory turns into
// K vote counters (atomicAdd) and back to zeros. `dead` and everything reduced are block-uniform,
// so every __syncthreads is reached by all threads.
struct BlockWorkspace {
  int32_t* argmax;    // [gridDim.x, E]
  float* pbar_global; // [gridDim.x, K], or null when pbar is in shared memory
};

template <typename T>
__global__ void __launch_bounds__(kBlockThreads) fused_block_kernel(FusedParams p, BlockWorkspace w) {
  using C = compute_t<T>;
  extern __shared__ float4 block_pbar_storage[];  // float4: 16-byte aligned for the vector adds
  float* block_pbar = reinterpret_cast<float*>(block_pbar_storage);
  __shared__ RowParts<C> row_scratch[kWarp + 1];
  __shared__ PbarParts pbar_scratch[kWarp + 1];
  __shared__ unsigned long long vote_scratch[kWarp + 1];

  const int32_t K = p.K;
  const int32_t E = static_cast<int32_t>(p.E);
  float* pbar = w.pbar_global != nullptr ? w.pbar_global + static_cast<int64_t>(blockIdx.x) * K : block_pbar;
  int32_t* counts = reinterpret_cast<int32_t*>(pbar);  // the same K words, between samples
  int32_t* argmaxes = w.argmax + static_cast<int64_t>(blockIdx.x) * E;
  // Shared memory is 16-byte aligned; a global row is when K % 4 == 0 (the workspace is 256-aligned).
  const bool pbar_vec = w.pbar_global == nullptr || K % kChunk == 0;
  const float inv_e = 1.0f / static_cast<float>(E);
  const RowParts<C> row_identity{OnlineRow<C>::empty(K), RowCheck::empty()};

  for (int32_t k = threadIdx.x; k < K; k += kBlockThreads) pbar[k] = 0.0f;
  __syncthreads();

  for (int64_t n = blockIdx.x; n < p.N; n += gridDim.x) {
    const int64_t label = p.labels != nullptr ? p.labels[n] : -1;
    float entropy_sum = 0.0f;
    LabelState label_state = empty_label_state();
    bool dead = false;
    for (int32_t e = 0; e < E && !dead; ++e) {
      const T* row = row_of<T>(p, e, n);
      RowParts<C> parts;
      block_row_stats<true>(row, K, p.vec, parts.online, parts.check);
      parts = block_reduce(parts, RowPartsOp(), row_identity, row_scratch);
      const Status status = parts.check.status();
      if (status != kOk) {
        if (threadIdx.x == 0) record_failure(p.failure, e, p.N, n, status);
        dead = true;
        break;
      }
      const OnlineRow<C>& r = parts.online;
      const float inv_s = 1.0f / r.s;
      const float log_s = logf(r.s);
      block_add_probabilities(row, K, p.vec, r.m, inv_s, pbar, pbar_vec);
      if (threadIdx.x == 0) {
        entropy_sum += member_entropy(log_s, r.t, inv_s);
        argmaxes[e] = r.a;
        if (label >= 0) {
          const float log_p = static_cast<float>(static_cast<C>(load_value(row + label)) - r.m) - log_s;
          observe_label(label_state, r.a, label, log_p);
        }
      }
    }
    // Below, pbar is indexed by k-stride rather than by chunk ownership: wait for every thread's adds.
    __syncthreads();
    if (dead) {  // this sample is not scored: clear pbar for the next one
      for (int32_t k = threadIdx.x; k < K; k += kBlockThreads) pbar[k] = 0.0f;
      __syncthreads();
      continue;
    }
    PbarParts parts{0.0f, TopTwo{0.0f, 0.0f}};
    for (int32_t k = threadIdx.x; k < K; k += kBlockThreads) {
      const float q = pbar[k] * inv_e;
      parts.neg_entropy += xlogx(q);
      parts.top.push(q);
    }
    parts = block_reduce(parts, PbarPartsOp(), PbarParts{0.0f, TopTwo{0.0f, 0.0f}}, pbar_scratch);
    // block_reduce ended on a barrier: pbar is read; it becomes the vote counters.
    for (int32_t k = threadIdx.x; k < K; k += kBlockThreads) counts[k] = 0;
    __syncthreads();  // zeros, and thread 0's argmaxes[] (global), visible to the block
    for (int32_t e = threadIdx.x; e < E; e += kBlockThreads) atomicAdd(counts + argmaxes[e], 1);
    __syncthreads();
    unsigned long long best = 0;
    unsigned long long vote_log_sum = 0;  // sum_e L[c_e] (row.h vote_entropy_of): exact in any order
    for (int32_t e = threadIdx.x; e < E; e += kBlockThreads) {
      const int32_t c = argmaxes[e];
      const int32_t v = counts[c];
      const unsigned long long key = vote_key(v, c);
      best = key > best ? key : best;
      vote_log_sum += static_cast<unsigned long long>(p.out.vote_log[v]);
    }
    best = block_reduce(best, MaxOp(), 0ull, vote_scratch);
    vote_log_sum = block_reduce(vote_log_sum, SumOp(), 0ull, vote_scratch);  // ends on a barrier: counts are read
    for (int32_t e = threadIdx.x; e < E; e += kBlockThreads) counts[argmaxes[e]] = 0;  // pbar = 0 again
    if (threadIdx.x == 0) {
      write_scores(p.out, n, K, E, PbarSummary{parts.neg_entropy, parts.top.top1, parts.top.top2}, entropy_sum,
                   vote_key_class(best), vote_key_votes(best), static_cast<int64_t>(vote_log_sum),
                   p.labels != nullptr ? &label_state : nullptr);
    }
    __syncthreads();  // counters cleared before the next sample adds probabilities
  }
}

// ------------------------------------------------------------------------------------ launch

struct BlockPlan {
  int64_t grid;
  size_t smem;       // dynamic shared memory: K floats, or 0 with pbar in the workspace
  bool pbar_in_smem;
  int64_t bytes;     // workspace
};

template <typename T>
BlockPlan plan_block(int64_t E, int64_t N, int64_t K, int device) {
  auto kernel = fused_block_kernel<T>;
  cudaFuncAttributes attributes;
  check_cuda(cudaFuncGetAttributes(&attributes, kernel), "cudaFuncGetAttributes(fused_block_kernel)");
  const int64_t optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  BlockPlan plan;
  plan.pbar_in_smem = K * 4 + static_cast<int64_t>(attributes.sharedSizeBytes) <= optin;
  plan.smem = plan.pbar_in_smem ? static_cast<size_t>(K) * 4 : 0;
  allow_shared_memory(kernel, attributes, plan.smem, optin);
  const int64_t resident = resident_blocks(kernel, kBlockThreads, plan.smem, device);
  plan.grid = N < resident ? N : resident;
  plan.bytes = kWorkspaceHeader + round_up(plan.grid * E * 4, 256) + (plan.pbar_in_smem ? 0 : plan.grid * K * 4);
  return plan;
}

template <typename T>
void launch_fused(const FusedParams& p, char* workspace, int64_t workspace_bytes, int device, cudaStream_t stream) {
  const int G = lanes_per_row(p.K);
  if (G == 0) {
    const BlockPlan plan = plan_block<T>(p.E, p.N, p.K, device);
    check_workspace(workspace_bytes, plan.bytes, "fused");
    BlockWorkspace w;
    w.argmax = reinterpret_cast<int32_t*>(workspace + kWorkspaceHeader);
    w.pbar_global = plan.pbar_in_smem
                        ? nullptr
                        : reinterpret_cast<float*>(workspace + kWorkspaceHeader + round_up(plan.grid * p.E * 4, 256));
    fused_block_kernel<T><<<grid_for(plan.grid), kBlockThreads, plan.smem, stream>>>(p, w);
    check_launch("fused_block_kernel");
    return;
  }
  const int64_t samples_per_block = kGroupThreads / G;
  const size_t smem = static_cast<size_t>(samples_per_block) * p.K * 4;  // <= 32 KB
  const unsigned grid = grid_for((p.N + samples_per_block - 1) / samples_per_block);
  switch (G) {
    case 1: fused_group_kernel<T, 1><<<grid, kGroupThreads, smem, stream>>>(p); break;
    case 4: fused_group_kernel<T, 4><<<grid, kGroupThreads, smem, stream>>>(p); break;
    default: fused_group_kernel<T, 32><<<grid, kGroupThreads, smem, stream>>>(p); break;
  }
  check_launch("fused_group_kernel");
}

template <typename F>
auto by_dtype(DType dtype, F f) {
  switch (dtype) {
    case kFloat16: return f(Half{});
    case kBFloat16: return f(BFloat16{});
    case kFloat64: return f(double{});
    default: return f(float{});
  }
}

}  // namespace
}  // namespace cuda

int64_t fused_cuda_workspace_bytes(DType dtype, int64_t E, int64_t N, int64_t K, int device) {
  using namespace cuda;
  if (N == 0 || lanes_per_row(K) != 0) return kWorkspaceHeader;
  use_device(device);
  return by_dtype(dtype, [&](auto tag) { return plan_block<decltype(tag)>(E, N, K, device).bytes; });
}

Failure fused_cuda(LogitsView logits, int64_t E, int64_t N, int64_t K, const int64_t* labels, ScoreOutputs out,
                   void* workspace, int64_t workspace_bytes, int device, uintptr_t stream_address) {
  using namespace cuda;
  if (N == 0) return Failure{};
  check_workspace(workspace_bytes, kWorkspaceHeader, "fused");
  use_device(device);
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_address);
  reset_failure(workspace, stream);
  FusedParams p;
  p.logits = logits.data;
  p.E = E;
  p.N = N;
  p.K = static_cast<int32_t>(K);
  p.member_stride = logits.member_stride;
  p.sample_stride = logits.sample_stride;
  p.labels = labels;
  p.out = out;
  p.failure = static_cast<unsigned long long*>(workspace);
  by_dtype(logits.dtype, [&](auto tag) {
    using T = decltype(tag);
    p.vec = rows_are_vector_aligned<T>(logits.data, E, logits.member_stride, N, logits.sample_stride);
    launch_fused<T>(p, static_cast<char*>(workspace), workspace_bytes, device, stream);
    return 0;
  });
  return decode_failure(read_failure(workspace, stream, "the fused kernel"), N);
}

}  // namespace ensel
