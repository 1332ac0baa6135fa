// lskd::md_masks: the MD masks in one op (docs/MATHEMATICS.md section 2.3): the CPU implementation,
// and the spec of the exact arithmetic of the CUDA kernel (csrc/cuda/md_masks.cu,
// registered for CUDA there: selection instead of sorts, 2 launches).
//
// The statistics come from the backend's lskd::md_stats kernel; the per-image
// quantiles and the comparisons are the same ATen calls, in the same order and
// dtypes, as lskd/ops/md_masks.py (md_masks and batched_quantile) makes from
// Python, so the masks are bitwise those of the Python code (and of the
// released per-image torch.quantile). In C++ they cost one Python call instead
// of about thirty.
//
//   float64_ranks: whether the installed torch.quantile computes the ranks
//   q * (L - 1) of float32 inputs in float64 (probed once in Python).
#include "common.h"
#include "op_handles.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

namespace lskd {
namespace {

// lskd.ops.md_masks.batched_quantile: values [R, L], q [R] -> [R].
at::Tensor batched_quantile(const at::Tensor& values, at::Tensor q, bool float64_ranks) {
  const at::Tensor ordered = std::get<0>(values.sort(1));
  const auto rank_dtype =
      float64_ranks && values.device().type() != c10::DeviceType::MPS ? at::kDouble : values.scalar_type();
  if (q.scalar_type() != values.scalar_type()) q = q.to(values.scalar_type());
  const at::Tensor ranks = q.to(rank_dtype) * (values.size(1) - 1);
  const at::Tensor below = ranks.floor();
  const at::Tensor lo = below.to(at::kLong).unsqueeze(1);
  const at::Tensor hi = ranks.ceil().to(at::kLong).unsqueeze(1);
  const at::Tensor weight = (ranks - below).to(values.scalar_type()).unsqueeze(1);
  const at::Tensor out = at::lerp(ordered.gather(1, lo), ordered.gather(1, hi), weight).squeeze(1);
  // torch.sort puts NaN last: a row holds a NaN iff its last sorted value is NaN.
  return out.masked_fill(ordered.select(1, -1).isnan(), std::numeric_limits<double>::quiet_NaN());
}

std::tuple<at::Tensor, at::Tensor> md_masks_kernel(const at::Tensor& feat, const at::Tensor& feat_bg_erased,
                                                   const at::Tensor& feat_new_erased, const at::Tensor& labels,
                                                   int64_t old_classes, int64_t ignore_index, double eps,
                                                   bool float64_ranks) {
  check_md_masks_args(feat, labels);
  // Nothing here is differentiable (the outputs are bool): skip the autograd layer of the calls below.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto [cos_bg, cos_new, gap_bg, gap_new] = md_stats_op().call(feat, feat_bg_erased, feat_new_erased, eps);
  const int64_t n = feat.size(0), c = feat.size(1), h = feat.size(2), w = feat.size(3);
  const int64_t total = labels.size(1) * labels.size(2);
  const at::Tensor is_old = labels.lt(old_classes);
  const at::Tensor is_new = is_old.logical_not().logical_and(labels.ne(ignore_index));
  // q = [rho_old, rho_new]: count / total in the default float dtype, as Python's `sum / total`.
  const at::Tensor q = at::cat({is_old, is_new}).sum(at::IntArrayRef{1, 2}).div(total);
  // One sort for both cosine maps and one for both gap vectors (rows: bg then new).
  const at::Tensor cos = at::cat({cos_bg.reshape({n, -1}), cos_new.reshape({n, -1})});
  const at::Tensor gap = at::cat({gap_bg, gap_new});
  const at::Tensor q_cos = batched_quantile(cos, q, float64_ranks).unsqueeze(1);
  const at::Tensor q_gap = batched_quantile(gap, q, float64_ranks).unsqueeze(1);
  const at::Tensor spatial =
      cos.slice(0, 0, n).ge(q_cos.slice(0, 0, n)).logical_or(cos.slice(0, n).le(q_cos.slice(0, n)));
  const at::Tensor channel =
      gap.slice(0, 0, n).ge(q_gap.slice(0, 0, n)).logical_or(gap.slice(0, n).le(q_gap.slice(0, n)));
  return {spatial.reshape({n, 1, h, w}), channel.reshape({n, c})};
}

}  // namespace
}  // namespace lskd

TORCH_LIBRARY_IMPL(lskd, CPU, m) {
  m.impl("md_masks", &lskd::md_masks_kernel);
}
