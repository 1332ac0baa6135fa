// The host helpers of pseudo_labels (csrc/pseudo_labels.cpp) that its CPU and CUDA kernels share.
#pragma once

#include "common.h"

#include <tuple>

namespace lskd {

// Shapes, dtypes and devices of pseudo_labels' inputs; returns O (the teacher's classes).
int64_t check_pseudo_labels(const at::Tensor& teacher, const at::Tensor& labels, const at::Tensor& thresholds);

// targets [N, H, W] int64 (uninitialised), accepted and eligible [N] int64 zero-filled.
std::tuple<at::Tensor, at::Tensor, at::Tensor> pseudo_labels_outputs(const at::Tensor& labels);

}  // namespace lskd
