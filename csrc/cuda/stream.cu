// The streaming (checkpoint-major) path on the GPU: update_cuda adds one member's rows to the state
// (ensel/_state.py layout), finalize_cuda turns the state into scores. Semantics of update_cpu /
// finalize_cpu (csrc/cpu/score_cpu.cpp).
//
// All or nothing: check_kernel validates every row of the batch and leaves the first invalid
// (members[n], n) in the failure word; the update kernels run next on the same stream and return at
// once unless the word is still kNoFailure, so an invalid batch changes nothing. The batch is read
// twice; a batch of a few thousand rows is still in L2 for the second read.
#include "cuda/device.cuh"
#include "cuda/row_pass.cuh"
#include "cuda/score_cuda.h"

namespace ensel {
namespace cuda {
namespace {

struct UpdateParams {
  StreamState state;
  const void* logits;     // [rows, K], row i is sample start + i
  int64_t sample_stride;  // elements
  int64_t start, rows;
  unsigned long long* failure;
  bool vec;       // logits rows aligned for vector chunk loads
  bool pbar_vec;  // pbar_sum rows 16-byte aligned (K % 4 == 0)
};

template <typename T>
__device__ __forceinline__ const T* row_of(const UpdateParams& p, int64_t i) {
  return static_cast<const T*>(p.logits) + i * p.sample_stride;
}

// The per-sample scalars of one member, as update_cpu does them (group leader / thread 0 only).
template <typename T>
__device__ __forceinline__ void update_scalars(const UpdateParams& p, int64_t n, const T* row, compute_t<T> m,
                                               float log_s, float entropy, int32_t a) {
  const StreamState& s = p.state;
  s.entropy_sum[n] += entropy;
  s.argmax_history[static_cast<int64_t>(s.members[n]) * s.num_samples + n] = a;
  s.members[n] += 1;
  if (s.labels != nullptr) {
    const int64_t y = s.labels[n];
    LabelState st = s.load_label_state(n);
    const float log_p = static_cast<float>(static_cast<compute_t<T>>(load_value(row + y)) - m) - log_s;
    observe_label(st, a, y, log_p);
    s.store_label_state(n, st);
  }
}

// ------------------------------------------------------------------------------------ check
// G lanes per row (as the update kernels choose it; G = 32 for long rows), each lane streaming over
// its chunks c = g, g + G, ...; RowCheck merged over the group. No shuffles inside the loops, so
// lanes may run different trip counts.
template <typename T, int G>
__global__ void __launch_bounds__(kGroupThreads) check_kernel(UpdateParams p) {
  constexpr int kRowsPerBlock = kGroupThreads / G;
  const int32_t K = static_cast<int32_t>(p.state.num_classes);
  const int lane_in_group = threadIdx.x % G;
  const int32_t num_chunks = (K + kChunk - 1) / kChunk;
  const int64_t num_tiles = (p.rows + kRowsPerBlock - 1) / kRowsPerBlock;
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int64_t i = tile * kRowsPerBlock + threadIdx.x / G;
    const bool active = i < p.rows;
    RowCheck check = RowCheck::empty();
    if (active) {
      const T* row = row_of<T>(p, i);
#pragma unroll 4
      for (int32_t c = lane_in_group; c < num_chunks; c += G) {
        compute_t<T> x[kChunk];
        load_chunk(row, c * kChunk, K, p.vec, x);
#pragma unroll
        for (int v = 0; v < kChunk; ++v) check.push(x[v], c * kChunk + v);
      }
    }
    check.first_bad = group_reduce<G>(check.first_bad, MinOp());
    check.any_finite = group_reduce<G>(check.any_finite, MaxOp());
    const Status status = check.status();
    if (active && lane_in_group == 0 && status != kOk) {
      const int64_t n = p.start + i;
      record_failure(p.failure, p.state.members[n], p.state.num_samples, n, status);
    }
  }
}

// ------------------------------------------------------------------------------------ update, K <= 1024
// The fused group kernel's row step (fused.cu) for one member: G lanes per row, the row's chunks in
// registers, pbar_sum[n] read-modify-written chunk by chunk by the lane that owns the chunk.
template <typename T, int G>
__global__ void __launch_bounds__(kGroupThreads, 2) update_group_kernel(UpdateParams p) {
  using C = compute_t<T>;
  if (*p.failure != kNoFailure) return;  // an invalid row in the batch: apply nothing (uniform)
  constexpr int kRowsPerBlock = kGroupThreads / G;
  const StreamState& s = p.state;
  const int32_t K = static_cast<int32_t>(s.num_classes);
  const int lane_in_group = threadIdx.x % G;
  const int32_t num_chunks = (K + kChunk - 1) / kChunk;
  const int lane_chunks = (num_chunks + G - 1) / G;
  const int64_t num_tiles = (p.rows + kRowsPerBlock - 1) / kRowsPerBlock;

  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int64_t i = tile * kRowsPerBlock + threadIdx.x / G;
    const bool active = i < p.rows;
    const int64_t n = p.start + i;
    const T* row = active ? row_of<T>(p, i) : nullptr;
    C x[kGroupSlots];
    load_group_row<G>(row, active, K, p.vec, lane_in_group, lane_chunks, x);
    int32_t unused_bad = 0;
    C m = lane_max<false>(x, lane_chunks, unused_bad);
    m = group_reduce<G>(m, MaxOp());  // finite for active rows: check_kernel passed them
    int32_t a;
    float sum, t;
    group_row_exponentials<G>(x, m, K, lane_in_group, lane_chunks, a, sum, t);
    if (active) {
      const float inv_s = 1.0f / sum;
      const float log_s = logf(sum);
      float* prow = s.pbar_sum + n * K;
#pragma unroll
      for (int j = 0; j < kChunksPerLane; ++j) {
        const int32_t k0 = (j * G + lane_in_group) * kChunk;
        if (j < lane_chunks && k0 < K) {
          float q[kChunk];
#pragma unroll
          for (int v = 0; v < kChunk; ++v) q[v] = static_cast<float>(x[j * kChunk + v]) * inv_s;
          add_chunk(prow, k0, K, p.pbar_vec, q);
        }
      }
      if (lane_in_group == 0) update_scalars(p, n, row, m, log_s, member_entropy(log_s, t, inv_s), a);
    }
  }
}

// ------------------------------------------------------------------------------------ update, K > 1024
// A block per row (looping over rows beyond the grid): one online pass over the row (OnlineRow per
// thread, block_reduce), then a second pass adding exp(l - m) / s into pbar_sum[n], thread i owning
// chunks i, i + kBlockThreads, ... (row_pass.cuh's block passes, shared with the fused kernel).

template <typename T>
__global__ void __launch_bounds__(kBlockThreads) update_block_kernel(UpdateParams p) {
  using C = compute_t<T>;
  __shared__ OnlineRow<C> scratch[kWarp + 1];
  if (*p.failure != kNoFailure) return;  // uniform over the grid, before any barrier
  const StreamState& s = p.state;
  const int32_t K = static_cast<int32_t>(s.num_classes);
  for (int64_t i = blockIdx.x; i < p.rows; i += gridDim.x) {
    const int64_t n = p.start + i;
    const T* row = row_of<T>(p, i);
    OnlineRow<C> online;
    RowCheck unused_check;  // check_kernel has validated the batch
    block_row_stats<false>(row, K, p.vec, online, unused_check);
    online = block_reduce(online, [](OnlineRow<C> a, const OnlineRow<C>& b) {
      a.merge(b);
      return a;
    }, OnlineRow<C>::empty(K), scratch);
    const float inv_s = 1.0f / online.s;
    const float log_s = logf(online.s);
    block_add_probabilities(row, K, p.vec, online.m, inv_s, s.pbar_sum + n * K, p.pbar_vec);
    if (threadIdx.x == 0) update_scalars(p, n, row, online.m, log_s, member_entropy(log_s, online.t, inv_s), online.a);
  }
}

// ------------------------------------------------------------------------------------ finalize
// Persistent blocks, one sample at a time: pbar's entropy and two largest entries (block_reduce),
// then the mode of the E argmaxes in argmax_history[:, n] counted in K shared-memory counters
// (a per-block workspace row when K exceeds shared memory), cleared again after each sample.
constexpr int kFinalizeThreads = 256;

template <typename Unused = void>
__global__ void __launch_bounds__(kFinalizeThreads) finalize_kernel(StreamState s, int32_t E, ScoreOutputs out,
                                                                    int32_t* counts_global) {
  extern __shared__ int32_t finalize_counts[];
  __shared__ PbarParts pbar_scratch[kWarp + 1];
  __shared__ unsigned long long vote_scratch[kWarp + 1];
  const int64_t K = s.num_classes, N = s.num_samples;
  int32_t* counts = counts_global != nullptr ? counts_global + static_cast<int64_t>(blockIdx.x) * K : finalize_counts;
  const float inv_e = 1.0f / static_cast<float>(E);
  for (int64_t k = threadIdx.x; k < K; k += kFinalizeThreads) counts[k] = 0;
  __syncthreads();
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const float* prow = s.pbar_sum + n * K;
    PbarParts parts{0.0f, TopTwo{0.0f, 0.0f}};
    for (int64_t k = threadIdx.x; k < K; k += kFinalizeThreads) {
      const float q = prow[k] * inv_e;
      parts.neg_entropy += xlogx(q);
      parts.top.push(q);
    }
    parts = block_reduce(parts, PbarPartsOp(), PbarParts{0.0f, TopTwo{0.0f, 0.0f}}, pbar_scratch);
    const int32_t* history = s.argmax_history + n;  // member e at history[e * N]
    for (int32_t e = threadIdx.x; e < E; e += kFinalizeThreads) atomicAdd(counts + history[e * N], 1);
    __syncthreads();
    unsigned long long best = 0;
    unsigned long long vote_log_sum = 0;  // sum_e L[c_e] (row.h vote_entropy_of): exact in any order
    for (int32_t e = threadIdx.x; e < E; e += kFinalizeThreads) {
      const int32_t c = history[e * N];
      const int32_t v = counts[c];
      const unsigned long long key = vote_key(v, c);
      best = key > best ? key : best;
      vote_log_sum += static_cast<unsigned long long>(out.vote_log[v]);
    }
    best = block_reduce(best, MaxOp(), 0ull, vote_scratch);
    vote_log_sum = block_reduce(vote_log_sum, SumOp(), 0ull, vote_scratch);  // ends on a barrier: counts are read
    for (int32_t e = threadIdx.x; e < E; e += kFinalizeThreads) counts[history[e * N]] = 0;
    if (threadIdx.x == 0) {
      LabelState st;
      if (s.labels != nullptr) st = s.load_label_state(n);
      write_scores(out, n, K, E, PbarSummary{parts.neg_entropy, parts.top.top1, parts.top.top2}, s.entropy_sum[n],
                   vote_key_class(best), vote_key_votes(best), static_cast<int64_t>(vote_log_sum),
                   s.labels != nullptr ? &st : nullptr);
    }
    __syncthreads();  // counters cleared before the next sample counts
  }
}

struct FinalizePlan {
  int64_t grid;
  size_t smem;
  bool counts_in_smem;
  int64_t bytes;
};

FinalizePlan plan_finalize(int64_t N, int64_t K, int device) {
  auto kernel = finalize_kernel<>;
  cudaFuncAttributes attributes;
  check_cuda(cudaFuncGetAttributes(&attributes, kernel), "cudaFuncGetAttributes(finalize_kernel)");
  const int64_t optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  FinalizePlan plan;
  plan.counts_in_smem = K * 4 + static_cast<int64_t>(attributes.sharedSizeBytes) <= optin;
  plan.smem = plan.counts_in_smem ? static_cast<size_t>(K) * 4 : 0;
  allow_shared_memory(kernel, attributes, plan.smem, optin);
  const int64_t resident = resident_blocks(kernel, kFinalizeThreads, plan.smem, device);
  plan.grid = N < resident ? N : resident;
  plan.bytes = kWorkspaceHeader + (plan.counts_in_smem ? 0 : plan.grid * K * 4);
  return plan;
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

template <typename T>
void launch_update(const UpdateParams& p, cudaStream_t stream) {
  const int G = lanes_per_row(p.state.num_classes);
  const int check_lanes = G == 0 ? 32 : G;
  const unsigned check_grid = grid_for((p.rows + kGroupThreads / check_lanes - 1) / (kGroupThreads / check_lanes));
  switch (check_lanes) {
    case 1: check_kernel<T, 1><<<check_grid, kGroupThreads, 0, stream>>>(p); break;
    case 4: check_kernel<T, 4><<<check_grid, kGroupThreads, 0, stream>>>(p); break;
    default: check_kernel<T, 32><<<check_grid, kGroupThreads, 0, stream>>>(p); break;
  }
  check_launch("check_kernel");
  if (G == 0) {
    update_block_kernel<T><<<grid_for(p.rows), kBlockThreads, 0, stream>>>(p);
    check_launch("update_block_kernel");
    return;
  }
  const unsigned grid = grid_for((p.rows + kGroupThreads / G - 1) / (kGroupThreads / G));
  switch (G) {
    case 1: update_group_kernel<T, 1><<<grid, kGroupThreads, 0, stream>>>(p); break;
    case 4: update_group_kernel<T, 4><<<grid, kGroupThreads, 0, stream>>>(p); break;
    default: update_group_kernel<T, 32><<<grid, kGroupThreads, 0, stream>>>(p); break;
  }
  check_launch("update_group_kernel");
}

}  // namespace
}  // namespace cuda

int64_t update_cuda_workspace_bytes() { return cuda::kWorkspaceHeader; }

Failure update_cuda(StreamState state, LogitsView logits, int64_t start, int64_t rows, void* workspace,
                    int64_t workspace_bytes, int device, uintptr_t stream_address) {
  using namespace cuda;
  if (rows == 0) return Failure{};
  check_workspace(workspace_bytes, kWorkspaceHeader, "update");
  use_device(device);
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_address);
  reset_failure(workspace, stream);
  UpdateParams p;
  p.state = state;
  p.logits = logits.data;
  p.sample_stride = logits.sample_stride;
  p.start = start;
  p.rows = rows;
  p.failure = static_cast<unsigned long long*>(workspace);
  p.pbar_vec = state.num_classes % kChunk == 0 && reinterpret_cast<uintptr_t>(state.pbar_sum) % 16 == 0;
  by_dtype(logits.dtype, [&](auto tag) {
    using T = decltype(tag);
    p.vec = rows_are_vector_aligned<T>(logits.data, 1, 0, rows, logits.sample_stride);
    launch_update<T>(p, stream);
    return 0;
  });
  return decode_failure(read_failure(workspace, stream, "the streaming update kernels"), state.num_samples);
}

int64_t finalize_cuda_workspace_bytes(int64_t N, int64_t K, int device) {
  using namespace cuda;
  if (N == 0) return kWorkspaceHeader;
  use_device(device);
  return plan_finalize(N, K, device).bytes;
}

void finalize_cuda(StreamState state, int32_t E, ScoreOutputs out, void* workspace, int64_t workspace_bytes, int device,
                   uintptr_t stream_address) {
  using namespace cuda;
  if (state.num_samples == 0) return;
  use_device(device);
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_address);
  const FinalizePlan plan = plan_finalize(state.num_samples, state.num_classes, device);
  check_workspace(workspace_bytes, plan.bytes, "finalize");
  int32_t* counts = plan.counts_in_smem ? nullptr : reinterpret_cast<int32_t*>(static_cast<char*>(workspace) + kWorkspaceHeader);
  finalize_kernel<><<<grid_for(plan.grid), kFinalizeThreads, plan.smem, stream>>>(state, E, out, counts);
  check_launch("finalize_kernel");
  const cudaError_t err = cudaStreamSynchronize(stream);
  if (err != cudaSuccess) throw_cuda(err, "running finalize_kernel");
}

}  // namespace ensel
