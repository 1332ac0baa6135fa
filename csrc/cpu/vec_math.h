// Vectorisable scalar maths shared by the CPU kernels of lskd: a branch-free select and float
// exp / log in forms GCC vectorises (the loops over pixels of ce_unkd and pseudo_labels).
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace lskd {
namespace cpu {

// c ? a : b without a branch. GCC does not if-convert float selects and comparisons that could
// trap (-ftrapping-math), which leaves the loops below scalar; bit masks vectorise.
template <typename acc>
inline acc select(bool c, acc a, acc b) {
  using I = std::conditional_t<sizeof(acc) == 4, int32_t, int64_t>;
  const I m = -static_cast<I>(c);
  return std::bit_cast<acc>(static_cast<I>((m & std::bit_cast<I>(a)) | (~m & std::bit_cast<I>(b))));
}

// exp(x) for float, in a form the compiler vectorises (Cephes' expf: x = n ln2 + r,
// |r| <= ln2 / 2, degree-7 polynomial, 2^n through the exponent bits; about 1 ulp). Below -88 it
// gives 0 (the exact value is at most 6e-39), above 88 it saturates; NaN stays NaN.
inline float exp_acc(float x) {
  const float xc = select(x < -88.0f, -88.0f, select(x > 88.0f, 88.0f, x));
  const float fn = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = xc - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const float scale = std::bit_cast<float>((static_cast<int32_t>(fn) + 127) << 23);
  return select((std::bit_cast<int32_t>(x) & 0x7fffffff) > 0x7f800000, x, p * scale);
}
inline double exp_acc(double x) {
  return std::exp(x);
}

// log(x) for float, vectorisable (Cephes' logf: x = m 2^e, sqrt(1/2) <= m < sqrt(2), degree-9
// polynomial in m - 1; about 1 ulp) for normal positive x, +inf and NaN; NaN for the others
// (zero, subnormal or negative: the sums it is applied to are >= 1 or NaN).
inline float log_acc(float x) {
  const int32_t ix = std::bit_cast<int32_t>(x);
  const bool small = (ix & 0x007fffff) < 0x3504f3;  // mantissa < sqrt(2) / 2 once scaled to [0.5, 1)
  const float fe = static_cast<float>(((ix >> 23) & 0xff) - 126 - static_cast<int32_t>(small));
  float m = std::bit_cast<float>((ix & 0x007fffff) | 0x3f000000);  // [0.5, 1)
  m = select(small, m + m, m) - 1.0f;
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
  y = y + fe * -2.12194440e-4f;
  y = y - 0.5f * z;
  const float r = (m + y) + fe * 0.693359375f;
  const bool normal = ix >= 0x00800000 && ix < 0x7f800000;
  return select(normal, r, select(ix >= 0x7f800000, x, std::numeric_limits<float>::quiet_NaN()));
}
inline double log_acc(double x) {
  return std::log(x);
}

}  // namespace cpu
}  // namespace lskd
