// CUDA kernel of lskd::ce_unkd_forward (cross-entropy and unbiased KD on bilinearly upsampled
// logits, fused). The definition and the formulas are in csrc/ce_unkd.cpp.
//
// One launch, ce_unkd_kernel: one thread per output pixel, blocks of kThreads pixels of one
// image (grid: N * tiles). Nothing is stored at the output resolution and nothing per class:
// each thread interpolates its pixel's K logits (and O teacher logits) from the four
// low-resolution neighbours again in each of its passes over the classes (any K):
//   1. pixel_maxima: the max m over all classes, the max mb over the merged group (the background
//      classes {0} U [O, K) of UNKD with a teacher, the CE's merged classes [0, M) without) and
//      the teacher's max;
//   2. pixel_sums, pixel_losses: S = sum of exp(z - m) outside the group (all classes without
//      one), Sb = sum of exp(z - mb) in it (neither lse can underflow), the teacher softmax sums,
//      z_y; then the pixel's losses, summed over the block
//      (fixed order) and added to ce[n] / unkd[n] with one atomicAdd per block;
//   3. pixel_gradients (with_grad): the gradients with respect to z, scattered to the four
//      low-resolution neighbours of grad_ce / grad_unkd with atomicAdd (weights that are exactly
//      0 are skipped).
// Not deterministic: float atomics for the gradient scatter and for the per-image sums (the
// order of the additions varies from run to run), as torch's upsample_bilinear2d backward on
// CUDA. The CPU kernel is deterministic.
#include "ce_unkd.h"
#include "device_utils.cuh"

#include <array>
#include <tuple>

namespace lskd {

namespace cuda {
namespace {

__device__ __forceinline__ float nan_acc(float) {
  return __uint_as_float(0x7fc00000u);
}
__device__ __forceinline__ double nan_acc(double) {
  return __longlong_as_double(0x7ff8000000000000LL);
}

struct CeUnkdGeom {
  int h, w, H, W;
  int K, O;   // O = 0 without a teacher
  int M;      // the CE's merged classes [0, M): 1 (plain CE), > 1 only without a teacher
  int tiles;  // blocks per image
  int64_t ignore_index;
};

// g[c plane] += adjoint of the interpolation of v (the four weighted neighbours; atomics).
template <typename acc>
__device__ __forceinline__ void scatter(acc* __restrict__ g, const int (&go)[4], const acc (&gw)[4], acc v) {
#pragma unroll
  for (int k = 0; k < 4; ++k)
    if (gw[k] != acc(0)) atomicAdd(g + go[k], gw[k] * v);
}

// One output pixel of one image: its four low-resolution neighbours (rows i0, i1, columns j0, j1)
// and the interpolation from them, in the student (xn, bx) and the teacher (tn, bt). Each pass
// over the classes interpolates the logits again: nothing per class is stored.
template <typename scalar_t, typename acc>
struct PixelSource {
  const scalar_t* xn;
  const scalar_t* tn;
  int64_t xc, tc;  // channel strides
  int i0, i1, j0, j1;
  Bilinear<acc> bx, bt;
  __device__ __forceinline__ acc z(int c) const { return bx.at(xn + c * xc); }
  __device__ __forceinline__ acc t(int c) const { return bt.at(tn + c * tc); }
};

// The source of output pixel p of image n (its offsets in x and t: their strides may differ).
template <typename scalar_t, typename acc>
__device__ __forceinline__ PixelSource<scalar_t, acc> pixel_source(const scalar_t* x, Strides4 sx, const scalar_t* t,
                                                                   Strides4 st, const CeUnkdGeom& G, int64_t n, int p,
                                                                   acc scale_h, acc scale_w) {
  PixelSource<scalar_t, acc> s;
  bilinear_source(p, G.W, G.h, G.w, scale_h, scale_w, s.i0, s.i1, s.j0, s.j1, s.bx);
  s.bx.set_offsets(s.i0, s.i1, s.j0, s.j1, sx.h, sx.w);
  s.bt = s.bx;
  s.bt.set_offsets(s.i0, s.i1, s.j0, s.j1, st.h, st.w);
  s.xn = x + n * sx.n;
  s.tn = t != nullptr ? t + n * st.n : nullptr;
  s.xc = sx.c;
  s.tc = st.c;
  return s;
}

constexpr int kMerged = -2;  // the target of a pixel whose class is one of the merged [0, M)

// Whether a merged channel group with its own max is kept, and whether channel c is in it.
__device__ __forceinline__ bool grouped(const CeUnkdGeom& G, bool has_t) {
  return has_t || G.M > 1;
}
__device__ __forceinline__ bool in_group(const CeUnkdGeom& G, bool has_t, int c) {
  return has_t ? (c == 0 || c >= G.O) : c < G.M;
}

// Target class of output pixel p of image n (-1: none, kMerged: one of the merged classes) and
// the CE factor wp: weight, 0 when ignored, NaN when invalid (the kernel's sums then give NaN, as
// the CPU kernel).
template <typename acc>
__device__ __forceinline__ int pixel_target(const int64_t* __restrict__ targets, const acc* __restrict__ weight,
                                            const CeUnkdGeom& G, int64_t n, int p, acc& wp) {
  int y = -1;
  wp = acc(0);
  if (targets == nullptr) return y;
  const int64_t v = targets[n * G.H * G.W + p];
  if (v != G.ignore_index) {
    if (v >= 0 && v < G.K) {
      y = G.M > 1 && v < G.M ? kMerged : static_cast<int>(v);
      wp = weight != nullptr ? weight[n] : acc(1);
    } else {
      wp = nan_acc(acc(0));
    }
  }
  return y;
}

// A pixel's softmax statistics: the maxima (pass 1), the sums (pass 2) and the factors that the
// losses and the gradients share.
template <typename acc>
struct PixelStats {
  acc m, mb, mt;  // max over all classes, over the merged group, teacher max
  acc S = acc(0), Sb = acc(0), St = acc(0), et0 = acc(0), tz = acc(0), t1 = acc(0), dy = acc(0);
  acc logS, invS, rb = acc(0), ib = acc(0), invSt = acc(0), P0 = acc(0);
};

// 1. maxima: m, mb and the teacher's max mt (lse and the group's lse are taken relative to m and mb).
template <typename scalar_t, typename acc>
__device__ __forceinline__ void pixel_maxima(const PixelSource<scalar_t, acc>& src, const CeUnkdGeom& G, bool has_t,
                                             PixelStats<acc>& s) {
  acc m = src.z(0), mb = m, mt = has_t ? src.t(0) : acc(0);
  for (int c = 1; c < G.K; ++c) {
    const acc z = src.z(c);
    m = max(m, z);
    if (grouped(G, has_t) && in_group(G, has_t, c)) mb = max(mb, z);
  }
  for (int c = 1; c < G.O; ++c) mt = max(mt, src.t(c));
  s.m = m;
  s.mb = mb;
  s.mt = mt;
}

// 2. sums: S = sum of exp(z - m) outside the merged group (all classes without one),
// Sb = sum of exp(z - mb) in it (neither can underflow), the teacher's
// softmax sums (St, its class 0 et0, tz = sum_{c>=1} et (z - m), t1 = sum_{c>=1} et) and
// dy = z_y - m.
template <typename scalar_t, typename acc>
__device__ __forceinline__ void pixel_sums(const PixelSource<scalar_t, acc>& src, const CeUnkdGeom& G, bool has_t,
                                           int y, PixelStats<acc>& s) {
  const int O = G.O;
  for (int c = 0; c < G.K; ++c) {
    const acc z = src.z(c);
    const acc d = z - s.m;
    if (c == y) s.dy = d;
    if (grouped(G, has_t) && in_group(G, has_t, c)) {
      s.Sb += exp_acc(z - s.mb);
    } else {
      s.S += exp_acc(d);
    }
    if (c < O) {
      const acc et = exp_acc(src.t(c) - s.mt);
      s.St += et;
      if (c == 0) {
        s.et0 = et;
      } else {
        s.tz += et * d;
        s.t1 += et;
      }
    }
  }
}

// The pixel's losses lce (0 without targets) and lun (0 without a teacher), and the factors of
// the gradients: invS = 1 / sum exp(z - m), rb = exp(mb - m) invS (q_c = exp(z_c - mb) rb in the
// merged group), ib = 1 / Sb, invSt, P0.
template <typename acc>
__device__ __forceinline__ void pixel_losses(PixelStats<acc>& s, const CeUnkdGeom& G, bool has_t, bool has_y, int y,
                                             acc wp, acc& lce, acc& lun) {
  const int O = G.O;
  if (grouped(G, has_t)) {
    const acc eb = exp_acc(s.mb - s.m);
    const acc Stot = s.S + s.Sb * eb;
    s.logS = log_acc(Stot);
    s.invS = acc(1) / Stot;
    s.rb = eb * s.invS;
    s.ib = acc(1) / s.Sb;
    if (y == kMerged) s.dy = (s.mb - s.m) + log_acc(s.Sb);  // lse_old - m
  }
  if (has_t) {
    s.invSt = acc(1) / s.St;
    s.P0 = s.et0 * s.invSt;
    // -(1/O) (P0 (lse_bg - lse) + sum_{c=1}^{O-1} P_c (z_c - lse))
    lun = -(s.P0 * ((s.mb - s.m) + log_acc(s.Sb) - s.logS) + (s.tz - s.t1 * s.logS) * s.invSt) / static_cast<acc>(O);
  } else if (!grouped(G, has_t)) {
    s.logS = log_acc(s.S);
    s.invS = acc(1) / s.S;
  }
  if (has_y) lce = wp * (s.logS - s.dy);
}

// 3. gradients with respect to z, scattered to the pixel's four low-resolution neighbours of
// grad_ce / grad_unkd of image n (either may be nullptr: not computed).
template <typename scalar_t, typename acc>
__device__ __forceinline__ void pixel_gradients(const PixelSource<scalar_t, acc>& src, const PixelStats<acc>& s,
                                                const CeUnkdGeom& G, int64_t n, bool has_t, int y, acc wp,
                                                acc* __restrict__ grad_ce, acc* __restrict__ grad_unkd) {
  const int K = G.K, O = G.O;
  const int hw = G.h * G.w;
  const int go[4] = {src.i0 * G.w + src.j0, src.i0 * G.w + src.j1, src.i1 * G.w + src.j0, src.i1 * G.w + src.j1};
  const acc gw[4] = {src.bx.l0y * src.bx.l0x, src.bx.l0y * src.bx.l1x, src.bx.l1y * src.bx.l0x,
                     src.bx.l1y * src.bx.l1x};
  const acc invO = has_t ? acc(1) / static_cast<acc>(O) : acc(0);
  acc* gce = grad_ce != nullptr ? grad_ce + n * K * hw : nullptr;
  acc* gun = grad_unkd != nullptr ? grad_unkd + n * K * hw : nullptr;
  for (int c = 0; c < K; ++c) {
    const acc z = src.z(c);
    const bool bg = grouped(G, has_t) && in_group(G, has_t, c);
    acc q, target = c == y ? acc(1) : acc(0), gu = acc(0);
    if (bg) {
      const acc e = exp_acc(z - s.mb);
      q = e * s.rb;
      if (has_t) gu = invO * (q - s.P0 * e * s.ib);
      if (y == kMerged) target = e * s.ib;  // the softmax within the merged classes
    } else {
      q = exp_acc(z - s.m) * s.invS;
      if (has_t) gu = invO * (q - exp_acc(src.t(c) - s.mt) * s.invSt);
    }
    if (gce != nullptr) scatter(gce + c * hw, go, gw, wp * (q - target));
    if (gun != nullptr) scatter(gun + c * hw, go, gw, gu);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    ce_unkd_kernel(const scalar_t* __restrict__ x, Strides4 sx, const scalar_t* __restrict__ t, Strides4 st,
                   const int64_t* __restrict__ targets, const acc_t<scalar_t>* __restrict__ weight, CeUnkdGeom G,
                   acc_t<scalar_t> scale_h, acc_t<scalar_t> scale_w, bool with_grad, acc_t<scalar_t>* __restrict__ ce,
                   acc_t<scalar_t>* __restrict__ unkd, acc_t<scalar_t>* __restrict__ grad_ce,
                   acc_t<scalar_t>* __restrict__ grad_unkd) {
  using acc = acc_t<scalar_t>;
  const int64_t blk = blockIdx.x;
  const int64_t n = blk / G.tiles;
  const int p = static_cast<int>(blk - n * G.tiles) * kThreads + static_cast<int>(threadIdx.x);
  const bool has_t = t != nullptr, has_y = targets != nullptr;

  acc lce = acc(0), lun = acc(0);
  if (p < G.H * G.W) {  // inactive threads still take part in the block sums below
    const PixelSource<scalar_t, acc> src = pixel_source(x, sx, t, st, G, n, p, scale_h, scale_w);
    acc wp;
    const int y = pixel_target(targets, weight, G, n, p, wp);
    PixelStats<acc> s;
    pixel_maxima(src, G, has_t, s);
    pixel_sums(src, G, has_t, y, s);
    pixel_losses(s, G, has_t, has_y, y, wp, lce, lun);
    if (with_grad) pixel_gradients(src, s, G, n, has_t, y, wp, grad_ce, grad_unkd);
  }

  // per-image sums: the block's sum (fixed order), then one atomicAdd
  if (targets != nullptr) {
    const acc s = block_sum(lce);
    if (threadIdx.x == 0) atomicAdd(ce + n, s);
  }
  if (t != nullptr) {
    const acc s = block_sum(lun);
    if (threadIdx.x == 0) atomicAdd(unkd + n, s);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_unkd_forward_cuda(
    const at::Tensor& student, const c10::optional<at::Tensor>& teacher, const c10::optional<at::Tensor>& targets,
    const c10::optional<at::Tensor>& weight, at::IntArrayRef size, int64_t ignore_index, int64_t merged,
    bool with_grad) {
  const auto dims = check_ce_unkd(student, teacher, targets, weight, size, merged);
  check_cuda_input("ce_unkd_forward", student, "student");
  c10::cuda::CUDAGuard guard(student.device());
  const bool has_t = teacher.has_value(), has_y = targets.has_value();
  auto out = ce_unkd_outputs(student, with_grad && has_y, with_grad && has_t);  // ce, unkd zero-filled
  const int64_t N = student.size(0), K = student.size(1), h = student.size(2), w = student.size(3);
  if (N == 0 || (!has_t && !has_y)) return out;
  TORCH_CHECK(K * h * w < (int64_t(1) << 31) && N * ceil_div(dims[1] * dims[2], kThreads) < (int64_t(1) << 31),
              "lskd: ce_unkd_forward: input too large");
  at::Tensor& grad_ce = std::get<2>(out);
  at::Tensor& grad_unkd = std::get<3>(out);
  if (grad_ce.numel() > 0) grad_ce.zero_();
  if (grad_unkd.numel() > 0) grad_unkd.zero_();
  CeUnkdGeom G;
  G.h = static_cast<int>(h);
  G.w = static_cast<int>(w);
  G.H = static_cast<int>(dims[1]);
  G.W = static_cast<int>(dims[2]);
  G.K = static_cast<int>(K);
  G.O = static_cast<int>(dims[0]);
  G.M = static_cast<int>(merged);
  G.tiles = static_cast<int>(ceil_div(dims[1] * dims[2], kThreads));
  G.ignore_index = ignore_index;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Strides4 sx = strides4(student);
  const Strides4 st = has_t ? strides4(*teacher) : Strides4{0, 0, 0, 0};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "lskd_ce_unkd_forward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const acc scale_h = static_cast<acc>(h) / static_cast<acc>(G.H);
    const acc scale_w = static_cast<acc>(w) / static_cast<acc>(G.W);
    const scalar_t* tp = has_t ? teacher->data_ptr<scalar_t>() : nullptr;
    const int64_t* yp = has_y ? targets->data_ptr<int64_t>() : nullptr;
    acc* gce = grad_ce.numel() > 0 ? grad_ce.data_ptr<acc>() : nullptr;
    acc* gun = grad_unkd.numel() > 0 ? grad_unkd.data_ptr<acc>() : nullptr;
    ce_unkd_kernel<scalar_t><<<static_cast<unsigned>(N * G.tiles), kThreads, 0, stream>>>(
        student.data_ptr<scalar_t>(), sx, tp, st, yp, opt_data<acc>(weight), G, scale_h, scale_w, with_grad,
        std::get<0>(out).data_ptr<acc>(), std::get<1>(out).data_ptr<acc>(), gce, gun);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace lskd

TORCH_LIBRARY_IMPL(lskd, CUDA, m) {
  m.impl("ce_unkd_forward", &lskd::cuda::ce_unkd_forward_cuda);
}
