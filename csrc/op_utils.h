// Helpers of the op files (csrc/<op>.cpp): the C++ autograd kernels, the batch reductions of
// the loss ops and the typed dispatcher calls one op makes to another.
//
// Autograd is a torch::autograd::Function, as torchvision does for roi_align, rather than a
// Python registration (torch.library.register_autograd), which costs tens of microseconds of
// Python per call. Only the student gets a gradient; the teacher and the masks never do, so
// they enter the graph detached. Only long-stable APIs are used (torch::autograd::Function<T>,
// AutogradContext, saved_data, c10::Dispatcher typed handles) so that this compiles against
// torch 2.11 to 2.14.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include <optional>

namespace lskd {

using OptTensor = std::optional<at::Tensor>;
using OptTensorList = c10::List<OptTensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The typed handle of an lskd op, for a function-local static (looked up once).
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Inputs that never get a gradient: detached, so that the graph keeps no edge to them (and
// nothing of the graph that produced them).
inline at::Tensor no_grad_input(const at::Tensor& t) {
  return t.requires_grad() ? t.detach() : t;
}
inline OptTensor no_grad_input(const OptTensor& t) {
  if (t.has_value() && t->defined() && t->requires_grad()) return t->detach();
  return t;
}
inline at::Tensor or_undefined(const OptTensor& t) {
  return t.has_value() ? *t : at::Tensor();
}
inline OptTensor as_optional(const at::Tensor& t) {
  return t.defined() ? OptTensor(t) : OptTensor();
}

// Whether the autograd graph must be recorded (the only differentiable input is the student).
inline bool needs_graph(const at::Tensor& student) {
  return at::GradMode::is_enabled() && student.requires_grad();
}

// Without create_graph nothing records the backward: the backward ops then skip the autograd
// layer (they have no autograd kernel; with create_graph=True the autograd fallback warns that
// the double backward is not implemented).
struct BelowAutogradUnlessRecording {
  std::optional<at::AutoDispatchBelowADInplaceOrView> below;
  BelowAutogradUnlessRecording() {
    if (!at::GradMode::is_enabled()) below.emplace();
  }
};

// The batch reduction of the loss ops, as at::Reduction.
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

inline void check_reduction(const char* op, int64_t reduction) {
  TORCH_CHECK(reduction == kNone || reduction == kMean || reduction == kSum, "lskd: ", op,
              ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

// The per-image distances reduced over the batch.
inline at::Tensor reduce(const at::Tensor& dist, int64_t reduction) {
  if (reduction == kMean) return dist.mean();
  if (reduction == kSum) return dist.sum();
  return dist;
}

// d(reduced)/d(dist) applied to the incoming gradient: the [N] gradient of dist (an expanded
// view for mean/sum: the kernels read grad_dist with its stride). SymInt: under torch.compile
// with dynamic shapes N stays symbolic (no specialisation).
inline at::Tensor grad_of_dist(const at::Tensor& grad, int64_t reduction, const c10::SymInt& n) {
  if (reduction == kMean) return grad.div(c10::Scalar(n)).expand_symint({n});  // as MeanBackward: g / N per image
  if (reduction == kSum) return grad.expand_symint({n});
  return grad.contiguous();
}

}  // namespace lskd
