// Statistics of the MD masks (docs/MATHEMATICS.md section 2.3): CPU kernel of lskd::md_stats
// (definition in csrc/md_stats.cpp).
//
// One pass over A, Cb, Dn. Work unit: one image and a block of rows (about
// 2048 positions, fixed by W, so results do not depend on the thread count).
// For every position of the block the unit accumulates <A,Cb>, <A,Dn>, |A|^2,
// |Cb|^2, |Dn|^2 over channels, and for every channel the block's sums of
// Cb - A and Dn - A; those are then summed per (n, c) in block order.
// Channel blocks: 1 when rows are unit-stride (NCHW), else 16 (channels-last).
#include "common.h"
#include "cpu_utils.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace lskd {
namespace {

using cpu::grain_for;
using cpu::kChannelBlock;
using cpu::load_rows;

template <typename scalar_t>
void md_stats_kernel(const at::Tensor& A, const at::Tensor& B, const at::Tensor& D, double eps_d, at::Tensor& cos_bg,
                     at::Tensor& cos_new, at::Tensor& part, int64_t rb) {
  using acc = acc_t<scalar_t>;
  const int64_t N = A.size(0), C = A.size(1), H = A.size(2), W = A.size(3);
  const Strides4 sa = strides4(A), sb = strides4(B), sd = strides4(D);
  const scalar_t* pa = A.data_ptr<scalar_t>();
  const scalar_t* pb = B.data_ptr<scalar_t>();
  const scalar_t* pd = D.data_ptr<scalar_t>();
  acc* cbg = cos_bg.data_ptr<acc>();
  acc* cnew = cos_new.data_ptr<acc>();
  acc* pp = part.data_ptr<acc>();  // [N, nrb, 2, C]: row-block sums of (Cb - A) and (Dn - A)
  const int64_t nrb = (H + rb - 1) / rb;
  const int64_t cb = (sa.w == 1 && sb.w == 1 && sd.w == 1 && W > 1) ? 1 : kChannelBlock;
  const acc eps = static_cast<acc>(eps_d);

  at::parallel_for(0, N * nrb, grain_for(3 * C * rb * W), [&](int64_t u0, int64_t u1) {
    const int64_t npmax = rb * W;
    std::vector<acc> dab(npmax), dad(npmax), naa(npmax), nbb(npmax), ndd(npmax);
    std::vector<acc> ba(cb * W), bb(cb * W), bd(cb * W);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n = u / nrb, blk = u % nrb, r0 = blk * rb, r1 = std::min(H, r0 + rb);
      const int64_t np = (r1 - r0) * W;
      std::fill(dab.begin(), dab.begin() + np, acc(0));
      std::fill(dad.begin(), dad.begin() + np, acc(0));
      std::fill(naa.begin(), naa.begin() + np, acc(0));
      std::fill(nbb.begin(), nbb.begin() + np, acc(0));
      std::fill(ndd.begin(), ndd.begin() + np, acc(0));
      acc* sbg = pp + (n * nrb + blk) * 2 * C;
      acc* snew = sbg + C;
      std::fill(sbg, sbg + 2 * C, acc(0));
      for (int64_t c0 = 0; c0 < C; c0 += cb) {
        const int64_t ncb = std::min(C, c0 + cb) - c0;
        for (int64_t r = r0; r < r1; ++r) {
          const bool pf = r + 1 < r1;
          load_rows(pa + n * sa.n + c0 * sa.c + r * sa.h, sa.c, sa.w, ncb, W, ba.data(), pf ? sa.h : 0);
          load_rows(pb + n * sb.n + c0 * sb.c + r * sb.h, sb.c, sb.w, ncb, W, bb.data(), pf ? sb.h : 0);
          load_rows(pd + n * sd.n + c0 * sd.c + r * sd.h, sd.c, sd.w, ncb, W, bd.data(), pf ? sd.h : 0);
          const int64_t o = (r - r0) * W;
          acc* __restrict xab = dab.data() + o;
          acc* __restrict xad = dad.data() + o;
          acc* __restrict xaa = naa.data() + o;
          acc* __restrict xbb = nbb.data() + o;
          acc* __restrict xdd = ndd.data() + o;
          for (int64_t j = 0; j < ncb; ++j) {
            const acc* __restrict a = ba.data() + j * W;
            const acc* __restrict b = bb.data() + j * W;
            const acc* __restrict d = bd.data() + j * W;
            LSKD_SIMD
            for (int64_t x = 0; x < W; ++x) {
              xab[x] += a[x] * b[x];
              xad[x] += a[x] * d[x];
              xaa[x] += a[x] * a[x];
              xbb[x] += b[x] * b[x];
              xdd[x] += d[x] * d[x];
            }
            // row sums of (Cb - A) and (Dn - A), 8 partial sums each (fixed order)
            acc s1[8] = {0, 0, 0, 0, 0, 0, 0, 0}, s2[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            int64_t x = 0;
            for (; x + 8 <= W; x += 8)
              for (int q = 0; q < 8; ++q) {
                s1[q] += b[x + q] - a[x + q];
                s2[q] += d[x + q] - a[x + q];
              }
            acc t1 = 0, t2 = 0;
            for (; x < W; ++x) {
              t1 += b[x] - a[x];
              t2 += d[x] - a[x];
            }
            sbg[c0 + j] += (((s1[0] + s1[4]) + (s1[1] + s1[5])) + ((s1[2] + s1[6]) + (s1[3] + s1[7]))) + t1;
            snew[c0 + j] += (((s2[0] + s2[4]) + (s2[1] + s2[5])) + ((s2[2] + s2[6]) + (s2[3] + s2[7]))) + t2;
          }
        }
      }
      acc* ob = cbg + n * H * W + r0 * W;
      acc* on = cnew + n * H * W + r0 * W;
      for (int64_t i = 0; i < np; ++i) {
        acc na = std::sqrt(naa[i]), nb = std::sqrt(nbb[i]), nd = std::sqrt(ndd[i]);
        na = na < eps ? eps : na;  // NaN stays NaN
        nb = nb < eps ? eps : nb;
        nd = nd < eps ? eps : nd;
        ob[i] = dab[i] / (na * nb);
        on[i] = dad[i] / (na * nd);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> md_stats_cpu(const at::Tensor& feat,
                                                                        const at::Tensor& feat_bg_erased,
                                                                        const at::Tensor& feat_new_erased, double eps) {
  check_pair("md_stats", feat, feat_bg_erased, c10::nullopt, c10::nullopt);
  check_pair("md_stats", feat, feat_new_erased, c10::nullopt, c10::nullopt);
  const int64_t N = feat.size(0), C = feat.size(1), H = feat.size(2), W = feat.size(3);
  const auto opts = feat.options().dtype(acc_scalar_type(feat.scalar_type()));
  at::Tensor cos_bg = at::empty({N, H, W}, opts);
  at::Tensor cos_new = at::empty({N, H, W}, opts);
  at::Tensor gap_bg = at::empty({N, C}, opts);
  at::Tensor gap_new = at::empty({N, C}, opts);
  if (N == 0 || H == 0 || W == 0) {
    gap_bg.fill_(std::nan(""));  // mean over an empty map
    gap_new.fill_(std::nan(""));
    return {cos_bg, cos_new, gap_bg, gap_new};
  }
  // Row blocks of about 2048 positions; fixed by W alone (determinism).
  const int64_t rb = std::max<int64_t>(1, std::min<int64_t>(H, 2048 / W));
  const int64_t nrb = (H + rb - 1) / rb;
  at::Tensor part = at::empty({N, nrb, 2, C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(), "lskd_md_stats_cpu", [&] {
    using acc = acc_t<scalar_t>;
    md_stats_kernel<scalar_t>(feat, feat_bg_erased, feat_new_erased, eps, cos_bg, cos_new, part, rb);
    const acc* pp = part.data_ptr<acc>();
    acc* gb = gap_bg.data_ptr<acc>();
    acc* gn = gap_new.data_ptr<acc>();
    const acc hw = static_cast<acc>(H * W);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) {
        acc s1 = 0, s2 = 0;
        for (int64_t blk = 0; blk < nrb; ++blk) {
          s1 += pp[((n * nrb + blk) * 2 + 0) * C + c];
          s2 += pp[((n * nrb + blk) * 2 + 1) * C + c];
        }
        gb[n * C + c] = std::abs(s1 / hw);
        gn[n * C + c] = std::abs(s2 / hw);
      }
  });
  return {cos_bg, cos_new, gap_bg, gap_new};
}

}  // namespace
}  // namespace lskd

TORCH_LIBRARY_IMPL(lskd, CPU, m) {
  m.impl("md_stats", &lskd::md_stats_cpu);
}
