// Host-side helpers shared by the CPU and CUDA kernels: input checks, the
// Local POD embedding layout and the accumulation type. Kept free of CUDA
// headers so that it compiles in plain C++ translation units too.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <string>

namespace lskd {

// Accumulation type: double for double inputs, float for everything else.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

inline at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Element strides of a 4-D tensor [N, C, H, W] (any memory format).
struct Strides4 {
  int64_t n, c, h, w;
};
inline Strides4 strides4(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

constexpr int kMaxScales = 8;

// The Local POD embedding layout of csrc/pod_distill.cpp, passed by value to kernels.
struct PodLayout {
  int num_scales;
  int64_t s[kMaxScales];
  int64_t kh[kMaxScales];
  int64_t kw[kMaxScales];
  int64_t Hs[kMaxScales];   // s * kh: rows that take part in this scale
  int64_t Ws[kMaxScales];   // s * kw: columns that take part in this scale
  int64_t off[kMaxScales];  // offset of this scale's block in the embedding
  int64_t L;                // embedding length per (n, c)
};

inline PodLayout make_pod_layout(int64_t H, int64_t W, at::IntArrayRef scales) {
  TORCH_CHECK(!scales.empty() && static_cast<int>(scales.size()) <= kMaxScales, "lskd: pod: between 1 and ", kMaxScales,
              " scales are supported, got ", scales.size());
  PodLayout p{};
  p.num_scales = static_cast<int>(scales.size());
  int64_t off = 0;
  for (int i = 0; i < p.num_scales; ++i) {
    const int64_t s = scales[i];
    TORCH_CHECK(s >= 1 && s <= H && s <= W, "lskd: pod: scale ", s, " does not fit a map of size ", H, "x", W);
    p.s[i] = s;
    p.kh[i] = H / s;
    p.kw[i] = W / s;
    p.Hs[i] = s * p.kh[i];
    p.Ws[i] = s * p.kw[i];
    p.off[i] = off;
    off += s * p.Hs[i] + s * p.Ws[i];
  }
  p.L = off;
  return p;
}

// Checks shared by the forward ops: student/teacher pair and optional masks.
inline void check_pair(const char* op, const at::Tensor& a, const at::Tensor& b,
                       const c10::optional<at::Tensor>& spatial_mask, const c10::optional<at::Tensor>& channel_mask) {
  TORCH_CHECK(a.dim() == 4, "lskd: ", op, ": student must be [N, C, H, W], got ", a.sizes());
  TORCH_CHECK(a.sizes() == b.sizes(), "lskd: ", op, ": student ", a.sizes(), " and teacher ", b.sizes(),
              " differ in shape");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "lskd: ", op, ": student and teacher dtypes differ");
  TORCH_CHECK(a.device() == b.device(), "lskd: ", op, ": student and teacher devices differ");
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), "lskd: ", op, ": floating-point input required");
  const auto acc = acc_scalar_type(a.scalar_type());
  if (spatial_mask.has_value()) {
    const auto& m = *spatial_mask;
    TORCH_CHECK(m.dim() == 3 && m.size(0) == a.size(0) && m.size(1) == a.size(2) && m.size(2) == a.size(3),
                "lskd: ", op, ": spatial_mask must be [N, H, W] = [", a.size(0), ", ", a.size(2), ", ", a.size(3),
                "], got ", m.sizes());
    TORCH_CHECK(m.scalar_type() == acc && m.is_contiguous() && m.device() == a.device(), "lskd: ", op,
                ": spatial_mask must be a contiguous ", acc, " tensor on ", a.device());
  }
  if (channel_mask.has_value()) {
    const auto& n = *channel_mask;
    TORCH_CHECK(n.dim() == 2 && n.size(0) == a.size(0) && n.size(1) == a.size(1), "lskd: ", op,
                ": channel_mask must be [N, C] = [", a.size(0), ", ", a.size(1), "], got ", n.sizes());
    TORCH_CHECK(n.scalar_type() == acc && n.is_contiguous() && n.device() == a.device(), "lskd: ", op,
                ": channel_mask must be a contiguous ", acc, " tensor on ", a.device());
  }
}

// Checks of the pooling geometry of sop_forward/sop_backward; returns {Ho, Wo}.
inline std::pair<int64_t, int64_t> sop_geometry(const at::Tensor& a, int64_t groups, at::IntArrayRef window,
                                                at::IntArrayRef stride, at::IntArrayRef padding) {
  TORCH_CHECK(groups >= 1 && groups <= a.size(1), "lskd: sop: groups must be in [1, C = ", a.size(1), "], got ",
              groups);
  TORCH_CHECK(window.size() == 2 && stride.size() == 2 && padding.size() == 2,
              "lskd: sop: window, stride and padding must have two entries");
  TORCH_CHECK(window[0] >= 1 && window[1] >= 1 && stride[0] >= 1 && stride[1] >= 1 && padding[0] >= 0 &&
                  padding[1] >= 0 && 2 * padding[0] <= window[0] && 2 * padding[1] <= window[1],
              "lskd: sop: invalid pooling window ", window, " stride ", stride, " padding ", padding);
  const int64_t Ho = (a.size(2) + 2 * padding[0] - window[0]) / stride[0] + 1;
  const int64_t Wo = (a.size(3) + 2 * padding[1] - window[1]) / stride[1] + 1;
  TORCH_CHECK(Ho >= 1 && Wo >= 1, "lskd: sop: pooling window ", window, " does not fit a map of size ", a.size(2), "x",
              a.size(3));
  return {Ho, Wo};
}

}  // namespace lskd
