// Cross-entropy and unbiased KD on bilinearly upsampled logits, fused: the CPU kernel of
// lskd::ce_unkd_forward (definition and formulas in csrc/ce_unkd.cpp). Nothing is written at the
// output resolution.
//
// Work unit: one image and a chunk of kRows output rows. The chunk reads the low-resolution rows
// [ilo, ihi] only: they are first interpolated along the columns to the output width (ZC, TC:
// [channels][rows][W]), so that every output row is a vectorised blend of two of them. The
// output pixels of a row are then taken in blocks of kCols columns, channel-major (the loops over
// the pixels vectorise): teacher softmax, the student's max and the max of its merged group (the
// background channels {0} U [O, K) of UNKD with a teacher, the merged classes [0, M) of the
// unbiased CE without), then one exp per channel (relative to the max, or to the group's max in
// the group, so that neither lse underflows), the per-pixel losses and the gradients with respect to
// the upsampled logits. Those are scattered back with the adjoint of the interpolation in the
// same two steps: along the rows into [channels][rows][W] accumulators (vectorised), then, once
// per chunk, along the columns into the chunk's private low-resolution buffer. The buffers of the
// chunks of an image are summed in chunk order, and so are the per-chunk loss sums (double):
// results are deterministic and do not depend on the thread count.
//
// Functions: process_unit (one work unit) -> output_row (one output row) -> block_targets,
// block_teacher, block_student, block_exps, block_losses (block_softmax), block_gradients
// (scatter_rows) (one block of pixels);
// scatter_columns (per unit); reduce_losses, reduce_gradients (per image, in chunk order).
#include "bilinear.h"
#include "ce_unkd.h"
#include "cpu_utils.h"
#include "vec_math.h"

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

using cpu::Axis;
using cpu::block_sum;
using cpu::exp_acc;
using cpu::grain_for;
using cpu::interp_columns;
using cpu::log_acc;
using cpu::opt_ptr;
using cpu::select;

constexpr int64_t kRows = 32;    // output rows per work unit (fixed: the summation order depends on it)
constexpr int64_t kCols = 64;    // output columns per block of pixels
constexpr int32_t kMerged = -2;  // the target of a pixel whose class is one of the merged [0, M)

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

// The inputs and geometry of one call, read by every work unit.
template <typename scalar_t>
struct Problem {
  using acc = acc_t<scalar_t>;
  int64_t N, K, h, w, H, W;
  int64_t O;  // teacher classes (0 without a teacher)
  int64_t M;  // the CE's merged classes [0, M) (1: plain CE; > 1 only without a teacher)
  int64_t ignore_index;
  bool do_ce, do_un, with_grad, g_ce, g_un;
  bool grouped;  // a merged channel group with its own max: UNKD's background or the CE's [0, M)
  Strides4 sx, st;
  const scalar_t* px;
  const scalar_t* pt;
  const int64_t* py;
  const acc* pw;
  Axis<acc> ay, ax;
  acc invO;        // 1 / O (0 without a teacher)
  int64_t chunks;  // work units per image
  int64_t nrmax;   // the most low-resolution rows a chunk reads (sizes the scratch and the per-chunk gradients)

  Problem(const at::Tensor& x, const at::Tensor* teacher, const at::Tensor* targets, const at::Tensor* weight,
          int64_t out_h, int64_t out_w, int64_t ignore, int64_t merged, bool grad)
      : ay(x.size(2), out_h), ax(x.size(3), out_w) {
    N = x.size(0), K = x.size(1), h = x.size(2), w = x.size(3), H = out_h, W = out_w;
    O = teacher ? teacher->size(1) : 0;
    M = merged;
    ignore_index = ignore;
    do_ce = targets != nullptr, do_un = teacher != nullptr;
    grouped = do_un || M > 1;
    with_grad = grad, g_ce = grad && do_ce, g_un = grad && do_un;
    sx = strides4(x);
    st = teacher ? strides4(*teacher) : Strides4{0, 0, 0, 0};
    px = x.data_ptr<scalar_t>();
    pt = teacher ? teacher->data_ptr<scalar_t>() : nullptr;
    py = targets ? targets->data_ptr<int64_t>() : nullptr;
    pw = weight ? weight->data_ptr<acc>() : nullptr;
    invO = do_un ? acc(1) / static_cast<acc>(O) : acc(0);
    chunks = (H + kRows - 1) / kRows;
    nrmax = 1;
    for (int64_t k = 0; k < chunks; ++k) nrmax = std::max(nrmax, row_range(k).second);
  }

  // Whether channel c is in the merged group: {0} U [O, K) with a teacher, [0, M) without.
  bool in_group(int64_t c) const { return do_un ? (c == 0 || c >= O) : c < M; }

  // {ilo, nr}: the low-resolution rows [ilo, ilo + nr) that chunk k reads.
  std::pair<int64_t, int64_t> row_range(int64_t k) const {
    const int64_t r0 = k * kRows, r1 = std::min(H, r0 + kRows);
    return std::make_pair(ay.i0[r0], ay.i1[r1 - 1] - ay.i0[r0] + 1);
  }
};

// What the work units leave for the final reduction, per unit u = n * chunks + k: the loss sums
// (double) and the low-resolution gradients [K][nrmax][w]. Kept apart so that the per-image sums
// are taken in chunk order, whatever thread ran which chunk.
template <typename acc>
struct Parts {
  std::vector<double> ce, un;
  int64_t elems;  // per unit: K * nrmax * w
  at::Tensor gce_t, gun_t;
  acc* gce;
  acc* gun;

  template <typename scalar_t>
  Parts(const Problem<scalar_t>& P, const at::TensorOptions& opts)
      : ce(P.N * P.chunks, 0.0),
        un(P.N * P.chunks, 0.0),
        elems(P.K * P.nrmax * P.w),
        gce_t(P.g_ce ? at::zeros({P.N * P.chunks * elems}, opts) : at::Tensor()),
        gun_t(P.g_un ? at::zeros({P.N * P.chunks * elems}, opts) : at::Tensor()),
        gce(P.g_ce ? gce_t.data_ptr<acc>() : nullptr),
        gun(P.g_un ? gun_t.data_ptr<acc>() : nullptr) {}
};

// A thread's scratch, reused by its work units: allocated once per parallel_for task.
template <typename acc>
struct Scratch {
  int64_t B;  // pixels per block: min(kCols, W)
  // [channels][nrmax][W]: the column-interpolated rows and the row-adjoint gradients; one low-resolution row
  std::vector<acc> zc, tc, gr_ce, gr_un, row;
  std::vector<acc> Z, T;  // [channels][B]: the block's logits, then their exps
  // per pixel of the block
  std::vector<acc> m, mb, mt, St, S, Sb, dy, tz, t1, wsel, logS, logSb, invS, rb, ib, invSt, P0, lce, lun, gbuf, gbuf2;
  std::vector<int32_t> yv;

  template <typename scalar_t>
  explicit Scratch(const Problem<scalar_t>& P) : B(std::min(kCols, P.W)) {
    const int64_t plane = P.nrmax * P.W;
    zc.resize(P.K * plane);
    tc.resize(P.O * plane);
    gr_ce.resize(P.g_ce ? P.K * plane : 0);
    gr_un.resize(P.g_un ? P.K * plane : 0);
    row.resize(P.w);
    Z.resize(P.K * B);
    T.resize(P.O * B);
    for (std::vector<acc>* v : {&m,     &mb,   &mt, &St, &S,     &Sb, &dy,  &tz,  &t1,   &wsel, &logS,
                                &logSb, &invS, &rb, &ib, &invSt, &P0, &lce, &lun, &gbuf, &gbuf2})
      v->resize(B);
    yv.assign(B, -1);  // -1: no target class (stays so without targets)
  }
};

// One block of output pixels: image n, output row r, columns [q0, q0 + nb). a0, a1: its two source
// rows among the chunk's nr interpolated rows, l0y, l1y their weights; wn: the image's CE weight.
template <typename acc>
struct Block {
  int64_t n, r, q0, nb, nr, a0, a1;
  acc l0y, l1y, wn;
};

// out[c][i] = the row interpolation of the chunk's column-interpolated rows src (C channels) at the
// block's pixels: the upsampled logits, channel-major so that the loops over the pixels vectorise.
template <typename acc>
void blend_rows(const acc* src, int64_t C, const Block<acc>& b, int64_t W, int64_t B, acc* out) {
  for (int64_t c = 0; c < C; ++c) {
    const acc* __restrict s0 = src + (c * b.nr + b.a0) * W + b.q0;
    const acc* __restrict s1 = src + (c * b.nr + b.a1) * W + b.q0;
    acc* __restrict t = out + c * B;
    LSKD_SIMD
    for (int64_t i = 0; i < b.nb; ++i) t[i] = b.l0y * s0[i] + b.l1y * s1[i];
  }
}

// out[i] = max of X[0][i] and X[c][i] for c in [c1, c2) (X: [channels][B]; nb pixels).
template <typename acc>
void channel_max(const acc* X, int64_t B, int64_t nb, int64_t c1, int64_t c2, acc* out) {
  acc* __restrict vm = out;
  std::copy(X, X + nb, vm);
  for (int64_t c = c1; c < c2; ++c) {
    const acc* __restrict z = X + c * B;
    LSKD_SIMD
    for (int64_t i = 0; i < nb; ++i) vm[i] = std::max(vm[i], z[i]);
  }
}

// targets: class index (-1 for none, kMerged for one of the merged classes [0, M) when M > 1) and
// the CE factor: weight, 0 when ignored, NaN when invalid.
template <typename scalar_t, typename acc>
void block_targets(const Problem<scalar_t>& P, const Block<acc>& b, Scratch<acc>& s) {
  const acc nan = std::numeric_limits<acc>::quiet_NaN();
  int32_t* __restrict vy = s.yv.data();
  acc* __restrict vw = s.wsel.data();
  const int64_t* y = P.py + (b.n * P.H + b.r) * P.W + b.q0;
  for (int64_t i = 0; i < b.nb; ++i) {
    const int64_t v = y[i];
    const bool valid = v >= 0 && v < P.K;
    vy[i] = valid && v != P.ignore_index ? (v < P.M && P.M > 1 ? kMerged : static_cast<int32_t>(v)) : -1;
    vw[i] = v == P.ignore_index ? acc(0) : (valid ? b.wn : nan);
  }
}

// teacher: T = exp(t - max t), St = sum
template <typename scalar_t, typename acc>
void block_teacher(const Problem<scalar_t>& P, const Block<acc>& b, Scratch<acc>& s) {
  blend_rows(s.tc.data(), P.O, b, P.W, s.B, s.T.data());
  channel_max(s.T.data(), s.B, b.nb, 1, P.O, s.mt.data());
  const acc* __restrict vmt = s.mt.data();
  acc* __restrict vSt = s.St.data();
  std::fill(vSt, vSt + b.nb, acc(0));
  for (int64_t c = 0; c < P.O; ++c) {
    acc* __restrict t = s.T.data() + c * s.B;
    LSKD_SIMD
    for (int64_t i = 0; i < b.nb; ++i) {
      t[i] = exp_acc(t[i] - vmt[i]);
      vSt[i] += t[i];
    }
  }
}

// student: Z = z, its max m and (grouped) the max mb over the merged group
template <typename scalar_t, typename acc>
void block_student(const Problem<scalar_t>& P, const Block<acc>& b, Scratch<acc>& s) {
  blend_rows(s.zc.data(), P.K, b, P.W, s.B, s.Z.data());
  channel_max(s.Z.data(), s.B, b.nb, 1, P.K, s.m.data());
  if (P.do_un) {
    channel_max(s.Z.data(), s.B, b.nb, P.O, P.K, s.mb.data());
  } else if (P.grouped) {
    channel_max(s.Z.data(), s.B, b.nb, 1, P.M, s.mb.data());
  }
}

// One exp per channel, Z <- exp(z - m) (outside the merged group, or all without one) or
// exp(z - mb) (in it), so that neither sum underflows; S, Sb their sums; dy = z_y - m; tz, t1 the
// teacher sums sum_{c=1}^{O-1} T_c (z_c - m) and sum_{c=1}^{O-1} T_c.
template <typename scalar_t, typename acc>
void block_exps(const Problem<scalar_t>& P, const Block<acc>& b, Scratch<acc>& s) {
  const int64_t nb = b.nb;
  const acc* __restrict vm = s.m.data();
  const acc* __restrict vmb = s.mb.data();
  const int32_t* __restrict vy = s.yv.data();
  acc* __restrict vS = s.S.data();
  acc* __restrict vSb = s.Sb.data();
  acc* __restrict vdy = s.dy.data();
  acc* __restrict vtz = s.tz.data();
  acc* __restrict vt1 = s.t1.data();
  std::fill(vS, vS + nb, acc(0));
  std::fill(vSb, vSb + nb, acc(0));
  std::fill(vdy, vdy + nb, acc(0));
  std::fill(vtz, vtz + nb, acc(0));
  std::fill(vt1, vt1 + nb, acc(0));
  for (int64_t c = 0; c < P.K; ++c) {
    acc* __restrict z = s.Z.data() + c * s.B;
    const int32_t ci = static_cast<int32_t>(c);
    if (P.grouped && P.in_group(c)) {
      LSKD_SIMD
      for (int64_t i = 0; i < nb; ++i) {
        vdy[i] = select(vy[i] == ci, z[i] - vm[i], vdy[i]);
        const acc e = exp_acc(z[i] - vmb[i]);
        vSb[i] += e;
        z[i] = e;
      }
    } else if (P.do_un) {
      const acc* __restrict t = s.T.data() + c * s.B;
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
}

// Per pixel, the softmax factors: logS = log sum_c exp(z_c - m) and invS its inverse; with a
// merged group also rb = exp(mb - m) invS (q_c = e_c rb in the group), ib = 1 / Sb, logSb = log Sb.
template <typename scalar_t, typename acc>
void block_softmax(const Problem<scalar_t>& P, const Block<acc>& b, Scratch<acc>& s) {
  const int64_t nb = b.nb;
  const acc* __restrict vm = s.m.data();
  const acc* __restrict vmb = s.mb.data();
  const acc* __restrict vS = s.S.data();
  const acc* __restrict vSb = s.Sb.data();
  acc* __restrict vlogS = s.logS.data();
  acc* __restrict vlogSb = s.logSb.data();
  acc* __restrict vinvS = s.invS.data();
  acc* __restrict vrb = s.rb.data();
  acc* __restrict vib = s.ib.data();
  if (!P.grouped) {
    LSKD_SIMD
    for (int64_t i = 0; i < nb; ++i) {
      vlogS[i] = log_acc(vS[i]);
      vinvS[i] = acc(1) / vS[i];
    }
    return;
  }
  LSKD_SIMD
  for (int64_t i = 0; i < nb; ++i) {
    const acc eb = exp_acc(vmb[i] - vm[i]);
    const acc Stot = vS[i] + vSb[i] * eb;
    vlogS[i] = log_acc(Stot);
    vlogSb[i] = log_acc(vSb[i]);
    vinvS[i] = acc(1) / Stot;
    vrb[i] = eb * vinvS[i];
    vib[i] = acc(1) / vSb[i];
  }
}

// Per pixel: the losses (added, summed over the block in a fixed order, to the chunk's sums) and
// the gradient factors that block_gradients reads (block_softmax's, invSt, P0).
template <typename scalar_t, typename acc>
void block_losses(const Problem<scalar_t>& P, const Block<acc>& b, Scratch<acc>& s, double& sum_ce, double& sum_un) {
  block_softmax(P, b, s);
  const int64_t nb = b.nb;
  const acc* __restrict vm = s.m.data();
  const acc* __restrict vmb = s.mb.data();
  const acc* __restrict vlogS = s.logS.data();
  const acc* __restrict vlogSb = s.logSb.data();
  const acc* __restrict vdy = s.dy.data();
  if (P.do_un) {
    const acc invO = P.invO;
    const acc* __restrict t0 = s.T.data();
    const acc* __restrict vSt = s.St.data();
    const acc* __restrict vtz = s.tz.data();
    const acc* __restrict vt1 = s.t1.data();
    acc* __restrict vinvSt = s.invSt.data();
    acc* __restrict vP0 = s.P0.data();
    acc* __restrict vlun = s.lun.data();
    LSKD_SIMD
    for (int64_t i = 0; i < nb; ++i) {
      vinvSt[i] = acc(1) / vSt[i];
      vP0[i] = t0[i] * vinvSt[i];
      // -(1/O) (P0 (lse_bg - lse) + sum_{c=1}^{O-1} P_c (z_c - lse))
      vlun[i] = -invO * (vP0[i] * ((vmb[i] - vm[i]) + vlogSb[i] - vlogS[i]) + (vtz[i] - vt1[i] * vlogS[i]) * vinvSt[i]);
    }
    sum_un += static_cast<double>(block_sum(vlun, nb));
  }
  if (!P.do_ce) return;
  const int32_t* __restrict vy = s.yv.data();
  const acc* __restrict vw = s.wsel.data();
  acc* __restrict vlce = s.lce.data();
  if (P.M > 1) {
    LSKD_SIMD  // a merged target's z_y - m is lse_old - m = (mb - m) + log Sb
        for (int64_t i = 0; i < nb; ++i) vlce[i] =
            vw[i] * (vlogS[i] - select(vy[i] == kMerged, (vmb[i] - vm[i]) + vlogSb[i], vdy[i]));
  } else {
    LSKD_SIMD
    for (int64_t i = 0; i < nb; ++i) vlce[i] = vw[i] * (vlogS[i] - vdy[i]);
  }
  sum_ce += static_cast<double>(block_sum(vlce, nb));
}

// gr[c][a0] += l0y g, gr[c][a1] += l1y g: the row step of the interpolation's adjoint for one
// channel of the block (the column step is left to scatter_columns, once per chunk).
template <typename acc>
void scatter_rows(acc* gr, int64_t c, const Block<acc>& b, int64_t W, const acc* g) {
  axpy(gr + (c * b.nr + b.a0) * W + b.q0, g, b.l0y, b.nb);
  axpy(gr + (c * b.nr + b.a1) * W + b.q0, g, b.l1y, b.nb);
}

// Gradients with respect to z, scattered along the rows (scatter_rows).
template <typename scalar_t, typename acc>
void block_gradients(const Problem<scalar_t>& P, const Block<acc>& b, Scratch<acc>& s) {
  const int64_t nb = b.nb, W = P.W;
  const acc invO = P.invO;
  const int32_t* __restrict vy = s.yv.data();
  const acc* __restrict vw = s.wsel.data();
  const acc* __restrict vinvS = s.invS.data();
  const acc* __restrict vrb = s.rb.data();
  const acc* __restrict vib = s.ib.data();
  const acc* __restrict vinvSt = s.invSt.data();
  const acc* __restrict vP0 = s.P0.data();
  acc* __restrict g = s.gbuf.data();
  acc* __restrict g2 = s.gbuf2.data();
  for (int64_t c = 0; c < P.K; ++c) {
    const acc* __restrict e = s.Z.data() + c * s.B;
    const int32_t ci = static_cast<int32_t>(c);
    const bool bg = P.grouped && P.in_group(c);
    const acc* __restrict qf = bg ? vrb : vinvS;  // q_c = e * qf
    if (P.g_ce) {
      if (bg && P.M > 1) {  // a merged target's indicator is the softmax within the group, e * ib
        LSKD_SIMD
        for (int64_t i = 0; i < nb; ++i)
          g[i] = vw[i] * (e[i] * qf[i] - select(vy[i] == kMerged, e[i] * vib[i], select(vy[i] == ci, acc(1), acc(0))));
      } else {
        LSKD_SIMD
        for (int64_t i = 0; i < nb; ++i) g[i] = vw[i] * (e[i] * qf[i] - select(vy[i] == ci, acc(1), acc(0)));
      }
      scatter_rows(s.gr_ce.data(), c, b, W, g);
    }
    if (P.g_un) {
      if (bg) {
        LSKD_SIMD
        for (int64_t i = 0; i < nb; ++i) g2[i] = invO * (e[i] * vrb[i] - vP0[i] * e[i] * vib[i]);
      } else {
        const acc* __restrict t = s.T.data() + c * s.B;
        LSKD_SIMD
        for (int64_t i = 0; i < nb; ++i) g2[i] = invO * (e[i] * vinvS[i] - t[i] * vinvSt[i]);
      }
      scatter_rows(s.gr_un.data(), c, b, W, g2);
    }
  }
}

// Output row r of image n, in blocks of kCols pixels: the losses (added to sum_ce, sum_un) and,
// with with_grad, the row-adjoint gradients. ilo, nr: the chunk's low-resolution rows.
template <typename scalar_t, typename acc>
void output_row(const Problem<scalar_t>& P, Scratch<acc>& s, int64_t n, int64_t r, int64_t ilo, int64_t nr, acc wn,
                double& sum_ce, double& sum_un) {
  Block<acc> b{n, r, 0, 0, nr, P.ay.i0[r] - ilo, P.ay.i1[r] - ilo, P.ay.l0[r], P.ay.l1[r], wn};
  for (int64_t q0 = 0; q0 < P.W; q0 += s.B) {
    b.q0 = q0;
    b.nb = std::min(s.B, P.W - q0);
    if (P.do_ce) block_targets(P, b, s);
    if (P.do_un) block_teacher(P, b, s);
    block_student(P, b, s);
    block_exps(P, b, s);
    block_losses(P, b, s, sum_ce, sum_un);
    if (P.with_grad) block_gradients(P, b, s);
  }
}

// Work unit u (image n, chunk k): interpolate the low-resolution rows it reads along the columns,
// take its output rows, then scatter its gradients along the columns into its part.
template <typename scalar_t, typename acc>
void process_unit(const Problem<scalar_t>& P, int64_t u, Scratch<acc>& s, Parts<acc>& parts) {
  const int64_t n = u / P.chunks, k = u % P.chunks;
  const int64_t r0 = k * kRows, r1 = std::min(P.H, r0 + kRows);
  const auto [ilo, nr] = P.row_range(k);
  const int64_t plane = nr * P.W;
  interp_columns(P.px + n * P.sx.n, P.sx, P.K, ilo, nr, P.w, P.ax, P.W, s.row.data(), s.zc.data());
  if (P.do_un) interp_columns(P.pt + n * P.st.n, P.st, P.O, ilo, nr, P.w, P.ax, P.W, s.row.data(), s.tc.data());
  if (P.g_ce) std::fill(s.gr_ce.begin(), s.gr_ce.begin() + P.K * plane, acc(0));
  if (P.g_un) std::fill(s.gr_un.begin(), s.gr_un.begin() + P.K * plane, acc(0));
  const acc wn = P.pw ? P.pw[n] : acc(1);
  double sum_ce = 0.0, sum_un = 0.0;
  for (int64_t r = r0; r < r1; ++r) output_row(P, s, n, r, ilo, nr, wn, sum_ce, sum_un);
  parts.ce[u] = sum_ce;
  parts.un[u] = sum_un;
  if (P.g_ce) scatter_columns(s.gr_ce.data(), P.K, nr, P.W, P.ax, P.w, P.nrmax, parts.gce + u * parts.elems);
  if (P.g_un) scatter_columns(s.gr_un.data(), P.K, nr, P.W, P.ax, P.w, P.nrmax, parts.gun + u * parts.elems);
}

// ce[n], unkd[n]: the sums of image n's chunk sums, in chunk order.
template <typename scalar_t, typename acc>
void reduce_losses(const Problem<scalar_t>& P, const Parts<acc>& parts, at::Tensor& ce, at::Tensor& unkd) {
  acc* pce = ce.data_ptr<acc>();
  acc* pun = unkd.data_ptr<acc>();
  for (int64_t n = 0; n < P.N; ++n) {
    double a = 0.0, b = 0.0;
    for (int64_t k = 0; k < P.chunks; ++k) {
      a += parts.ce[n * P.chunks + k];
      b += parts.un[n * P.chunks + k];
    }
    if (P.do_ce) pce[n] = static_cast<acc>(a);
    if (P.do_un) pun[n] = static_cast<acc>(b);
  }
}

// out [K][h][w] = the sum of one image's chunk gradients part [chunks][K][nrmax][w], in chunk
// order (chunk k covers the rows [ilo, ilo + nr) of out).
template <typename scalar_t, typename acc>
void sum_chunks(const Problem<scalar_t>& P, const acc* part, int64_t elems, acc* out) {
  const int64_t h = P.h, w = P.w;
  std::fill(out, out + P.K * h * w, acc(0));
  for (int64_t k = 0; k < P.chunks; ++k) {
    const auto [ilo, nr] = P.row_range(k);
    const acc* p = part + k * elems;
    for (int64_t c = 0; c < P.K; ++c)
      for (int64_t ii = 0; ii < nr; ++ii) {
        acc* __restrict o = out + (c * h + ilo + ii) * w;
        const acc* __restrict s = p + (c * P.nrmax + ii) * w;
        LSKD_SIMD
        for (int64_t j = 0; j < w; ++j) o[j] += s[j];
      }
  }
}

// grad_ce[n], grad_unkd[n]: the sums of the chunks' low-resolution gradients (images in parallel).
template <typename scalar_t, typename acc>
void reduce_gradients(const Problem<scalar_t>& P, const Parts<acc>& parts, at::Tensor& grad_ce, at::Tensor& grad_unkd) {
  const int64_t img = P.K * P.h * P.w, per_image = P.chunks * parts.elems;
  acc* gce = P.g_ce ? grad_ce.data_ptr<acc>() : nullptr;
  acc* gun = P.g_un ? grad_unkd.data_ptr<acc>() : nullptr;
  at::parallel_for(0, P.N, grain_for(per_image), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      if (P.g_ce) sum_chunks(P, parts.gce + n * per_image, parts.elems, gce + n * img);
      if (P.g_un) sum_chunks(P, parts.gun + n * per_image, parts.elems, gun + n * img);
    }
  });
}

template <typename scalar_t>
void ce_unkd_kernel(const at::Tensor& x, const at::Tensor* teacher, const at::Tensor* targets, const at::Tensor* weight,
                    int64_t H, int64_t W, int64_t ignore_index, int64_t merged, bool with_grad, at::Tensor& ce,
                    at::Tensor& unkd, at::Tensor& grad_ce, at::Tensor& grad_unkd) {
  using acc = acc_t<scalar_t>;
  const Problem<scalar_t> P(x, teacher, targets, weight, H, W, ignore_index, merged, with_grad);
  Parts<acc> parts(P, x.options().dtype(acc_scalar_type(x.scalar_type())));
  at::parallel_for(0, P.N * P.chunks, grain_for(kRows * W * P.K), [&](int64_t u0, int64_t u1) {
    Scratch<acc> s(P);
    for (int64_t u = u0; u < u1; ++u) process_unit(P, u, s, parts);
  });
  reduce_losses(P, parts, ce, unkd);
  if (with_grad) reduce_gradients(P, parts, grad_ce, grad_unkd);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_unkd_forward_cpu(
    const at::Tensor& student, const c10::optional<at::Tensor>& teacher, const c10::optional<at::Tensor>& targets,
    const c10::optional<at::Tensor>& weight, at::IntArrayRef size, int64_t ignore_index, int64_t merged,
    bool with_grad) {
  const auto dims = check_ce_unkd(student, teacher, targets, weight, size, merged);
  auto out = ce_unkd_outputs(student, with_grad && targets.has_value(), with_grad && teacher.has_value());
  at::Tensor& ce = std::get<0>(out);
  at::Tensor& unkd = std::get<1>(out);
  at::Tensor& grad_ce = std::get<2>(out);
  at::Tensor& grad_unkd = std::get<3>(out);
  if (student.size(0) == 0 || (!targets.has_value() && !teacher.has_value())) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "lskd_ce_unkd_forward_cpu", [&] {
    ce_unkd_kernel<scalar_t>(student, opt_ptr(teacher), opt_ptr(targets), opt_ptr(weight), dims[1], dims[2],
                             ignore_index, merged, with_grad, ce, unkd, grad_ce, grad_unkd);
  });
  return out;
}

}  // namespace
}  // namespace lskd

TORCH_LIBRARY_IMPL(lskd, CPU, m) {
  m.impl("ce_unkd_forward", &lskd::ce_unkd_forward_cpu);
}
