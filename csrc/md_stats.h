// The statistics op (csrc/md_stats.cpp) as lskd::md_masks calls it.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace lskd {

// lskd::md_stats through the dispatcher: (cos_bg, cos_new, gap_bg, gap_new).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_md_stats(const at::Tensor& feat,
                                                                         const at::Tensor& feat_bg_erased,
                                                                         const at::Tensor& feat_new_erased, double eps);

}  // namespace lskd
