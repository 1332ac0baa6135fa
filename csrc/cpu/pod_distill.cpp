// Local POD distance (docs/MATHEMATICS.md section 2.1): CPU kernels of lskd::pod_forward and
// lskd::pod_backward (definitions in csrc/pod_distill.cpp).
//
// Work unit: one image and a block of channels (one channel when rows are
// unit-stride, e.g. NCHW-contiguous; 16 channels otherwise, so that a
// channels-last row is read one cache line per column). Each unit walks the
// rows of its planes once. Every channel's results depend only on its own
// plane and are computed in a fixed order, so outputs are bitwise identical
// whatever the number of threads; the per-image reduction sums the
// per-(n, c) partial sums in channel order.
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

using cpu::block_sum;
using cpu::block_sumsq;
using cpu::grain_for;
using cpu::kChannelBlock;
using cpu::load_rows;
using cpu::opt_ptr;
using cpu::store_rows;
using cpu::store_zero_rows;

template <typename scalar_t>
void pod_forward_kernel(const at::Tensor& a, const at::Tensor& b, const at::Tensor* smask, const at::Tensor* cmask,
                        const PodLayout& lay, bool square, at::Tensor& emb, at::Tensor& part) {
  using acc = acc_t<scalar_t>;
  const int64_t N = a.size(0), C = a.size(1), H = a.size(2), W = a.size(3);
  const Strides4 sa = strides4(a), sb = strides4(b);
  const scalar_t* pa = a.data_ptr<scalar_t>();
  const scalar_t* pb = b.data_ptr<scalar_t>();
  const acc* sm = smask ? smask->data_ptr<acc>() : nullptr;
  const acc* cm = cmask ? cmask->data_ptr<acc>() : nullptr;
  acc* pe = emb.data_ptr<acc>();
  acc* pp = part.data_ptr<acc>();
  const int64_t L = lay.L;
  int64_t maxHs = 0;
  for (int i = 0; i < lay.num_scales; ++i) maxHs = std::max(maxHs, lay.Hs[i]);
  const int64_t cb = (sa.w == 1 && sb.w == 1 && W > 1) ? 1 : kChannelBlock;
  const int64_t nblk = (C + cb - 1) / cb;

  at::parallel_for(0, N * nblk, grain_for(cb * H * W), [&](int64_t u0, int64_t u1) {
    std::vector<acc> bufa(cb * W), bufb(cb * W);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n = u / nblk, c0 = (u % nblk) * cb, ncb = std::min(C, c0 + cb) - c0;
      acc* e0 = pe + (n * C + c0) * L;
      std::fill(e0, e0 + ncb * L, acc(0));
      for (int64_t r = 0; r < maxHs; ++r) {
        const bool pf = r + 1 < maxHs;
        load_rows(pa + n * sa.n + c0 * sa.c + r * sa.h, sa.c, sa.w, ncb, W, bufa.data(), pf ? sa.h : 0);
        load_rows(pb + n * sb.n + c0 * sb.c + r * sb.h, sb.c, sb.w, ncb, W, bufb.data(), pf ? sb.h : 0);
        const acc* __restrict mrow = sm ? sm + (n * H + r) * W : nullptr;
        for (int64_t j = 0; j < ncb; ++j) {
          acc* __restrict z = bufa.data() + j * W;
          const acc* __restrict zb = bufb.data() + j * W;
          const acc f = cm ? cm[n * C + c0 + j] : acc(1);
          if (mrow) {
            if (square) {
              LSKD_SIMD
              for (int64_t x = 0; x < W; ++x) {
                const acc t = mrow[x] * f, xa = z[x] * t, xb = zb[x] * t;
                z[x] = (xa - xb) * (xa + xb);
              }
            } else {
              LSKD_SIMD
              for (int64_t x = 0; x < W; ++x) {
                const acc t = mrow[x] * f;
                z[x] = z[x] * t - zb[x] * t;
              }
            }
          } else {
            if (square) {
              LSKD_SIMD
              for (int64_t x = 0; x < W; ++x) {
                const acc xa = z[x] * f, xb = zb[x] * f;
                z[x] = (xa - xb) * (xa + xb);
              }
            } else {
              LSKD_SIMD
              for (int64_t x = 0; x < W; ++x) z[x] = z[x] * f - zb[x] * f;
            }
          }
          acc* e = e0 + j * L;
          for (int i = 0; i < lay.num_scales; ++i) {
            const int64_t Hs = lay.Hs[i];
            if (r >= Hs) continue;
            const int64_t s = lay.s[i], kh = lay.kh[i], kw = lay.kw[i], Ws = lay.Ws[i];
            acc* ew = e + lay.off[i];
            const acc akw = static_cast<acc>(kw);
            for (int64_t q = 0; q < s; ++q) ew[q * Hs + r] = block_sum(z + q * kw, kw) / akw;
            acc* __restrict eh = e + lay.off[i] + s * Hs + (r / kh) * Ws;
            LSKD_SIMD
            for (int64_t x = 0; x < Ws; ++x) eh[x] += z[x];
          }
        }
      }
      for (int64_t j = 0; j < ncb; ++j) {
        acc* e = e0 + j * L;
        for (int i = 0; i < lay.num_scales; ++i) {
          acc* eh = e + lay.off[i] + lay.s[i] * lay.Hs[i];
          const int64_t len = lay.s[i] * lay.Ws[i];
          const acc akh = static_cast<acc>(lay.kh[i]);
          LSKD_SIMD
          for (int64_t x = 0; x < len; ++x) eh[x] = eh[x] / akh;
        }
        pp[n * C + c0 + j] = block_sumsq(e, L);
      }
    }
  });
}

template <typename scalar_t>
void pod_backward_kernel(const at::Tensor& gd, const at::Tensor& a, const at::Tensor* smask, const at::Tensor* cmask,
                         const at::Tensor& emb, const PodLayout& lay, bool square, at::Tensor& grad) {
  using acc = acc_t<scalar_t>;
  const int64_t N = a.size(0), C = a.size(1), H = a.size(2), W = a.size(3);
  const Strides4 sa = strides4(a), sg = strides4(grad);
  const scalar_t* pa = a.data_ptr<scalar_t>();
  scalar_t* pg = grad.data_ptr<scalar_t>();
  const acc* sm = smask ? smask->data_ptr<acc>() : nullptr;
  const acc* cm = cmask ? cmask->data_ptr<acc>() : nullptr;
  const acc* pe = emb.data_ptr<acc>();
  const acc* pgd = gd.data_ptr<acc>();
  const int64_t L = lay.L;
  int64_t maxHs = 0;
  for (int i = 0; i < lay.num_scales; ++i) maxHs = std::max(maxHs, lay.Hs[i]);
  const int64_t cb = (sa.w == 1 && sg.w == 1 && W > 1) ? 1 : kChannelBlock;
  const int64_t nblk = (C + cb - 1) / cb;

  at::parallel_for(0, N * nblk, grain_for(cb * H * W), [&](int64_t u0, int64_t u1) {
    std::vector<acc> buf(cb * W), coef(W);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n = u / nblk, c0 = (u % nblk) * cb, ncb = std::min(C, c0 + cb) - c0;
      const acc g = pgd[n];
      scalar_t* gbase = pg + n * sg.n + c0 * sg.c;
      if (g == acc(0)) {  // d == 0 (or zero upstream gradient): exactly zero
        for (int64_t r = 0; r < H; ++r) store_zero_rows(gbase + r * sg.h, sg.c, sg.w, ncb, W);
        continue;
      }
      for (int64_t r = 0; r < H; ++r) {
        if (r >= maxHs) {
          store_zero_rows(gbase + r * sg.h, sg.c, sg.w, ncb, W);
          continue;
        }
        int64_t wext = 0;  // columns past every active scale's Ws get exactly 0
        for (int i = 0; i < lay.num_scales; ++i)
          if (r < lay.Hs[i]) wext = std::max(wext, lay.Ws[i]);
        const bool pf = r + 1 < maxHs;
        if (square) load_rows(pa + n * sa.n + c0 * sa.c + r * sa.h, sa.c, sa.w, ncb, W, buf.data(), pf ? sa.h : 0);
        const acc* __restrict mrow = sm ? sm + (n * H + r) * W : nullptr;
        for (int64_t j = 0; j < ncb; ++j) {
          const acc* e = pe + (n * C + c0 + j) * L;
          acc* cf = coef.data();
          std::fill(cf, cf + wext, acc(0));
          for (int i = 0; i < lay.num_scales; ++i) {
            const int64_t Hs = lay.Hs[i];
            if (r >= Hs) continue;
            const int64_t s = lay.s[i], kh = lay.kh[i], kw = lay.kw[i], Ws = lay.Ws[i];
            const acc* ew = e + lay.off[i];
            const acc* eh = e + lay.off[i] + s * Hs + (r / kh) * Ws;
            const acc akh = static_cast<acc>(kh), akw = static_cast<acc>(kw);
            for (int64_t q = 0; q < s; ++q) {
              const acc vw = ew[q * Hs + r] / akw;
              acc* __restrict c = cf + q * kw;
              const acc* __restrict h = eh + q * kw;
              LSKD_SIMD
              for (int64_t x = 0; x < kw; ++x) c[x] += vw + h[x] / akh;
            }
          }
          const acc f = cm ? cm[n * C + c0 + j] : acc(1);
          acc* __restrict o = buf.data() + j * W;
          if (square) {
            const acc gf = acc(2) * g * f * f;
            if (mrow) {
              LSKD_SIMD
              for (int64_t x = 0; x < wext; ++x) o[x] = gf * cf[x] * (o[x] * (mrow[x] * mrow[x]));
            } else {
              LSKD_SIMD
              for (int64_t x = 0; x < wext; ++x) o[x] = gf * cf[x] * o[x];
            }
          } else {
            const acc gf = g * f;
            if (mrow) {
              LSKD_SIMD
              for (int64_t x = 0; x < wext; ++x) o[x] = gf * cf[x] * mrow[x];
            } else {
              LSKD_SIMD
              for (int64_t x = 0; x < wext; ++x) o[x] = gf * cf[x];
            }
          }
          for (int64_t x = wext; x < W; ++x) o[x] = acc(0);
        }
        store_rows(gbase + r * sg.h, sg.c, sg.w, ncb, W, buf.data(), pf ? sg.h : 0);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> pod_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                   const c10::optional<at::Tensor>& spatial_mask,
                                                   const c10::optional<at::Tensor>& channel_mask,
                                                   at::IntArrayRef scales, bool square) {
  check_pair("pod_forward", student, teacher, spatial_mask, channel_mask);
  const int64_t N = student.size(0), C = student.size(1);
  const PodLayout lay = make_pod_layout(student.size(2), student.size(3), scales);
  const auto acc_type = acc_scalar_type(student.scalar_type());
  const auto opts = student.options().dtype(acc_type);
  at::Tensor emb = at::empty({N, C, lay.L}, opts);
  at::Tensor part = at::empty({N, C}, opts);
  at::Tensor dist = at::empty({N}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "lskd_pod_forward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    pod_forward_kernel<scalar_t>(student, teacher, opt_ptr(spatial_mask), opt_ptr(channel_mask), lay, square, emb,
                                 part);
    const acc* pp = part.data_ptr<acc>();
    acc* pd = dist.data_ptr<acc>();
    for (int64_t n = 0; n < N; ++n) {
      double s = 0;
      for (int64_t c = 0; c < C; ++c) s += static_cast<double>(pp[n * C + c]);
      pd[n] = static_cast<acc>(std::sqrt(s));
    }
  });
  return {dist, emb};
}

at::Tensor pod_backward_cpu(const at::Tensor& grad_dist, const at::Tensor& student,
                            const c10::optional<at::Tensor>& spatial_mask,
                            const c10::optional<at::Tensor>& channel_mask, const at::Tensor& dist,
                            const at::Tensor& emb, at::IntArrayRef scales, bool square) {
  check_pair("pod_backward", student, student, spatial_mask, channel_mask);
  const int64_t N = student.size(0), C = student.size(1);
  const PodLayout lay = make_pod_layout(student.size(2), student.size(3), scales);
  const auto acc_type = acc_scalar_type(student.scalar_type());
  TORCH_CHECK(grad_dist.numel() == N && dist.numel() == N, "lskd: pod_backward: grad_dist and dist must have ", N,
              " elements");
  TORCH_CHECK(emb.dim() == 3 && emb.size(0) == N && emb.size(1) == C && emb.size(2) == lay.L,
              "lskd: pod_backward: emb must be [", N, ", ", C, ", ", lay.L, "], got ", emb.sizes());
  TORCH_CHECK(emb.scalar_type() == acc_type, "lskd: pod_backward: emb must be ", acc_type);
  TORCH_CHECK(
      grad_dist.device() == student.device() && dist.device() == student.device() && emb.device() == student.device(),
      "lskd: pod_backward: all tensors must be on ", student.device());
  const at::Tensor e = emb.contiguous();
  // g / d per image, 0 where d == 0 (a NaN d propagates).
  at::Tensor g = grad_dist.reshape({N}).to(acc_type);
  at::Tensor d = dist.reshape({N}).to(acc_type);
  at::Tensor gd = at::where(d == 0, at::zeros_like(g), g / d).contiguous();
  at::Tensor grad = at::empty_like(student);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "lskd_pod_backward_cpu", [&] {
    pod_backward_kernel<scalar_t>(gd, student, opt_ptr(spatial_mask), opt_ptr(channel_mask), e, lay, square, grad);
  });
  return grad;
}

}  // namespace
}  // namespace lskd

TORCH_LIBRARY_IMPL(lskd, CPU, m) {
  m.impl("pod_forward", &lskd::pod_forward_cpu);
  m.impl("pod_backward", &lskd::pod_backward_cpu);
}
