// PLOP's entropy pseudo-labels on bilinearly upsampled teacher logits, fused: the schema of
// lskd::pseudo_labels and the input checks and outputs its kernels share. Kernels:
// csrc/cpu/pseudo_labels.cpp, csrc/cuda/pseudo_labels.cu, kernels/pseudo_labels.py (Triton). No
// autograd (the labels are the teacher's). Definitions: docs/MATHEMATICS.md §2.5.
//
// pseudo_labels
//   teacher [N, O, h, w] (any strides, O >= 1), labels [N, H, W] int64 contiguous, thresholds [O]
//   acc_t contiguous (acc_t: double for a float64 teacher, float otherwise), all on one device.
//   A pixel p of image n with v = labels[n, p] < O is eligible (background or an old class: PLOP
//   relabels it); the others keep their label: targets[n, p] = v.
//   For an eligible pixel, t = the teacher logits upsampled to (H, W) at p in acc_t (bilinear,
//   align_corners=False, torch's upsample_bilinear2d rule with an output size, as ce_unkd):
//     c* = the first class of largest t (a NaN counts as the largest, as torch.max);
//     m = t[c*], e_c = exp(t_c - m), S = sum_c e_c,
//     entropy = (log S - sum_c e_c (t_c - m) / S) / log O   (the Shannon entropy of softmax(t)
//               divided by log O; 0 when O == 1);
//     accepted = entropy < thresholds[c*] (false for NaN);
//     targets[n, p] = accepted ? c* : ignore_index.
//   accepted[n] = the image's accepted eligible pixels, eligible[n] = its eligible pixels (int64).
#include "pseudo_labels.h"

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lskd, m) {
  m.def(
      "pseudo_labels(Tensor teacher, Tensor labels, Tensor thresholds, int ignore_index) "
      "-> (Tensor targets, Tensor accepted, Tensor eligible)");
}

namespace lskd {

int64_t check_pseudo_labels(const at::Tensor& teacher, const at::Tensor& labels, const at::Tensor& thresholds) {
  const char* op = "pseudo_labels";
  TORCH_CHECK(teacher.dim() == 4, "lskd: ", op, ": teacher must be [N, O, h, w], got ", teacher.sizes());
  TORCH_CHECK(at::isFloatingType(teacher.scalar_type()), "lskd: ", op, ": floating-point teacher required, got ",
              teacher.scalar_type());
  const int64_t N = teacher.size(0), O = teacher.size(1);
  TORCH_CHECK(N == 0 || (O >= 1 && teacher.size(2) >= 1 && teacher.size(3) >= 1), "lskd: ", op, ": teacher ",
              teacher.sizes(), " has an empty class or spatial dimension");
  TORCH_CHECK(labels.dim() == 3 && labels.size(0) == N && labels.size(1) >= 1 && labels.size(2) >= 1, "lskd: ", op,
              ": labels must be [N, H, W] with N = ", N, ", got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous() && labels.device() == teacher.device(),
              "lskd: ", op, ": labels must be a contiguous int64 tensor on ", teacher.device());
  TORCH_CHECK(
      labels.size(1) * labels.size(2) < (int64_t(1) << 31) && teacher.size(2) * teacher.size(3) < (int64_t(1) << 31),
      "lskd: ", op, ": map too large");
  const auto acc = acc_scalar_type(teacher.scalar_type());
  TORCH_CHECK(thresholds.dim() == 1 && thresholds.size(0) == O, "lskd: ", op, ": thresholds must be [O] = [", O,
              "], got ", thresholds.sizes());
  TORCH_CHECK(thresholds.scalar_type() == acc && thresholds.is_contiguous() && thresholds.device() == teacher.device(),
              "lskd: ", op, ": thresholds must be a contiguous ", acc, " tensor on ", teacher.device());
  return O;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pseudo_labels_outputs(const at::Tensor& labels) {
  const int64_t N = labels.size(0);
  return {at::empty_like(labels, at::MemoryFormat::Contiguous), at::zeros({N}, labels.options()),
          at::zeros({N}, labels.options())};
}

}  // namespace lskd
