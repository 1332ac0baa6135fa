// Statistics of the MD masks (docs/MATHEMATICS.md section 2.3): the schema of lskd::md_stats.
// Kernels: csrc/cpu/md_stats.cpp, csrc/cuda/md_stats.cu, kernels/md_stats.py (Triton); no
// autograd (the masks are the teacher's). Conventions shared by every op: csrc/README.md.
//
// md_stats
//   feat (A), feat_bg_erased (Cb), feat_new_erased (Dn): [N, C, H, W] (no masks).
//   cos_bg[n, h, w]  = <A, Cb> / (max(|A|, eps) * max(|Cb|, eps))   (over channels)
//   cos_new[n, h, w] = <A, Dn> / (max(|A|, eps) * max(|Dn|, eps))
//   gap_bg[n, c]  = |mean_hw Cb - mean_hw A|,  gap_new[n, c] = |mean_hw Dn - mean_hw A|.
//   (This is torch.nn.functional.cosine_similarity's definition.)
#include "md_stats.h"

#include "op_utils.h"

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lskd, m) {
  m.def(
      "md_stats(Tensor feat, Tensor feat_bg_erased, Tensor feat_new_erased, float eps) "
      "-> (Tensor cos_bg, Tensor cos_new, Tensor gap_bg, Tensor gap_new)");
}

namespace lskd {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_md_stats(const at::Tensor& feat,
                                                                         const at::Tensor& feat_bg_erased,
                                                                         const at::Tensor& feat_new_erased,
                                                                         double eps) {
  using Sig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                         const at::Tensor&, double);
  static const auto op = find_op<Sig>("lskd::md_stats");
  return op.call(feat, feat_bg_erased, feat_new_erased, eps);
}

}  // namespace lskd
