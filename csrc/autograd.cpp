// Autograd kernels of the lskd operators, in C++ (TORCH_LIBRARY_IMPL(lskd, Autograd, m)).
//
// Autograd is a torch::autograd::Function, as torchvision does for roi_align,
// rather than a Python registration (torch.library.register_autograd), which
// costs tens of microseconds of Python per call (the Python autograd.Function,
// fill_defaults, redispatch, the Python backward):
//
//   pod_forward / sop_forward   the raw ops of the schema (csrc/ops.cpp):
//       outputs (dist, aux): aux (emb / pooled_grad) gets no gradient
//       (materialize_grads is off, so no zero-filled gradient is built for it).
//   pod_distill / sop_distill   the same plus the reduction of dist over the
//       batch (0 = none, 1 = mean, 2 = sum as at::Reduction), one autograd node
//       for the whole loss term (no separate MeanBackward/SumBackward node).
//   distill_terms   several pod/sop terms in one op and one autograd node with
//       one output per term; a term whose output gets no gradient runs no backward.
//
// The forward calls the backend kernel (CPU or CUDA) through the dispatcher
// below autograd; the backward calls lskd::pod_backward / lskd::sop_backward
// through the dispatcher, so the CPU and CUDA kernels (and the fake kernels
// under torch.compile) are all used. Only the student (input 0) gets a
// gradient; the teacher and the masks never do.
//
// Only long-stable APIs are used (torch::autograd::Function<T>,
// AutogradContext, save_for_backward, get_saved_variables, saved_data,
// c10::Dispatcher typed handles, csrc/op_handles.h) so that this compiles against torch 2.11 to 2.14.
#include "op_handles.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace lskd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---------------------------------------------------------------- helpers

// Inputs that never get a gradient: detached, so that the graph keeps no edge
// to them (and nothing of the graph that produced them).
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

// d(reduced)/d(dist) applied to the incoming gradient: the [N] gradient of dist
// (an expanded view for mean/sum: the kernels read grad_dist with its stride).
// SymInt: under torch.compile with dynamic shapes N stays symbolic (no specialisation).
inline at::Tensor grad_of_dist(const at::Tensor& grad, int64_t reduction, const c10::SymInt& n) {
  if (reduction == kMean) return grad.div(c10::Scalar(n)).expand_symint({n});  // as MeanBackward: g / N per image
  if (reduction == kSum) return grad.expand_symint({n});
  return grad.contiguous();
}

// ---------------------------------------------------------------- Local POD

// Saved: student, spatial_mask, channel_mask, dist, emb; saved_data: scales, square, reduction.
inline void pod_save(AutogradContext* ctx, const at::Tensor& student, const OptTensor& m, const OptTensor& k,
                     const at::Tensor& dist, const at::Tensor& emb, at::IntArrayRef scales, bool square,
                     int64_t reduction) {
  ctx->save_for_backward({student, or_undefined(m), or_undefined(k), dist, emb});
  ctx->saved_data["scales"] = scales.vec();
  ctx->saved_data["square"] = square;
  ctx->saved_data["reduction"] = reduction;
  ctx->set_materialize_grads(false);
}

inline at::Tensor pod_grad(AutogradContext* ctx, const at::Tensor& grad) {
  if (!grad.defined() || !ctx->needs_input_grad(0)) return at::Tensor();
  const auto saved = ctx->get_saved_variables();
  const at::Tensor& student = saved[0];
  const at::Tensor& dist = saved[3];
  const auto scales = ctx->saved_data["scales"].toIntVector();
  const bool square = ctx->saved_data["square"].toBool();
  const int64_t reduction = ctx->saved_data["reduction"].toInt();
  const at::Tensor grad_dist = grad_of_dist(grad, reduction, dist.sym_size(0));
  // Without create_graph nothing records the backward: skip the autograd layer
  // (pod_backward has no autograd kernel; with create_graph=True its autograd
  // fallback warns that the double backward is not implemented).
  std::optional<at::AutoDispatchBelowADInplaceOrView> below;
  if (!at::GradMode::is_enabled()) below.emplace();
  return pod_backward_op().call(grad_dist, student, as_optional(saved[1]), as_optional(saved[2]), dist, saved[4],
                                scales, square);
}

struct PodForwardFunction : public torch::autograd::Function<PodForwardFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                               const OptTensor& m, const OptTensor& k, at::IntArrayRef scales, bool square) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dist, emb] = pod_forward_op().call(student, teacher, m, k, scales, square);
    pod_save(ctx, student, m, k, dist, emb, scales, square, kNone);
    return {dist, emb};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // grads[1] (emb) is ignored: emb is an auxiliary output.
    return {pod_grad(ctx, grads[0]), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct PodDistillFunction : public torch::autograd::Function<PodDistillFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                            const OptTensor& m, const OptTensor& k, at::IntArrayRef scales, bool square,
                            int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dist, emb] = pod_forward_op().call(student, teacher, m, k, scales, square);
    pod_save(ctx, student, m, k, dist, emb, scales, square, reduction);
    return reduce(dist, reduction);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {
        pod_grad(ctx, grads[0]), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> pod_forward_autograd(const at::Tensor& student, const at::Tensor& teacher,
                                                        const OptTensor& m, const OptTensor& k, at::IntArrayRef scales,
                                                        bool square) {
  if (!needs_graph(student)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return pod_forward_op().call(student, teacher, m, k, scales, square);
  }
  auto out =
      PodForwardFunction::apply(student, no_grad_input(teacher), no_grad_input(m), no_grad_input(k), scales, square);
  return {out[0], out[1]};
}

at::Tensor pod_distill_autograd(const at::Tensor& student, const at::Tensor& teacher, const OptTensor& m,
                                const OptTensor& k, at::IntArrayRef scales, bool square, int64_t reduction) {
  check_reduction("pod_distill", reduction);
  if (!needs_graph(student)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return pod_distill_op().call(student, teacher, m, k, scales, square, reduction);
  }
  return PodDistillFunction::apply(student, no_grad_input(teacher), no_grad_input(m), no_grad_input(k), scales, square,
                                   reduction);
}

// Backend kernel of pod_distill (CPU and CUDA): the backend's pod_forward, then the reduction.
at::Tensor pod_distill_kernel(const at::Tensor& student, const at::Tensor& teacher, const OptTensor& m,
                              const OptTensor& k, at::IntArrayRef scales, bool square, int64_t reduction) {
  check_reduction("pod_distill", reduction);
  auto out = pod_forward_op().call(student, teacher, m, k, scales, square);
  return reduce(std::get<0>(out), reduction);
}

// ---------------------------------------------------------------- second-order pooling

// Saved: student, spatial_mask, channel_mask, dist, pooled_grad;
// saved_data: groups, window, stride, padding, reduction.
inline void sop_save(AutogradContext* ctx, const at::Tensor& student, const OptTensor& m, const OptTensor& k,
                     const at::Tensor& dist, const at::Tensor& pooled_grad, int64_t groups, at::IntArrayRef window,
                     at::IntArrayRef stride, at::IntArrayRef padding, int64_t reduction) {
  ctx->save_for_backward({student, or_undefined(m), or_undefined(k), dist, pooled_grad});
  ctx->saved_data["groups"] = groups;
  ctx->saved_data["window"] = window.vec();
  ctx->saved_data["stride"] = stride.vec();
  ctx->saved_data["padding"] = padding.vec();
  ctx->saved_data["reduction"] = reduction;
  ctx->set_materialize_grads(false);
}

inline at::Tensor sop_grad(AutogradContext* ctx, const at::Tensor& grad) {
  if (!grad.defined() || !ctx->needs_input_grad(0)) return at::Tensor();
  const auto saved = ctx->get_saved_variables();
  const at::Tensor& student = saved[0];
  const at::Tensor& dist = saved[3];
  const int64_t groups = ctx->saved_data["groups"].toInt();
  const auto window = ctx->saved_data["window"].toIntVector();
  const auto stride = ctx->saved_data["stride"].toIntVector();
  const auto padding = ctx->saved_data["padding"].toIntVector();
  const int64_t reduction = ctx->saved_data["reduction"].toInt();
  const at::Tensor grad_dist = grad_of_dist(grad, reduction, dist.sym_size(0));
  std::optional<at::AutoDispatchBelowADInplaceOrView> below;  // as in pod_grad
  if (!at::GradMode::is_enabled()) below.emplace();
  return sop_backward_op().call(grad_dist, student, as_optional(saved[1]), as_optional(saved[2]), dist, saved[4],
                                groups, window, stride, padding);
}

struct SopForwardFunction : public torch::autograd::Function<SopForwardFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                               const OptTensor& m, const OptTensor& k, int64_t groups, at::IntArrayRef window,
                               at::IntArrayRef stride, at::IntArrayRef padding) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dist, pooled_grad] = sop_forward_op().call(student, teacher, m, k, groups, window, stride, padding);
    sop_save(ctx, student, m, k, dist, pooled_grad, groups, window, stride, padding, kNone);
    return {dist, pooled_grad};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // grads[1] (pooled_grad) is ignored: it is an auxiliary output.
    return {sop_grad(ctx, grads[0]),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

struct SopDistillFunction : public torch::autograd::Function<SopDistillFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                            const OptTensor& m, const OptTensor& k, int64_t groups, at::IntArrayRef window,
                            at::IntArrayRef stride, at::IntArrayRef padding, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dist, pooled_grad] = sop_forward_op().call(student, teacher, m, k, groups, window, stride, padding);
    sop_save(ctx, student, m, k, dist, pooled_grad, groups, window, stride, padding, reduction);
    return reduce(dist, reduction);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {sop_grad(ctx, grads[0]),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> sop_forward_autograd(const at::Tensor& student, const at::Tensor& teacher,
                                                        const OptTensor& m, const OptTensor& k, int64_t groups,
                                                        at::IntArrayRef window, at::IntArrayRef stride,
                                                        at::IntArrayRef padding) {
  if (!needs_graph(student)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return sop_forward_op().call(student, teacher, m, k, groups, window, stride, padding);
  }
  auto out = SopForwardFunction::apply(student, no_grad_input(teacher), no_grad_input(m), no_grad_input(k), groups,
                                       window, stride, padding);
  return {out[0], out[1]};
}

at::Tensor sop_distill_autograd(const at::Tensor& student, const at::Tensor& teacher, const OptTensor& m,
                                const OptTensor& k, int64_t groups, at::IntArrayRef window, at::IntArrayRef stride,
                                at::IntArrayRef padding, int64_t reduction) {
  check_reduction("sop_distill", reduction);
  if (!needs_graph(student)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return sop_distill_op().call(student, teacher, m, k, groups, window, stride, padding, reduction);
  }
  return SopDistillFunction::apply(student, no_grad_input(teacher), no_grad_input(m), no_grad_input(k), groups, window,
                                   stride, padding, reduction);
}

at::Tensor sop_distill_kernel(const at::Tensor& student, const at::Tensor& teacher, const OptTensor& m,
                              const OptTensor& k, int64_t groups, at::IntArrayRef window, at::IntArrayRef stride,
                              at::IntArrayRef padding, int64_t reduction) {
  check_reduction("sop_distill", reduction);
  auto out = sop_forward_op().call(student, teacher, m, k, groups, window, stride, padding);
  return reduce(std::get<0>(out), reduction);
}

// ---------------------------------------------------------------- several terms, one node

// One term of lskd::distill_terms, parsed from its params (see csrc/ops.cpp).
struct TermSpec {
  int64_t kind = 0;  // 0 = pod_distill, 1 = sop_distill
  bool square = true;
  std::vector<int64_t> scales;
  int64_t groups = 1;
  std::vector<int64_t> window, stride, padding;
};

std::vector<TermSpec> parse_terms(at::IntArrayRef params) {
  std::vector<TermSpec> specs;
  size_t i = 0;
  const size_t n = params.size();
  auto need = [&](size_t count, const char* what) {
    TORCH_CHECK(i + count <= n, "lskd: distill_terms: params end inside the ", what, " of term ", specs.size(), " (", n,
                " values)");
  };
  while (i < n) {
    TermSpec t;
    t.kind = params[i++];
    if (t.kind == 0) {
      need(2, "pod parameters");
      t.square = params[i++] != 0;
      const int64_t ns = params[i++];
      TORCH_CHECK(ns >= 1 && ns <= 8, "lskd: distill_terms: term ", specs.size(), " has ", ns,
                  " scales (1 to 8 are supported)");
      need(static_cast<size_t>(ns), "scales");
      t.scales.assign(params.begin() + i, params.begin() + i + ns);
      i += static_cast<size_t>(ns);
    } else if (t.kind == 1) {
      need(7, "sop parameters");
      t.groups = params[i];
      t.window = {params[i + 1], params[i + 2]};
      t.stride = {params[i + 3], params[i + 4]};
      t.padding = {params[i + 5], params[i + 6]};
      i += 7;
    } else {
      TORCH_CHECK(false, "lskd: distill_terms: term ", specs.size(), " has kind ", t.kind,
                  " (0 = pod_distill, 1 = sop_distill)");
    }
    specs.push_back(std::move(t));
  }
  return specs;
}

std::vector<TermSpec> check_terms(at::TensorList students, at::TensorList teachers, const OptTensorList& m,
                                  const OptTensorList& k, at::IntArrayRef params, int64_t reduction) {
  check_reduction("distill_terms", reduction);
  auto specs = parse_terms(params);
  const size_t T = specs.size();
  TORCH_CHECK(students.size() == T && teachers.size() == T && m.size() == T && k.size() == T,
              "lskd: distill_terms: params describe ", T, " terms but got ", students.size(), " students, ",
              teachers.size(), " teachers, ", m.size(), " spatial masks and ", k.size(), " channel masks");
  return specs;
}

// The backend's forward op of one term: (dist [N], auxiliary tensor for the backward).
std::tuple<at::Tensor, at::Tensor> term_forward(const TermSpec& t, const at::Tensor& student, const at::Tensor& teacher,
                                                const OptTensor& m, const OptTensor& k) {
  if (t.kind == 0) return pod_forward_op().call(student, teacher, m, k, t.scales, t.square);
  return sop_forward_op().call(student, teacher, m, k, t.groups, t.window, t.stride, t.padding);
}

// Backend kernel of distill_terms (CPU and CUDA): each term's forward op, then its reduction.
std::vector<at::Tensor> distill_terms_kernel(at::TensorList students, at::TensorList teachers, const OptTensorList& m,
                                             const OptTensorList& k, at::IntArrayRef params, int64_t reduction) {
  const auto specs = check_terms(students, teachers, m, k, params, reduction);
  std::vector<at::Tensor> out;
  out.reserve(specs.size());
  for (size_t t = 0; t < specs.size(); ++t) {
    auto fw = term_forward(specs[t], students[t], teachers[t], m.get(t), k.get(t));
    out.push_back(reduce(std::get<0>(fw), reduction));
  }
  return out;
}

// Inputs: the T students (differentiable); teachers, masks, params and the
// reduction are not variables. Saved: students, spatial masks, channel masks,
// dists, auxiliary tensors (T each, in that order); saved_data: params, reduction.
struct DistillTermsFunction : public torch::autograd::Function<DistillTermsFunction> {
  static variable_list forward(AutogradContext* ctx, at::TensorList students, const std::vector<at::Tensor>& teachers,
                               const OptTensorList& m, const OptTensorList& k, const std::vector<int64_t>& params,
                               int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const auto specs = parse_terms(params);
    const size_t T = specs.size();
    variable_list out, saved(5 * T);
    out.reserve(T);
    for (size_t t = 0; t < T; ++t) {
      const OptTensor mt = no_grad_input(m.get(t)), kt = no_grad_input(k.get(t));
      auto [dist, aux] = term_forward(specs[t], students[t], no_grad_input(teachers[t]), mt, kt);
      saved[t] = students[t];
      saved[T + t] = or_undefined(mt);
      saved[2 * T + t] = or_undefined(kt);
      saved[3 * T + t] = dist;
      saved[4 * T + t] = aux;
      out.push_back(reduce(dist, reduction));
    }
    ctx->save_for_backward(saved);
    ctx->saved_data["params"] = params;
    ctx->saved_data["reduction"] = reduction;
    ctx->set_materialize_grads(false);  // terms without a gradient stay undefined: no backward for them
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto specs = parse_terms(ctx->saved_data["params"].toIntVector());
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const size_t T = specs.size();
    variable_list out(T + 5);  // students, then teachers, spatial, channel, params, reduction (no gradient)
    const auto saved = ctx->get_saved_variables();
    std::optional<at::AutoDispatchBelowADInplaceOrView> below;  // as in pod_grad
    if (!at::GradMode::is_enabled()) below.emplace();
    // Last term first, as the engine runs separate terms: its inputs are the most recently read.
    for (size_t t = T; t-- > 0;) {
      if (!grads[t].defined() || !ctx->needs_input_grad(t)) continue;
      const TermSpec& spec = specs[t];
      const at::Tensor& student = saved[t];
      const at::Tensor& dist = saved[3 * T + t];
      const at::Tensor grad_dist = grad_of_dist(grads[t], reduction, dist.sym_size(0));
      const OptTensor mt = as_optional(saved[T + t]), kt = as_optional(saved[2 * T + t]);
      if (spec.kind == 0) {
        out[t] = pod_backward_op().call(grad_dist, student, mt, kt, dist, saved[4 * T + t], spec.scales, spec.square);
      } else {
        out[t] = sop_backward_op().call(grad_dist, student, mt, kt, dist, saved[4 * T + t], spec.groups, spec.window,
                                        spec.stride, spec.padding);
      }
    }
    return out;
  }
};

std::vector<at::Tensor> distill_terms_autograd(at::TensorList students, at::TensorList teachers, const OptTensorList& m,
                                               const OptTensorList& k, at::IntArrayRef params, int64_t reduction) {
  check_terms(students, teachers, m, k, params, reduction);
  bool graph = false;
  for (const auto& s : students) graph = graph || needs_graph(s);
  if (!graph) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return distill_terms_op().call(students, teachers, m, k, params, reduction);
  }
  return DistillTermsFunction::apply(students, teachers.vec(), m, k, params.vec(), reduction);
}

}  // namespace
}  // namespace lskd

TORCH_LIBRARY_IMPL(lskd, Autograd, m) {
  m.impl("pod_forward", &lskd::pod_forward_autograd);
  m.impl("sop_forward", &lskd::sop_forward_autograd);
  m.impl("pod_distill", &lskd::pod_distill_autograd);
  m.impl("sop_distill", &lskd::sop_distill_autograd);
  m.impl("distill_terms", &lskd::distill_terms_autograd);
}

// The fused loss ops run the backend's *_forward op and reduce; the same code
// serves every backend that has the *_forward kernel.
TORCH_LIBRARY_IMPL(lskd, CPU, m) {
  m.impl("pod_distill", &lskd::pod_distill_kernel);
  m.impl("sop_distill", &lskd::sop_distill_kernel);
  m.impl("distill_terms", &lskd::distill_terms_kernel);
}
#ifdef LSKD_WITH_CUDA
TORCH_LIBRARY_IMPL(lskd, CUDA, m) {
  m.impl("pod_distill", &lskd::pod_distill_kernel);
  m.impl("sop_distill", &lskd::sop_distill_kernel);
  m.impl("distill_terms", &lskd::distill_terms_kernel);
}
#endif
