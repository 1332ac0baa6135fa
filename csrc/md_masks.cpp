// The MD masks in one op (docs/MATHEMATICS.md section 2.3): the schema of lskd::md_masks and what
// its kernels share. Kernels: csrc/cpu/md_masks.cpp, csrc/cuda/md_masks.cu. The rule is
// lskd/ops/md_masks.py (md_statistics, then per image the quantiles of the statistics and the
// comparisons), which the Triton and reference backends run; both kernels give its masks bit
// for bit (tests/test_md_masks.py, tests/test_gpu.py and, on the CPU, tests/test_cuda_emulated.py
// check it).
//
// md_masks
//   md_stats, then per image the quantiles of the statistics at rho_old / rho_new
//   (labels [N, Hl, Wl]) and the comparisons:
//   spatial_mask [N, 1, H, W] bool, channel_mask [N, C] bool.
#include "md_masks.h"

#include <torch/library.h>

#include <atomic>
#include <cmath>

TORCH_LIBRARY_FRAGMENT(lskd, m) {
  m.def(
      "md_masks(Tensor feat, Tensor feat_bg_erased, Tensor feat_new_erased, Tensor labels, int old_classes, "
      "int ignore_index, float eps) -> (Tensor spatial_mask, Tensor channel_mask)");
}

namespace lskd {
namespace {

// The weight of the lerp between 0 and 1 at rank 59.647... is the rank's fractional part, which
// differs between float32 and float64 ranks.
bool probe_quantile_float64_ranks() {
  const at::Tensor values = at::zeros({67}, at::kFloat);
  values.slice(0, 60).fill_(1.0);
  const at::Tensor q = at::scalar_tensor(0.9037463665008545, at::kFloat);
  const double rank = static_cast<double>(q.item<float>()) * 66;
  return at::quantile(values, q).item<float>() == static_cast<float>(rank - std::floor(rank));
}

std::atomic<int> rank_rule{-1};

}  // namespace

bool quantile_float64_ranks() {
  const int rule = rank_rule.load();
  if (rule >= 0) return rule != 0;
  static const bool probed = probe_quantile_float64_ranks();
  return probed;
}

void set_quantile_rank_rule(int rule) {
  rank_rule.store(rule < 0 ? -1 : (rule != 0 ? 1 : 0));
}

void check_md_masks_args(const at::Tensor& feat, const at::Tensor& labels) {
  TORCH_CHECK(feat.dim() == 4, "lskd: md_masks: feat must be [N, C, H, W], got ", feat.sizes());
  TORCH_CHECK(labels.dim() == 3 && labels.size(0) == feat.size(0) && labels.numel() > 0,
              "lskd: md_masks: labels must be [N, Hl, Wl] with N = ", feat.size(0), ", got ", labels.sizes());
  TORCH_CHECK(labels.device() == feat.device(), "lskd: md_masks: labels are on ", labels.device(),
              " but the features are on ", feat.device());
  TORCH_CHECK(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false),
              "lskd: md_masks: labels must be an integer tensor, got ", labels.scalar_type());
}

}  // namespace lskd
