// Local POD distance (docs/MATHEMATICS.md section 2.1, Local POD / MD): the schemas of
// lskd::pod_forward, lskd::pod_backward and lskd::pod_distill, their C++ autograd and the
// fused loss kernel. Kernels: csrc/cpu/pod_distill.cpp, csrc/cuda/pod_distill.cu,
// kernels/pod_distill.py (Triton). Conventions shared by every op: csrc/README.md.
//
// pod_forward
//   z = x_a^2 - x_b^2 if square else x_a - x_b.
//   For scale s: kh = H / s, kw = W / s, Hs = s * kh, Ws = s * kw.
//   emb [N, C, L], L = sum_s (s * Hs + s * Ws). For scale s at offset off_s:
//     emb[n, c, off_s + j * Hs + r]          = (1/kw) * sum_{col in [j*kw, (j+1)*kw)} z[n, c, r, col]
//                                               (r in [0, Hs), j in [0, s))
//     emb[n, c, off_s + s * Hs + i * Ws + q] = (1/kh) * sum_{row in [i*kh, (i+1)*kh)} z[n, c, row, q]
//                                               (q in [0, Ws), i in [0, s))
//   dist[n] = sqrt(sum_{c, l} emb[n, c, l]^2).
// pod_backward
//   grad_student[n, c, r, q] = (grad_dist[n] / dist[n], or 0 where dist == 0)
//       * sum_s [r < Hs and q < Ws] * (emb_w(s, j = q / kw, r) / kw + emb_h(s, i = r / kh, q) / kh)
//       * dz/da,  dz/da = 2 * a * (m * n)^2 if square else (m * n).
//   Output has the dtype and memory format of student (empty_like).
// pod_distill  (the loss term, one op and one autograd node)
//   pod_forward with the same arguments, then dist reduced over the batch: reduction 0 = none
//   ([N]), 1 = mean, 2 = sum (0-dim), as at::Reduction. One kernel for CPU and CUDA (below),
//   calling the backend's pod_forward; the backward calls pod_backward.
//
// Autograd (pod_forward, pod_distill): the forward calls the backend kernel through the
// dispatcher below autograd, the backward calls lskd::pod_backward through the dispatcher, so
// the CPU and CUDA kernels (and the fake kernels under torch.compile) are all used. emb is an
// auxiliary output: it gets no gradient (materialize_grads is off, so none is zero-filled).
#include "pod_distill.h"

#include "common.h"
#include "op_utils.h"

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lskd, m) {
  m.def(
      "pod_forward(Tensor student, Tensor teacher, Tensor? spatial_mask, Tensor? channel_mask, "
      "int[] scales, bool square) -> (Tensor dist, Tensor emb)");
  m.def(
      "pod_backward(Tensor grad_dist, Tensor student, Tensor? spatial_mask, Tensor? channel_mask, "
      "Tensor dist, Tensor emb, int[] scales, bool square) -> Tensor");
  m.def(
      "pod_distill(Tensor student, Tensor teacher, Tensor? spatial_mask, Tensor? channel_mask, "
      "int[] scales, bool square, int reduction) -> Tensor");
}

namespace lskd {
namespace {

using ForwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                                      const OptTensor&, at::IntArrayRef, bool);
using BackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                               const at::Tensor&, const at::Tensor&, at::IntArrayRef, bool);
using DistillSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, at::IntArrayRef,
                              bool, int64_t);

std::tuple<at::Tensor, at::Tensor> forward_op(const at::Tensor& student, const at::Tensor& teacher, const OptTensor& m,
                                              const OptTensor& k, at::IntArrayRef scales, bool square) {
  static const auto op = find_op<ForwardSig>("lskd::pod_forward");
  return op.call(student, teacher, m, k, scales, square);
}

at::Tensor backward_op(const at::Tensor& grad_dist, const at::Tensor& student, const OptTensor& m, const OptTensor& k,
                       const at::Tensor& dist, const at::Tensor& emb, at::IntArrayRef scales, bool square) {
  static const auto op = find_op<BackwardSig>("lskd::pod_backward");
  return op.call(grad_dist, student, m, k, dist, emb, scales, square);
}

// Saved: student, spatial_mask, channel_mask, dist, emb; saved_data: scales, square, reduction.
void save(AutogradContext* ctx, const at::Tensor& student, const OptTensor& m, const OptTensor& k,
          const at::Tensor& dist, const at::Tensor& emb, at::IntArrayRef scales, bool square, int64_t reduction) {
  ctx->save_for_backward({student, or_undefined(m), or_undefined(k), dist, emb});
  ctx->saved_data["scales"] = scales.vec();
  ctx->saved_data["square"] = square;
  ctx->saved_data["reduction"] = reduction;
  ctx->set_materialize_grads(false);
}

at::Tensor grad_student(AutogradContext* ctx, const at::Tensor& grad) {
  if (!grad.defined() || !ctx->needs_input_grad(0)) return at::Tensor();
  const auto saved = ctx->get_saved_variables();
  const at::Tensor& dist = saved[3];
  const auto scales = ctx->saved_data["scales"].toIntVector();
  const int64_t reduction = ctx->saved_data["reduction"].toInt();
  const at::Tensor grad_dist = grad_of_dist(grad, reduction, dist.sym_size(0));
  BelowAutogradUnlessRecording below;
  return backward_op(grad_dist, saved[0], as_optional(saved[1]), as_optional(saved[2]), dist, saved[4], scales,
                     ctx->saved_data["square"].toBool());
}

struct PodForwardFunction : public torch::autograd::Function<PodForwardFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                               const OptTensor& m, const OptTensor& k, at::IntArrayRef scales, bool square) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dist, emb] = forward_op(student, teacher, m, k, scales, square);
    save(ctx, student, m, k, dist, emb, scales, square, kNone);
    return {dist, emb};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // grads[1] (emb) is ignored: emb is an auxiliary output.
    variable_list out(6);
    out[0] = grad_student(ctx, grads[0]);
    return out;
  }
};

struct PodDistillFunction : public torch::autograd::Function<PodDistillFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                            const OptTensor& m, const OptTensor& k, at::IntArrayRef scales, bool square,
                            int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dist, emb] = forward_op(student, teacher, m, k, scales, square);
    save(ctx, student, m, k, dist, emb, scales, square, reduction);
    return reduce(dist, reduction);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(7);
    out[0] = grad_student(ctx, grads[0]);
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> pod_forward_autograd(const at::Tensor& student, const at::Tensor& teacher,
                                                        const OptTensor& m, const OptTensor& k, at::IntArrayRef scales,
                                                        bool square) {
  if (!needs_graph(student)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward_op(student, teacher, m, k, scales, square);
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
    static const auto op = find_op<DistillSig>("lskd::pod_distill");
    return op.call(student, teacher, m, k, scales, square, reduction);
  }
  return PodDistillFunction::apply(student, no_grad_input(teacher), no_grad_input(m), no_grad_input(k), scales, square,
                                   reduction);
}

// The kernel of pod_distill for every backend with a pod_forward kernel: pod_forward, then the reduction.
at::Tensor pod_distill_kernel(const at::Tensor& student, const at::Tensor& teacher, const OptTensor& m,
                              const OptTensor& k, at::IntArrayRef scales, bool square, int64_t reduction) {
  check_reduction("pod_distill", reduction);
  return reduce(std::get<0>(forward_op(student, teacher, m, k, scales, square)), reduction);
}

}  // namespace

PodTerm read_pod_term(TermReader& params) {
  const at::IntArrayRef head = params.take(2, "pod parameters");
  PodTerm term;
  term.square = head[0] != 0;
  const int64_t num_scales = head[1];
  TORCH_CHECK(num_scales >= 1 && num_scales <= kMaxScales, "lskd: distill_terms: term ", params.term(), " has ",
              num_scales, " scales (1 to ", kMaxScales, " are supported)");
  term.scales = params.take(static_cast<size_t>(num_scales), "scales").vec();
  return term;
}

std::tuple<at::Tensor, at::Tensor> term_forward(const PodTerm& term, const at::Tensor& student,
                                                const at::Tensor& teacher, const OptTensor& m, const OptTensor& k) {
  return forward_op(student, teacher, m, k, term.scales, term.square);
}

at::Tensor term_backward(const PodTerm& term, const at::Tensor& grad_dist, const at::Tensor& student,
                         const OptTensor& m, const OptTensor& k, const at::Tensor& dist, const at::Tensor& emb) {
  return backward_op(grad_dist, student, m, k, dist, emb, term.scales, term.square);
}

}  // namespace lskd

TORCH_LIBRARY_IMPL(lskd, Autograd, m) {
  m.impl("pod_forward", &lskd::pod_forward_autograd);
  m.impl("pod_distill", &lskd::pod_distill_autograd);
}
TORCH_LIBRARY_IMPL(lskd, CPU, m) {
  m.impl("pod_distill", &lskd::pod_distill_kernel);
}
#ifdef LSKD_WITH_CUDA
TORCH_LIBRARY_IMPL(lskd, CUDA, m) {
  m.impl("pod_distill", &lskd::pod_distill_kernel);
}
#endif
