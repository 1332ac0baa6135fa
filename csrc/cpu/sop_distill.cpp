// Second-order context pooling distance (docs/MATHEMATICS.md section 2.2, MCD): CPU kernels of
// lskd::sop_forward and lskd::sop_backward (definitions in csrc/sop_distill.cpp).
//
// Forward work unit: one (image, group). The group's k channels of a * m and
// b * m are average-pooled into per-thread scratch (vertical window sums of
// rows, then horizontal window sums), then at every pooled position
// u = p - q, v = p + q give term = 0.5 (|u|^2 |v|^2 + (u.v)^2) and
// pooled_grad = (|v|^2 + u.v) u + (|u|^2 + u.v) v; the k x k products are
// never formed. The per-(n, group) sums of terms are reduced per image in
// group order (deterministic). Backward work unit: one image and a block of
// channels; each row gathers the pooled gradients whose windows cover it.
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

using cpu::block_sum;
using cpu::grain_for;
using cpu::kChannelBlock;
using cpu::load_rows;
using cpu::opt_ptr;
using cpu::store_rows;
using cpu::store_zero_rows;

template <typename scalar_t>
void sop_forward_kernel(const at::Tensor& a, const at::Tensor& b, const at::Tensor* smask, const at::Tensor* cmask,
                        int64_t G, const int64_t win[2], const int64_t str[2], const int64_t pad[2], int64_t Ho,
                        int64_t Wo, at::Tensor& pooled_grad, at::Tensor& part) {
  using acc = acc_t<scalar_t>;
  const int64_t N = a.size(0), C = a.size(1), H = a.size(2), W = a.size(3);
  const int64_t k = C / G, Gk = G * k, P = Ho * Wo;
  const int64_t wh = win[0], ww = win[1], sh = str[0], sw = str[1], ph = pad[0], pw = pad[1];
  const Strides4 sa = strides4(a), sb = strides4(b);
  const scalar_t* pa = a.data_ptr<scalar_t>();
  const scalar_t* pb = b.data_ptr<scalar_t>();
  const acc* sm = smask ? smask->data_ptr<acc>() : nullptr;
  const acc* cm = cmask ? cmask->data_ptr<acc>() : nullptr;
  acc* pgr = pooled_grad.data_ptr<acc>();
  acc* pp = part.data_ptr<acc>();
  const int64_t cb = (sa.w == 1 && sb.w == 1 && W > 1) ? 1 : std::min(kChannelBlock, k);
  const acc div = static_cast<acc>(wh * ww);

  at::parallel_for(0, N * G, grain_for(k * H * W), [&](int64_t u0, int64_t u1) {
    const int64_t Wp = W + 2 * pw;  // column sums with the zero padding on both sides
    std::vector<acc> Pa(k * P), Pb(k * P), bufa(cb * W), bufb(cb * W), cola(cb * Wp), colb(cb * Wp);
    std::vector<acc> suu(P), svv(P), suv(P), term(P);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n = u / G, g = u % G, cbase = g * k;
      // 1. average pooling of the group's channels of a * m and b * m (sums only).
      for (int64_t c0 = 0; c0 < k; c0 += cb) {
        const int64_t ncb = std::min(k, c0 + cb) - c0;
        const scalar_t* ra = pa + n * sa.n + (cbase + c0) * sa.c;
        const scalar_t* rb = pb + n * sb.n + (cbase + c0) * sb.c;
        for (int64_t ho = 0; ho < Ho; ++ho) {
          const int64_t hlo = std::max<int64_t>(0, ho * sh - ph), hhi = std::min(H, ho * sh - ph + wh);
          std::fill(cola.begin(), cola.begin() + ncb * Wp, acc(0));
          std::fill(colb.begin(), colb.begin() + ncb * Wp, acc(0));
          for (int64_t h = hlo; h < hhi; ++h) {
            const bool pf = h + 1 < H;
            load_rows(ra + h * sa.h, sa.c, sa.w, ncb, W, bufa.data(), pf ? sa.h : 0);
            load_rows(rb + h * sb.h, sb.c, sb.w, ncb, W, bufb.data(), pf ? sb.h : 0);
            const acc* __restrict mrow = sm ? sm + (n * H + h) * W : nullptr;
            for (int64_t j = 0; j < ncb; ++j) {
              acc* __restrict ca = cola.data() + j * Wp + pw;
              acc* __restrict cbb = colb.data() + j * Wp + pw;
              const acc* __restrict xa = bufa.data() + j * W;
              const acc* __restrict xb = bufb.data() + j * W;
              if (mrow) {
                LSKD_SIMD
                for (int64_t x = 0; x < W; ++x) {
                  ca[x] += xa[x] * mrow[x];
                  cbb[x] += xb[x] * mrow[x];
                }
              } else {
                LSKD_SIMD
                for (int64_t x = 0; x < W; ++x) {
                  ca[x] += xa[x];
                  cbb[x] += xb[x];
                }
              }
            }
          }
          for (int64_t j = 0; j < ncb; ++j) {
            // window wo covers padded columns [wo * sw, wo * sw + ww)
            acc* __restrict oa = Pa.data() + (c0 + j) * P + ho * Wo;
            acc* __restrict ob = Pb.data() + (c0 + j) * P + ho * Wo;
            const acc* __restrict ca = cola.data() + j * Wp;
            const acc* __restrict cbb = colb.data() + j * Wp;
            if (Wo == 1) {
              oa[0] = block_sum(ca, ww);
              ob[0] = block_sum(cbb, ww);
            } else {
              for (int64_t wo = 0; wo < Wo; ++wo) oa[wo] = ob[wo] = acc(0);
              for (int64_t t = 0; t < ww; ++t) LSKD_SIMD
              for (int64_t wo = 0; wo < Wo; ++wo) {
                oa[wo] += ca[wo * sw + t];
                ob[wo] += cbb[wo * sw + t];
              }
            }
          }
        }
      }
      // 2. u = p - q, v = p + q (channel mask applied after the linear pooling), in place.
      for (int64_t cc = 0; cc < k; ++cc) {
        const acc f = cm ? cm[n * C + cbase + cc] : acc(1);
        acc* U = Pa.data() + cc * P;
        acc* V = Pb.data() + cc * P;
        LSKD_SIMD
        for (int64_t i = 0; i < P; ++i) {
          const acc p = U[i] / div, q = V[i] / div;
          U[i] = f * (p - q);
          V[i] = f * (p + q);
        }
      }
      // 3. |u|^2, |v|^2, u.v per position; the term and its sum.
      std::fill(suu.begin(), suu.end(), acc(0));
      std::fill(svv.begin(), svv.end(), acc(0));
      std::fill(suv.begin(), suv.end(), acc(0));
      acc* __restrict xuu = suu.data();
      acc* __restrict xvv = svv.data();
      acc* __restrict xuv = suv.data();
      for (int64_t cc = 0; cc < k; ++cc) {
        const acc* __restrict U = Pa.data() + cc * P;
        const acc* __restrict V = Pb.data() + cc * P;
        LSKD_SIMD
        for (int64_t i = 0; i < P; ++i) {
          xuu[i] += U[i] * U[i];
          xvv[i] += V[i] * V[i];
          xuv[i] += U[i] * V[i];
        }
      }
      LSKD_SIMD
      for (int64_t i = 0; i < P; ++i) term[i] = acc(0.5) * (suu[i] * svv[i] + suv[i] * suv[i]);
      pp[n * G + g] = block_sum(term.data(), P);
      // 4. pooled_grad = (|v|^2 + u.v) u + (|u|^2 + u.v) v.
      for (int64_t cc = 0; cc < k; ++cc) {
        const acc* __restrict U = Pa.data() + cc * P;
        const acc* __restrict V = Pb.data() + cc * P;
        acc* __restrict o = pgr + (n * Gk + cbase + cc) * P;
        LSKD_SIMD
        for (int64_t i = 0; i < P; ++i) o[i] = (xvv[i] + xuv[i]) * U[i] + (xuu[i] + xuv[i]) * V[i];
      }
    }
  });
}

template <typename scalar_t>
void sop_backward_kernel(const at::Tensor& gd2, const at::Tensor* smask, const at::Tensor* cmask,
                         const at::Tensor& pooled_grad, int64_t G, const int64_t win[2], const int64_t str[2],
                         const int64_t pad[2], int64_t Ho, int64_t Wo, at::Tensor& grad) {
  using acc = acc_t<scalar_t>;
  const int64_t N = grad.size(0), C = grad.size(1), H = grad.size(2), W = grad.size(3);
  const int64_t k = C / G, Gk = G * k, P = Ho * Wo;
  const int64_t wh = win[0], ww = win[1], sh = str[0], sw = str[1], ph = pad[0], pw = pad[1];
  const Strides4 sg = strides4(grad);
  scalar_t* pg = grad.data_ptr<scalar_t>();
  const acc* sm = smask ? smask->data_ptr<acc>() : nullptr;
  const acc* cm = cmask ? cmask->data_ptr<acc>() : nullptr;
  const acc* ppg = pooled_grad.data_ptr<acc>();
  const acc* pgd = gd2.data_ptr<acc>();
  const int64_t cb = (sg.w == 1 && W > 1) ? 1 : kChannelBlock;
  const int64_t nblk = (C + cb - 1) / cb;
  const acc div = static_cast<acc>(wh * ww);

  at::parallel_for(0, N * nblk, grain_for(cb * H * W), [&](int64_t u0, int64_t u1) {
    const int64_t Wp = W + 2 * pw;
    std::vector<acc> buf(cb * W), col(Wo), rowp(Wp);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n = u / nblk, c0 = (u % nblk) * cb, ncb = std::min(C, c0 + cb) - c0;
      const acc scale = pgd[n] / div;
      scalar_t* gbase = pg + n * sg.n + c0 * sg.c;
      if (scale == acc(0) || c0 >= Gk) {
        for (int64_t h = 0; h < H; ++h) store_zero_rows(gbase + h * sg.h, sg.c, sg.w, ncb, W);
        continue;
      }
      for (int64_t h = 0; h < H; ++h) {
        // pooled rows whose window covers row h
        const int64_t t = h + ph - wh + 1;
        const int64_t holo = t <= 0 ? 0 : (t + sh - 1) / sh;
        const int64_t hohi = std::min(Ho - 1, (h + ph) / sh);
        const acc* mrow = sm ? sm + (n * H + h) * W : nullptr;
        for (int64_t j = 0; j < ncb; ++j) {
          const int64_t c = c0 + j;
          acc* __restrict o = buf.data() + j * W;
          if (c >= Gk) {
            std::fill(o, o + W, acc(0));
            continue;
          }
          const acc* pc = ppg + (n * Gk + c) * P;
          {
            acc* __restrict cw = col.data();
            std::fill(cw, cw + Wo, acc(0));
            for (int64_t ho = holo; ho <= hohi; ++ho) {
              const acc* __restrict row = pc + ho * Wo;
              LSKD_SIMD
              for (int64_t wo = 0; wo < Wo; ++wo) cw[wo] += row[wo];
            }
          }
          // window wo covers padded columns [wo * sw, wo * sw + ww)
          acc* __restrict rp = rowp.data();
          const acc* __restrict cl = col.data();
          if (Wo == 1) {
            std::fill(rp, rp + Wp, acc(0));
            for (int64_t t = 0; t < ww; ++t) rp[t] = cl[0];
          } else {
            std::fill(rp, rp + Wp, acc(0));
            for (int64_t t = 0; t < ww; ++t) LSKD_SIMD
            for (int64_t wo = 0; wo < Wo; ++wo) rp[wo * sw + t] += cl[wo];
          }
          const acc f = scale * (cm ? cm[n * C + c] : acc(1));
          const acc* __restrict rq = rp + pw;
          if (mrow) {
            LSKD_SIMD
            for (int64_t x = 0; x < W; ++x) o[x] = rq[x] * (f * mrow[x]);
          } else {
            LSKD_SIMD
            for (int64_t x = 0; x < W; ++x) o[x] = rq[x] * f;
          }
        }
        store_rows(gbase + h * sg.h, sg.c, sg.w, ncb, W, buf.data(), h + 1 < H ? sg.h : 0);
      }
    }
  });
}

struct Pool {
  int64_t win[2], str[2], pad[2];
};

inline Pool make_pool(at::IntArrayRef window, at::IntArrayRef stride, at::IntArrayRef padding) {
  Pool p{};
  for (int i = 0; i < 2; ++i) {
    p.win[i] = window[i];
    p.str[i] = stride[i];
    p.pad[i] = padding[i];
  }
  return p;
}

std::tuple<at::Tensor, at::Tensor> sop_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                   const c10::optional<at::Tensor>& spatial_mask,
                                                   const c10::optional<at::Tensor>& channel_mask, int64_t groups,
                                                   at::IntArrayRef window, at::IntArrayRef stride,
                                                   at::IntArrayRef padding) {
  check_pair("sop_forward", student, teacher, spatial_mask, channel_mask);
  const auto hw = sop_geometry(student, groups, window, stride, padding);
  const Pool pl = make_pool(window, stride, padding);
  const int64_t N = student.size(0), C = student.size(1), k = C / groups;
  const auto opts = student.options().dtype(acc_scalar_type(student.scalar_type()));
  at::Tensor pooled_grad = at::empty({N, groups * k, hw.first, hw.second}, opts);
  at::Tensor part = at::empty({N, groups}, opts);
  at::Tensor dist = at::empty({N}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "lskd_sop_forward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    sop_forward_kernel<scalar_t>(student, teacher, opt_ptr(spatial_mask), opt_ptr(channel_mask), groups, pl.win, pl.str,
                                 pl.pad, hw.first, hw.second, pooled_grad, part);
    const acc* pp = part.data_ptr<acc>();
    acc* pd = dist.data_ptr<acc>();
    for (int64_t n = 0; n < N; ++n) {
      double s = 0;
      for (int64_t g = 0; g < groups; ++g) s += static_cast<double>(pp[n * groups + g]);
      pd[n] = static_cast<acc>(std::sqrt(s));
    }
  });
  return {dist, pooled_grad};
}

at::Tensor sop_backward_cpu(const at::Tensor& grad_dist, const at::Tensor& student,
                            const c10::optional<at::Tensor>& spatial_mask,
                            const c10::optional<at::Tensor>& channel_mask, const at::Tensor& dist,
                            const at::Tensor& pooled_grad, int64_t groups, at::IntArrayRef window,
                            at::IntArrayRef stride, at::IntArrayRef padding) {
  check_pair("sop_backward", student, student, spatial_mask, channel_mask);
  const auto hw = sop_geometry(student, groups, window, stride, padding);
  const Pool pl = make_pool(window, stride, padding);
  const int64_t N = student.size(0), C = student.size(1), k = C / groups;
  const auto acc_type = acc_scalar_type(student.scalar_type());
  TORCH_CHECK(grad_dist.numel() == N && dist.numel() == N, "lskd: sop_backward: grad_dist and dist must have ", N,
              " elements");
  TORCH_CHECK(pooled_grad.dim() == 4 && pooled_grad.size(0) == N && pooled_grad.size(1) == groups * k &&
                  pooled_grad.size(2) == hw.first && pooled_grad.size(3) == hw.second,
              "lskd: sop_backward: pooled_grad must be [", N, ", ", groups * k, ", ", hw.first, ", ", hw.second,
              "], got ", pooled_grad.sizes());
  TORCH_CHECK(pooled_grad.scalar_type() == acc_type, "lskd: sop_backward: pooled_grad must be ", acc_type);
  TORCH_CHECK(grad_dist.device() == student.device() && dist.device() == student.device() &&
                  pooled_grad.device() == student.device(),
              "lskd: sop_backward: all tensors must be on ", student.device());
  const at::Tensor pg = pooled_grad.contiguous();
  // g / (2 d) per image, 0 where d == 0 (a NaN d propagates).
  at::Tensor g = grad_dist.reshape({N}).to(acc_type);
  at::Tensor d = dist.reshape({N}).to(acc_type);
  at::Tensor gd2 = at::where(d == 0, at::zeros_like(g), g / (2 * d)).contiguous();
  at::Tensor grad = at::empty_like(student);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "lskd_sop_backward_cpu", [&] {
    sop_backward_kernel<scalar_t>(gd2, opt_ptr(spatial_mask), opt_ptr(channel_mask), pg, groups, pl.win, pl.str, pl.pad,
                                  hw.first, hw.second, grad);
  });
  return grad;
}

}  // namespace
}  // namespace lskd

TORCH_LIBRARY_IMPL(lskd, CPU, m) {
  m.impl("sop_forward", &lskd::sop_forward_cpu);
  m.impl("sop_backward", &lskd::sop_backward_cpu);
}
