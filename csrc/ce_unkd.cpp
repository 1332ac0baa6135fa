// Cross-entropy and unbiased knowledge distillation (UNKD) on bilinearly upsampled logits, fused:
// the schema of lskd::ce_unkd_forward and the input checks and outputs its kernels share. Kernels:
// csrc/cpu/ce_unkd.cpp, csrc/cuda/ce_unkd.cu, kernels/ce_unkd.py (Triton). No C++ autograd: the
// loss is terminal, the gradients are computed in the forward pass and lskd/ops/ce_unkd.py
// registers the autograd (grad_student = grad_ce[n] * grad_ce + grad_unkd[n] * grad_unkd).
// Conventions shared by every op: csrc/README.md.
//
// ce_unkd_forward
//   student [N, K, h, w] (any strides), teacher None or [N, O, h, w] (1 <= O <= K), targets None
//   or [N, H, W] int64 (values in [0, K) or ignore_index), weight None or [N] acc_t, size = [H, W],
//   merged M in [1, K] (M > 1 only without a teacher: the kernels keep one merged channel group).
//   z_p (student) and t_p (teacher): the bilinear, align_corners=False upsampling of the logits
//   to (H, W), as torch's upsample_bilinear2d with an output size. For an output row r (columns
//   alike with w, W):
//     src = (h / H) * (r + 0.5) - 0.5, clamped below at 0;  i0 = (int) src;
//     i1 = i0 + (i0 < h - 1);  l1 = src - i0;  l0 = 1 - l1;
//     z_p[c] = l0y * (l0x * x[i0, j0] + l1x * x[i0, j1]) + l1y * (l0x * x[i1, j0] + l1x * x[i1, j1]).
//   lse(z) = log sum_c exp(z_c);  lse_bg(z) = log(exp(z_0) + sum_{c=O}^{K-1} exp(z_c));
//   lse_old(z) = log sum_{c=0}^{M-1} exp(z_c);
//   q = softmax(z_p) over K;  P = softmax(t_p) over O.
//   ce[n]   = sum over pixels p with targets[n, p] != ignore_index of weight[n] * (lse(z_p) - z_p[y_p]),
//             lse_old(z_p) in place of z_p[y_p] when M > 1 and y_p < M (MiB's unbiased CE: background
//             and the old classes [1, M) are one class) (0 when targets is None; NaN when a target is
//             neither in [0, K) nor ignore_index).
//   unkd[n] = sum over all pixels p of
//             -(1/O) * (P_0 * (lse_bg(z_p) - lse(z_p)) + sum_{c=1}^{O-1} P_c * (z_p[c] - lse(z_p)))
//             (0 when teacher is None).
//   Gradients with respect to z_p:
//     CE:   weight[n] * (q_c - [c == y_p]) at valid pixels, 0 at ignored ones; for a merged target
//           (M > 1, y_p < M) weight[n] * (q_c - [c < M] exp(z_c - lse_old(z_p)));
//     UNKD: (1/O) * (q_c - P_0 * b_c - [1 <= c < O] * P_c),  b_c = exp(z_c - lse_bg(z_p)) for
//           c in {0} U [O, K), else 0.
//   grad_ce, grad_unkd [N, K, h, w] contiguous acc_t: the adjoint of the interpolation applied to
//   them (each pixel adds l0y l0x g to [i0, j0], l0y l1x g to [i0, j1], l1y l0x g to [i1, j0],
//   l1y l1x g to [i1, j1]), i.e. d ce[n] / d student[n] and d unkd[n] / d student[n]. Only when
//   with_grad and targets (resp. teacher) are given; otherwise empty tensors of shape [0].
//   All outputs are acc_t (double for float64 students, float otherwise).
#include "ce_unkd.h"

#include "op_utils.h"

#include <torch/library.h>

#include <array>
#include <tuple>

TORCH_LIBRARY_FRAGMENT(lskd, m) {
  m.def(
      "ce_unkd_forward(Tensor student, Tensor? teacher, Tensor? targets, Tensor? weight, int[] size, "
      "int ignore_index, int merged, bool with_grad) -> (Tensor ce, Tensor unkd, Tensor grad_ce, Tensor grad_unkd)");
}

namespace lskd {

std::array<int64_t, 3> check_ce_unkd(const at::Tensor& student, const OptTensor& teacher, const OptTensor& targets,
                                     const OptTensor& weight, at::IntArrayRef size, int64_t merged) {
  const char* op = "ce_unkd_forward";
  TORCH_CHECK(student.dim() == 4, "lskd: ", op, ": student must be [N, K, h, w], got ", student.sizes());
  TORCH_CHECK(at::isFloatingType(student.scalar_type()), "lskd: ", op, ": floating-point student required, got ",
              student.scalar_type());
  TORCH_CHECK(size.size() == 2 && size[0] >= 1 && size[1] >= 1, "lskd: ", op,
              ": size must be [H, W] with H, W >= 1, got ", size);
  const int64_t N = student.size(0), K = student.size(1), h = student.size(2), w = student.size(3);
  TORCH_CHECK(N == 0 || (K >= 1 && h >= 1 && w >= 1), "lskd: ", op, ": student ", student.sizes(),
              " has an empty class or spatial dimension");
  TORCH_CHECK(size[0] * size[1] < (int64_t(1) << 31) && h * w < (int64_t(1) << 31), "lskd: ", op, ": map too large");
  TORCH_CHECK(merged >= 1 && (N == 0 || merged <= K), "lskd: ", op, ": merged must be in [1, K = ", K, "], got ",
              merged);
  TORCH_CHECK(merged == 1 || !teacher.has_value(), "lskd: ", op,
              ": merged > 1 (the unbiased CE) is computed without a teacher; make a second call for UNKD");
  int64_t O = 0;
  if (teacher.has_value()) {
    const at::Tensor& t = *teacher;
    TORCH_CHECK(t.dim() == 4 && t.size(0) == N && t.size(1) >= 1 && t.size(1) <= K && t.size(2) == h && t.size(3) == w,
                "lskd: ", op, ": teacher must be [N, O, h, w] = [", N, ", O, ", h, ", ", w, "] with 1 <= O <= K = ", K,
                ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == student.scalar_type(), "lskd: ", op, ": student and teacher dtypes differ (",
                student.scalar_type(), " and ", t.scalar_type(), ")");
    TORCH_CHECK(t.device() == student.device(), "lskd: ", op, ": student and teacher devices differ");
    O = t.size(1);
  }
  if (targets.has_value()) {
    const at::Tensor& y = *targets;
    TORCH_CHECK(y.dim() == 3 && y.size(0) == N && y.size(1) == size[0] && y.size(2) == size[1], "lskd: ", op,
                ": targets must be [N, H, W] = [", N, ", ", size[0], ", ", size[1], "], got ", y.sizes());
    TORCH_CHECK(y.scalar_type() == at::kLong && y.is_contiguous() && y.device() == student.device(), "lskd: ", op,
                ": targets must be a contiguous int64 tensor on ", student.device());
  }
  if (weight.has_value()) {
    const at::Tensor& wt = *weight;
    const auto acc = acc_scalar_type(student.scalar_type());
    TORCH_CHECK(wt.dim() == 1 && wt.size(0) == N, "lskd: ", op, ": weight must be [N] = [", N, "], got ", wt.sizes());
    TORCH_CHECK(wt.scalar_type() == acc && wt.is_contiguous() && wt.device() == student.device(), "lskd: ", op,
                ": weight must be a contiguous ", acc, " tensor on ", student.device());
  }
  return {O, size[0], size[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_unkd_outputs(const at::Tensor& student, bool ce_grad,
                                                                           bool unkd_grad) {
  const auto opts = student.options().dtype(acc_scalar_type(student.scalar_type()));
  const int64_t N = student.size(0);
  at::Tensor ce = at::zeros({N}, opts);
  at::Tensor unkd = at::zeros({N}, opts);
  at::Tensor grad_ce = ce_grad ? at::empty(student.sizes(), opts) : at::empty({0}, opts);
  at::Tensor grad_unkd = unkd_grad ? at::empty(student.sizes(), opts) : at::empty({0}, opts);
  return {ce, unkd, grad_ce, grad_unkd};
}

}  // namespace lskd
