// The instruction-set levels the CPU kernels are compiled for, and the one conversion that needs
// intrinsics (IEEE half -> float with F16C).
//
// Dispatch follows PyTorch's CPU_CAPABILITY and numpy's dispatch design: the same source is
// compiled once per level (here with GCC/Clang function target attributes, so there is one
// translation unit and no per-file flags), the best level the processor reports is chosen once
// at load, and a caller may pick a lower one (ENSEL_CPU_ISA; ensel/backends/cpu.py) so the tests
// run every level the machine has against the reference. Only functions marked with a level's
// ENSEL_TARGET_* attribute contain that level's instructions; everything they call is inlined
// into them or compiled for the baseline, so no out-of-line copy of a shared template (a
// std::vector method, say) ever carries AVX-512 code into a baseline caller.
#pragma once

#include <stdint.h>

#include "ensel/common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ENSEL_CPU_X86 1
#include <immintrin.h>
#else
#define ENSEL_CPU_X86 0
#endif

namespace ensel {

// Levels in increasing order; names are what ENSEL_CPU_ISA takes.
//   baseline: the build's default target (x86-64 with SSE2; on aarch64, NEON)
//   avx2:     x86-64-v3 (AVX2, FMA, F16C, BMI2)
//   avx512:   x86-64-v4 (AVX-512 F/BW/CD/DQ/VL), 512-bit vectors preferred
enum CpuIsa : int32_t { kIsaBaseline = 0, kIsaAvx2 = 1, kIsaAvx512 = 2, kNumCpuIsas = 3 };

inline const char* cpu_isa_name(CpuIsa level) {
  switch (level) {
    case kIsaAvx2: return "avx2";
    case kIsaAvx512: return "avx512";
    default: return "baseline";
  }
}

// Whether this processor (and this build) can run a level.
inline bool cpu_isa_supported(CpuIsa level) {
  if (level == kIsaBaseline) return true;
#if ENSEL_CPU_X86
  __builtin_cpu_init();
  if (level == kIsaAvx2) return __builtin_cpu_supports("x86-64-v3");
  if (level == kIsaAvx512) return __builtin_cpu_supports("x86-64-v4");
#endif
  return false;
}

// Between rows and lanes: the small-K kernels compute with one SIMD lane per sample, on tiles
// stored [K][B] (xs[k * B + b]: class k of sample b). Transposed in 4 x 4 blocks with SSE (the
// x86-64 baseline; inlined into each level's functions, VEX-encoded there); scalar elsewhere. A
// scalar transpose costs a load, a store and loop overhead per value, the largest single cost
// of the small-K path, and the compiler's own vectorization of it uses slow scatters.

// xs[k * B + b] = rows[b][k] for b < nb, k < K.
ENSEL_HD void rows_to_lanes(const float* const* rows, int64_t nb, int64_t K, float* xs, int64_t B) {
  int64_t b = 0;
#if ENSEL_CPU_X86
  for (; b + 4 <= nb; b += 4) {
    const float *r0 = rows[b], *r1 = rows[b + 1], *r2 = rows[b + 2], *r3 = rows[b + 3];
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
      __m128 a0 = _mm_loadu_ps(r0 + k), a1 = _mm_loadu_ps(r1 + k), a2 = _mm_loadu_ps(r2 + k),
             a3 = _mm_loadu_ps(r3 + k);
      _MM_TRANSPOSE4_PS(a0, a1, a2, a3);
      _mm_storeu_ps(xs + k * B + b, a0);
      _mm_storeu_ps(xs + (k + 1) * B + b, a1);
      _mm_storeu_ps(xs + (k + 2) * B + b, a2);
      _mm_storeu_ps(xs + (k + 3) * B + b, a3);
    }
    for (; k < K; ++k) {
      xs[k * B + b] = r0[k];
      xs[k * B + b + 1] = r1[k];
      xs[k * B + b + 2] = r2[k];
      xs[k * B + b + 3] = r3[k];
    }
  }
#endif
  for (; b < nb; ++b)
    for (int64_t k = 0; k < K; ++k) xs[k * B + b] = rows[b][k];
}

// block[b * K + k] += xs[k * B + b] * scale[b] for b < nb, k < K (one multiply, one add: the
// same roundings in either path).
ENSEL_HD void lanes_to_rows_add(const float* xs, const float* scale, int64_t nb, int64_t K, int64_t B,
                                float* block) {
  int64_t b = 0;
#if ENSEL_CPU_X86
  for (; b + 4 <= nb; b += 4) {
    const __m128 s0 = _mm_set1_ps(scale[b]), s1 = _mm_set1_ps(scale[b + 1]), s2 = _mm_set1_ps(scale[b + 2]),
                 s3 = _mm_set1_ps(scale[b + 3]);
    float *r0 = block + b * K, *r1 = r0 + K, *r2 = r1 + K, *r3 = r2 + K;
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
      __m128 a0 = _mm_loadu_ps(xs + k * B + b), a1 = _mm_loadu_ps(xs + (k + 1) * B + b),
             a2 = _mm_loadu_ps(xs + (k + 2) * B + b), a3 = _mm_loadu_ps(xs + (k + 3) * B + b);
      _MM_TRANSPOSE4_PS(a0, a1, a2, a3);  // now a_i holds row b + i, classes k..k+3
      _mm_storeu_ps(r0 + k, _mm_add_ps(_mm_loadu_ps(r0 + k), _mm_mul_ps(a0, s0)));
      _mm_storeu_ps(r1 + k, _mm_add_ps(_mm_loadu_ps(r1 + k), _mm_mul_ps(a1, s1)));
      _mm_storeu_ps(r2 + k, _mm_add_ps(_mm_loadu_ps(r2 + k), _mm_mul_ps(a2, s2)));
      _mm_storeu_ps(r3 + k, _mm_add_ps(_mm_loadu_ps(r3 + k), _mm_mul_ps(a3, s3)));
    }
    for (; k < K; ++k) {
      r0[k] += xs[k * B + b] * scale[b];
      r1[k] += xs[k * B + b + 1] * scale[b + 1];
      r2[k] += xs[k * B + b + 2] * scale[b + 2];
      r3[k] += xs[k * B + b + 3] * scale[b + 3];
    }
  }
#endif
  for (; b < nb; ++b)
    for (int64_t k = 0; k < K; ++k) block[b * K + k] += xs[k * B + b] * scale[b];
}

}  // namespace ensel

#if ENSEL_CPU_X86
#define ENSEL_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#if defined(__clang__)
#define ENSEL_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#else
// GCC keeps 256-bit vectors for x86-64-v4 unless told otherwise.
#define ENSEL_TARGET_AVX512 __attribute__((target("arch=x86-64-v4,prefer-vector-width=512")))
#endif

// Half -> float, 8 at a time with F16C (exact, like to_float(Half), which the tail uses). The
// generic loop over to_float(Half) vectorizes too, but as a dozen integer instructions per value.
// One copy per level: GCC inlines a function only into callers of the same target.
#define ENSEL_DEFINE_HALF_ROW_TO_FLOAT(TARGET, NAME)                                  \
  TARGET inline void NAME(const Half* src, float* dst, int64_t K) {                  \
    int64_t k = 0;                                                                   \
    for (; k + 8 <= K; k += 8) {                                                     \
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k));  \
      _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(h));                                 \
    }                                                                                \
    for (; k < K; ++k) dst[k] = to_float(src[k]);                                    \
  }

namespace ensel {
ENSEL_DEFINE_HALF_ROW_TO_FLOAT(ENSEL_TARGET_AVX2, half_row_to_float_avx2)
ENSEL_DEFINE_HALF_ROW_TO_FLOAT(ENSEL_TARGET_AVX512, half_row_to_float_avx512)
}  // namespace ensel
#endif
