// The passes over one member's row that the fused kernels (fused.cu) and the streaming update
// kernels (stream.cu) both make, written once. Two shapes:
//
// - group rows (K <= 32 G): G lanes share a row; lane g owns chunks c = j G + g, j < kChunksPerLane,
//   so each lane holds at most kGroupSlots classes in registers. Slots past the row hold -inf: they
//   never equal a finite max, their exponential is 0, and they change no sum.
// - block rows (larger K): thread i of a block owns chunks i, i + kBlockThreads, ... and streams
//   over them kBlockUnroll at a time (the loads of one step are in flight together).
//
// The arithmetic is row.h's (shifted_logit, exp_of_shifted as in row_stats.h): per row the max m,
// the first argmax a, s = sum exp(l - m), t = sum exp(l - m) (l - m), then pbar += exp(l - m) / s.
#pragma once

#include "cuda/device.cuh"

namespace ensel {
namespace cuda {

constexpr int kChunksPerLane = kGroupSlots / kChunk;
constexpr int kBlockUnroll = 4;  // chunks each thread loads before using them (bytes in flight)

// row[k0 .. k0 + 4) += q, one float4 when the row is 16-byte aligned and the chunk whole; classes
// >= K untouched.
__device__ __forceinline__ void add_chunk(float* row, int32_t k0, int32_t K, bool vec, const float (&q)[kChunk]) {
  if (vec && k0 + kChunk <= K) {
    float4 acc = *reinterpret_cast<float4*>(row + k0);
    acc.x += q[0], acc.y += q[1], acc.z += q[2], acc.w += q[3];
    *reinterpret_cast<float4*>(row + k0) = acc;
  } else {
#pragma unroll
    for (int v = 0; v < kChunk; ++v)
      if (k0 + v < K) row[k0 + v] += q[v];
  }
}

// ------------------------------------------------------------------------------------ group rows

// The lane's chunks of `row` into x[] (all loads first: up to 8 independent vector loads in
// flight per lane); -inf where the lane is inactive or the chunk lies past the row.
template <int G, typename T>
__device__ __forceinline__ void load_group_row(const T* row, bool active, int32_t K, bool vec, int lane_in_group,
                                               int lane_chunks, compute_t<T> (&x)[kGroupSlots]) {
#pragma unroll
  for (int j = 0; j < kChunksPerLane; ++j) {
    if (j < lane_chunks) {
      const int32_t k0 = (j * G + lane_in_group) * kChunk;
      compute_t<T> chunk[kChunk];
      if (active && k0 < K)
        load_chunk(row, k0, K, vec, chunk);
      else
        fill_neg_inf(chunk);
#pragma unroll
      for (int v = 0; v < kChunk; ++v) x[j * kChunk + v] = chunk[v];
    }
  }
}

// The lane's max (not yet reduced over the group); with kFlagBad, `bad` becomes nonzero when the
// lane holds a NaN or +inf (NaN never wins the max; RowCheck names the offence).
template <bool kFlagBad, typename C>
__device__ __forceinline__ C lane_max(const C (&x)[kGroupSlots], int lane_chunks, int32_t& bad) {
  C m = static_cast<C>(-kInf);
#pragma unroll
  for (int j = 0; j < kChunksPerLane; ++j) {
    if (j < lane_chunks) {
#pragma unroll
      for (int v = 0; v < kChunk; ++v) {
        const C xv = x[j * kChunk + v];
        m = xv > m ? xv : m;
        if (kFlagBad) bad |= !(xv < static_cast<C>(kInf));
      }
    }
  }
  return m;
}

// Given the row's max m: the first argmax a, s and t, reduced over the group; the exponentials
// exp(l - m) replace the logits in x[].
template <int G, typename C>
__device__ __forceinline__ void group_row_exponentials(C (&x)[kGroupSlots], C m, int32_t K, int lane_in_group,
                                                       int lane_chunks, int32_t& a, float& s, float& t) {
  a = K;
  s = 0.0f;
  t = 0.0f;
#pragma unroll
  for (int j = 0; j < kChunksPerLane; ++j) {
    if (j < lane_chunks) {
      const int32_t k0 = (j * G + lane_in_group) * kChunk;
#pragma unroll
      for (int v = 0; v < kChunk; ++v) {
        const C xv = x[j * kChunk + v];
        a = xv == m && k0 + v < a ? k0 + v : a;
        const float d = shifted_logit(static_cast<float>(xv - m));
        const float ex = exp_of_shifted(d);
        x[j * kChunk + v] = ex;
        s += ex;
        t += ex * d;
      }
    }
  }
  a = group_reduce<G>(a, MinOp());
  s = group_reduce<G>(s, SumOp());
  t = group_reduce<G>(t, SumOp());
}

// ------------------------------------------------------------------------------------ block rows

// The thread's part of the row's online statistics (and, with kCheck, of its validity), to be
// merged over the block by the caller.
template <bool kCheck, typename T>
__device__ __forceinline__ void block_row_stats(const T* row, int32_t K, bool vec, OnlineRow<compute_t<T>>& online,
                                                RowCheck& check) {
  using C = compute_t<T>;
  const int32_t num_chunks = (K + kChunk - 1) / kChunk;
  online = OnlineRow<C>::empty(K);
  check = RowCheck::empty();
  for (int32_t c0 = threadIdx.x; c0 < num_chunks; c0 += kBlockUnroll * kBlockThreads) {
    C x[kBlockUnroll][kChunk];
#pragma unroll
    for (int u = 0; u < kBlockUnroll; ++u) {
      const int32_t c = c0 + u * kBlockThreads;
      if (c < num_chunks)
        load_chunk(row, c * kChunk, K, vec, x[u]);
      else
        fill_neg_inf(x[u]);
    }
#pragma unroll
    for (int u = 0; u < kBlockUnroll; ++u) {
      const int32_t k0 = (c0 + u * kBlockThreads) * kChunk;  // increasing k within the thread
#pragma unroll
      for (int v = 0; v < kChunk; ++v) {
        if (kCheck) check.push(x[u][v], k0 + v);
        online.push(x[u][v], k0 + v);
      }
    }
  }
}

// pbar[k] += exp(l_k - m) * inv_s over the thread's chunks (block_row_stats' ownership): the row's
// second read, from L2 (or L1) after the first.
template <typename T>
__device__ __forceinline__ void block_add_probabilities(const T* row, int32_t K, bool vec, compute_t<T> m,
                                                        float inv_s, float* pbar, bool pbar_vec) {
  using C = compute_t<T>;
  const int32_t num_chunks = (K + kChunk - 1) / kChunk;
  for (int32_t c0 = threadIdx.x; c0 < num_chunks; c0 += kBlockUnroll * kBlockThreads) {
    C x[kBlockUnroll][kChunk];
#pragma unroll
    for (int u = 0; u < kBlockUnroll; ++u) {
      const int32_t c = c0 + u * kBlockThreads;
      if (c < num_chunks) load_chunk(row, c * kChunk, K, vec, x[u]);
    }
#pragma unroll
    for (int u = 0; u < kBlockUnroll; ++u) {
      const int32_t c = c0 + u * kBlockThreads;
      if (c < num_chunks) {
        float q[kChunk];
#pragma unroll
        for (int v = 0; v < kChunk; ++v) q[v] = exp_of_shifted(shifted_logit(static_cast<float>(x[u][v] - m))) * inv_s;
        add_chunk(pbar, c * kChunk, K, pbar_vec, q);
      }
    }
  }
}

}  // namespace cuda
}  // namespace ensel
