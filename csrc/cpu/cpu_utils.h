// Helpers shared by the CPU kernels of lskd (csrc/cpu/*.cpp): the row
// loaders and storers that move a block of channels between a tensor of any
// memory format and a [cb][W] scratch in the accumulation type, and the
// fixed-order block sums.
//
// Everything here is either a template or `inline`, so that several
// translation units can include it. Summation orders are fixed, so results do
// not depend on the thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cstdint>

#include "common.h"

// Element-wise loops over distinct buffers: let the compiler vectorise them.
#define LSKD_SIMD _Pragma("omp simd")

namespace lskd {
namespace cpu {

// Channels per work unit when rows are not unit-stride (e.g. channels-last).
inline constexpr int64_t kChannelBlock = 16;

// Grain of at::parallel_for for work units of `elems` elements each: about
// at::internal::GRAIN_SIZE elements per task, so that a small map runs on the
// calling thread instead of waking the OpenMP pool (tens of microseconds).
// The summation orders are fixed per unit: results never depend on it.
inline int64_t grain_for(int64_t elems) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, elems));
}

// rows of channels [0, cb) at p (pointing at (n, c0, r, 0)) -> out[cb][W] in acc.
// pf: element offset of the next row, prefetched on the channels-last path
// (0 = none): strided rows otherwise leave the loads waiting on memory.
template <typename scalar_t, typename acc>
inline void load_rows(const scalar_t* p, int64_t sc, int64_t sw, int64_t cb, int64_t W, acc* out, int64_t pf = 0) {
  if (sw == 1) {
    for (int64_t j = 0; j < cb; ++j) {
      const scalar_t* q = p + j * sc;
      acc* o = out + j * W;
      LSKD_SIMD
      for (int64_t x = 0; x < W; ++x) o[x] = static_cast<acc>(q[x]);
    }
  } else if (sc == 1) {
    for (int64_t x = 0; x < W; ++x) {
      const scalar_t* q = p + x * sw;
      if (pf != 0) {
        for (int64_t j = 0; j < cb; j += 64 / sizeof(scalar_t)) __builtin_prefetch(q + pf + j);
        __builtin_prefetch(q + pf + cb - 1);
      }
      for (int64_t j = 0; j < cb; ++j) out[j * W + x] = static_cast<acc>(q[j]);
    }
  } else {
    for (int64_t j = 0; j < cb; ++j)
      for (int64_t x = 0; x < W; ++x) out[j * W + x] = static_cast<acc>(p[j * sc + x * sw]);
  }
}

// in[cb][W] in acc -> rows of channels [0, cb) at p; pf as in load_rows.
template <typename scalar_t, typename acc>
inline void store_rows(scalar_t* p, int64_t sc, int64_t sw, int64_t cb, int64_t W, const acc* in, int64_t pf = 0) {
  if (sw == 1) {
    for (int64_t j = 0; j < cb; ++j) {
      scalar_t* q = p + j * sc;
      const acc* i = in + j * W;
      LSKD_SIMD
      for (int64_t x = 0; x < W; ++x) q[x] = static_cast<scalar_t>(i[x]);
    }
  } else if (sc == 1) {
    for (int64_t x = 0; x < W; ++x) {
      scalar_t* q = p + x * sw;
      if (pf != 0) {
        for (int64_t j = 0; j < cb; j += 64 / sizeof(scalar_t)) __builtin_prefetch(q + pf + j, 1);
        __builtin_prefetch(q + pf + cb - 1, 1);
      }
      for (int64_t j = 0; j < cb; ++j) q[j] = static_cast<scalar_t>(in[j * W + x]);
    }
  } else {
    for (int64_t j = 0; j < cb; ++j)
      for (int64_t x = 0; x < W; ++x) p[j * sc + x * sw] = static_cast<scalar_t>(in[j * W + x]);
  }
}

template <typename scalar_t>
inline void store_zero_rows(scalar_t* p, int64_t sc, int64_t sw, int64_t cb, int64_t W) {
  for (int64_t j = 0; j < cb; ++j)
    for (int64_t x = 0; x < W; ++x) p[j * sc + x * sw] = scalar_t(0);
}

// Sum of n values with 8 independent partial sums (vectorisable, fixed order).
template <typename acc>
inline acc block_sum(const acc* x, int64_t n) {
  acc s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) s[k] += x[i + k];
  acc t = 0;
  for (; i < n; ++i) t += x[i];
  return (((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]))) + t;
}

// Sum of squares of n values, in the same order as block_sum.
template <typename acc>
inline acc block_sumsq(const acc* x, int64_t n) {
  acc s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) s[k] += x[i + k] * x[i + k];
  acc t = 0;
  for (; i < n; ++i) t += x[i] * x[i];
  return (((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]))) + t;
}

// Optional tensor argument -> pointer (nullptr when absent).
inline const at::Tensor* opt_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? &*t : nullptr;
}

}  // namespace cpu
}  // namespace lskd
