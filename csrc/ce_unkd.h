// The host helpers of ce_unkd_forward (csrc/ce_unkd.cpp) that its CPU and CUDA kernels share.
#pragma once

#include "common.h"

#include <array>
#include <optional>
#include <tuple>

namespace lskd {

// Shapes, dtypes and devices of ce_unkd_forward's inputs (the target values are the Python
// wrapper's), merged in [1, K] and 1 with a teacher. Returns {O (0 without teacher), H, W}.
std::array<int64_t, 3> check_ce_unkd(const at::Tensor& student, const std::optional<at::Tensor>& teacher,
                                     const std::optional<at::Tensor>& targets, const std::optional<at::Tensor>& weight,
                                     at::IntArrayRef size, int64_t merged);

// ce and unkd [N] zero-filled; grad_ce / grad_unkd [N, K, h, w] contiguous (uninitialised) when
// computed, else empty [0]. All acc_t.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_unkd_outputs(const at::Tensor& student, bool ce_grad,
                                                                           bool unkd_grad);

}  // namespace lskd
