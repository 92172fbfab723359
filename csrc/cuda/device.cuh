// Device-side building blocks of the CUDA kernels (fused.cu, stream.cu): loads of 4-class chunks,
// warp-group and block reductions, failure keys, launch checks. The row math itself is the shared
// code of csrc/include/ensel/ (row.h) and row_stats.h.
//
// Layout used by every kernel: a row of K classes is cut into chunks of kChunk = 4 consecutive
// classes, chunk c holding classes [4c, 4c + 4) (the last one padded with -inf when K % 4 != 0).
// A cooperating set of L threads (a group of lanes, or a block) owns chunk c in thread c % L, so
// consecutive threads read consecutive chunks (coalesced). A chunk is one vector load (16 bytes for
// float32, 8 for 16-bit types, two 16-byte loads for float64) when every row base is aligned to it
// (`vec`), four scalar loads otherwise; the thread that owns a chunk owns its classes everywhere
// (pbar registers or shared memory, the state's pbar_sum row), so those need no synchronization.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <stdexcept>
#include <string>

#include "cuda/row_stats.h"
#include "ensel/state.h"

namespace ensel {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kChunk = 4;
constexpr int kWarp = 32;

// ---------------------------------------------------------------------------------------------
// Errors.

inline void throw_cuda(cudaError_t err, const char* what) {
  throw std::runtime_error(std::string("ensel (cuda): ") + what + ": " + cudaGetErrorName(err) + ": " +
                           cudaGetErrorString(err));
}

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw_cuda(err, what);
}

// After every launch: a bad configuration (or an earlier asynchronous fault) surfaces here, named.
inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw_cuda(err, (std::string("launching ") + kernel).c_str());
}

// Makes `device` current. The Python layer holds a torch.cuda.device guard for the call, so this is
// normally a no-op; it matters because this module has its own (static) CUDA runtime. It does not
// restore anything on exit: the torch guard does, and a restore from this runtime's idea of the
// previous device could switch the thread's context under torch.
inline void use_device(int device) {
  int current = -1;
  check_cuda(cudaGetDevice(&current), "cudaGetDevice");
  if (current != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
}

inline int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  check_cuda(cudaDeviceGetAttribute(&value, attr, device), "cudaDeviceGetAttribute");
  return value;
}

// Lets `kernel` launch with `dynamic_bytes` of dynamic shared memory. Without the opt-in a block
// gets 48 KB in all, its static shared memory included: a kernel with 1.4 KB of static arrays fails
// to launch with 47.5 to 48 KB of dynamic memory, so the test is on the sum, not on dynamic_bytes.
// The limit is raised to the most the kernel can ever use on this device (optin - static), never to
// this launch's size: the attribute belongs to the function, and a concurrent call (the bindings
// release the GIL) that set a smaller value between this call's set and its launch would make it fail.
template <typename Kernel>
void allow_shared_memory(Kernel kernel, const cudaFuncAttributes& attributes, size_t dynamic_bytes, int64_t optin) {
  const int64_t static_bytes = static_cast<int64_t>(attributes.sharedSizeBytes);
  if (static_cast<int64_t>(dynamic_bytes) + static_bytes > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(optin - static_bytes)),
               "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
}

// Resident blocks of `kernel` on the whole device: the grid of a persistent kernel.
template <typename Kernel>
int64_t resident_blocks(Kernel kernel, int threads, size_t smem, int device) {
  int per_sm = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem),
             "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  if (per_sm < 1) per_sm = 1;
  return static_cast<int64_t>(per_sm) * device_attribute(cudaDevAttrMultiProcessorCount, device);
}

// Grids of non-persistent kernels loop over their work beyond this many blocks.
constexpr int64_t kMaxGrid = int64_t{1} << 30;

inline unsigned grid_for(int64_t blocks) {
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > kMaxGrid ? kMaxGrid : blocks));
}

// ---------------------------------------------------------------------------------------------
// The first invalid (member, sample): one 64-bit word, kNoFailure (all ones) until a row fails;
// atomicMin keeps the least key ((member * N + sample) << 2 | status), i.e. the first in
// (member, sample) order. member * N + sample < E * N (or capacity * N), far below 2^62.

constexpr unsigned long long kNoFailure = ~0ull;

__device__ __forceinline__ void record_failure(unsigned long long* word, int64_t member, int64_t num_samples,
                                               int64_t sample, Status status) {
  const unsigned long long index = static_cast<unsigned long long>(member * num_samples + sample);
  atomicMin(word, (index << 2) | static_cast<unsigned long long>(status));
}

inline Failure decode_failure(unsigned long long word, int64_t num_samples) {
  Failure f;
  if (word == kNoFailure) return f;
  const unsigned long long index = word >> 2;
  f.status = static_cast<Status>(word & 3ull);
  f.member = static_cast<int64_t>(index / static_cast<unsigned long long>(num_samples));
  f.sample = static_cast<int64_t>(index % static_cast<unsigned long long>(num_samples));
  return f;
}

// ---------------------------------------------------------------------------------------------
// Loads. Values are converted exactly to the compute type (float, or double for float64 input).

__device__ __forceinline__ float load_value(const float* p) { return *p; }
__device__ __forceinline__ double load_value(const double* p) { return *p; }
__device__ __forceinline__ float load_value(const BFloat16* p) { return to_float(*p); }
// The hardware conversion (one instruction, exact) rather than to_float(Half)'s bit arithmetic.
__device__ __forceinline__ float half_bits_to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
__device__ __forceinline__ float load_value(const Half* p) { return half_bits_to_float(p->bits); }

__device__ __forceinline__ void load_vector(const float* p, float (&x)[kChunk]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
}
__device__ __forceinline__ void load_vector(const double* p, double (&x)[kChunk]) {
  const double2 v0 = reinterpret_cast<const double2*>(p)[0];
  const double2 v1 = reinterpret_cast<const double2*>(p)[1];
  x[0] = v0.x, x[1] = v0.y, x[2] = v1.x, x[3] = v1.y;
}
__device__ __forceinline__ void load_vector(const BFloat16* p, float (&x)[kChunk]) {
  const uint2 v = *reinterpret_cast<const uint2*>(p);  // little-endian: class 4c in the low half of v.x
  x[0] = float_from_bits(v.x << 16), x[1] = float_from_bits(v.x & 0xffff0000u);
  x[2] = float_from_bits(v.y << 16), x[3] = float_from_bits(v.y & 0xffff0000u);
}
__device__ __forceinline__ void load_vector(const Half* p, float (&x)[kChunk]) {
  const uint2 v = *reinterpret_cast<const uint2*>(p);
  x[0] = half_bits_to_float(static_cast<uint16_t>(v.x)), x[1] = half_bits_to_float(static_cast<uint16_t>(v.x >> 16));
  x[2] = half_bits_to_float(static_cast<uint16_t>(v.y)), x[3] = half_bits_to_float(static_cast<uint16_t>(v.y >> 16));
}

// Bytes a row base must be aligned to for vector loads of T chunks.
template <typename T>
constexpr int64_t vector_alignment() {
  return sizeof(T) * kChunk < 16 ? sizeof(T) * kChunk : 16;
}

// Classes [k0, k0 + 4) of `row` (k0 < K); classes >= K read as -inf. `vec`: the row base is aligned
// to vector_alignment<T>(), so a full chunk is one aligned vector (k0 is a multiple of 4).
template <typename T>
__device__ __forceinline__ void load_chunk(const T* row, int32_t k0, int32_t K, bool vec, compute_t<T> (&x)[kChunk]) {
  if (vec && k0 + kChunk <= K) {
    load_vector(row + k0, x);
  } else {
#pragma unroll
    for (int v = 0; v < kChunk; ++v)
      x[v] = k0 + v < K ? static_cast<compute_t<T>>(load_value(row + k0 + v)) : static_cast<compute_t<T>>(-kInf);
  }
}

__device__ __forceinline__ void fill_neg_inf(float (&x)[kChunk]) {
#pragma unroll
  for (int v = 0; v < kChunk; ++v) x[v] = -kInf;
}
__device__ __forceinline__ void fill_neg_inf(double (&x)[kChunk]) {
#pragma unroll
  for (int v = 0; v < kChunk; ++v) x[v] = -kInf;
}

// ---------------------------------------------------------------------------------------------
// Reductions within aligned groups of G lanes (G divides 32). Every lane of the warp must call
// them (full mask): callers keep control flow warp-uniform around them, including lanes whose
// sample lies beyond N.

template <typename V>
__device__ __forceinline__ V shfl_xor(V v, int offset) {
  return __shfl_xor_sync(kFullMask, v, offset);
}

__device__ __forceinline__ RowCheck shfl_xor(RowCheck v, int offset) {
  return RowCheck{shfl_xor(v.first_bad, offset), shfl_xor(v.any_finite, offset)};
}

template <typename C>
__device__ __forceinline__ OnlineRow<C> shfl_xor(OnlineRow<C> v, int offset) {
  return OnlineRow<C>{shfl_xor(v.m, offset), shfl_xor(v.s, offset), shfl_xor(v.t, offset), shfl_xor(v.a, offset)};
}

template <int G, typename V, typename Op>
__device__ __forceinline__ V group_reduce(V v, Op op) {
#pragma unroll
  for (int offset = G / 2; offset > 0; offset /= 2) v = op(v, shfl_xor(v, offset));
  return v;
}

struct MaxOp {
  template <typename V>
  __device__ V operator()(V a, V b) const { return b > a ? b : a; }
};
struct MinOp {
  template <typename V>
  __device__ V operator()(V a, V b) const { return b < a ? b : a; }
};
struct SumOp {
  template <typename V>
  __device__ V operator()(V a, V b) const { return a + b; }
};

// The two largest entries of pbar (equal maxima give top2 = top1, i.e. margin 0, as the CPU's
// summarize_pbar and the reference's topk do).
struct TopTwo {
  float top1, top2;

  __device__ void push(float p) {
    const bool above = p > top1;
    top2 = above ? top1 : (p > top2 ? p : top2);
    top1 = above ? p : top1;
  }
};
__device__ __forceinline__ TopTwo shfl_xor(TopTwo v, int offset) {
  return TopTwo{shfl_xor(v.top1, offset), shfl_xor(v.top2, offset)};
}
struct TopTwoOp {
  __device__ TopTwo operator()(TopTwo a, TopTwo b) const {
    const float lo = a.top1 < b.top1 ? a.top1 : b.top1;
    const float next = a.top2 > b.top2 ? a.top2 : b.top2;
    return TopTwo{a.top1 > b.top1 ? a.top1 : b.top1, lo > next ? lo : next};
  }
};

// What the scores need from pbar, summed per thread then reduced.
struct PbarParts {
  float neg_entropy;
  TopTwo top;
};
__device__ __forceinline__ PbarParts shfl_xor(PbarParts v, int offset) {
  return PbarParts{shfl_xor(v.neg_entropy, offset), shfl_xor(v.top, offset)};
}
struct PbarPartsOp {
  __device__ PbarParts operator()(PbarParts a, PbarParts b) const {
    return PbarParts{a.neg_entropy + b.neg_entropy, TopTwoOp()(a.top, b.top)};
  }
};

// A row's statistics while the threads that share it combine them.
template <typename C>
struct RowParts {
  OnlineRow<C> online;
  RowCheck check;
};
template <typename C>
__device__ __forceinline__ RowParts<C> shfl_xor(RowParts<C> v, int offset) {
  return RowParts<C>{shfl_xor(v.online, offset), shfl_xor(v.check, offset)};
}
struct RowPartsOp {
  template <typename C>
  __device__ RowParts<C> operator()(RowParts<C> a, const RowParts<C>& b) const {
    a.online.merge(b.online);
    a.check.merge(b.check);
    return a;
  }
};

// The mode as a max over keys (votes << 32 | ~class): most votes first, then the lowest class,
// which is mode_of's tie rule.
__device__ __forceinline__ unsigned long long vote_key(int32_t votes, int32_t k) {
  return (static_cast<unsigned long long>(static_cast<uint32_t>(votes)) << 32) |
         static_cast<unsigned long long>(0xffffffffu - static_cast<uint32_t>(k));
}
__device__ __forceinline__ int32_t vote_key_class(unsigned long long key) {
  return static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(key & 0xffffffffull));
}
__device__ __forceinline__ int32_t vote_key_votes(unsigned long long key) { return static_cast<int32_t>(key >> 32); }

// All-reduce over the whole block (blockDim.x a multiple of 32, at most 1024). `scratch` holds 33
// values in shared memory. Starts and ends with every thread past a barrier, so consecutive calls
// may reuse the same scratch; must be called by every thread of the block.
template <typename V, typename Op>
__device__ V block_reduce(V v, Op op, V identity, V* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  v = group_reduce<kWarp>(v, op);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    V w = lane < warps ? scratch[lane] : identity;
    w = group_reduce<kWarp>(w, op);
    if (lane == 0) scratch[kWarp] = w;
  }
  __syncthreads();
  const V result = scratch[kWarp];
  __syncthreads();
  return result;
}

// ---------------------------------------------------------------------------------------------
// Host-side planning shared by the launchers.

// Lanes that share one row in the group kernels: each lane then holds at most kGroupSlots classes
// in registers (lane count x 32 >= K). 0: the row is too long for one warp and a block takes it.
constexpr int kGroupSlots = 32;
constexpr int kGroupThreads = 256;
constexpr int kBlockThreads = 512;

inline int lanes_per_row(int64_t K) {
  if (K <= kGroupSlots) return 1;       // a lane per sample: K = 10 rows are 20-40 bytes
  if (K <= 4 * kGroupSlots) return 4;   // 8 samples per warp
  if (K <= 32 * kGroupSlots) return 32; // a warp per sample, up to 1024 classes
  return 0;
}

// Whether every row base (base + e * member_stride + n * sample_stride) is aligned for vector
// chunk loads. Strides of dimensions of size 1 are never used and may be anything.
template <typename T>
bool rows_are_vector_aligned(const void* base, int64_t members, int64_t member_stride, int64_t samples,
                             int64_t sample_stride) {
  const int64_t align = vector_alignment<T>();
  const int64_t elements = align / static_cast<int64_t>(sizeof(T));
  return reinterpret_cast<uintptr_t>(base) % align == 0 && (members <= 1 || member_stride % elements == 0) &&
         (samples <= 1 || sample_stride % elements == 0);
}

// The failure word lives at the start of every workspace; the rest is 256-byte aligned.
constexpr int64_t kWorkspaceHeader = 256;

inline int64_t round_up(int64_t bytes, int64_t to) { return (bytes + to - 1) / to * to; }

inline void check_workspace(int64_t given, int64_t needed, const char* what) {
  if (given < needed)
    throw std::invalid_argument(std::string("ensel (cuda): ") + what + ": workspace of " + std::to_string(given) +
                                " bytes, needs " + std::to_string(needed));
}

inline void reset_failure(void* workspace, cudaStream_t stream) {
  check_cuda(cudaMemsetAsync(workspace, 0xff, sizeof(unsigned long long), stream), "cudaMemsetAsync(failure word)");
}

// Waits for the stream and returns the failure word (kNoFailure when every row was valid).
inline unsigned long long read_failure(const void* workspace, cudaStream_t stream, const char* kernels) {
  unsigned long long word = kNoFailure;
  check_cuda(cudaMemcpyAsync(&word, workspace, sizeof word, cudaMemcpyDeviceToHost, stream),
             "cudaMemcpyAsync(failure word)");
  const cudaError_t err = cudaStreamSynchronize(stream);
  if (err != cudaSuccess) throw_cuda(err, (std::string("running ") + kernels).c_str());
  return word;
}

}  // namespace cuda
}  // namespace ensel
