// PLOP's entropy pseudo-labels on bilinearly upsampled teacher logits: the CPU kernel of
// lskd::pseudo_labels (definition in csrc/pseudo_labels.cpp). Nothing is written at the label
// resolution but the targets.
//
// Work unit: one output row of one image. A row without an eligible pixel (label < O) only copies
// its labels. Otherwise its two low-resolution source rows, interpolated along the columns to the
// output width ([O][W] each, kept for the thread's next rows, which mostly share them), are
// blended into the row's logits T [O][W], channel-major so that the loops over the pixels
// vectorise: the first argmax (NaN the largest), the sums of exp(t - m) and exp(t - m) (t - m),
// the normalised entropy; then the threshold test per pixel. Per-row counts are summed per image
// afterwards (integers: exact in any order). With O = 1 the teacher is not read (entropy 0).
#include "bilinear.h"
#include "cpu_utils.h"
#include "pseudo_labels.h"
#include "vec_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace lskd {

namespace {

using cpu::Axis;
using cpu::exp_acc;
using cpu::grain_for;
using cpu::interp_columns;
using cpu::log_acc;
using cpu::select;

// The inputs and geometry of one call, read by every work unit.
template <typename scalar_t>
struct Problem {
  using acc = acc_t<scalar_t>;
  int64_t N, O, h, w, H, W, ignore_index;
  Strides4 st;
  const scalar_t* pt;
  const int64_t* labels;
  const acc* thresholds;
  acc inv_log_o;  // 1 / log O (0 when O == 1: the entropy of one class is 0)
  Axis<acc> ay, ax;

  Problem(const at::Tensor& teacher, const at::Tensor& lab, const at::Tensor& thr, int64_t ignore)
      : ay(teacher.size(2), lab.size(1)), ax(teacher.size(3), lab.size(2)) {
    N = teacher.size(0), O = teacher.size(1), h = teacher.size(2), w = teacher.size(3);
    H = lab.size(1), W = lab.size(2), ignore_index = ignore;
    st = strides4(teacher);
    pt = teacher.data_ptr<scalar_t>();
    labels = lab.data_ptr<int64_t>();
    thresholds = thr.data_ptr<acc>();
    inv_log_o = O > 1 ? acc(1) / std::log(static_cast<acc>(O)) : acc(0);
  }
};

// A thread's scratch, reused by its rows. The column-interpolated source rows ([O][W] each) are
// kept for the next output rows: a thread takes consecutive rows, which share source rows.
template <typename acc>
struct Scratch {
  std::vector<acc> cols[2];       // two column-interpolated source rows, [O][W]
  int64_t key[2] = {-1, -1};      // which (image, source row) each holds: n * h + i
  int next = 0;                   // the slot to refill
  std::vector<acc> T, row;        // [O][W] the output row's logits, [w] one low-resolution row
  std::vector<acc> m, S, D, ent;  // per pixel: max, sum exp(t - m), sum exp(t - m) (t - m), entropy
  std::vector<int32_t> best;      // per pixel: the first argmax

  template <typename scalar_t>
  explicit Scratch(const Problem<scalar_t>& P)
      : cols{std::vector<acc>(P.O * P.W), std::vector<acc>(P.O * P.W)},
        T(P.O * P.W),
        row(P.w),
        m(P.W),
        S(P.W),
        D(P.W),
        ent(P.W),
        best(P.W) {}
};

// Source row i of image n interpolated along the columns, [O][W] (from the cache when it holds it).
template <typename scalar_t, typename acc>
const acc* source_row(const Problem<scalar_t>& P, int64_t n, int64_t i, Scratch<acc>& s) {
  const int64_t key = n * P.h + i;
  for (int k = 0; k < 2; ++k)
    if (s.key[k] == key) return s.cols[k].data();
  const int k = s.next;
  s.next = 1 - k;
  s.key[k] = key;
  interp_columns(P.pt + n * P.st.n, P.st, P.O, i, 1, P.w, P.ax, P.W, s.row.data(), s.cols[k].data());
  return s.cols[k].data();
}

// T[c][q] = the teacher's logits of image n upsampled at output row r (all W columns).
template <typename scalar_t, typename acc>
void row_logits(const Problem<scalar_t>& P, int64_t n, int64_t r, Scratch<acc>& s) {
  const acc* a0 = source_row(P, n, P.ay.i0[r], s);
  const acc* b0 = source_row(P, n, P.ay.i1[r], s);  // the same row when its weight is 0
  const acc l0 = P.ay.l0[r], l1 = P.ay.l1[r];
  for (int64_t c = 0; c < P.O; ++c) {
    const acc* __restrict a = a0 + c * P.W;
    const acc* __restrict b = b0 + c * P.W;
    acc* __restrict t = s.T.data() + c * P.W;
    LSKD_SIMD
    for (int64_t q = 0; q < P.W; ++q) t[q] = l0 * a[q] + l1 * b[q];
  }
}

// m, best: the largest logit and its first class (a NaN wins over numbers, the first NaN over
// later ones, as torch.max); S, D: the sums of exp(t - m) and exp(t - m) (t - m); ent: the
// normalised entropy.
template <typename scalar_t, typename acc>
void row_entropy(const Problem<scalar_t>& P, Scratch<acc>& s) {
  const int64_t W = P.W;
  acc* __restrict vm = s.m.data();
  int32_t* __restrict vb = s.best.data();
  std::copy(s.T.data(), s.T.data() + W, vm);
  std::fill(vb, vb + W, 0);
  for (int64_t c = 1; c < P.O; ++c) {
    const acc* __restrict t = s.T.data() + c * W;
    const int32_t ci = static_cast<int32_t>(c);
    LSKD_SIMD
    for (int64_t q = 0; q < W; ++q) {
      // bitwise, not short-circuit: a branch would keep the loop scalar
      const bool take = (t[q] > vm[q]) | ((t[q] != t[q]) & (vm[q] == vm[q]));
      vm[q] = select(take, t[q], vm[q]);
      vb[q] = take ? ci : vb[q];
    }
  }
  acc* __restrict vS = s.S.data();
  acc* __restrict vD = s.D.data();
  std::fill(vS, vS + W, acc(0));
  std::fill(vD, vD + W, acc(0));
  for (int64_t c = 0; c < P.O; ++c) {
    const acc* __restrict t = s.T.data() + c * W;
    LSKD_SIMD
    for (int64_t q = 0; q < W; ++q) {
      const acc d = t[q] - vm[q];
      const acc e = exp_acc(d);
      vS[q] += e;
      vD[q] += e * d;
    }
  }
  acc* __restrict ve = s.ent.data();
  const acc k = P.inv_log_o;
  LSKD_SIMD
  for (int64_t q = 0; q < W; ++q) ve[q] = (log_acc(vS[q]) - vD[q] / vS[q]) * k;
}

// Output row r of image n: its targets; returns {accepted, eligible} of the row.
template <typename scalar_t, typename acc>
std::pair<int64_t, int64_t> label_row(const Problem<scalar_t>& P, int64_t n, int64_t r, Scratch<acc>& s,
                                      int64_t* targets) {
  const int64_t* lab = P.labels + (n * P.H + r) * P.W;
  int64_t* out = targets + (n * P.H + r) * P.W;
  int64_t eligible = 0;
  for (int64_t q = 0; q < P.W; ++q) eligible += lab[q] < P.O;
  if (eligible == 0) {
    std::copy(lab, lab + P.W, out);
    return {0, 0};
  }
  int64_t accepted = 0;
  if (P.O > 1) {
    row_logits(P, n, r, s);
    row_entropy(P, s);
  }
  for (int64_t q = 0; q < P.W; ++q) {
    if (lab[q] >= P.O) {
      out[q] = lab[q];
      continue;
    }
    const int32_t c = P.O > 1 ? s.best[q] : 0;
    const bool ok = P.O == 1 ? acc(0) < P.thresholds[0] : s.ent[q] < P.thresholds[c];  // false for NaN
    out[q] = ok ? c : P.ignore_index;
    accepted += ok;
  }
  return {accepted, eligible};
}

template <typename scalar_t>
void pseudo_labels_kernel(const at::Tensor& teacher, const at::Tensor& labels, const at::Tensor& thresholds,
                          int64_t ignore_index, at::Tensor& targets, at::Tensor& accepted, at::Tensor& eligible) {
  using acc = acc_t<scalar_t>;
  const Problem<scalar_t> P(teacher, labels, thresholds, ignore_index);
  std::vector<int64_t> row_acc(P.N * P.H), row_elig(P.N * P.H);
  int64_t* pt = targets.data_ptr<int64_t>();
  at::parallel_for(0, P.N * P.H, grain_for(P.W * P.O * 4), [&](int64_t u0, int64_t u1) {
    Scratch<acc> s(P);
    for (int64_t u = u0; u < u1; ++u) std::tie(row_acc[u], row_elig[u]) = label_row(P, u / P.H, u % P.H, s, pt);
  });
  int64_t* pa = accepted.data_ptr<int64_t>();
  int64_t* pe = eligible.data_ptr<int64_t>();
  for (int64_t u = 0; u < P.N * P.H; ++u) {
    pa[u / P.H] += row_acc[u];
    pe[u / P.H] += row_elig[u];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pseudo_labels_cpu(const at::Tensor& teacher, const at::Tensor& labels,
                                                                 const at::Tensor& thresholds, int64_t ignore_index) {
  check_pseudo_labels(teacher, labels, thresholds);
  auto out = pseudo_labels_outputs(labels);
  if (teacher.size(0) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher.scalar_type(), "lskd_pseudo_labels_cpu", [&] {
    pseudo_labels_kernel<scalar_t>(teacher, labels, thresholds, ignore_index, std::get<0>(out), std::get<1>(out),
                                   std::get<2>(out));
  });
  return out;
}

}  // namespace
}  // namespace lskd

TORCH_LIBRARY_IMPL(lskd, CPU, m) {
  m.impl("pseudo_labels", &lskd::pseudo_labels_cpu);
}
