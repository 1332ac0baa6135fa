// Local POD distance (docs/MATHEMATICS.md section 2.1): CPU kernels of lskd::pod_forward and
// lskd::pod_backward (definitions in csrc/pod_distill.cpp).
//
// Work unit: one image and a block of channels (one channel when rows are
// unit-stride, e.g. NCHW-contiguous; 16 channels otherwise, so that a
// channels-last row is read one cache line per column). Each unit walks the
// rows of its planes once. Every channel's results depend only on its own
// plane and are computed in a fixed order, so outputs are bitwise identical
// whatever the number of threads; the per-image reduction sums the
// per-(n, c) partial sums in channel order. Channels-last student and teacher
// maps of up to 32x32 take a channel-vectorised path instead
// (pod_forward_channels_last, pod_backward_channels_last), with the same work
// units and the same guarantees.
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

// ---------------------------------------------------------------------------
// Channels-last maps (channel stride 1): the kVec channels of a work unit are the vector
// dimension. Each pixel is read once, as one run of channels, and added into the embedding
// entries it belongs to, kept channel-innermost in a [L][kVec] scratch. The row-wise path
// (pod_forward_kernel, pod_backward_kernel) runs its loops over the W columns of a row, which on the small maps of a
// training step (8x8 at the demo's shapes) is mostly loop overhead: measured 2-3x slower there
// (benches/results/cpu-2026-12-06.md).

constexpr int64_t kVec = cpu::kChannelBlock;

// Channel stride 1 and rows that are not unit-stride (a channels-last map with C > 1 and W > 1),
// on maps of at most kVecMaxPixels pixels. Past that the [L][16] scratch (28 KiB at 32x32 and
// scales 1, 2, 4) outgrows L1 and the six scattered entries a pixel adds into miss: measured
// on 2x256 maps, forward + backward, this path takes 2.4 against 3.3 ms at 32x32 and 19.6
// against 12.6 ms at 64x64.
constexpr int64_t kVecMaxPixels = 1024;

inline bool channels_innermost(const at::Tensor& t) {
  return t.stride(1) == 1 && !(t.stride(3) == 1 && t.size(3) > 1) && t.size(2) * t.size(3) <= kVecMaxPixels;
}

// The ncb channels at p (stride 1) -> out[kVec] in acc, zero past ncb.
template <typename scalar_t, typename acc>
inline void load_channels(const scalar_t* __restrict p, int64_t ncb, acc* __restrict out) {
  if (ncb == kVec) {
    LSKD_SIMD
    for (int64_t j = 0; j < kVec; ++j) out[j] = static_cast<acc>(p[j]);
    return;
  }
  for (int64_t j = 0; j < kVec; ++j) out[j] = j < ncb ? static_cast<acc>(p[j]) : acc(0);
}

// Where pixel (r, x) adds in the [L][kVec] scratch: per scale, the width-pooled entry of its row
// and column window and the height-pooled entry of its row window and column (rows [0, Hs) x
// columns [0, Ws) take part). Column windows come from a table made once per call (an integer
// division per pixel and scale was the path's main cost).
struct PixelEntries {
  const PodLayout& lay;
  int64_t H, W;
  std::vector<int64_t> row, col;  // [scale][H] r / kh for r < Hs, [scale][W] x / kw for x < Ws; -1 past
  PixelEntries(const PodLayout& l, int64_t h, int64_t w)
      : lay(l), H(h), W(w), row(static_cast<size_t>(l.num_scales * h)), col(static_cast<size_t>(l.num_scales * w)) {
    for (int i = 0; i < lay.num_scales; ++i) {
      for (int64_t r = 0; r < H; ++r) row[i * H + r] = r < lay.Hs[i] ? r / lay.kh[i] : -1;
      for (int64_t x = 0; x < W; ++x) col[i * W + x] = x < lay.Ws[i] ? x / lay.kw[i] : -1;
    }
  }
  // The (width, height) entry offsets of (r, x) at scale i, or false when it takes no part.
  bool at(int i, int64_t r, int64_t x, int64_t* w, int64_t* h) const {
    const int64_t q = col[i * W + x], p = row[i * H + r];
    if (q < 0 || p < 0) return false;
    *w = (lay.off[i] + q * lay.Hs[i] + r) * kVec;
    *h = (lay.off[i] + lay.s[i] * lay.Hs[i] + p * lay.Ws[i] + x) * kVec;
    return true;
  }
};

template <typename acc>
inline void scatter_pixel(acc* __restrict T, const PixelEntries& pe, int64_t r, int64_t x, const acc* __restrict z) {
  int64_t wo, ho;
  for (int i = 0; i < pe.lay.num_scales; ++i) {
    if (!pe.at(i, r, x, &wo, &ho)) continue;
    acc* __restrict w = T + wo;
    acc* __restrict h = T + ho;
    LSKD_SIMD
    for (int64_t j = 0; j < kVec; ++j) w[j] += z[j];
    LSKD_SIMD
    for (int64_t j = 0; j < kVec; ++j) h[j] += z[j];
  }
}

// The entries of the scratch divided by the number of pixels they pool (kw or kh).
template <typename acc>
inline void normalise_entries(acc* T, const PodLayout& lay) {
  for (int i = 0; i < lay.num_scales; ++i) {
    const int64_t nw = lay.s[i] * lay.Hs[i], nh = lay.s[i] * lay.Ws[i];
    const acc akw = static_cast<acc>(lay.kw[i]), akh = static_cast<acc>(lay.kh[i]);
    acc* w = T + lay.off[i] * kVec;
    for (int64_t e = 0; e < nw * kVec; ++e) w[e] /= akw;
    acc* h = w + nw * kVec;
    for (int64_t e = 0; e < nh * kVec; ++e) h[e] /= akh;
  }
}

template <typename scalar_t>
void pod_forward_channels_last(const at::Tensor& a, const at::Tensor& b, const at::Tensor* smask,
                               const at::Tensor* cmask, const PodLayout& lay, bool square, at::Tensor& emb,
                               at::Tensor& part) {
  using acc = acc_t<scalar_t>;
  const int64_t N = a.size(0), C = a.size(1), H = a.size(2), W = a.size(3), L = lay.L;
  const Strides4 sa = strides4(a), sb = strides4(b);
  const scalar_t* pa = a.data_ptr<scalar_t>();
  const scalar_t* pb = b.data_ptr<scalar_t>();
  const acc* sm = smask ? smask->data_ptr<acc>() : nullptr;
  const acc* cm = cmask ? cmask->data_ptr<acc>() : nullptr;
  acc* pe = emb.data_ptr<acc>();
  acc* pp = part.data_ptr<acc>();
  int64_t maxHs = 0, maxWs = 0;
  for (int i = 0; i < lay.num_scales; ++i) maxHs = std::max(maxHs, lay.Hs[i]), maxWs = std::max(maxWs, lay.Ws[i]);
  const int64_t nblk = (C + kVec - 1) / kVec;
  const PixelEntries entries(lay, H, W);

  at::parallel_for(0, N * nblk, grain_for(kVec * H * W), [&](int64_t u0, int64_t u1) {
    std::vector<acc> T(L * kVec);
    acc f[kVec], za[kVec], zb[kVec], ss[kVec];
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n = u / nblk, c0 = (u % nblk) * kVec, ncb = std::min(C, c0 + kVec) - c0;
      std::fill(T.begin(), T.end(), acc(0));
      for (int64_t j = 0; j < kVec; ++j) f[j] = j < ncb ? (cm ? cm[n * C + c0 + j] : acc(1)) : acc(0);
      for (int64_t r = 0; r < maxHs; ++r) {
        const acc* mrow = sm ? sm + (n * H + r) * W : nullptr;
        for (int64_t x = 0; x < maxWs; ++x) {
          load_channels(pa + n * sa.n + c0 * sa.c + r * sa.h + x * sa.w, ncb, za);
          load_channels(pb + n * sb.n + c0 * sb.c + r * sb.h + x * sb.w, ncb, zb);
          const acc m = mrow ? mrow[x] : acc(1);
          if (square) {
            LSKD_SIMD
            for (int64_t j = 0; j < kVec; ++j) {
              const acc t = m * f[j], xa = za[j] * t, xb = zb[j] * t;
              za[j] = (xa - xb) * (xa + xb);
            }
          } else {
            LSKD_SIMD
            for (int64_t j = 0; j < kVec; ++j) {
              const acc t = m * f[j];
              za[j] = za[j] * t - zb[j] * t;
            }
          }
          scatter_pixel(T.data(), entries, r, x, za);
        }
      }
      normalise_entries(T.data(), lay);
      std::fill(ss, ss + kVec, acc(0));
      for (int64_t l = 0; l < L; ++l) {
        const acc* t = T.data() + l * kVec;
        LSKD_SIMD
        for (int64_t j = 0; j < kVec; ++j) ss[j] += t[j] * t[j];
      }
      for (int64_t j = 0; j < ncb; ++j) {
        acc* e = pe + (n * C + c0 + j) * L;
        for (int64_t l = 0; l < L; ++l) e[l] = T[l * kVec + j];
        pp[n * C + c0 + j] = ss[j];
      }
    }
  });
}

// The sum over the scales (r, x) takes part in of its width- and height-pooled entries (already
// divided by kw / kh) -> coef[kVec]; false when it takes part in none (its gradient is exactly 0).
template <typename acc>
inline bool gather_coef(const acc* __restrict T, const PixelEntries& pe, int64_t r, int64_t x, acc* __restrict coef) {
  bool any = false;
  int64_t wo, ho;
  std::fill(coef, coef + kVec, acc(0));
  for (int i = 0; i < pe.lay.num_scales; ++i) {
    if (!pe.at(i, r, x, &wo, &ho)) continue;
    any = true;
    const acc* __restrict w = T + wo;
    const acc* __restrict h = T + ho;
    LSKD_SIMD
    for (int64_t j = 0; j < kVec; ++j) coef[j] += w[j] + h[j];
  }
  return any;
}

template <typename scalar_t>
void pod_backward_channels_last(const at::Tensor& gd, const at::Tensor& a, const at::Tensor* smask,
                                const at::Tensor* cmask, const at::Tensor& emb, const PodLayout& lay, bool square,
                                at::Tensor& grad) {
  using acc = acc_t<scalar_t>;
  const int64_t N = a.size(0), C = a.size(1), H = a.size(2), W = a.size(3), L = lay.L;
  const Strides4 sa = strides4(a), sg = strides4(grad);
  const scalar_t* pa = a.data_ptr<scalar_t>();
  scalar_t* pg = grad.data_ptr<scalar_t>();
  const acc* sm = smask ? smask->data_ptr<acc>() : nullptr;
  const acc* cm = cmask ? cmask->data_ptr<acc>() : nullptr;
  const acc* pe = emb.data_ptr<acc>();
  const acc* pgd = gd.data_ptr<acc>();
  const int64_t nblk = (C + kVec - 1) / kVec;
  const PixelEntries entries(lay, H, W);

  at::parallel_for(0, N * nblk, grain_for(kVec * H * W), [&](int64_t u0, int64_t u1) {
    std::vector<acc> T(L * kVec);
    acc gf[kVec], coef[kVec], o[kVec];
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n = u / nblk, c0 = (u % nblk) * kVec, ncb = std::min(C, c0 + kVec) - c0;
      const acc g = pgd[n];
      scalar_t* gbase = pg + n * sg.n + c0 * sg.c;
      if (g == acc(0)) {  // d == 0 (or zero upstream gradient): exactly zero
        for (int64_t r = 0; r < H; ++r) store_zero_rows(gbase + r * sg.h, sg.c, sg.w, ncb, W);
        continue;
      }
      for (int64_t j = 0; j < kVec; ++j) {
        const acc f = j < ncb ? (cm ? cm[n * C + c0 + j] : acc(1)) : acc(0);
        gf[j] = square ? acc(2) * g * f * f : g * f;
        for (int64_t l = 0; l < L; ++l) T[l * kVec + j] = j < ncb ? pe[(n * C + c0 + j) * L + l] : acc(0);
      }
      normalise_entries(T.data(), lay);
      for (int64_t r = 0; r < H; ++r) {
        const acc* mrow = sm ? sm + (n * H + r) * W : nullptr;
        for (int64_t x = 0; x < W; ++x) {
          scalar_t* q = gbase + r * sg.h + x * sg.w;
          if (!gather_coef(T.data(), entries, r, x, coef)) {
            for (int64_t j = 0; j < ncb; ++j) q[j] = scalar_t(0);
            continue;
          }
          const acc m = mrow ? mrow[x] : acc(1);
          if (square) {
            load_channels(pa + n * sa.n + c0 * sa.c + r * sa.h + x * sa.w, ncb, o);
            LSKD_SIMD
            for (int64_t j = 0; j < kVec; ++j) o[j] = gf[j] * coef[j] * (o[j] * (m * m));
          } else {
            LSKD_SIMD
            for (int64_t j = 0; j < kVec; ++j) o[j] = gf[j] * coef[j] * m;
          }
          for (int64_t j = 0; j < ncb; ++j) q[j] = static_cast<scalar_t>(o[j]);
        }
      }
    }
  });
}

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
    if (channels_innermost(student) && channels_innermost(teacher)) {
      pod_forward_channels_last<scalar_t>(student, teacher, opt_ptr(spatial_mask), opt_ptr(channel_mask), lay, square,
                                          emb, part);
    } else {
      pod_forward_kernel<scalar_t>(student, teacher, opt_ptr(spatial_mask), opt_ptr(channel_mask), lay, square, emb,
                                   part);
    }
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
    if (channels_innermost(student) && channels_innermost(grad)) {
      pod_backward_channels_last<scalar_t>(gd, student, opt_ptr(spatial_mask), opt_ptr(channel_mask), e, lay, square,
                                           grad);
    } else {
      pod_backward_kernel<scalar_t>(gd, student, opt_ptr(spatial_mask), opt_ptr(channel_mask), e, lay, square, grad);
    }
  });
  return grad;
}

}  // namespace
}  // namespace lskd

TORCH_LIBRARY_IMPL(lskd, CPU, m) {
  m.impl("pod_forward", &lskd::pod_forward_cpu);
  m.impl("pod_backward", &lskd::pod_backward_cpu);
}
