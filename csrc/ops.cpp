// Schemas of the lskd operators (one place for all backends).
//
// Backends register kernels for these schemas:
//   csrc/cpu/<op>.cpp   TORCH_LIBRARY_IMPL(lskd, CPU, m)
//   csrc/cuda/<op>.cu   TORCH_LIBRARY_IMPL(lskd, CUDA, m)
// The Triton backend (kernels/<op>.py) registers Python custom ops with the
// same signatures under the namespace "lskd_triton" (pod_forward/backward,
// sop_forward/backward, md_stats). The autograd kernels of the lskd ops are
// C++ (csrc/autograd.cpp, TORCH_LIBRARY_IMPL(lskd, Autograd, m)); the fake
// (meta) kernels are registered in Python (lskd/ops/<op>.py), as are the
// autograd formulas of the Triton ops.
//
// Conventions shared by every op (see docs/MATHEMATICS.md section 2):
//   * student/teacher: [N, C, H, W], float32/float64/bfloat16/float16, the
//     same dtype and shape, any strides (contiguous and channels-last are the
//     fast paths). acc_t = double for float64 inputs, float otherwise.
//   * spatial_mask: None or [N, H, W] acc_t, contiguous (the Python layer
//     squeezes the [N, 1, H, W] user mask and converts bool -> acc_t).
//   * channel_mask: None or [N, C] acc_t, contiguous.
//   * Masked input x = v * spatial_mask[n, h, w] * channel_mask[n, c].
//   * Outputs are acc_t; reductions are deterministic (no float atomics).
//
// pod_forward  (docs/MATHEMATICS.md section 2.1, Local POD / MD)
//   z = x_a^2 - x_b^2 if square else x_a - x_b.
//   For scale s: kh = H / s, kw = W / s, Hs = s * kh, Ws = s * kw.
//   emb [N, C, L], L = sum_s (s * Hs + s * Ws). For scale s at offset off_s:
//     emb[n, c, off_s + j * Hs + r]          = (1/kw) * sum_{col in [j*kw, (j+1)*kw)} z[n, c, r, col]
//                                               (r in [0, Hs), j in [0, s))
//     emb[n, c, off_s + s * Hs + i * Ws + q] = (1/kh) * sum_{row in [i*kh, (i+1)*kh)} z[n, c, row, q]
//                                               (q in [0, Ws), i in [0, s))
//   dist[n] = sqrt(sum_{c, l} emb[n, c, l]^2).
// pod_backward
//   grad_student[n, c, r, q] = (grad_dist[n] / dist[n], or 0 where dist == 0)
//       * sum_s [r < Hs and q < Ws] * (emb_w(s, j = q / kw, r) / kw + emb_h(s, i = r / kh, q) / kh)
//       * dz/da,  dz/da = 2 * a * (m * n)^2 if square else (m * n).
//   Output has the dtype and memory format of student (empty_like).
//
// sop_forward  (docs/MATHEMATICS.md section 2.2, MCD / second-order context pooling)
//   k = C / groups; channels >= groups * k are dropped.
//   Average pooling of x_a, x_b over each channel with window (wh, ww),
//   stride (sh, sw), padding (ph, pw), divisor wh * ww (count_include_pad):
//     Ho = (H + 2 ph - wh) / sh + 1, Wo = (W + 2 pw - ww) / sw + 1.
//   At each pooled position and group, p (student), q (teacher) in R^k,
//   u = p - q, v = p + q, term = 0.5 * (|u|^2 |v|^2 + (u.v)^2).
//   dist[n] = sqrt(sum of terms over groups and positions).
//   pooled_grad [N, groups * k, Ho, Wo] = d(sum of terms)/dp
//                                       = (|v|^2 + u.v) u + (|u|^2 + u.v) v.
//   The global variant is window = (H, W), stride = (1, 1), padding = (0, 0).
// sop_backward
//   grad_student[n, c, h, w] = (c < groups * k) * m * n
//       * (grad_dist[n] / (2 dist[n]), or 0 where dist == 0) / (wh * ww)
//       * sum over pooled positions (ho, wo) whose window covers (h, w) of pooled_grad[n, c, ho, wo].
//   student is passed for its shape, dtype and memory format only.
//
// pod_distill / sop_distill  (the loss terms, one op and one autograd node each)
//   pod_forward / sop_forward with the same arguments, then dist reduced over
//   the batch: reduction 0 = none ([N]), 1 = mean, 2 = sum (0-dim), as
//   at::Reduction. Kernels: csrc/autograd.cpp (one for CPU and CUDA, calling
//   the backend's *_forward; the backward calls *_backward).
//
// distill_terms  (several loss terms in one op and one autograd node)
//   Term t is pod_distill (kind 0) or sop_distill (kind 1) of (student[t],
//   teacher[t], spatial_mask[t], channel_mask[t]) with the batch reduction
//   `reduction` (1 = mean, 2 = sum); the output is the list of the T reduced
//   distances (0-dim each). The same student may appear in several terms (its
//   gradients add up). params holds the terms' parameters one after the other:
//     pod: 0, square, S, scale_1 .. scale_S
//     sop: 1, groups, wh, ww, sh, sw, ph, pw
//   The backward of term t runs only when its output gets a gradient, so
//   torch.autograd.grad of one term costs one term's backward.
//   Kernel: csrc/autograd.cpp (one for CPU and CUDA, calling the backend's
//   *_forward ops; the backward calls *_backward).
//
// md_stats  (docs/MATHEMATICS.md section 2.3, the fused statistics of the MD masks)
//   feat (A), feat_bg_erased (Cb), feat_new_erased (Dn): [N, C, H, W] (no masks).
//   cos_bg[n, h, w]  = <A, Cb> / (max(|A|, eps) * max(|Cb|, eps))   (over channels)
//   cos_new[n, h, w] = <A, Dn> / (max(|A|, eps) * max(|Dn|, eps))
//   gap_bg[n, c]  = |mean_hw Cb - mean_hw A|,  gap_new[n, c] = |mean_hw Dn - mean_hw A|.
//   (This is torch.nn.functional.cosine_similarity's definition.)
//
// md_masks  (docs/MATHEMATICS.md section 2.3, the masks; csrc/md_masks.cpp, one kernel for CPU and CUDA)
//   md_stats, then per image the quantiles of the statistics at rho_old / rho_new
//   (labels [N, Hl, Wl]) and the comparisons, exactly as lskd/ops/md_masks.py:
//   spatial_mask [N, 1, H, W] bool, channel_mask [N, C] bool. float64_ranks: the
//   installed torch.quantile computes float32 ranks in float64.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import lskd._C` loads this library and with it the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(lskd, m) {
  m.def(
      "pod_forward(Tensor student, Tensor teacher, Tensor? spatial_mask, Tensor? channel_mask, "
      "int[] scales, bool square) -> (Tensor dist, Tensor emb)");
  m.def(
      "pod_backward(Tensor grad_dist, Tensor student, Tensor? spatial_mask, Tensor? channel_mask, "
      "Tensor dist, Tensor emb, int[] scales, bool square) -> Tensor");
  m.def(
      "sop_forward(Tensor student, Tensor teacher, Tensor? spatial_mask, Tensor? channel_mask, "
      "int groups, int[] window, int[] stride, int[] padding) -> (Tensor dist, Tensor pooled_grad)");
  m.def(
      "sop_backward(Tensor grad_dist, Tensor student, Tensor? spatial_mask, Tensor? channel_mask, "
      "Tensor dist, Tensor pooled_grad, int groups, int[] window, int[] stride, int[] padding) -> Tensor");
  m.def(
      "pod_distill(Tensor student, Tensor teacher, Tensor? spatial_mask, Tensor? channel_mask, "
      "int[] scales, bool square, int reduction) -> Tensor");
  m.def(
      "sop_distill(Tensor student, Tensor teacher, Tensor? spatial_mask, Tensor? channel_mask, "
      "int groups, int[] window, int[] stride, int[] padding, int reduction) -> Tensor");
  m.def(
      "distill_terms(Tensor[] student, Tensor[] teacher, Tensor?[] spatial_mask, Tensor?[] channel_mask, "
      "int[] params, int reduction) -> Tensor[]");
  m.def(
      "md_stats(Tensor feat, Tensor feat_bg_erased, Tensor feat_new_erased, float eps) "
      "-> (Tensor cos_bg, Tensor cos_new, Tensor gap_bg, Tensor gap_new)");
  m.def(
      "md_masks(Tensor feat, Tensor feat_bg_erased, Tensor feat_new_erased, Tensor labels, int old_classes, "
      "int ignore_index, float eps, bool float64_ranks) -> (Tensor spatial_mask, Tensor channel_mask)");
}
