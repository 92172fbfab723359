// Branch-free exp and log for the hot loops: written so the host compiler vectorizes them
// (glibc's expf/logf are scalar calls without -ffast-math) and the device compiles them as is.
#pragma once

#include "ensel/common.h"

namespace ensel {

constexpr float kInf = __builtin_inff();

// exp(x) for x <= 0 (every caller passes a logit minus its row's maximum, floored by
// shifted_logit), with results below FLT_MIN flushed to exactly 0 (so exp(-inf) = 0).
// Cephes expf: x = n ln2 + r with |r| <= ln2/2, exp(r) by a degree-7 polynomial (about 1 ulp),
// 2^n assembled in the exponent bits. Rounding to nearest uses the 1.5 * 2^23 shifter. No upper
// clamp: x <= 0 keeps 2^n normal, and one select less matters in the hot loop.
ENSEL_HD float exp_approx(float x) {
  const float kUnderflow = -87.33654f;  // ln(FLT_MIN)
  const float xc = x < kUnderflow ? kUnderflow : x;
  const float shifter = 12582912.0f;
  const float n = (xc * 1.44269504088896341f + shifter) - shifter;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const float scale = float_from_bits(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  return x < kUnderflow ? 0.0f : y * scale;
}

// log(x) for normal x > 0 (Cephes logf): x = m 2^e with m in [sqrt(1/2), sqrt(2)),
// log(m) = (m-1) - (m-1)^2/2 + (m-1)^3 P(m-1).
ENSEL_HD float log_approx(float x) {
  const uint32_t w = bits_from_float(x);
  int32_t e = static_cast<int32_t>((w >> 23) & 0xffu) - 126;
  float m = float_from_bits((w & 0x007fffffu) | 0x3f000000u);  // in [0.5, 1)
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1 : e;
  m = low ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += fe * -2.12194440e-4f;
  y += -0.5f * z;
  return m + y + fe * 0.693359375f;
}

// 2^-e for the exponent e of x > 0 (x = f 2^e, f in [1, 2)), so that x 2^-e is in [1, 2) and
// every y <= x scales exactly (a power of two). Subnormal x count as the smallest normal's
// exponent (x 2^-e then >= 2^-23 for float), and e is capped at the largest exponent whose
// inverse is normal: x 2^-e stays normal and finite for every finite x > 0.
ENSEL_HD float pow2_inverse(float x) {
  int32_t e = static_cast<int32_t>((bits_from_float(x) >> 23) & 0xffu);  // biased: 1..254 for normals
  e = e < 1 ? 1 : (e > 253 ? 253 : e);
  return float_from_bits(static_cast<uint32_t>(254 - e) << 23);
}
ENSEL_HD double pow2_inverse(double x) {
  uint64_t w;
  memcpy(&w, &x, sizeof w);
  int64_t e = static_cast<int64_t>((w >> 52) & 0x7ffu);  // biased: 1..2046 for normals
  e = e < 1 ? 1 : (e > 2045 ? 2045 : e);
  const uint64_t r = static_cast<uint64_t>(2046 - e) << 52;
  double out;
  memcpy(&out, &r, sizeof out);
  return out;
}

// p log p with 0 log 0 = 0. Below FLT_MIN the term is < 1e-36 and taken as 0, which also
// keeps subnormals away from log_approx.
ENSEL_HD float xlogx(float p) {
  const float kTiny = 1.17549435e-38f;
  // The log is evaluated unconditionally (of a safe argument) so the select stays branch-free
  // and loops over xlogx vectorize.
  const float log_p = log_approx(p < kTiny ? 1.0f : p);
  return p < kTiny ? 0.0f : p * log_p;
}

}  // namespace ensel
