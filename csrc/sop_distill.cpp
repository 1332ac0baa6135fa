// Second-order context pooling distance (docs/MATHEMATICS.md section 2.2, MCD): the schemas of
// lskd::sop_forward, lskd::sop_backward and lskd::sop_distill, their C++ autograd and the fused
// loss kernel. Kernels: csrc/cpu/sop_distill.cpp, csrc/cuda/sop_distill.cu,
// kernels/sop_distill.py (Triton). Conventions shared by every op: csrc/README.md.
//
// sop_forward
//   k = C / groups; channels >= groups * k are dropped.
//   Average pooling of x_a, x_b over each channel with window (wh, ww),
//   stride (sh, sw), padding (ph, pw), divisor wh * ww (count_include_pad):
//     Ho = (H + 2 ph - wh) / sh + 1, Wo = (W + 2 pw - ww) / sw + 1.
//   At each pooled position and group, p (student), q (teacher) in R^k,
//   u = p - q, v = p + q, term = 0.5 * (|u|^2 |v|^2 + (u.v)^2).
//   dist[n] = sqrt(sum of terms over groups and positions).
//   pooled_grad [N, groups * k, Ho, Wo] = d(sum of terms)/dp
//                                       = (|v|^2 + u.v) u + (|u|^2 + u.v) v.
//   The global variant is window = (H, W), stride = (1, 1), padding = (0, 0).
// sop_backward
//   grad_student[n, c, h, w] = (c < groups * k) * m * n
//       * (grad_dist[n] / (2 dist[n]), or 0 where dist == 0) / (wh * ww)
//       * sum over pooled positions (ho, wo) whose window covers (h, w) of pooled_grad[n, c, ho, wo].
//   student is passed for its shape, dtype and memory format only.
// sop_distill  (the loss term, one op and one autograd node)
//   sop_forward with the same arguments, then dist reduced over the batch: reduction 0 = none
//   ([N]), 1 = mean, 2 = sum (0-dim), as at::Reduction. One kernel for CPU and CUDA (below),
//   calling the backend's sop_forward; the backward calls sop_backward.
//
// Autograd (sop_forward, sop_distill): as for Local POD (csrc/pod_distill.cpp); pooled_grad is
// an auxiliary output and gets no gradient.
#include "sop_distill.h"

#include "op_utils.h"

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lskd, m) {
  m.def(
      "sop_forward(Tensor student, Tensor teacher, Tensor? spatial_mask, Tensor? channel_mask, "
      "int groups, int[] window, int[] stride, int[] padding) -> (Tensor dist, Tensor pooled_grad)");
  m.def(
      "sop_backward(Tensor grad_dist, Tensor student, Tensor? spatial_mask, Tensor? channel_mask, "
      "Tensor dist, Tensor pooled_grad, int groups, int[] window, int[] stride, int[] padding) -> Tensor");
  m.def(
      "sop_distill(Tensor student, Tensor teacher, Tensor? spatial_mask, Tensor? channel_mask, "
      "int groups, int[] window, int[] stride, int[] padding, int reduction) -> Tensor");
}

namespace lskd {
namespace {

using ForwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                                      const OptTensor&, int64_t, at::IntArrayRef, at::IntArrayRef,
                                                      at::IntArrayRef);
using BackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                               const at::Tensor&, const at::Tensor&, int64_t, at::IntArrayRef, at::IntArrayRef,
                               at::IntArrayRef);
using DistillSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, int64_t,
                              at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t);

std::tuple<at::Tensor, at::Tensor> forward_op(const at::Tensor& student, const at::Tensor& teacher, const OptTensor& m,
                                              const OptTensor& k, int64_t groups, at::IntArrayRef window,
                                              at::IntArrayRef stride, at::IntArrayRef padding) {
  static const auto op = find_op<ForwardSig>("lskd::sop_forward");
  return op.call(student, teacher, m, k, groups, window, stride, padding);
}

at::Tensor backward_op(const at::Tensor& grad_dist, const at::Tensor& student, const OptTensor& m, const OptTensor& k,
                       const at::Tensor& dist, const at::Tensor& pooled_grad, int64_t groups, at::IntArrayRef window,
                       at::IntArrayRef stride, at::IntArrayRef padding) {
  static const auto op = find_op<BackwardSig>("lskd::sop_backward");
  return op.call(grad_dist, student, m, k, dist, pooled_grad, groups, window, stride, padding);
}

// Saved: student, spatial_mask, channel_mask, dist, pooled_grad;
// saved_data: groups, window, stride, padding, reduction.
void save(AutogradContext* ctx, const at::Tensor& student, const OptTensor& m, const OptTensor& k,
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

at::Tensor grad_student(AutogradContext* ctx, const at::Tensor& grad) {
  if (!grad.defined() || !ctx->needs_input_grad(0)) return at::Tensor();
  const auto saved = ctx->get_saved_variables();
  const at::Tensor& dist = saved[3];
  const auto window = ctx->saved_data["window"].toIntVector();
  const auto stride = ctx->saved_data["stride"].toIntVector();
  const auto padding = ctx->saved_data["padding"].toIntVector();
  const int64_t reduction = ctx->saved_data["reduction"].toInt();
  const at::Tensor grad_dist = grad_of_dist(grad, reduction, dist.sym_size(0));
  BelowAutogradUnlessRecording below;
  return backward_op(grad_dist, saved[0], as_optional(saved[1]), as_optional(saved[2]), dist, saved[4],
                     ctx->saved_data["groups"].toInt(), window, stride, padding);
}

struct SopForwardFunction : public torch::autograd::Function<SopForwardFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                               const OptTensor& m, const OptTensor& k, int64_t groups, at::IntArrayRef window,
                               at::IntArrayRef stride, at::IntArrayRef padding) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dist, pooled_grad] = forward_op(student, teacher, m, k, groups, window, stride, padding);
    save(ctx, student, m, k, dist, pooled_grad, groups, window, stride, padding, kNone);
    return {dist, pooled_grad};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // grads[1] (pooled_grad) is ignored: it is an auxiliary output.
    variable_list out(8);
    out[0] = grad_student(ctx, grads[0]);
    return out;
  }
};

struct SopDistillFunction : public torch::autograd::Function<SopDistillFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                            const OptTensor& m, const OptTensor& k, int64_t groups, at::IntArrayRef window,
                            at::IntArrayRef stride, at::IntArrayRef padding, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dist, pooled_grad] = forward_op(student, teacher, m, k, groups, window, stride, padding);
    save(ctx, student, m, k, dist, pooled_grad, groups, window, stride, padding, reduction);
    return reduce(dist, reduction);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(9);
    out[0] = grad_student(ctx, grads[0]);
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> sop_forward_autograd(const at::Tensor& student, const at::Tensor& teacher,
                                                        const OptTensor& m, const OptTensor& k, int64_t groups,
                                                        at::IntArrayRef window, at::IntArrayRef stride,
                                                        at::IntArrayRef padding) {
  if (!needs_graph(student)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward_op(student, teacher, m, k, groups, window, stride, padding);
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
    static const auto op = find_op<DistillSig>("lskd::sop_distill");
    return op.call(student, teacher, m, k, groups, window, stride, padding, reduction);
  }
  return SopDistillFunction::apply(student, no_grad_input(teacher), no_grad_input(m), no_grad_input(k), groups, window,
                                   stride, padding, reduction);
}

// The kernel of sop_distill for every backend with a sop_forward kernel: sop_forward, then the reduction.
at::Tensor sop_distill_kernel(const at::Tensor& student, const at::Tensor& teacher, const OptTensor& m,
                              const OptTensor& k, int64_t groups, at::IntArrayRef window, at::IntArrayRef stride,
                              at::IntArrayRef padding, int64_t reduction) {
  check_reduction("sop_distill", reduction);
  return reduce(std::get<0>(forward_op(student, teacher, m, k, groups, window, stride, padding)), reduction);
}

}  // namespace

SopTerm read_sop_term(TermReader& params) {
  const at::IntArrayRef p = params.take(7, "sop parameters");
  SopTerm term;
  term.groups = p[0];
  term.window = {p[1], p[2]};
  term.stride = {p[3], p[4]};
  term.padding = {p[5], p[6]};
  return term;
}

std::tuple<at::Tensor, at::Tensor> term_forward(const SopTerm& term, const at::Tensor& student,
                                                const at::Tensor& teacher, const OptTensor& m, const OptTensor& k) {
  return forward_op(student, teacher, m, k, term.groups, term.window, term.stride, term.padding);
}

at::Tensor term_backward(const SopTerm& term, const at::Tensor& grad_dist, const at::Tensor& student,
                         const OptTensor& m, const OptTensor& k, const at::Tensor& dist,
                         const at::Tensor& pooled_grad) {
  return backward_op(grad_dist, student, m, k, dist, pooled_grad, term.groups, term.window, term.stride, term.padding);
}

}  // namespace lskd

TORCH_LIBRARY_IMPL(lskd, Autograd, m) {
  m.impl("sop_forward", &lskd::sop_forward_autograd);
  m.impl("sop_distill", &lskd::sop_distill_autograd);
}
TORCH_LIBRARY_IMPL(lskd, CPU, m) {
  m.impl("sop_distill", &lskd::sop_distill_kernel);
}
#ifdef LSKD_WITH_CUDA
TORCH_LIBRARY_IMPL(lskd, CUDA, m) {
  m.impl("sop_distill", &lskd::sop_distill_kernel);
}
#endif
