// MD masks (docs/MATHEMATICS.md section 2.3): CPU kernel of lskd::md_masks (schema in
// csrc/md_masks.cpp).
//
// lskd::md_stats, then per image, in one pass, the rule of lskd/ops/md_masks.py
// (md_masks_from_statistics), whose masks it gives bit for bit:
//   - the numbers of old (label < O) and new (label >= O, != ignore) pixels, the labels
//     compared in their own integer type (O and ignore cast to it, as ATen's comparisons with
//     a scalar do); q = (float)count / (float)total, torch's true division of an int64 sum;
//   - per row (cos_bg, cos_new: L = H * W; gap_bg, gap_new: L = C) the quantile as
//     batched_quantile takes it: rank = q * (L - 1) in float64 or float32 as this torch's
//     quantile does (csrc/md_masks.cpp), the lo-th and hi-th smallest values by selection
//     (a row holding a NaN gives NaN, as torch.sort puts NaN last), then torch.lerp with its
//     CPU rounding (one FMA);
//   - the masks bg >= Q_bg || new <= Q_new (a NaN Q gives false).
// Why a kernel rather than the rule's ATen calls: at the demo's step shapes (16 images, 8x8
// maps) those calls cost about 0.45 ms a map on one thread, against a few microseconds here
// (benches/results/cpu-2026-12-06.md). Images are independent; each is computed by one
// thread, so the masks do not depend on the thread count.
#include "../md_masks.h"
#include "../md_stats.h"
#include "cpu_utils.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace lskd {
namespace {

struct Counts {
  int64_t old_pixels = 0, new_pixels = 0;
};

template <typename label_t>
Counts count_labels(const label_t* y, int64_t total, int64_t old_classes, int64_t ignore_index) {
  const label_t old_c = static_cast<label_t>(old_classes), ignore = static_cast<label_t>(ignore_index);
  Counts c;
  for (int64_t i = 0; i < total; ++i) {
    const bool is_old = y[i] < old_c;
    c.old_pixels += is_old;
    c.new_pixels += !is_old && y[i] != ignore;
  }
  return c;
}

template <typename acc>
struct Rank {
  int64_t lo, hi;
  acc weight;
};

// batched_quantile's ranks: q in the values' dtype, rank = q * (L - 1) in float64 for float64
// values or float64_ranks, else in float32.
template <typename acc>
Rank<acc> make_rank(float q, int64_t L, bool float64_ranks) {
  if (std::is_same<acc, double>::value || float64_ranks) {
    const double rank = static_cast<double>(q) * static_cast<double>(L - 1);
    const double below = std::floor(rank);
    return {static_cast<int64_t>(below), static_cast<int64_t>(std::ceil(rank)), static_cast<acc>(rank - below)};
  }
  const float rank = q * static_cast<float>(L - 1);
  const float below = std::floor(rank);
  return {static_cast<int64_t>(below), static_cast<int64_t>(std::ceil(rank)), static_cast<acc>(rank - below)};
}

// torch.lerp as ATen's CPU kernel rounds it.
template <typename acc>
acc lerp_exact(acc a, acc b, acc w) {
  const acc d = b - a;
  return std::abs(w) < acc(0.5) ? std::fma(w, d, a) : std::fma(w - acc(1), d, b);
}

// The quantile of row [L] at q (scratch: L values, reordered).
template <typename acc>
acc row_quantile(const acc* row, int64_t L, float q, bool float64_ranks, acc* scratch) {
  for (int64_t i = 0; i < L; ++i) {
    if (std::isnan(row[i])) return std::numeric_limits<acc>::quiet_NaN();
    scratch[i] = row[i];
  }
  const Rank<acc> r = make_rank<acc>(q, L, float64_ranks);
  std::nth_element(scratch, scratch + r.lo, scratch + L);
  const acc v_lo = scratch[r.lo];
  const acc v_hi = r.hi == r.lo ? v_lo : *std::min_element(scratch + r.lo + 1, scratch + L);
  return lerp_exact(v_lo, v_hi, r.weight);
}

// mask[i] = bg[i] >= Q(bg, q_old) || nw[i] <= Q(nw, q_new), i < L.
template <typename acc>
void row_mask(const acc* bg, const acc* nw, int64_t L, float q_old, float q_new, bool float64_ranks, acc* scratch,
              bool* mask) {
  if (L == 0) return;
  const acc q_bg = row_quantile(bg, L, q_old, float64_ranks, scratch);
  const acc q_nw = row_quantile(nw, L, q_new, float64_ranks, scratch);
  for (int64_t i = 0; i < L; ++i) mask[i] = bg[i] >= q_bg || nw[i] <= q_nw;
}

template <typename acc, typename label_t>
void md_masks_kernel(const at::Tensor& cos_bg, const at::Tensor& cos_new, const at::Tensor& gap_bg,
                     const at::Tensor& gap_new, const at::Tensor& labels, int64_t old_classes, int64_t ignore_index,
                     bool float64_ranks, at::Tensor& spatial, at::Tensor& channel) {
  const int64_t N = gap_bg.size(0), C = gap_bg.size(1), HW = cos_bg.numel() / std::max<int64_t>(N, 1);
  const int64_t total = labels.size(1) * labels.size(2);
  const acc *cb = cos_bg.data_ptr<acc>(), *cn = cos_new.data_ptr<acc>();
  const acc *gb = gap_bg.data_ptr<acc>(), *gn = gap_new.data_ptr<acc>();
  const label_t* y = labels.data_ptr<label_t>();
  bool* sm = spatial.data_ptr<bool>();
  bool* cm = channel.data_ptr<bool>();
  const float t = static_cast<float>(total);
  at::parallel_for(0, N, cpu::grain_for(total + 2 * (HW + C)), [&](int64_t n0, int64_t n1) {
    std::vector<acc> scratch(std::max(HW, C));
    for (int64_t n = n0; n < n1; ++n) {
      const Counts k = count_labels(y + n * total, total, old_classes, ignore_index);
      const float q_old = static_cast<float>(k.old_pixels) / t, q_new = static_cast<float>(k.new_pixels) / t;
      row_mask(cb + n * HW, cn + n * HW, HW, q_old, q_new, float64_ranks, scratch.data(), sm + n * HW);
      row_mask(gb + n * C, gn + n * C, C, q_old, q_new, float64_ranks, scratch.data(), cm + n * C);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> md_masks_cpu(const at::Tensor& feat, const at::Tensor& feat_bg_erased,
                                                const at::Tensor& feat_new_erased, const at::Tensor& labels,
                                                int64_t old_classes, int64_t ignore_index, double eps) {
  check_md_masks_args(feat, labels);
  const bool float64_ranks = quantile_float64_ranks();
  // Nothing here is differentiable (the outputs are bool): skip the autograd layer of md_stats.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto stats = call_md_stats(feat, feat_bg_erased, feat_new_erased, eps);
  const at::Tensor cos_bg = std::get<0>(stats).contiguous(), cos_new = std::get<1>(stats).contiguous();
  const at::Tensor gap_bg = std::get<2>(stats).contiguous(), gap_new = std::get<3>(stats).contiguous();
  const int64_t N = feat.size(0), C = feat.size(1), H = feat.size(2), W = feat.size(3);
  const auto bool_opts = feat.options().dtype(at::kBool);
  at::Tensor spatial = at::empty({N, 1, H, W}, bool_opts);
  at::Tensor channel = at::empty({N, C}, bool_opts);
  if (N == 0) return std::make_tuple(spatial, channel);
  const at::Tensor lab = labels.contiguous();
  AT_DISPATCH_FLOATING_TYPES(cos_bg.scalar_type(), "lskd_md_masks_cpu", [&] {
    using acc = scalar_t;
    AT_DISPATCH_INTEGRAL_TYPES(lab.scalar_type(), "lskd_md_masks_cpu_labels", [&] {
      md_masks_kernel<acc, scalar_t>(cos_bg, cos_new, gap_bg, gap_new, lab, old_classes, ignore_index, float64_ranks,
                                     spatial, channel);
    });
  });
  return std::make_tuple(spatial, channel);
}

}  // namespace
}  // namespace lskd

TORCH_LIBRARY_IMPL(lskd, CPU, m) {
  m.impl("md_masks", &lskd::md_masks_cpu);
}
