// The MD masks in one op (docs/MATHEMATICS.md section 2.3): the schema of lskd::md_masks.
// Kernel: csrc/cuda/md_masks.cu. The rule is lskd/ops/md_masks.py (md_statistics, then per
// image the quantiles of the statistics and the comparisons), which is also what every other
// backend runs; the CUDA kernel gives its masks bit for bit (tests/test_gpu.py and, on the
// CPU, tests/test_cuda_emulated.py check it).
//
// md_masks
//   md_stats, then per image the quantiles of the statistics at rho_old / rho_new
//   (labels [N, Hl, Wl]) and the comparisons:
//   spatial_mask [N, 1, H, W] bool, channel_mask [N, C] bool.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lskd, m) {
  m.def(
      "md_masks(Tensor feat, Tensor feat_bg_erased, Tensor feat_new_erased, Tensor labels, int old_classes, "
      "int ignore_index, float eps) -> (Tensor spatial_mask, Tensor channel_mask)");
}
