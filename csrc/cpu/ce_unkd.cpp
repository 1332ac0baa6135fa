// Cross-entropy and unbiased KD on bilinearly upsampled logits, fused: the CPU kernel of
// lskd::ce_unkd_forward (definition and formulas in csrc/ce_unkd.cpp). Nothing is written at the
// output resolution.
//
// Work unit: one image and a chunk of kRows output rows. The chunk reads the low-resolution rows
// [ilo, ihi] only: they are first interpolated along the columns to the output width (ZC, TC:
// [channels][rows][W]), so that every output row is a vectorised blend of two of them. The
// output pixels of a row are then taken in blocks of kCols columns, channel-major (the loops over
// the pixels vectorise): teacher softmax, the student's max and background max, then one exp per
// channel (foreground channels relative to the max, background ones relative to the background
// max, so that neither lse underflows), the per-pixel losses and the gradients with respect to
// the upsampled logits. Those are scattered back with the adjoint of the interpolation in the
// same two steps: along the rows into [channels][rows][W] accumulators (vectorised), then, once
// per chunk, along the columns into the chunk's private low-resolution buffer. The buffers of the
// chunks of an image are summed in chunk order, and so are the per-chunk loss sums (double):
// results are deterministic and do not depend on the thread count.
#include "ce_unkd.h"
#include "cpu_utils.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace lskd {

namespace {

using cpu::block_sum;
using cpu::grain_for;
using cpu::opt_ptr;

constexpr int64_t kRows = 32;  // output rows per work unit (fixed: the summation order depends on it)
constexpr int64_t kCols = 64;  // output columns per block of pixels

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
      i0[o] = a;
      i1[o] = a + (a < in - 1 ? 1 : 0);
      l1[o] = src - static_cast<acc>(a);
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

// part[c][ii][j] += adjoint of the column interpolation of g[c][ii][col] (C channels, nr rows).
// Eight rows at a time, column-major: the read-modify-writes of a row depend on each other
// (neighbouring columns share j0), those of different rows do not.
template <typename acc>
void scatter_columns(const acc* g, int64_t C, int64_t nr, int64_t W, const Axis<acc>& ax, int64_t w, int64_t part_rows,
                     acc* part) {
  constexpr int64_t kGroup = 8;
  const int64_t* j0 = ax.i0.data();
  const int64_t* j1 = ax.i1.data();
  const acc* l0 = ax.l0.data();
  const acc* l1 = ax.l1.data();
  const int64_t rows = C * nr;
  for (int64_t r0 = 0; r0 < rows; r0 += kGroup) {
    const int64_t ng = std::min(kGroup, rows - r0);
    const acc* gr[kGroup];
    acc* pr[kGroup];
    for (int64_t k = 0; k < ng; ++k) {
      const int64_t c = (r0 + k) / nr, ii = (r0 + k) % nr;
      gr[k] = g + (c * nr + ii) * W;
      pr[k] = part + (c * part_rows + ii) * w;
    }
    for (int64_t col = 0; col < W; ++col) {
      const int64_t a = j0[col], b = j1[col];
      const acc u = l0[col], v = l1[col];
      for (int64_t k = 0; k < ng; ++k) {
        const acc x = gr[k][col];
        pr[k][a] += u * x;
        pr[k][b] += v * x;
      }
    }
  }
}

// dst[x] += f * src[x]
template <typename acc>
inline void axpy(acc* __restrict dst, const acc* __restrict src, acc f, int64_t n) {
  LSKD_SIMD
  for (int64_t k = 0; k < n; ++k) dst[k] += f * src[k];
}

template <typename scalar_t>
void ce_unkd_kernel(const at::Tensor& x, const at::Tensor* teacher, const at::Tensor* targets, const at::Tensor* weight,
                    int64_t H, int64_t W, int64_t ignore_index, bool with_grad, at::Tensor& ce, at::Tensor& unkd,
                    at::Tensor& grad_ce, at::Tensor& grad_unkd) {
  using acc = acc_t<scalar_t>;
  const int64_t N = x.size(0), K = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t O = teacher ? teacher->size(1) : 0;
  const bool do_ce = targets != nullptr, do_un = teacher != nullptr;
  const bool g_ce = with_grad && do_ce, g_un = with_grad && do_un;
  const Strides4 sx = strides4(x);
  const Strides4 st = teacher ? strides4(*teacher) : Strides4{0, 0, 0, 0};
  const scalar_t* px = x.data_ptr<scalar_t>();
  const scalar_t* pt = teacher ? teacher->data_ptr<scalar_t>() : nullptr;
  const int64_t* py = targets ? targets->data_ptr<int64_t>() : nullptr;
  const acc* pw = weight ? weight->data_ptr<acc>() : nullptr;
  const Axis<acc> ay(h, H), ax(w, W);

  const int64_t chunks = (H + kRows - 1) / kRows, units = N * chunks;
  auto row_range = [&](int64_t k) {  // low-resolution rows [ilo, ilo + nr) read by chunk k
    const int64_t r0 = k * kRows, r1 = std::min(H, r0 + kRows);
    return std::make_pair(ay.i0[r0], ay.i1[r1 - 1] - ay.i0[r0] + 1);
  };
  int64_t nrmax = 1;
  for (int64_t k = 0; k < chunks; ++k) nrmax = std::max(nrmax, row_range(k).second);
  const auto acc_opts = x.options().dtype(acc_scalar_type(x.scalar_type()));
  // Per chunk: the loss sums and the low-resolution gradients [K][nrmax][w].
  std::vector<double> part_ce(units, 0.0), part_un(units, 0.0);
  const int64_t part_elems = K * nrmax * w;
  at::Tensor part_gce = g_ce ? at::zeros({units * part_elems}, acc_opts) : at::Tensor();
  at::Tensor part_gun = g_un ? at::zeros({units * part_elems}, acc_opts) : at::Tensor();
  acc* ppce = g_ce ? part_gce.data_ptr<acc>() : nullptr;
  acc* ppun = g_un ? part_gun.data_ptr<acc>() : nullptr;
  const acc invO = do_un ? acc(1) / static_cast<acc>(O) : acc(0);
  const acc nan = std::numeric_limits<acc>::quiet_NaN();

  at::parallel_for(0, units, grain_for(kRows * W * K), [&](int64_t u0, int64_t u1) {
    const int64_t B = std::min(kCols, W);
    std::vector<acc> zc(K * nrmax * W), tc(O * nrmax * W), gr_ce(g_ce ? K * nrmax * W : 0),
        gr_un(g_un ? K * nrmax * W : 0), row(w);
    std::vector<acc> Z(K * B), T(O * B);
    // per pixel of the block
    std::vector<acc> m(B), mb(B), mt(B), St(B), S(B), Sb(B), dy(B), tz(B), t1(B), wsel(B), invS(B), rb(B), ib(B),
        invSt(B), P0(B), lce(B), lun(B), gbuf(B), gbuf2(B);
    std::vector<int32_t> yv(B, -1);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n = u / chunks, k = u % chunks;
      const int64_t r0 = k * kRows, r1 = std::min(H, r0 + kRows);
      const auto [ilo, nr] = row_range(k);
      const int64_t plane = nr * W;
      interp_columns(px + n * sx.n, sx, K, ilo, nr, w, ax, W, row.data(), zc.data());
      if (do_un) interp_columns(pt + n * st.n, st, O, ilo, nr, w, ax, W, row.data(), tc.data());
      if (g_ce) std::fill(gr_ce.begin(), gr_ce.begin() + K * plane, acc(0));
      if (g_un) std::fill(gr_un.begin(), gr_un.begin() + K * plane, acc(0));
      const acc wn = pw ? pw[n] : acc(1);
      double sum_ce = 0.0, sum_un = 0.0;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t a0 = ay.i0[r] - ilo, a1 = ay.i1[r] - ilo;
        const acc l0y = ay.l0[r], l1y = ay.l1[r];
        for (int64_t q0 = 0; q0 < W; q0 += B) {
          const int64_t nb = std::min(B, W - q0);
          acc* __restrict vm = m.data();
          acc* __restrict vmb = mb.data();
          acc* __restrict vS = S.data();
          acc* __restrict vSb = Sb.data();
          acc* __restrict vdy = dy.data();
          acc* __restrict vtz = tz.data();
          acc* __restrict vt1 = t1.data();
          acc* __restrict vSt = St.data();
          acc* __restrict vmt = mt.data();
          int32_t* __restrict vy = yv.data();
          acc* __restrict vw = wsel.data();
          // targets: class index (-1 for none) and the CE factor: weight, 0 when ignored, NaN when invalid.
          if (do_ce) {
            const int64_t* y = py + (n * H + r) * W + q0;
            for (int64_t i = 0; i < nb; ++i) {
              const int64_t v = y[i];
              const bool valid = v >= 0 && v < K;
              vy[i] = valid && v != ignore_index ? static_cast<int32_t>(v) : -1;
              vw[i] = v == ignore_index ? acc(0) : (valid ? wn : nan);
            }
          }
          // teacher: T = exp(t - max t), St = sum
          if (do_un) {
            for (int64_t c = 0; c < O; ++c) {
              const acc* __restrict s0 = tc.data() + (c * nr + a0) * W + q0;
              const acc* __restrict s1 = tc.data() + (c * nr + a1) * W + q0;
              acc* __restrict t = T.data() + c * B;
              LSKD_SIMD
              for (int64_t i = 0; i < nb; ++i) t[i] = l0y * s0[i] + l1y * s1[i];
            }
            std::copy(T.begin(), T.begin() + nb, mt.begin());
            for (int64_t c = 1; c < O; ++c) {
              const acc* __restrict t = T.data() + c * B;
              LSKD_SIMD
              for (int64_t i = 0; i < nb; ++i) vmt[i] = std::max(vmt[i], t[i]);
            }
            std::fill(vSt, vSt + nb, acc(0));
            for (int64_t c = 0; c < O; ++c) {
              acc* __restrict t = T.data() + c * B;
              LSKD_SIMD
              for (int64_t i = 0; i < nb; ++i) {
                t[i] = exp_acc(t[i] - vmt[i]);
                vSt[i] += t[i];
              }
            }
          }
          // student: Z = z, its max and (with a teacher) the max over the background channels
          for (int64_t c = 0; c < K; ++c) {
            const acc* __restrict s0 = zc.data() + (c * nr + a0) * W + q0;
            const acc* __restrict s1 = zc.data() + (c * nr + a1) * W + q0;
            acc* __restrict z = Z.data() + c * B;
            LSKD_SIMD
            for (int64_t i = 0; i < nb; ++i) z[i] = l0y * s0[i] + l1y * s1[i];
          }
          std::copy(Z.begin(), Z.begin() + nb, m.begin());
          for (int64_t c = 1; c < K; ++c) {
            const acc* __restrict z = Z.data() + c * B;
            LSKD_SIMD
            for (int64_t i = 0; i < nb; ++i) vm[i] = std::max(vm[i], z[i]);
          }
          if (do_un) {
            std::copy(Z.begin(), Z.begin() + nb, mb.begin());
            for (int64_t c = O; c < K; ++c) {
              const acc* __restrict z = Z.data() + c * B;
              LSKD_SIMD
              for (int64_t i = 0; i < nb; ++i) vmb[i] = std::max(vmb[i], z[i]);
            }
          }
          // one exp per channel, Z <- exp(z - m) (foreground, or all without a teacher) or
          // exp(z - mb) (background); S, Sb their sums; dy = z_y - m; tz, t1 the teacher sums.
          std::fill(vS, vS + nb, acc(0));
          std::fill(vSb, vSb + nb, acc(0));
          std::fill(vdy, vdy + nb, acc(0));
          std::fill(vtz, vtz + nb, acc(0));
          std::fill(vt1, vt1 + nb, acc(0));
          for (int64_t c = 0; c < K; ++c) {
            acc* __restrict z = Z.data() + c * B;
            const int32_t ci = static_cast<int32_t>(c);
            if (do_un && (c == 0 || c >= O)) {
              LSKD_SIMD
              for (int64_t i = 0; i < nb; ++i) {
                vdy[i] = select(vy[i] == ci, z[i] - vm[i], vdy[i]);
                const acc e = exp_acc(z[i] - vmb[i]);
                vSb[i] += e;
                z[i] = e;
              }
            } else if (do_un) {
              const acc* __restrict t = T.data() + c * B;
              LSKD_SIMD
              for (int64_t i = 0; i < nb; ++i) {
                const acc d = z[i] - vm[i];
                vdy[i] = select(vy[i] == ci, d, vdy[i]);
                vtz[i] += t[i] * d;
                vt1[i] += t[i];
                const acc e = exp_acc(d);
                vS[i] += e;
                z[i] = e;
              }
            } else {
              LSKD_SIMD
              for (int64_t i = 0; i < nb; ++i) {
                const acc d = z[i] - vm[i];
                vdy[i] = select(vy[i] == ci, d, vdy[i]);
                const acc e = exp_acc(d);
                vS[i] += e;
                z[i] = e;
              }
            }
          }
          // per pixel: losses and the gradient factors
          acc* __restrict vinvS = invS.data();
          acc* __restrict vrb = rb.data();
          acc* __restrict vib = ib.data();
          acc* __restrict vinvSt = invSt.data();
          acc* __restrict vP0 = P0.data();
          acc* __restrict vlce = lce.data();
          acc* __restrict vlun = lun.data();
          if (do_un) {
            const acc* __restrict t0 = T.data();
            LSKD_SIMD
            for (int64_t i = 0; i < nb; ++i) {
              const acc eb = exp_acc(vmb[i] - vm[i]);
              const acc Stot = vS[i] + vSb[i] * eb;
              const acc logS = log_acc(Stot);
              const acc logSb = log_acc(vSb[i]);
              vinvS[i] = acc(1) / Stot;
              vrb[i] = eb * vinvS[i];
              vib[i] = acc(1) / vSb[i];
              vinvSt[i] = acc(1) / vSt[i];
              vP0[i] = t0[i] * vinvSt[i];
              // -(1/O) (P0 (lse_bg - lse) + sum_{c=1}^{O-1} P_c (z_c - lse))
              vlun[i] = -invO * (vP0[i] * ((vmb[i] - vm[i]) + logSb - logS) + (vtz[i] - vt1[i] * logS) * vinvSt[i]);
              vlce[i] = vw[i] * (logS - vdy[i]);
            }
            sum_un += static_cast<double>(block_sum(vlun, nb));
          } else {
            LSKD_SIMD
            for (int64_t i = 0; i < nb; ++i) {
              const acc logS = log_acc(vS[i]);
              vinvS[i] = acc(1) / vS[i];
              vlce[i] = vw[i] * (logS - vdy[i]);
            }
          }
          if (do_ce) sum_ce += static_cast<double>(block_sum(vlce, nb));
          if (!with_grad) continue;
          // gradients with respect to z, scattered along the rows: gr[c][a0] += l0y g, gr[c][a1] += l1y g
          acc* __restrict g = gbuf.data();
          acc* __restrict g2 = gbuf2.data();
          for (int64_t c = 0; c < K; ++c) {
            const acc* __restrict e = Z.data() + c * B;
            const int32_t ci = static_cast<int32_t>(c);
            const bool bg = do_un && (c == 0 || c >= O);
            const acc* __restrict qf = bg ? vrb : vinvS;  // q_c = e * qf
            if (g_ce) {
              LSKD_SIMD
              for (int64_t i = 0; i < nb; ++i) g[i] = vw[i] * (e[i] * qf[i] - select(vy[i] == ci, acc(1), acc(0)));
              axpy(gr_ce.data() + (c * nr + a0) * W + q0, g, l0y, nb);
              axpy(gr_ce.data() + (c * nr + a1) * W + q0, g, l1y, nb);
            }
            if (g_un) {
              if (bg) {
                LSKD_SIMD
                for (int64_t i = 0; i < nb; ++i) g2[i] = invO * (e[i] * vrb[i] - vP0[i] * e[i] * vib[i]);
              } else {
                const acc* __restrict t = T.data() + c * B;
                LSKD_SIMD
                for (int64_t i = 0; i < nb; ++i) g2[i] = invO * (e[i] * vinvS[i] - t[i] * vinvSt[i]);
              }
              axpy(gr_un.data() + (c * nr + a0) * W + q0, g2, l0y, nb);
              axpy(gr_un.data() + (c * nr + a1) * W + q0, g2, l1y, nb);
            }
          }
        }
      }
      part_ce[u] = sum_ce;
      part_un[u] = sum_un;
      if (g_ce) scatter_columns(gr_ce.data(), K, nr, W, ax, w, nrmax, ppce + u * part_elems);
      if (g_un) scatter_columns(gr_un.data(), K, nr, W, ax, w, nrmax, ppun + u * part_elems);
    }
  });

  // Per image, in chunk order: the loss sums and the low-resolution gradients.
  acc* pce = ce.data_ptr<acc>();
  acc* pun = unkd.data_ptr<acc>();
  for (int64_t n = 0; n < N; ++n) {
    double a = 0.0, b = 0.0;
    for (int64_t k = 0; k < chunks; ++k) {
      a += part_ce[n * chunks + k];
      b += part_un[n * chunks + k];
    }
    if (do_ce) pce[n] = static_cast<acc>(a);
    if (do_un) pun[n] = static_cast<acc>(b);
  }
  if (!with_grad) return;
  at::parallel_for(0, N, grain_for(chunks * part_elems), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int which = 0; which < 2; ++which) {
        if (which == 0 ? !g_ce : !g_un) continue;
        acc* out = (which == 0 ? grad_ce : grad_unkd).data_ptr<acc>() + n * K * h * w;
        const acc* part = which == 0 ? ppce : ppun;
        std::fill(out, out + K * h * w, acc(0));
        for (int64_t k = 0; k < chunks; ++k) {
          const auto [ilo, nr] = row_range(k);
          const acc* p = part + (n * chunks + k) * part_elems;
          for (int64_t c = 0; c < K; ++c)
            for (int64_t ii = 0; ii < nr; ++ii) {
              acc* __restrict o = out + (c * h + ilo + ii) * w;
              const acc* __restrict s = p + (c * nrmax + ii) * w;
              LSKD_SIMD
              for (int64_t j = 0; j < w; ++j) o[j] += s[j];
            }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_unkd_forward_cpu(
    const at::Tensor& student, const c10::optional<at::Tensor>& teacher, const c10::optional<at::Tensor>& targets,
    const c10::optional<at::Tensor>& weight, at::IntArrayRef size, int64_t ignore_index, bool with_grad) {
  const auto dims = check_ce_unkd(student, teacher, targets, weight, size);
  auto out = ce_unkd_outputs(student, with_grad && targets.has_value(), with_grad && teacher.has_value());
  at::Tensor& ce = std::get<0>(out);
  at::Tensor& unkd = std::get<1>(out);
  at::Tensor& grad_ce = std::get<2>(out);
  at::Tensor& grad_unkd = std::get<3>(out);
  if (student.size(0) == 0 || (!targets.has_value() && !teacher.has_value())) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "lskd_ce_unkd_forward_cpu", [&] {
    ce_unkd_kernel<scalar_t>(student, opt_ptr(teacher), opt_ptr(targets), opt_ptr(weight), dims[1], dims[2],
                             ignore_index, with_grad, ce, unkd, grad_ce, grad_unkd);
  });
  return out;
}

}  // namespace
}  // namespace lskd

TORCH_LIBRARY_IMPL(lskd, CPU, m) {
  m.impl("ce_unkd_forward", &lskd::ce_unkd_forward_cpu);
}
