// Several loss terms in one op and one autograd node: the schema of lskd::distill_terms, its
// C++ autograd and its kernel (one for CPU and CUDA, calling the backend's *_forward ops; the
// backward calls *_backward). Conventions shared by every op: csrc/README.md.
//
// distill_terms
//   Term t is pod_distill (kind 0) or sop_distill (kind 1) of (student[t], teacher[t],
//   spatial_mask[t], channel_mask[t]) with the batch reduction `reduction` (1 = mean, 2 = sum);
//   the output is the list of the T reduced distances (0-dim each). The same student may appear
//   in several terms (its gradients add up). params holds the terms one after the other, each
//   its kind and then its op's parameters as that op reads them (csrc/distill_terms.h): pod by
//   read_pod_term (csrc/pod_distill.cpp), sop by read_sop_term (csrc/sop_distill.cpp); the
//   Python side packs them in lskd/ops/<op>.py. The layout lives with each op only.
//   The backward of term t runs only when its output gets a gradient, so
//   torch.autograd.grad of one term costs one term's backward.
#include "distill_terms.h"

#include "op_utils.h"
#include "pod_distill.h"
#include "sop_distill.h"

#include <torch/library.h>

#include <variant>
#include <vector>

TORCH_LIBRARY_FRAGMENT(lskd, m) {
  m.def(
      "distill_terms(Tensor[] student, Tensor[] teacher, Tensor?[] spatial_mask, Tensor?[] channel_mask, "
      "int[] params, int reduction) -> Tensor[]");
}

namespace lskd {
namespace {

using Term = std::variant<PodTerm, SopTerm>;

std::vector<Term> parse_terms(at::IntArrayRef params) {
  std::vector<Term> terms;
  TermReader reader(params);
  while (!reader.done()) {
    const int64_t kind = reader.next_kind();
    if (kind == 0) {
      terms.emplace_back(read_pod_term(reader));
    } else if (kind == 1) {
      terms.emplace_back(read_sop_term(reader));
    } else {
      TORCH_CHECK(false, "lskd: distill_terms: term ", reader.term(), " has kind ", kind,
                  " (0 = pod_distill, 1 = sop_distill)");
    }
    reader.end_term();
  }
  return terms;
}

std::vector<Term> check_terms(at::TensorList students, at::TensorList teachers, const OptTensorList& m,
                              const OptTensorList& k, at::IntArrayRef params, int64_t reduction) {
  check_reduction("distill_terms", reduction);
  auto terms = parse_terms(params);
  const size_t T = terms.size();
  TORCH_CHECK(students.size() == T && teachers.size() == T && m.size() == T && k.size() == T,
              "lskd: distill_terms: params describe ", T, " terms but got ", students.size(), " students, ",
              teachers.size(), " teachers, ", m.size(), " spatial masks and ", k.size(), " channel masks");
  return terms;
}

// The backend's forward op of one term: (dist [N], auxiliary tensor for the backward).
std::tuple<at::Tensor, at::Tensor> forward(const Term& term, const at::Tensor& student, const at::Tensor& teacher,
                                           const OptTensor& m, const OptTensor& k) {
  return std::visit([&](const auto& t) { return term_forward(t, student, teacher, m, k); }, term);
}

// Kernel of distill_terms (CPU and CUDA): each term's forward op, then its reduction.
std::vector<at::Tensor> distill_terms_kernel(at::TensorList students, at::TensorList teachers, const OptTensorList& m,
                                             const OptTensorList& k, at::IntArrayRef params, int64_t reduction) {
  const auto terms = check_terms(students, teachers, m, k, params, reduction);
  std::vector<at::Tensor> out;
  out.reserve(terms.size());
  for (size_t t = 0; t < terms.size(); ++t) {
    auto fw = forward(terms[t], students[t], teachers[t], m.get(t), k.get(t));
    out.push_back(reduce(std::get<0>(fw), reduction));
  }
  return out;
}

// Inputs: the T students (differentiable); teachers, masks, params and the reduction are not
// variables. Saved: students, spatial masks, channel masks, dists, auxiliary tensors (T each, in
// that order); saved_data: params, reduction.
struct DistillTermsFunction : public torch::autograd::Function<DistillTermsFunction> {
  static variable_list forward(AutogradContext* ctx, at::TensorList students, const std::vector<at::Tensor>& teachers,
                               const OptTensorList& m, const OptTensorList& k, const std::vector<int64_t>& params,
                               int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const auto terms = parse_terms(params);
    const size_t T = terms.size();
    variable_list out, saved(5 * T);
    out.reserve(T);
    for (size_t t = 0; t < T; ++t) {
      const OptTensor mt = no_grad_input(m.get(t)), kt = no_grad_input(k.get(t));
      auto [dist, aux] = lskd::forward(terms[t], students[t], no_grad_input(teachers[t]), mt, kt);
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
    const auto terms = parse_terms(ctx->saved_data["params"].toIntVector());
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const size_t T = terms.size();
    variable_list out(T + 5);  // students, then teachers, spatial, channel, params, reduction (no gradient)
    const auto saved = ctx->get_saved_variables();
    BelowAutogradUnlessRecording below;
    // Last term first, as the engine runs separate terms: its inputs are the most recently read.
    for (size_t t = T; t-- > 0;) {
      if (!grads[t].defined() || !ctx->needs_input_grad(t)) continue;
      const at::Tensor& dist = saved[3 * T + t];
      const at::Tensor grad_dist = grad_of_dist(grads[t], reduction, dist.sym_size(0));
      const OptTensor mt = as_optional(saved[T + t]), kt = as_optional(saved[2 * T + t]);
      out[t] = std::visit(
          [&](const auto& term) { return term_backward(term, grad_dist, saved[t], mt, kt, dist, saved[4 * T + t]); },
          terms[t]);
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
    using Sig = std::vector<at::Tensor>(at::TensorList, at::TensorList, const OptTensorList&, const OptTensorList&,
                                        at::IntArrayRef, int64_t);
    static const auto op = find_op<Sig>("lskd::distill_terms");
    return op.call(students, teachers, m, k, params, reduction);
  }
  return DistillTermsFunction::apply(students, teachers.vec(), m, k, params.vec(), reduction);
}

}  // namespace
}  // namespace lskd

TORCH_LIBRARY_IMPL(lskd, Autograd, m) {
  m.impl("distill_terms", &lskd::distill_terms_autograd);
}
TORCH_LIBRARY_IMPL(lskd, CPU, m) {
  m.impl("distill_terms", &lskd::distill_terms_kernel);
}
#ifdef LSKD_WITH_CUDA
TORCH_LIBRARY_IMPL(lskd, CUDA, m) {
  m.impl("distill_terms", &lskd::distill_terms_kernel);
}
#endif
