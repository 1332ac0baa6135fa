// Bilinear upsampling (align_corners=False, torch's upsample_bilinear2d rule with an output size)
// on the CPU, shared by the kernels that read logits at the label resolution without writing
// them there (ce_unkd, pseudo_labels).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"

namespace lskd {
namespace cpu {

// Bilinear (align_corners=False) source indices and weights of one axis, as upsample_bilinear2d.
template <typename acc>
struct Axis {
  std::vector<int64_t> i0, i1;
  std::vector<acc> l0, l1;
  Axis(int64_t in, int64_t out) : i0(out), i1(out), l0(out), l1(out) {
    const acc scale = static_cast<acc>(in) / static_cast<acc>(out);
    for (int64_t o = 0; o < out; ++o) {
      acc src = scale * (static_cast<acc>(o) + acc(0.5)) - acc(0.5);
      if (src < acc(0)) src = acc(0);
      const int64_t a = std::min(static_cast<int64_t>(src), in - 1);
      l1[o] = src - static_cast<acc>(a);
      i0[o] = a;
      // A neighbour of weight 0 is not read: 0 * NaN would leak a NaN (or inf) of one pixel into
      // the next, also at the identity size, where torch copies the input.
      i1[o] = a + (a < in - 1 && l1[o] != acc(0) ? 1 : 0);
      l0[o] = acc(1) - l1[o];
    }
  }
};

// out[c][ii][col] = column interpolation of low-resolution row ilo + ii of channel c (C channels,
// nr rows) at output column col. x points at the image; row: scratch of w values.
template <typename scalar_t, typename acc>
void interp_columns(const scalar_t* x, const Strides4& s, int64_t C, int64_t ilo, int64_t nr, int64_t w,
                    const Axis<acc>& ax, int64_t W, acc* row, acc* out) {
  const int64_t* j0 = ax.i0.data();
  const int64_t* j1 = ax.i1.data();
  const acc* l0 = ax.l0.data();
  const acc* l1 = ax.l1.data();
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t ii = 0; ii < nr; ++ii) {
      const scalar_t* p = x + c * s.c + (ilo + ii) * s.h;
      for (int64_t j = 0; j < w; ++j) row[j] = static_cast<acc>(p[j * s.w]);
      acc* o = out + (c * nr + ii) * W;
      for (int64_t col = 0; col < W; ++col) o[col] = l0[col] * row[j0[col]] + l1[col] * row[j1[col]];
    }
  }
}

}  // namespace cpu
}  // namespace lskd
