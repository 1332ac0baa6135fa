// What the kernels of lskd::md_masks share (defined in csrc/md_masks.cpp).
#pragma once

#include <ATen/ATen.h>

namespace lskd {

// Whether the masks take the quantile ranks q * (L - 1) of float32 values in float64 (as newer
// torch versions' quantile does, pytorch/pytorch#187574) or in float32: as this torch does
// (probed once, as lskd/ops/md_masks.py does), unless a test set the rule.
bool quantile_float64_ranks();

// -1: as this torch does; 0 / 1: float32 / float64 ranks (tests of both rules:
// lskd._C._set_quantile_rank_rule, and the CUDA emulation's emu_set_float64_ranks).
void set_quantile_rank_rule(int rule);

// The argument checks every kernel makes (shapes, label dtype, devices).
void check_md_masks_args(const at::Tensor& feat, const at::Tensor& labels);

}  // namespace lskd
