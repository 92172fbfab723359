// Portability macros, status codes and dtype loads shared by the CPU and CUDA kernels.
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define ENSEL_HD __host__ __device__ __forceinline__
#else
#define ENSEL_HD inline __attribute__((always_inline))
#endif

// `omp simd` lets the host compiler vectorize max/sum reductions without -ffast-math
// (which would also license it to drop the NaN/inf checks the contract needs).
#if defined(__CUDA_ARCH__)
#define ENSEL_SIMD(...)
#else
#define ENSEL_DO_PRAGMA(x) _Pragma(#x)
#define ENSEL_SIMD(...) ENSEL_DO_PRAGMA(omp simd __VA_ARGS__)
#endif

namespace ensel {

// Must match ensel/_dtypes.py.
enum DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Must match ensel/_errors.py. Ordered by the contract's wording, not by severity.
enum Status : int32_t { kOk = 0, kNaN = 1, kPosInf = 2, kAllNegInf = 3 };

// Bit patterns of the 16-bit formats; the loads below are exact.
struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

ENSEL_HD float float_from_bits(uint32_t w) {
  float f;
  memcpy(&f, &w, sizeof f);
  return f;
}

ENSEL_HD uint32_t bits_from_float(float f) {
  uint32_t w;
  memcpy(&w, &f, sizeof w);
  return w;
}

ENSEL_HD float to_float(float x) { return x; }
ENSEL_HD float to_float(double x) { return static_cast<float>(x); }
ENSEL_HD float to_float(BFloat16 x) { return float_from_bits(static_cast<uint32_t>(x.bits) << 16); }

// IEEE half -> float without branches, so it vectorizes (M. Maratyszcza's FP16 library,
// fp16_ieee_to_fp32_value): normals are rebiased by a multiply, subnormals are built with a
// magic-number subtraction, inf and NaN fall out of the normal path unchanged.
ENSEL_HD float to_float(Half x) {
  const uint32_t w = static_cast<uint32_t>(x.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  const float exp_scale = 0x1.0p-112f;
  const float normalized = float_from_bits((two_w >> 4) + exp_offset) * exp_scale;
  const uint32_t magic_mask = 126u << 23;
  const float magic_bias = 0.5f;
  const float denormalized = float_from_bits((two_w >> 17) | magic_mask) - magic_bias;
  const uint32_t denormalized_cutoff = 1u << 27;
  const uint32_t result =
      sign | (two_w < denormalized_cutoff ? bits_from_float(denormalized) : bits_from_float(normalized));
  return float_from_bits(result);
}

// Comparisons (max, argmax, validity) run in the input's own precision: float64 logits that differ
// only beyond float32's precision or range keep their order. Everything after l - m is float32.
template <typename T>
struct ComputeType {
  using type = float;
};
template <>
struct ComputeType<double> {
  using type = double;
};
template <typename T>
using compute_t = typename ComputeType<T>::type;

template <typename T>
ENSEL_HD compute_t<T> to_compute(T x) {
  return to_float(x);
}
template <>
ENSEL_HD double to_compute<double>(double x) {
  return x;
}

}  // namespace ensel
